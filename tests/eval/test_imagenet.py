"""ImageNet-style classification evaluation: label files, both data layouts, top-k, agreement, dtypes, results.

Top-k and agreement are checked exactly on a fake model with known logits over synthetic images; the
pipeline with a tiny random-weight timm ViT on a few real images of ``imagenet-val-subset`` where the
shared assets exist (random weights: the accuracies mean nothing, the bookkeeping is what is tested).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import cubistmerge
from cubistmerge.assets import assets_dir
from cubistmerge.eval import (
    ImageNetDataset,
    ImageNetResult,
    SampleRecord,
    accuracy_from_records,
    evaluate_imagenet,
    imagenet_synsets,
    model_data_config,
    read_label_file,
    read_synsets,
)


def _imagenet_dir() -> Path | None:
    try:
        path = assets_dir() / "imagenet-val-subset"
    except FileNotFoundError:
        return None
    return path if (path / "labels.txt").is_file() and (path / "images").is_dir() else None


IMAGENET = _imagenet_dir()
needs_imagenet = pytest.mark.skipif(
    IMAGENET is None,
    reason="shared assets imagenet-val-subset (images/, labels.txt) not found: set $CUBISTMERGE_ASSETS or provide "
    "<repo>/../shared/assets",
)
NUM_REAL = 8  # real images used by the tiny-ViT tests


def tiny_vit(**kwargs) -> nn.Module:
    """A random-weight ViT small enough for the shared CPU (fixed seed: the same weights every call)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{"img_size": 64, "depth": 4, **kwargs})


def real_subset() -> list[tuple[str, int]]:
    assert IMAGENET is not None
    return read_label_file(IMAGENET / "labels.txt")[:NUM_REAL]


def write_wnid_tree(root: Path, entries: list[tuple[str, int]]) -> Path:
    """An ImageFolder tree of symlinks to real images, one WordNet-id folder per class."""
    assert IMAGENET is not None
    wnids = read_synsets(IMAGENET / "synset_words.txt")
    for name, label in entries:
        folder = root / wnids[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(IMAGENET / "images" / name)
    return root


# --------------------------------------------------------------------------- label and synset files


def test_read_label_file_formats(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# a comment\nb.JPEG, 3\n\n  a.png,12  \nwith space.jpg 7\nodd, name.jpg, 0\n", encoding="utf-8")
    assert read_label_file(path) == [("b.JPEG", 3), ("a.png", 12), ("with space.jpg", 7), ("odd, name.jpg", 0)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.jpg\n", r"labels.txt:1: expected 'file, index'"),
        ("a.jpg, 1\nb.jpg, one\n", r"labels.txt:2: expected 'file, index'"),
        ("a.jpg, 1.5\n", r"expected 'file, index'"),
        (", 4\n", r"expected 'file, index'"),
        ("a.jpg, -1\n", r"labels.txt:1: class index must be >= 0"),
        ("a.jpg, 1\n# x\na.jpg, 2\n", r"labels.txt:3: 'a.jpg' is listed twice \(first on line 1\)"),
        ("# only a comment\n\n", r"has no 'file, index' line"),
    ],
)
def test_read_label_file_errors(tmp_path, text, match):
    path = tmp_path / "labels.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_label_file(path)


def test_read_label_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="label file not found"):
        read_label_file(tmp_path / "nope.txt")


def test_read_synsets_and_timm_list(tmp_path):
    standard = imagenet_synsets()
    assert len(standard) == 1000 and standard[0] == "n01440764" and standard == sorted(standard)
    path = tmp_path / "synset_words.txt"
    path.write_text("n00000002 two, words\nn00000001 one\n", encoding="utf-8")
    assert read_synsets(path) == ["n00000002", "n00000001"]
    with pytest.raises(ValueError, match="not WordNet ids"):
        read_synsets(["n01440764", "cat"])
    with pytest.raises(ValueError, match="listed twice"):
        read_synsets(["n01440764", "n01440764"])


@needs_imagenet
def test_asset_synset_file_is_the_standard_order():
    assert read_synsets(IMAGENET / "synset_words.txt") == imagenet_synsets()


# --------------------------------------------------------------------------- synthetic data and a fake model


def _pixel_id(image: Image.Image) -> torch.Tensor:
    """Transform of the synthetic images: their id, read back from the red channel."""
    return torch.tensor([float(image.getpixel((0, 0))[0])])


