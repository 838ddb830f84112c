"""Self-distillation of merged models (cubistmerge.train.distill) on tiny random-weight models.

The real runs (MobileSAM, ImgFocus on the shared images) are benchmarks, not tests; here every path runs on
models of a few thousand parameters and 8 tiny images so the file stays fast on 2 cores.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import cubistmerge
from cubistmerge.sweep import parse_setting
from cubistmerge.train import CheckpointError, DistillConfigError, distill, load_student, read_checkpoint
from cubistmerge.train.distill import lr_factor
from cubistmerge.train.tasks import make_task
from cubistmerge.train.trainable import select_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_IMAGES = 8


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """8 x 8 patch grid, 4 blocks, 10 classes, LayerScale so every block's gammas matter."""
    torch.manual_seed(seed)
    settings = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10, init_values=0.5)
    settings.update(overrides)
    model = VisionTransformer(**settings).eval()
    # Random (not zero) biases and head, so the logits depend on every block.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.2)
        # Logits of about unit spread: neither near-uniform nor saturated, so the KL responds to the merge.
        model.head.weight.normal_(0, 0.3)
        model.pos_embed.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for k in range(NUM_IMAGES):
        # Blobs plus noise: neighbouring tokens similar as in photographs, but not identical.
        base = torch.rand(3, 6, 8, generator=generator)
        pixels = torch.nn.functional.interpolate(base[None], size=(48, 60), mode="bilinear")[0]
        pixels = (0.7 * pixels + 0.3 * torch.rand(3, 48, 60, generator=generator)).clamp(0, 1)
        array = (pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"img{k}.png")
    return folder


def _batch(image_dir: Path, model) -> torch.Tensor:
    from cubistmerge.train.data import ImageFolder

    task = make_task(model)
    dataset = ImageFolder(image_dir, task.transform(model))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _loss(student, teacher, images) -> float:
    task = make_task(teacher)
    with torch.no_grad():
        return float(task.loss(task.outputs(student, images), task.outputs(teacher, images)))


# --------------------------------------------------------------------------- schedule and selection


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    total, warm = 10, 2
    factors = [lr_factor(step, total, warm, 0.1) for step in range(total)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3])
    assert factors[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert lr_factor(total, total, warm, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("setting", "first_trained_block"),
    [("cubist r=1 loc=2", 2), ("cubist r=2 loc=3", 3), ("tome r=4", 0), ("expedite r=2 loc=1", 1)],
)
def test_default_trains_the_blocks_from_the_first_reduction_on(image_dir, setting, first_trained_block):
    model = tiny_vit()
    variant = parse_setting(setting)
    student = cubistmerge.patch(copy.deepcopy(model), variant.method, **variant.options)
    images = _batch(image_dir, model)[:2]
    task = make_task(model)
    names = select_trainable(student, model, lambda m: task.outputs(m, images))
    blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})
    assert blocks == list(range(first_trained_block, 4))
    # The embedding, position table and class token run before any reduction; the final norm and head after.
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token")) for n in names)
    assert {"norm.weight", "head.weight", "head.bias"} <= set(names)
    # Every tensor of a trained block trains, not only those whose own inputs changed.
    assert f"blocks.{first_trained_block}.norm1.weight" in names


def test_norms_biases_and_all(image_dir):
    model = tiny_vit()
    student = cubistmerge.patch(copy.deepcopy(model), "cubist", r=1, loc=2)
    images = _batch(image_dir, model)[:2]
    task = make_task(model)
    run = lambda m: task.outputs(m, images)  # noqa: E731
    subset = select_trainable(student, model, run, "norms_biases")
    assert subset and all(n.endswith("bias") or ".norm" in n or n.startswith("norm.") for n in subset)
    assert "blocks.2.attn.qkv.bias" in subset and "blocks.2.attn.qkv.weight" not in subset
    assert "blocks.1.norm1.weight" not in subset
    assert select_trainable(student, model, run, "all") == [n for n, _ in student.named_parameters()]
    with pytest.raises(ValueError, match="trainable must be one of"):
        select_trainable(student, model, run, "heads")


# --------------------------------------------------------------------------- training


def test_a_few_steps_reduce_the_student_teacher_loss(image_dir):
    model = tiny_vit()
    images = _batch(image_dir, model)
    before = cubistmerge.patch(copy.deepcopy(model), "cubist", r=2, loc=1)
    result = distill(model, image_dir, "cubist r=2 loc=1", epochs=6, lr=1e-5, batch_size=4, warmup=0.0, progress=False)
    start, end = _loss(before, model, images), _loss(result.student, model, images)
    with torch.no_grad():
        # Merging moves the logits well beyond float32 noise, so the reduction below means something.
        assert (before(images) - model(images)).abs().max() > 1e-3
    assert end < 0.5 * start, (start, end)
    assert len(result.history) == 12 and result.images_seen == 6 * NUM_IMAGES
    # The model given is neither trained nor patched.
    assert type(model) is VisionTransformer
    assert torch.equal(model.blocks[3].mlp.fc1.weight, tiny_vit().blocks[3].mlp.fc1.weight)


@pytest.mark.parametrize("setting", ["cubist r=2 loc=2", "cubist r=2 loc=2 representation=mean", "tome r=6"])
def test_gradients_flow_through_the_merge_to_the_blocks_before_it(image_dir, setting):
    """With every parameter trainable, the blocks before the reduction get gradients only through the merged
    values: a merge that detached its output (or a matching that broke the graph) leaves them at zero."""
    model = tiny_vit()
    variant = parse_setting(setting)
    student = cubistmerge.patch(copy.deepcopy(model), variant.method, **variant.options)
    images = _batch(image_dir, model)[:4]
    task = make_task(model)
    with torch.no_grad():
        target = task.outputs(model, images)
    task.loss(task.outputs(student, images), target).backward()
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "pos_embed"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_dense_and_sam_tasks_run(image_dir, tmp_path):
    """One step on an ImgFocus-layout model (the saliency logits) and on a tiny SAM (the image embeddings)."""
    from cubistmerge.models.img_focus import ImgFocus, SaliencyHead

    torch.manual_seed(0)
    backbone = VisionTransformer(
        img_size=224, patch_size=14, embed_dim=32, depth=3, num_heads=2, num_classes=0, init_values=0.5
    )
    focus = ImgFocus(backbone, SaliencyHead(in_chans=32, channels=(8, 8, 4))).eval()
    # A BatchNorm head (0-dim counters among its buffers) with the teacher cache.
    result = distill(focus, image_dir, "cubist r=2 loc=1", epochs=0.25, batch_size=2, progress=False, cache=tmp_path)
    assert result.task["task"] == "dense" and len(result.history) == 1 and result.history[0]["loss"] > 0
    assert any(n.startswith("head.") for n in result.trainable)
    assert not any(n.startswith("backbone.blocks.0.") for n in result.trainable)

    from tests.patch.test_sam import _tiny_sam

    sam = _tiny_sam()
    result = distill(sam, image_dir, "cubist r=1 loc=1", epochs=0.25, batch_size=2, progress=False)
    assert result.task["task"] == "sam" and result.history[0]["loss"] > 0
    assert all(n.startswith("image_encoder.") for n in result.trainable)  # the decoder never sees a change