def write_synthetic(folder: Path, count: int) -> list[str]:
    """``count`` solid 4x4 PNGs whose red channel is 10 * id (ids 0..count-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(count):
        name = f"img{k}.png"
        Image.new("RGB", (4, 4), (10 * k, 0, 0)).save(folder / name)
        names.append(name)
    return names


class FixedLogits(nn.Module):
    """Returns, for each image, the logits of its id: class ``c`` scores ``10 - rank of c`` in ``rankings[id]``."""

    def __init__(self, rankings: list[list[int]]) -> None:
        super().__init__()
        num_classes = len(rankings[0])
        table = torch.zeros(len(rankings), num_classes)
        for row, ranking in enumerate(rankings):
            for position, klass in enumerate(ranking):
                table[row, klass] = 10.0 - position
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 0] / 10).round().long()
        return self.table[ids]


# labels, and rankings whose top-1 / top-5 outcome is known: 2 of 6 top-1, 4 of 6 top-5
LABELS = [3, 2, 6, 0, 5, 1]
RANKINGS = [
    [3, 0, 1, 2, 4, 5, 6],  # top-1 hit
    [0, 2, 1, 3, 4, 5, 6],  # second: top-5 only
    [1, 2, 3, 4, 5, 6, 0],  # label 6 sixth: miss
    [0, 1, 2, 3, 4, 5, 6],  # top-1 hit
    [4, 3, 2, 1, 5, 0, 6],  # fifth: top-5 only
    [2, 3, 4, 5, 6, 0, 1],  # last: miss
]
# against RANKINGS: the same top-1 on ids 0, 2, 3, 4 (agreement 4/6); top-1 hits on ids 0, 1, 3, 5 (4/6);
# top-5 misses only id 2 (label 6 is last): 5/6
OTHER = [
    [3, 1, 0, 2, 4, 5, 6],
    [2, 0, 1, 3, 4, 5, 6],
    [1, 0, 2, 3, 4, 5, 6],
    [0, 1, 2, 3, 4, 5, 6],
    [4, 5, 3, 2, 1, 0, 6],
    [1, 2, 3, 4, 5, 6, 0],
]


@pytest.fixture()
def synthetic(tmp_path) -> Path:
    names = write_synthetic(tmp_path / "flat", len(LABELS))
    lines = [f"{name}, {label}" for name, label in zip(names, LABELS, strict=True)]
    (tmp_path / "flat" / "labels.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "flat"


def test_topk_and_agreement_on_known_logits(synthetic):
    models = {"ref": FixedLogits(RANKINGS), "other": FixedLogits(OTHER)}
    result = evaluate_imagenet(models, synthetic, reference="ref", batch_size=4, transform=_pixel_id, progress=False)
    assert result.num_images == 6
    assert result["ref"].top1 == pytest.approx(2 / 6)
    assert result["ref"].top5 == pytest.approx(4 / 6)
    assert result["ref"].agreement == 1.0
    assert result["other"].top1 == pytest.approx(4 / 6)
    assert result["other"].top5 == pytest.approx(5 / 6)
    assert result["other"].agreement == pytest.approx(4 / 6)
    first = result.samples[0]
    assert (first.index, first.file, first.label, first.reference_top1) == (0, "img0.png", 3, 3)
    assert first.predictions == {"ref": [3, 0, 1, 2, 4], "other": [3, 1, 0, 2, 4]}
    assert [s.index for s in result.samples] == list(range(6))


def test_without_reference_and_with_given_predictions(synthetic):
    models = {"a": FixedLogits(RANKINGS)}
    plain = evaluate_imagenet(models, synthetic, transform=_pixel_id, progress=False)
    assert plain["a"].agreement is None and plain.reference is None
    assert all(s.reference_top1 is None for s in plain.samples)
    given = plain.top1_by_file("a")
    assert given == {f"img{k}.png": RANKINGS[k][0] for k in range(6)}
    other = evaluate_imagenet(
        {"other": FixedLogits(OTHER)}, synthetic, reference=given, transform=_pixel_id, progress=False
    )
    assert other["other"].agreement == pytest.approx(4 / 6)
    assert other.reference == "given predictions"
    with pytest.raises(ValueError, match="lack 1 of the evaluated files"):
        evaluate_imagenet(
            models, synthetic, reference={f"img{k}.png": 0 for k in range(5)}, transform=_pixel_id, progress=False
        )


def test_max_images_and_fewer_than_five_classes(tmp_path):
    names = write_synthetic(tmp_path, 3)
    labels = {name: label for name, label in zip(names, [0, 1, 2], strict=True)}
    rankings = [[0, 1, 2], [2, 0, 1], [0, 1, 2]]
    result = evaluate_imagenet(FixedLogits(rankings), tmp_path, labels, transform=_pixel_id, progress=False)
    assert result.labels == ["model"]
    assert result["model"].top5 == 1.0  # only 3 classes: every label is among the best 3
    assert result.samples[1].predictions["model"] == [2, 0, 1]
    first_two = evaluate_imagenet(
        FixedLogits(rankings), tmp_path, labels, transform=_pixel_id, max_images=2, progress=False
    )
    assert first_two.num_images == 2 and first_two["model"].top1 == 0.5
    none = evaluate_imagenet(FixedLogits(rankings), tmp_path, labels, transform=_pixel_id, max_images=0, progress=False)
    assert none.num_images == 0 and math.isnan(none["model"].top1)


def test_label_out_of_range_for_the_model(synthetic, tmp_path):
    wide = [r + [7] for r in RANKINGS]  # 8 classes: fine
    evaluate_imagenet(FixedLogits(wide), synthetic, transform=_pixel_id, progress=False)
    narrow = [[c for c in r if c < 6] for r in RANKINGS]  # 6 classes, label 6 of img2 out of range
    with pytest.raises(ValueError, match=r"label 6 of 'img2.png' is out of range for model 'model' with 6 classes"):
        evaluate_imagenet(FixedLogits(narrow), synthetic, transform=_pixel_id, progress=False)


def test_model_output_must_be_logits(synthetic):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match=r"must return logits of shape \(4, num_classes\), got tuple"):
        evaluate_imagenet(Pair(), synthetic, transform=_pixel_id, batch_size=4, progress=False)


def test_argument_errors(synthetic):
    model = FixedLogits(RANKINGS)
    common = {"transform": _pixel_id, "progress": False}
    with pytest.raises(ValueError, match="reference 'nope' is not one of the model labels"):
        evaluate_imagenet({"a": model}, synthetic, reference="nope", **common)
    with pytest.raises(ValueError, match="dtype must be one of"):
        evaluate_imagenet(model, synthetic, dtype="int8", **common)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_imagenet(model, synthetic, batch_size=0, **common)
    with pytest.raises(ValueError, match="max_images must be >= 0"):
        evaluate_imagenet(model, synthetic, max_images=-1, **common)
    with pytest.raises(ValueError, match="models is empty"):
        evaluate_imagenet({}, synthetic, **common)
    with pytest.raises(TypeError, match=r"models\['a'\] must be a torch.nn.Module"):
        evaluate_imagenet({"a": "resnet"}, synthetic, **common)
    with pytest.raises(ValueError, match="labels= is only for a folder"):
        evaluate_imagenet(model, ImageNetDataset(synthetic), synthetic / "labels.txt", **common)


def test_accuracy_from_records_by_hand():
    samples = [
        SampleRecord(0, "a", 1, {"m": [1, 2], "n": [2, 1]}, 1),
        SampleRecord(1, "b", 2, {"m": [1, 2], "n": [2, 1]}, 2),
        SampleRecord(2, "c", 0, {"m": [1, 2], "n": [1, 2]}, 1),
    ]
    m, n = accuracy_from_records(samples, ["m", "n"], {"m": 0.3})
    assert (m.top1, m.top5, m.agreement) == (pytest.approx(1 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (n.top1, n.top5, n.agreement) == (pytest.approx(1 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert m.forward_ms_per_image == pytest.approx(100.0) and math.isnan(n.forward_ms_per_image)
    with pytest.raises(ValueError, match="some records have a reference"):
        accuracy_from_records([samples[0], SampleRecord(3, "d", 0, {"m": [0]})], ["m"])


def test_result_outputs(synthetic):
    result = evaluate_imagenet(
        {"ref": FixedLogits(RANKINGS), "other": FixedLogits(OTHER)},
        synthetic,
        reference="ref",
        transform=_pixel_id,
        progress=False,
    )
    data = json.loads(result.to_json())
    assert data["models"][1]["label"] == "other" and data["models"][1]["agreement"] == pytest.approx(4 / 6)
    assert data["samples"][2]["predictions"]["ref"] == [1, 2, 3, 4, 5]
    assert data["settings"]["layout"] == "label_file" and data["settings"]["transform"] == "given"
    assert "samples" not in result.to_dict(samples=False)
    rebuilt = ImageNetResult.from_dict(data)
    assert rebuilt == result and rebuilt.top1_by_file("ref") == result.top1_by_file("ref")
    markdown = result.to_markdown()
    assert "| method | images | top-1 | top-5 | agreement with ref | ms/image |" in markdown
    assert "| other | 6 | 66.67% | 83.33% | 66.67% |" in markdown
    text = result.to_text()
    assert "agreement with ref" in text and "other: top-1 66.67%  top-5 83.33%  agreement 66.67%" in text
    with pytest.raises(KeyError, match="no model labelled 'x'"):
        result["x"]


# --------------------------------------------------------------------------- layouts


def test_flat_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageNetDataset(tmp_path / "absent")
    names = write_synthetic(tmp_path / "flat", 2)
    with pytest.raises(FileNotFoundError, match="neither class sub-folders nor a label file"):
        ImageNetDataset(tmp_path / "flat")
    (tmp_path / "flat" / "labels.txt").write_text(
        f"{names[0]}, 0\ngone.png, 1\nalso-gone.png, 1\n{names[1]}, 1\n", encoding="utf-8"
    )
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 images listed in .*labels.txt .*'gone.png', 'also-gone"):
        ImageNetDataset(tmp_path / "flat")
    with pytest.raises(ValueError, match=r"labels\['img0.png'\] must be a class index"):
        ImageNetDataset(tmp_path / "flat", {"img0.png": -2})
    with pytest.raises(FileNotFoundError, match="label file not found"):
        ImageNetDataset(tmp_path / "flat", tmp_path / "other.txt")


def test_flat_layout_finds_images_subfolder(tmp_path):
    names = write_synthetic(tmp_path / "root" / "images", 3)
    (tmp_path / "root" / "labels.txt").write_text(f"{names[2]} 1\n{names[0]} 0\n", encoding="utf-8")
    dataset = ImageNetDataset(tmp_path / "root")
    assert dataset.layout == "label_file"
    assert dataset.files == ("img2.png", "img0.png") and dataset.targets == (1, 0)
    assert dataset.paths[0] == tmp_path / "root" / "images" / "img2.png"
    image, label, index = dataset[1]
    assert image.mode == "RGB" and (label, index) == (0, 1)


def test_folder_layout_sorted_like_torchvision(tmp_path):
    root = tmp_path / "tree"
    write_synthetic(root / "cat", 2)
    write_synthetic(root / "ant" / "nested", 1)
    write_synthetic(root / "bee", 1)
    (root / "bee" / "notes.txt").write_text("not an image", encoding="utf-8")
    (root / "bee" / "UPPER.JPG").write_bytes((root / "cat" / "img0.png").read_bytes())
    dataset = ImageNetDataset(root)
    assert dataset.layout == "folders" and dataset.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}
    assert dataset.files == ("ant/nested/img0.png", "bee/UPPER.JPG", "bee/img0.png", "cat/img0.png", "cat/img1.png")
    assert dataset.targets == (0, 1, 1, 2, 2)
    assert dataset.label_source == "folders in sorted order"
    with pytest.raises(ValueError, match="class_index='synsets' needs WordNet-id class folders"):
        ImageNetDataset(root, class_index="synsets")
    with pytest.raises(ValueError, match="class_index must be 'auto', 'sorted' or 'synsets'"):
        ImageNetDataset(root, class_index="alphabetical")
    (root / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class folder .*empty' holds no image"):
        ImageNetDataset(root)


def test_folder_layout_wordnet_ids(tmp_path):
    root = tmp_path / "tree"
    write_synthetic(root / "n01443537", 1)  # standard index 1
    write_synthetic(root / "n01440764", 1)  # standard index 0
    write_synthetic(root / "n15075141", 1)  # standard index 999
    standard = ImageNetDataset(root)
    assert standard.class_to_idx == {"n01440764": 0, "n01443537": 1, "n15075141": 999}
    assert standard.label_source == "folders indexed by timm imagenet-1k synsets"
    assert ImageNetDataset(root, class_index="sorted").targets == (0, 1, 2)
    given = ImageNetDataset(root, synsets=["n15075141", "n01443537", "n01440764"])
    assert given.targets == (2, 1, 0)
    # a synset file next to the data is found by itself
    (tmp_path / "synset_words.txt").write_text("n01443537 a\nn01440764 b\nn15075141 c\n", encoding="utf-8")
    assert ImageNetDataset(root).targets == (1, 0, 2)
    write_synthetic(root / "n99999999", 1)
    with pytest.raises(ValueError, match=r"class folders not in the synset list .*\['n99999999'\]"):
        ImageNetDataset(root)


@needs_imagenet
def test_real_layouts_give_the_same_labels(tmp_path):
    entries = real_subset()
    flat = ImageNetDataset(IMAGENET)
    assert flat.layout == "label_file" and len(flat) == 1300
    assert list(zip(flat.files, flat.targets, strict=True))[:NUM_REAL] == entries
    tree = ImageNetDataset(write_wnid_tree(tmp_path / "tree", entries))
    assert tree.layout == "folders"
    by_name = {Path(name).name: target for name, target in zip(tree.files, tree.targets, strict=True)}
    assert by_name == dict(entries)  # standard indices, though the tree holds only a few classes


# --------------------------------------------------------------------------- a tiny ViT on real images


def test_model_data_config_uses_the_built_image_size():
    config = model_data_config(tiny_vit())
    assert config["input_size"] == (3, 64, 64) and config["interpolation"] == "bicubic"
    assert model_data_config(tiny_vit(), {"crop_pct": 1.0})["crop_pct"] == 1.0


@needs_imagenet
def test_tiny_vit_both_layouts_and_agreement(tmp_path):
    entries = real_subset()
    base = tiny_vit()
    same = copy.deepcopy(base)
    merged = cubistmerge.patch(copy.deepcopy(base), "tome", r=3)
    models = {"none": base, "same": same, "tome": merged}
    flat = evaluate_imagenet(models, IMAGENET, reference="none", batch_size=3, max_images=NUM_REAL, progress=False)
    assert flat.num_images == NUM_REAL and flat.settings["input_size"] == [3, 64, 64]
    assert flat["none"].agreement == 1.0 and flat["same"].agreement == 1.0
    # merging changes predictions of a random model somewhere or not at all: check the bookkeeping
    for label in models:
        records = [s.predictions[label] for s in flat.samples]
        assert flat[label].agreement == pytest.approx(
            sum(p[0] == s.predictions["none"][0] for p, s in zip(records, flat.samples, strict=True)) / NUM_REAL
        )
        assert flat[label].top1 == pytest.approx(
            sum(p[0] == s.label for p, s in zip(records, flat.samples, strict=True)) / NUM_REAL
        )
        assert flat[label].top5 == pytest.approx(
            sum(s.label in p for p, s in zip(records, flat.samples, strict=True)) / NUM_REAL
        )
        assert all(len(p) == 5 and len(set(p)) == 5 for p in records)

    tree = evaluate_imagenet(
        models, write_wnid_tree(tmp_path / "tree", entries), reference="none", batch_size=5, progress=False
    )
    assert tree.settings["layout"] == "folders" and tree.num_images == NUM_REAL
    flat_by_file = {s.file: (s.label, s.predictions) for s in flat.samples}
    assert {Path(s.file).name: (s.label, s.predictions) for s in tree.samples} == flat_by_file
    for label in models:
        assert (tree[label].top1, tree[label].top5, tree[label].agreement) == (
            flat[label].top1,
            flat[label].top5,
            flat[label].agreement,
        )


@needs_imagenet
def test_tiny_vit_label_range_checked_before_running():
    with pytest.raises(ValueError, match=r"label \d+ of 'ILSVRC2012_val_\d+.JPEG' .* model 'model' with 10 classes"):
        evaluate_imagenet(tiny_vit(num_classes=10), IMAGENET, max_images=NUM_REAL, progress=False)


@needs_imagenet
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_leaves_the_model_unchanged(dtype):
    model = tiny_vit()
    model.train()
    model.blocks[0].eval()  # a mixed state, which must come back as it was
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    result = evaluate_imagenet(
        {"fp32": model, "low": model}, IMAGENET, reference="fp32", dtype=dtype, max_images=4, progress=False
    )
    assert result.settings["dtype"] == dtype
    assert all(len(s.predictions["low"]) == 5 for s in result.samples)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(after[key].dtype == value.dtype and torch.equal(after[key], value) for key, value in before.items())


@needs_imagenet
def test_models_needing_different_transforms_are_refused():
    with pytest.raises(ValueError, match=r"models \['small'\] need another input transform than 'big'"):
        evaluate_imagenet({"big": tiny_vit(), "small": tiny_vit(img_size=32)}, IMAGENET, max_images=2, progress=False)
    # overrides of the data config are applied and recorded
    result = evaluate_imagenet(
        {"small": tiny_vit(img_size=32)}, IMAGENET, max_images=2, data_config={"crop_pct": 1.0}, progress=False
    )
    assert result.settings["input_size"] == [3, 32, 32] and result.settings["crop_pct"] == 1.0


# --------------------------------------------------------------------------- the CLI: eval imagenet, sweep imagenet


def _run_main(argv: list[str]) -> int:
    from cubistmerge.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--runs", "1", "--warmup", "0", "--no-progress"]


@needs_imagenet
def test_cli_eval_imagenet_one_method(tmp_path, capsys):
    out_json = tmp_path / "in.json"
    argv = ["eval", "imagenet", *TINY_ARGS, "--max-images", "6", "--batch-size", "3", "--method", "cubist",
            "--cubist-r", "1", "--json", str(out_json)]  # fmt: skip
    assert _run_main(argv) == 0
    data = json.loads(out_json.read_text())
    rows = {row["label"]: row for row in data["rows"]}
    assert list(rows) == ["unmerged", "cubist r=1 loc=1"]
    assert rows["unmerged"]["metrics"]["agreement"] == 1.0
    assert set(rows["cubist r=1 loc=1"]["metrics"]) == {"top1", "top5", "agreement"}
    assert data["primary_metric"] == "agreement" and data["setup"]["weights"] == "random"  # random weights
    assert "6 images" in data["setup"]["data"]
    assert "agreement" in capsys.readouterr().out


@needs_imagenet
def test_cli_sweep_imagenet_runs_the_built_in_curves(tmp_path):
    from cubistmerge.eval.imagenet import IMAGENET_CURVE_SETTINGS

    out_json, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    # 112 px: a 7x7 grid, where the curves' largest reduction (r=3) still fits
    argv = ["sweep", "imagenet", *TINY_ARGS, "--img-size", "112", "--max-images", "4", "--batch-size", "4",
            "--json", str(out_json), "--plot", str(plot)]  # fmt: skip
    assert _run_main(argv) == 0
    data = json.loads(out_json.read_text())
    assert [row["label"] for row in data["rows"]] == ["unmerged", *IMAGENET_CURVE_SETTINGS]
    assert {row["series"] for row in data["rows"]} == {
        "unmerged",
        "CubistMerge loc=1",
        "ToMe",
        "Expedite loc=1",
        "PiToMe",
        "ToFu",
        "lower resolution",
    }
    sizes = [row["options"]["size"] for row in data["rows"] if row["method"] == "resize"]
    # the closest multiples of the patch size to FLOP ratios 1.15, 1.35, 1.6 on this 112-px model: the full size
    # (1.0), 96 px (~1.4) and again 96 px (80 px is ~2)
    assert sizes == [[112, 112], [96, 96], [96, 96]]
    assert all(row["flop_ratio"] > 1.0 for row in data["rows"][1:] if row["options"].get("size") != [112, 112])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_eval_imagenet_errors(tmp_path, capsys):
    assert _run_main(["eval", "imagenet", "--data", str(tmp_path / "missing"), *TINY_ARGS]) == 2
    assert "not found" in capsys.readouterr().err
    assert _run_main(["eval", "imagenet", "--model", "no_such_model_xyz", "--data", str(tmp_path)]) == 2
    assert _run_main(["eval", "imagenet", "--cubist-r", "2"]) == 2
    assert "only to --method cubist" in capsys.readouterr().err