def test_accumulation_equals_a_larger_batch(image_dir):
    """Two accumulated batches of 2 make the same step as one batch of 4 (the loss is divided by the group)."""
    model = tiny_vit()
    one = distill(
        model,
        image_dir,
        "cubist r=1 loc=1",
        epochs=1,
        lr=1e-3,
        batch_size=4,
        shuffle=False,
        progress=False,
        clip_grad=None,
    )
    two = distill(
        model,
        image_dir,
        "cubist r=1 loc=1",
        epochs=1,
        lr=1e-3,
        batch_size=2,
        accumulate=2,
        shuffle=False,
        progress=False,
        clip_grad=None,
    )
    assert len(one.history) == len(two.history) == 2
    for (name, a), b in zip(one.student.state_dict().items(), two.student.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_into_an_unpatched_model_and_reproduces_the_student(image_dir, tmp_path):
    model = tiny_vit()
    out = tmp_path / "student.pt"
    result = distill(
        model, image_dir, "cubist r=1 loc=2 metric=l2", epochs=1, lr=1e-3, batch_size=4, out=out, progress=False
    )
    assert result.checkpoint == out
    payload = read_checkpoint(out)
    assert payload["setting"] == "cubist r=1 loc=2 metric=l2"
    assert set(payload["state_dict"]) == set(tiny_vit().state_dict())  # the original model's keys

    # By hand, as the checkpoint's docstring promises ...
    fresh = tiny_vit(seed=1)
    fresh.load_state_dict(payload["state_dict"])
    cubistmerge.patch(fresh, "cubist", r=1, loc=2, metric="l2")
    # ... and through load_student.
    loaded = load_student(tiny_vit(seed=2), out)
    images = _batch(image_dir, model)
    with torch.no_grad():
        expected = result.student(images)
        assert torch.equal(fresh(images), expected)
        assert torch.equal(loaded(images), expected)
        assert not torch.equal(model(images), expected)


def test_resume_continues_the_schedule_and_the_data(image_dir, tmp_path):
    model = tiny_vit()
    common = dict(epochs=3, lr=1e-3, batch_size=2, accumulate=2, warmup=0.2, progress=False)
    straight = distill(model, image_dir, "cubist r=1 loc=1", **common)
    part = tmp_path / "part.pt"
    first = distill(model, image_dir, "cubist r=1 loc=1", out=part, max_steps=3, **common)
    assert len(first.history) == 3 and read_checkpoint(part)["batches"] == 6
    resumed = distill(model, image_dir, "cubist r=1 loc=1", resume=part, **common)
    assert [h["step"] for h in resumed.history] == list(range(6))
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in straight.history])
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-5)
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


# --------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(image_dir, tmp_path):
    model = tiny_vit()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image"):
        distill(model, empty, "cubist r=1 loc=1", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="no readable image"):
        distill(model, broken, "cubist r=1 loc=1", progress=False)
    with pytest.raises(ValueError, match="cannot run on this model"):
        distill(model, image_dir, "cubist r=8 loc=1", progress=False)  # more than the 8 x 8 grid
    with pytest.raises((ValueError, TypeError), match="cannot run on this model"):
        distill(model, image_dir, "cubist r=1 loc=1 colour=red", progress=False)
    with pytest.raises(DistillConfigError, match="merging method"):
        distill(model, image_dir, "resize size=32", progress=False)
    with pytest.raises(DistillConfigError, match="CUDA|float16"):
        distill(model, image_dir, "cubist r=1 loc=1", dtype="float16", progress=False)
    with pytest.raises(DistillConfigError, match="unmerged model"):
        distill(cubistmerge.patch(tiny_vit(), "cubist", r=1), image_dir, "cubist r=1 loc=1", progress=False)
    with pytest.raises(TypeError, match="cannot tell how to distil"):
        distill(torch.nn.Linear(3, 3), image_dir, "cubist r=1", progress=False)


def test_a_checkpoint_of_another_model_is_refused(image_dir, tmp_path):
    out = tmp_path / "student.pt"
    distill(tiny_vit(), image_dir, "cubist r=1 loc=1", epochs=0.5, batch_size=4, out=out, progress=False)
    with pytest.raises(CheckpointError, match="written for"):
        load_student(tiny_vit(embed_dim=48), out)
    with pytest.raises(CheckpointError, match="written for"):
        distill(tiny_vit(depth=3), image_dir, "cubist r=1 loc=1", resume=out, progress=False)
    with pytest.raises(DistillConfigError, match="setting"):
        distill(tiny_vit(), image_dir, "cubist r=2 loc=1", epochs=0.5, batch_size=4, resume=out, progress=False)
    plain = tmp_path / "plain.pt"
    torch.save(tiny_vit().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a cubistmerge distillation checkpoint"):
        load_student(tiny_vit(), plain)


# --------------------------------------------------------------------------- torchrun

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from tests.train.test_distill import tiny_vit
    from cubistmerge.train import distill

    out, images, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = distill(tiny_vit(), images, "cubist r=1 loc=1", epochs=2, lr=1e-3, batch_size=batch, shuffle=False,
                     progress=False, out=out)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        json.dump([h["loss"] for h in result.history], open(out + ".json", "w"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


def test_two_torchrun_processes_equal_one_process_with_the_same_global_batch(image_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    commands = [
        [sys.executable, str(script), one, str(image_dir), "4"],
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            two,
            str(image_dir),
            "2",
        ],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    losses_one, losses_two = json.loads(Path(one + ".json").read_text()), json.loads(Path(two + ".json").read_text())
    assert len(losses_one) == len(losses_two) == 4
    # Each loss is a KL of nearly equal distributions: a small difference of O(1) float32 terms, summed per rank
    # and then averaged, so its last few digits depend on the order of summation (measured: 3e-5 relative).
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    a, b = read_checkpoint(one), read_checkpoint(two)
    assert b["world_size"] == 2 and b["images_seen"] == a["images_seen"] == 2 * NUM_IMAGES
    for name, value in a["state_dict"].items():
        # float32 sums in another order (gloo's all-reduce of two halves): equal to rounding.
        assert torch.allclose(value, b["state_dict"][name], atol=1e-6, rtol=1e-5), name


# --------------------------------------------------------------------------- every listed parameter trains


def _tiny_tinyvit_classifier() -> torch.nn.Module:
    import timm

    from cubistmerge.patch.timm_tinyvit import _attention_blocks

    torch.manual_seed(0)
    model = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=10, depths=(1, 2, 3, 1)).eval()
    for _, block in _attention_blocks(model):
        torch.nn.init.normal_(block.attn.attention_biases)
    return model


def _tiny_minisam() -> torch.nn.Module:
    """MobileSAM's layout (conv stage, windows 7 / 14 / 7, stride-1 last stage, SAM's neck) at 256 px."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from cubistmerge.models.minisam import MiniSam, MiniSamImageEncoder

    torch.manual_seed(0)
    encoder = MiniSamImageEncoder(img_size=256, embed_dims=(8, 16, 16, 16), depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2),
                                  out_chans=32)  # fmt: skip
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=8)
    decoder = MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=32,
                                                                            num_heads=2))  # fmt: skip
    model = MiniSam(encoder, prompt, decoder).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("attention_biases"):
            torch.nn.init.normal_(parameter)
    return model


def _tiny_segment_anything() -> torch.nn.Module:
    from tests.patch.test_sam import _tiny_sam

    return _tiny_sam()


def _tiny_img_focus() -> torch.nn.Module:
    from cubistmerge.models.img_focus import ImgFocus, SaliencyHead

    torch.manual_seed(0)
    backbone = VisionTransformer(
        img_size=224, patch_size=14, embed_dim=32, depth=3, num_heads=2, num_classes=0, init_values=0.5
    )
    return ImgFocus(backbone, SaliencyHead(in_chans=32, channels=(8, 8, 4))).eval()


FAMILIES = {
    # family: (builder, CubistMerge setting, ToMe setting)
    "timm_vit": (tiny_vit, "cubist r=2 loc=1", "tome r=4"),
    "timm_tinyvit": (_tiny_tinyvit_classifier, "cubist r=2 loc=1", "tome r=4"),
    "minisam": (_tiny_minisam, "cubist r=2 loc=1", "tome r=4"),
    "segment_anything": (_tiny_segment_anything, "cubist r=1 loc=1", "tome r=4"),
    "img_focus": (_tiny_img_focus, "cubist r=2 loc=1", "tome r=8"),
}


@pytest.mark.parametrize("trainable", ["after_reduction", "all"])
@pytest.mark.parametrize("method", ["cubist", "tome"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_listed_as_trainable_changes_and_no_other(image_dir, family, method, trainable):
    """Two steps at a large lr: each listed tensor moves, every other stays bit-identical. TinyViT's cached
    attention biases were the case that broke this (listed, never trained; 'all' failed on its second step)."""
    build, cubist_setting, tome_setting = FAMILIES[family]
    model = build()
    setting = cubist_setting if method == "cubist" else tome_setting
    result = distill(
        model, image_dir, setting, epochs=1, lr=1e-3, batch_size=4, warmup=0.0, trainable=trainable, progress=False
    )
    assert len(result.history) == 2 and all(h["grad_norm"] > 0 for h in result.history)
    before, after = dict(model.named_parameters()), dict(result.student.named_parameters())
    unchanged = [name for name in result.trainable if torch.equal(before[name], after[name])]
    assert unchanged == []
    frozen_moved = [n for n in before if n not in set(result.trainable) and not torch.equal(before[n], after[n])]
    assert frozen_moved == []
    merged = make_task(model).merging_module(model)
    prefix = {"minisam": "image_encoder.", "segment_anything": "image_encoder."}.get(family, "")
    if trainable == "all":
        if family == "img_focus":
            assert set(result.trainable) == set(before)  # the backbone and the head
        else:
            assert set(result.trainable) == {prefix + n for n, _ in merged.named_parameters()}
    if family in ("timm_tinyvit", "minisam"):
        biases = [n for n in result.trainable if n.endswith("attention_biases")]
        # the blocks from the reduction at loc 1 on (ToMe: from block 0) with their bias tables, all of them
        blocks = sum(1 for n in before if n.endswith("attention_biases"))
        assert len(biases) == (blocks if method == "tome" or trainable == "all" else blocks - 1)


def test_a_trained_tinyvit_student_computes_with_its_trained_biases(image_dir, tmp_path):
    """After training, and after loading the checkpoint into a model that ran before, the student's outputs
    come from its trained bias tables, not from biases cached before training (eval mode keeps a cache)."""
    model = _tiny_tinyvit_classifier()
    out = tmp_path / "student.pt"
    result = distill(model, image_dir, "tome r=4", epochs=1, lr=1e-2, batch_size=4, out=out, progress=False)
    images = _batch(image_dir, model)[:2]
    recomputed = copy.deepcopy(result.student)
    for module in recomputed.modules():
        if hasattr(module, "attention_bias_cache"):
            module.attention_bias_cache = {}
    used = _tiny_tinyvit_classifier()
    with torch.no_grad():
        used(images)  # fills its caches with the untrained biases
        loaded = load_student(used, out)
        assert torch.equal(result.student(images), recomputed(images))
        assert torch.equal(loaded(images), recomputed(images))


class _DetachedPositions(VisionTransformer):
    """A ViT whose position table reaches the tokens detached, as a cached bias did."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed.detach()


def test_a_listed_parameter_without_gradient_stops_the_run(image_dir):
    """A cached or detached path makes the run fail at its first step, naming the tensors."""
    from cubistmerge.train import UntrainedParameterError

    torch.manual_seed(0)
    model = _DetachedPositions(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10).eval()
    with pytest.raises(UntrainedParameterError, match="1 of the .* received no gradient .*pos_embed"):
        distill(model, image_dir, "cubist r=2 loc=1", epochs=1, batch_size=4, trainable="all", progress=False)


# --------------------------------------------------------------------------- the recipe holds


def test_gradient_clipping_bounds_the_step(image_dir):
    """AdamW's first step is about lr * sign(gradient) whatever the gradient's size, unless the clipped gradient
    falls below its epsilon: with clip_grad=1e-12 the weights must barely move; without clipping they move by ~lr."""
    common = dict(epochs=0.5, lr=1e-3, batch_size=4, warmup=0.0, shuffle=False, progress=False)
    clipped = distill(tiny_vit(), image_dir, "cubist r=2 loc=1", clip_grad=1e-12, **common)
    free = distill(tiny_vit(), image_dir, "cubist r=2 loc=1", clip_grad=None, **common)
    name = "blocks.3.mlp.fc1.weight"
    start = dict(tiny_vit().named_parameters())[name]
    moved_clipped = (dict(clipped.student.named_parameters())[name] - start).abs().max()
    moved_free = (dict(free.student.named_parameters())[name] - start).abs().max()
    assert moved_free > 5e-4 and moved_clipped < 1e-6, (float(moved_free), float(moved_clipped))
    assert clipped.history[0]["grad_norm"] == pytest.approx(free.history[0]["grad_norm"], rel=1e-5)


def test_a_resume_that_changes_the_recipe_is_refused_naming_every_change(image_dir, tmp_path):
    part = tmp_path / "part.pt"
    common = dict(epochs=2, batch_size=2, progress=False)
    distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-4, out=part, max_steps=1, **common)
    with pytest.raises(DistillConfigError, match=r"lr: 0\.0001 -> 0\.001"):
        distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-3, resume=part, **common)
    with pytest.raises(DistillConfigError, match=r"clip_grad: 1\.0 -> None.*weight_decay: 0\.0 -> 0\.01"):
        distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-4, clip_grad=None, weight_decay=0.01, resume=part,
                **common)  # fmt: skip
    for change, pattern in [
        (dict(dtype="bfloat16"), "dtype"),
        (dict(warmup=0.5), "warmup"),
        (dict(min_lr_ratio=0.1), "min_lr_ratio"),
        (dict(trainable="all"), "trainable"),
        (dict(temperature=2.0), "task.temperature"),
    ]:
        with pytest.raises(DistillConfigError, match=pattern):
            distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-4, resume=part, **{**common, **change})
    with pytest.raises(DistillConfigError, match="teacher"):
        distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-4, resume=part, teacher=tiny_vit(seed=5), **common)
    with pytest.raises(DistillConfigError, match="images"):
        distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-4, resume=part, max_images=4, **common)
    # what only says how the run is carried out may change
    resumed = distill(tiny_vit(), image_dir, "cubist r=1 loc=1", lr=1e-4, resume=part, save_every=1, **common)
    assert len(resumed.history) == 8  # 8 images, batches of 2, 2 epochs


def test_the_recipe_fingerprint_is_known_before_training_and_recorded(image_dir, tmp_path):
    from cubistmerge.train import distill_recipe

    out = tmp_path / "student.pt"
    result = distill(tiny_vit(), image_dir, "tome r=4", epochs=0.5, lr=1e-4, batch_size=4, out=out, progress=False)
    recipe, fingerprint = distill_recipe(tiny_vit(), image_dir, "tome r=4", epochs=0.5, lr=1e-4, batch_size=4)
    assert fingerprint == result.fingerprint == read_checkpoint(out)["fingerprint"]
    assert recipe == read_checkpoint(out)["recipe"]
    # workers, save_every and eval_every do not change what trains; everything else does
    assert distill_recipe(tiny_vit(), image_dir, "tome r=4", epochs=0.5, lr=1e-4, batch_size=4, save_every=3)[1] == (
        fingerprint
    )
    others = [
        dict(lr=2e-4), dict(epochs=1.0), dict(batch_size=2), dict(clip_grad=None), dict(seed=1), dict(augment=True),
        dict(trainable="all"), dict(max_images=4), dict(temperature=2.0),
    ]  # fmt: skip
    for other in others:
        options = {**dict(epochs=0.5, lr=1e-4, batch_size=4), **other}
        assert distill_recipe(tiny_vit(), image_dir, "tome r=4", **options)[1] != fingerprint, other
    assert distill_recipe(tiny_vit(seed=3), image_dir, "tome r=4", epochs=0.5, lr=1e-4, batch_size=4)[1] != fingerprint
    with pytest.raises(TypeError, match="unknown distillation options"):
        distill_recipe(tiny_vit(), image_dir, "tome r=4", learning_rate=1e-4)


def test_the_default_learning_rate_is_the_tasks_and_is_recorded(image_dir):
    from cubistmerge.train.distill import DEFAULT_LR, distill_recipe

    sam_recipe, _ = distill_recipe(_tiny_minisam(), image_dir, "cubist r=2 loc=1")
    vit_recipe, _ = distill_recipe(tiny_vit(), image_dir, "tome r=4")
    assert sam_recipe["config"]["lr"] == DEFAULT_LR["sam"] == 1e-4
    assert vit_recipe["config"]["lr"] == DEFAULT_LR["classifier"] == 1e-6
    given, fingerprint = distill_recipe(tiny_vit(), image_dir, "tome r=4", lr=1e-6)
    assert given["config"]["lr"] == 1e-6 and fingerprint == distill_recipe(tiny_vit(), image_dir, "tome r=4")[1]


def test_teacher_outputs_come_from_the_cache_once_written(image_dir, tmp_path):
    """The second run with the cache never runs the teacher, and trains exactly as the first run did.
    (trainable='all': the default's probe runs the teacher once on two images to find the reduction.)"""
    model = tiny_vit()
    cache = tmp_path / "cache"
    common = dict(epochs=1, lr=1e-3, batch_size=4, progress=False, shuffle=False, cache=cache, trainable="all")
    first = distill(model, image_dir, "tome r=4", **common)
    teacher = copy.deepcopy(model)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    assert len(list(cache.rglob("*.pt"))) == NUM_IMAGES  # one float16 target per image
    second = distill(model, image_dir, "tome r=4", teacher=teacher, **common)
    assert calls == []
    assert [h["loss"] for h in second.history] == [h["loss"] for h in first.history]
    # and the cached values are what the loss reads: corrupt them and the loss changes
    for file in cache.rglob("*.pt"):
        torch.save(torch.zeros_like(torch.load(file, weights_only=True)), file)
    third = distill(model, image_dir, "tome r=4", teacher=teacher, **common)
    assert calls == [] and third.history[0]["loss"] != first.history[0]["loss"]


def test_the_cache_keeps_one_target_per_image_and_side(image_dir, tmp_path):
    """With flips, a cached target is the teacher's output for the side the image is shown: a warm cache gives
    the cold run's losses without running the teacher, and holds one file per (image, side) drawn."""
    from cubistmerge.train.data import ImageFolder

    model = tiny_vit()
    cache = tmp_path / "cache"
    common = dict(epochs=3, lr=1e-3, batch_size=4, progress=False, augment=True, cache=cache, trainable="all")
    first = distill(model, image_dir, "tome r=4", **common)
    dataset = ImageFolder(image_dir, make_task(model).transform(model), augment=True)
    sides = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        sides |= {(i, dataset.flips(i)) for i in range(NUM_IMAGES)}
    assert len(sides) > NUM_IMAGES and len(list(cache.rglob("*.pt"))) == len(sides)
    teacher = copy.deepcopy(model)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    second = distill(model, image_dir, "tome r=4", teacher=teacher, **common)
    assert calls == []
    assert [h["loss"] for h in second.history] == [h["loss"] for h in first.history]


# --------------------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def labelled_dir(image_dir, tmp_path_factory) -> Path:
    """The 8 images in two class folders named like ImageNet's (WordNet ids -> ImageNet-1k indices)."""
    import shutil

    root = tmp_path_factory.mktemp("labelled")
    for k, image in enumerate(sorted(image_dir.glob("*.png"))):
        folder = root / ("n01440764" if k % 2 == 0 else "n01443537")  # classes 0 and 1
        folder.mkdir(exist_ok=True)
        shutil.copy(image, folder / image.name)
    return root


def test_ce_weight_uses_the_class_labels(labelled_dir, image_dir):
    common = dict(epochs=1, lr=1e-3, batch_size=4, shuffle=False, warmup=0.0, progress=False)
    plain = distill(tiny_vit(), labelled_dir, "cubist r=2 loc=1", **common)
    with_ce = distill(tiny_vit(), labelled_dir, "cubist r=2 loc=1", ce_weight=5.0, **common)
    assert with_ce.recipe["images"]["labels"].startswith("folders indexed by")
    # the first loss adds 5 x the cross-entropy of the untrained student on those labels, exactly
    from cubistmerge.train.data import ImageFolder

    task = make_task(tiny_vit())
    dataset = ImageFolder(labelled_dir, task.transform(tiny_vit()))
    images = torch.stack([dataset[i][0] for i in range(4)])
    labels = torch.tensor([0 if p.parent.name == "n01440764" else 1 for p in dataset.paths[:4]])
    student = cubistmerge.patch(tiny_vit(), "cubist", r=2, loc=1)
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(student(images), labels))
    assert with_ce.history[0]["loss"] == pytest.approx(plain.history[0]["loss"] + 5.0 * ce, rel=1e-5)
    assert not torch.equal(with_ce.student.head.weight, plain.student.head.weight)
    with pytest.raises(DistillConfigError, match="class labels"):
        distill(tiny_vit(), image_dir, "cubist r=2 loc=1", ce_weight=5.0, **common)  # no class folders
    with pytest.raises(DistillConfigError, match="classifier"):
        distill(_tiny_img_focus(), labelled_dir, "cubist r=2 loc=1", ce_weight=1.0, **common)
