"""ImageNet-style classification evaluation: top-1 / top-5 accuracy and top-1 agreement with the unmerged model.

Data, two layouts (detected by :class:`ImageNetDataset`):

* a flat folder of images plus a label file whose lines are ``file, index`` (``file index`` also works;
  blank lines and ``#`` comments are skipped), e.g. ``imagenet-val-subset/labels.txt``; listed files are
  looked up in the folder and in its ``images/`` sub-folder; a ``labels.txt`` in the folder is found
  without being named;
* an ImageFolder tree, one sub-folder per class. Class index = position of the folder in sorted order
  (torchvision's ``ImageFolder``), except when every folder is a WordNet id (``n01440764``): then the
  index is the position in the synset list (a given one, a ``synset_words.txt`` next to the data, else
  timm's ImageNet-1k list), so a tree holding only some ImageNet classes still gets the standard
  0-999 indices the classifier was trained with.

Images go through timm's evaluation transform for the model (``resolve_model_data_config`` then
``create_transform(is_training=False)``); a timm ViT built with another ``img_size`` than its pretrained
config gets its own input size.

One pass over the data evaluates several models (e.g. the unmerged model and merged variants of it):
every batch is run through each model, and each model's top-1 is compared with the reference's. The
per-image records (position, file, label, every model's top-5, the reference top-1) are kept in the
result, and the metrics are computed from them alone, which is what makes the ``torchrun`` evaluation
(see :mod:`cubistmerge.eval.distributed`) give the single-process numbers exactly.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .._runtime import autocast, parse_dtype, synchronize
from ..assets import display_path
from .distributed import (
    DistEnv,
    broadcast_from_main,
    gather_objects,
    gather_records,
    init_distributed,
    resolve_device,
    shard_indices,
)

__all__ = [
    "IMAGENET_CURVE_SETTINGS",
    "ImageNetSweep",
    "IMAGE_EXTENSIONS",
    "ImageNetDataset",
    "ImageNetResult",
    "ModelAccuracy",
    "SampleRecord",
    "accuracy_from_records",
    "eval_transform",
    "evaluate_imagenet",
    "imagenet_synsets",
    "model_data_config",
    "read_label_file",
    "read_synsets",
]

# torchvision's ImageFolder extensions, matched case-insensitively as it does
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("labels.txt",)
SYNSET_FILE_NAMES = ("synset_words.txt", "synsets.txt", "LOC_synset_mapping.txt")
TOP_K = 5
_WNID = re.compile(r"n\d{8}")


# --------------------------------------------------------------------------- label and synset files


def read_label_file(path: str | Path) -> list[tuple[str, int]]:
    """``(file, class index)`` pairs of a label file, in file order.

    Lines are ``file, index`` (split at the last comma, so names may hold commas) or ``file index``
    (split at the last run of whitespace); blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line, a negative index, a file listed twice, or no entry at all;
            the message names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {str(path)!r}")
    entries: list[tuple[str, int]] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = [part.strip() for part in (line.rsplit(",", 1) if "," in line else line.rsplit(None, 1))]
            if len(parts) != 2 or not parts[0] or not re.fullmatch(r"[+-]?\d+", parts[1]):
                raise ValueError(
                    f"{path}:{number}: expected 'file, index' (an image file name, a comma or spaces, and an "
                    f"integer class index), got {line!r}"
                )
            name, index = parts[0], int(parts[1])
            if index < 0:
                raise ValueError(f"{path}:{number}: class index must be >= 0, got {index} for {name!r}")
            if name in first_line:
                raise ValueError(f"{path}:{number}: {name!r} is listed twice (first on line {first_line[name]})")
            first_line[name] = number
            entries.append((name, index))
    if not entries:
        raise ValueError(f"label file {str(path)!r} has no 'file, index' line")
    return entries


def read_synsets(source: str | Path | Sequence[str]) -> list[str]:
    """WordNet ids in class-index order, from a file (first word of each non-empty line, as in
    ``synset_words.txt`` or ``LOC_synset_mapping.txt``) or from a sequence of ids (copied)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"synset file not found: {str(path)!r}")
        lines = path.read_text(encoding="utf-8").splitlines()
        wnids = [line.split()[0] for line in lines if line.strip()]
        where = str(path)
    else:
        wnids = [str(w) for w in source]
        where = "the given synset list"
    bad = [w for w in wnids if not _WNID.fullmatch(w)]
    if bad:
        raise ValueError(f"{where}: not WordNet ids (expected like 'n01440764'): {bad[:5]}")
    if len(set(wnids)) != len(wnids):
        twice = sorted({w for w in wnids if wnids.count(w) > 1})
        raise ValueError(f"{where}: WordNet ids listed twice: {twice[:5]}")
    if not wnids:
        raise ValueError(f"{where}: no WordNet id")
    return wnids


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in standard class-index order (the list shipped with timm)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def _synset_list(root: Path, synsets: str | Path | Sequence[str] | None) -> tuple[list[str], str]:
    """The synset list for WordNet-id class folders and where it came from."""
    if synsets is not None:
        return read_synsets(synsets), str(synsets) if isinstance(synsets, (str, Path)) else "given list"
    for directory in (root, root.parent):
        for name in SYNSET_FILE_NAMES:
            candidate = directory / name
            if candidate.is_file():
                return read_synsets(candidate), str(candidate)
    return imagenet_synsets(), "timm imagenet-1k synsets"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (symlinks followed), in torchvision's order: by directory, then by name."""
    found: list[Path] = []
    for directory, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [Path(directory) / name for name in sorted(names) if _is_image(name)]
    return found


# --------------------------------------------------------------------------- dataset


class ImageNetDataset(Dataset):
    """Labelled images from an ImageFolder tree or a flat folder with a label file (see the module docstring).

    Items are ``(image, label, index)``: the image after ``transform`` (a PIL RGB image without one),
    the class index and the item's position, which identifies it in evaluation records.

    Args:
        root: the folder (class sub-folders, or images / an ``images/`` sub-folder next to a label file).
        labels: a label file (``file, index`` lines) or a mapping file name -> class index; default: the
            ``labels.txt`` in ``root`` if there is one, else ``root`` must hold class sub-folders.
        transform: applied to each PIL image.
        class_index: for class sub-folders: ``"auto"`` (synset positions when every folder is a WordNet
            id, else sorted folder order), ``"sorted"`` (always torchvision's sorted folder order) or
            ``"synsets"`` (synset positions; every folder must be a listed WordNet id).
        synsets: the synset list for ``class_index`` (a file like ``synset_words.txt`` or a sequence of
            WordNet ids); default: ``synset_words.txt`` / ``synsets.txt`` / ``LOC_synset_mapping.txt`` in
            ``root`` or its parent, else timm's ImageNet-1k list.

    Attributes:
        layout: ``"label_file"`` or ``"folders"``.
        files: each item's name (as listed in the label file, or ``class_folder/.../name``).
        targets: each item's class index.
        paths: each item's image path.
        class_to_idx: for class folders, folder name -> class index (``None`` for a label file).
        label_source: where the labels came from (label file path, ``"mapping"``, or how folders were indexed).
    """

    def __init__(
        self,
        root: str | Path,
        labels: str | Path | Mapping[str, int] | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        class_index: str = "auto",
        synsets: str | Path | Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {str(self.root)!r} (expected a folder with one sub-folder per class, "
                "or a folder of images with a 'file, index' label file)"
            )
        if class_index not in ("auto", "sorted", "synsets"):
            raise ValueError(f"class_index must be 'auto', 'sorted' or 'synsets', got {class_index!r}")
        self.transform = transform
        self.class_to_idx: dict[str, int] | None = None
        if labels is None:
            found = [self.root / name for name in LABEL_FILE_NAMES if (self.root / name).is_file()]
            labels = found[0] if found else None
        if labels is not None:
            self.layout = "label_file"
            entries, self.label_source = self._label_entries(labels)
            pairs = self._locate(entries)
        else:
            self.layout = "folders"
            pairs = self._scan_folders(class_index, synsets)
        self.paths: tuple[Path, ...] = tuple(path for path, _, _ in pairs)
        self.files: tuple[str, ...] = tuple(name for _, name, _ in pairs)
        self.targets: tuple[int, ...] = tuple(target for _, _, target in pairs)

    # -- construction

    @staticmethod
    def _label_entries(labels: str | Path | Mapping[str, int]) -> tuple[list[tuple[str, int]], str]:
        if isinstance(labels, Mapping):
            entries = []
            for name, index in labels.items():
                if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                    raise ValueError(f"labels[{name!r}] must be a class index (int >= 0), got {index!r}")
                entries.append((str(name), int(index)))
            if not entries:
                raise ValueError("the labels mapping is empty")
            return entries, "mapping"
        return read_label_file(labels), str(labels)

    def _locate(self, entries: list[tuple[str, int]]) -> list[tuple[Path, str, int]]:
        """Each listed file in ``root`` or ``root/images``; all missing ones reported at once."""
        pairs: list[tuple[Path, str, int]] = []
        missing: list[str] = []
        for name, index in entries:
            for candidate in (self.root / name, self.root / "images" / name):
                if candidate.is_file():
                    pairs.append((candidate, name, index))
                    break
            else:
                missing.append(name)
        if missing:
            shown = ", ".join(repr(name) for name in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of the {len(entries)} images listed in {self.label_source} are neither in "
                f"{str(self.root)!r} nor in its images/ sub-folder: {shown}"
            )
        return pairs

    def _scan_folders(
        self, class_index: str, synsets: str | Path | Sequence[str] | None
    ) -> list[tuple[Path, str, int]]:
        # torchvision's class list: every sub-directory, sorted
        folders = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not folders:
            raise FileNotFoundError(
                f"{str(self.root)!r} has neither class sub-folders nor a label file ({', '.join(LABEL_FILE_NAMES)}); "
                "pass labels= (a file of 'file, index' lines) or put the images in one sub-folder per class"
            )
        all_wnids = all(_WNID.fullmatch(name) for name in folders)
        if class_index == "synsets" and not all_wnids:
            others = [name for name in folders if not _WNID.fullmatch(name)]
            raise ValueError(
                f"class_index='synsets' needs WordNet-id class folders (like 'n01440764'), found {others[:5]}; "
                "use class_index='sorted' for sorted folder order"
            )
        if class_index == "synsets" or (class_index == "auto" and all_wnids):
            wnids, source = _synset_list(self.root, synsets)
            position = {wnid: i for i, wnid in enumerate(wnids)}
            unknown = [name for name in folders if name not in position]
            if unknown:
                raise ValueError(
                    f"class folders not in the synset list ({source}): {unknown[:5]}; pass synsets= with the "
                    "model's class list, or class_index='sorted' for sorted folder order"
                )
            self.class_to_idx = {name: position[name] for name in folders}
            self.label_source = f"folders indexed by {source}"
        else:
            self.class_to_idx = {name: i for i, name in enumerate(folders)}
            self.label_source = "folders in sorted order"
        pairs: list[tuple[Path, str, int]] = []
        for name in folders:
            images = _images_under(self.root / name)
            if not images:
                raise FileNotFoundError(
                    f"class folder {str(self.root / name)!r} holds no image (allowed extensions: "
                    f"{', '.join(IMAGE_EXTENSIONS)})"
                )
            pairs += [(path, path.relative_to(self.root).as_posix(), self.class_to_idx[name]) for path in images]
        return pairs

    # -- use

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        try:
            from PIL import Image
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("reading images needs pillow (pip install pillow)") from error
        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform is not None else rgb), self.targets[index], index

    def with_transform(self, transform: Callable[[Any], Any] | None) -> ImageNetDataset:
        """A copy using ``transform`` (the file lists are shared: they are tuples)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def check_num_classes(self, num_classes: int, what: str = "the model", count: int | None = None) -> None:
        """Raise ``ValueError`` if a label of the first ``count`` items (all by default) is not in
        ``range(num_classes)``."""
        for name, target in itertools.islice(zip(self.files, self.targets, strict=True), count):
            if target >= num_classes:
                raise ValueError(
                    f"label {target} of {name!r} ({self.label_source}) is out of range for {what} with "
                    f"{num_classes} classes (labels must be 0..{num_classes - 1})"
                )


# --------------------------------------------------------------------------- transforms


def _fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) a timm ViT-like model was built for, when it accepts no other size."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if not getattr(patch_embed, "strict_img_size", False) or getattr(model, "dynamic_img_size", False):
        return None
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    return None


def model_data_config(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's evaluation data config of ``model`` (input size, interpolation, crop, mean / std).

    A timm ViT built with an ``img_size`` other than its pretrained config's (e.g. ``img_size=64``)
    keeps the pretrained config's input size in ``pretrained_cfg``; the size it was built for wins here,
    since a fixed-size model fails on anything else. ``overrides`` (e.g. ``{"crop_pct": 1.0}``) win last.
    """
    from timm.data import resolve_model_data_config

    config = dict(resolve_model_data_config(model))
    fixed = _fixed_input_size(model)
    if fixed is not None and tuple(config["input_size"][1:]) != fixed:
        config["input_size"] = (config["input_size"][0], *fixed)
    if overrides:
        config.update(overrides)
    return config


def eval_transform(model: nn.Module, data_config: Mapping[str, Any] | None = None) -> Callable[[Any], Any]:
    """timm's evaluation transform (resize, center crop, to tensor, normalise) for ``model``; ``data_config``
    overrides entries of :func:`model_data_config`."""
    from timm.data import create_transform

    return create_transform(**model_data_config(model, data_config), is_training=False)


# --------------------------------------------------------------------------- results


@dataclass
class SampleRecord:
    """One image: its position, name and label, each model's top-5 (best first) and the reference top-1."""

    index: int
    file: str
    label: int
    predictions: dict[str, list[int]]
    reference_top1: int | None = None


@dataclass
class ModelAccuracy:
    """One model's accuracies (fractions in [0, 1]) and forward time."""

    label: str
    top1: float
    top5: float  # the label among the min(5, num_classes) best classes
    agreement: float | None  # fraction of images whose top-1 equals the reference's; None without reference
    forward_ms_per_image: float = math.nan  # summed over processes / images (includes autocast)


def accuracy_from_records(
    samples: Sequence[SampleRecord],
    model_labels: Sequence[str],
    forward_seconds: Mapping[str, float] | None = None,
) -> list[ModelAccuracy]:
    """Top-1, top-5 and agreement of each model from per-image records (NaN for no record).

    Agreement is computed when the records hold a reference top-1 (all of them, or none).
    """
    with_reference = [s.reference_top1 is not None for s in samples]
    if any(with_reference) and not all(with_reference):
        raise ValueError("some records have a reference top-1 and some do not")
    has_reference = bool(samples) and all(with_reference)
    n = len(samples)
    results = []
    for label in model_labels:
        top1 = sum(s.predictions[label][0] == s.label for s in samples)
        top5 = sum(s.label in s.predictions[label] for s in samples)
        agreed = sum(s.predictions[label][0] == s.reference_top1 for s in samples)
        seconds = (forward_seconds or {}).get(label)
        results.append(
            ModelAccuracy(
                label=label,
                top1=top1 / n if n else math.nan,
                top5=top5 / n if n else math.nan,
                agreement=(agreed / n if n else math.nan) if has_reference else None,
                forward_ms_per_image=1000.0 * seconds / n if seconds is not None and n else math.nan,
            )
        )
    return results


@dataclass
class ImageNetResult:
    """Classification accuracy of one or more models on the same images, with per-image records and the setup."""

    models: list[ModelAccuracy]
    num_images: int
    reference: str | None  # label of the reference model, "given predictions", or None
    seconds: float  # wall-clock time of the whole evaluation (on rank 0)
    settings: dict[str, Any] = field(default_factory=dict)
    samples: list[SampleRecord] = field(default_factory=list)

    def __getitem__(self, label: str) -> ModelAccuracy:
        for model in self.models:
            if model.label == label:
                return model
        raise KeyError(f"no model labelled {label!r}; labels: {[m.label for m in self.models]}")

    @property
    def labels(self) -> list[str]:
        return [model.label for model in self.models]

    def top1_by_file(self, label: str) -> dict[str, int]:
        """File -> top-1 class of model ``label``: usable as ``reference=`` of a later evaluation."""
        self[label]  # a clear KeyError for an unknown label
        return {sample.file: sample.predictions[label][0] for sample in self.samples}

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not samples:
            out.pop("samples")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageNetResult:
        """The inverse of :meth:`to_dict` (e.g. a saved JSON whose top-1 serves as a later ``reference``)."""
        return cls(
            models=[ModelAccuracy(**model) for model in data["models"]],
            num_images=data["num_images"],
            reference=data["reference"],
            seconds=data["seconds"],
            settings=dict(data.get("settings", {})),
            samples=[SampleRecord(**sample) for sample in data.get("samples", [])],
        )

    def to_json(self, indent: int | None = 2, samples: bool = True) -> str:
        return json.dumps(self.to_dict(samples=samples), indent=indent)

    def summary_line(self, label: str) -> str:
        model = self[label]
        agreement = "" if model.agreement is None else f"  agreement {100 * model.agreement:.2f}%"
        return (
            f"{model.label}: top-1 {100 * model.top1:.2f}%  top-5 {100 * model.top5:.2f}%{agreement}  "
            f"{model.forward_ms_per_image:.1f} ms/image"
        )

    def to_text(self) -> str:
        where = self.settings.get("data", "")
        reference = "" if self.reference is None else f", agreement with {self.reference}"
        lines = [f"ImageNet classification on {self.num_images} images ({where}){reference}:"]
        lines += [f"  {self.summary_line(label)}" for label in self.labels]
        return "\n".join(lines) + "\n"

    def to_markdown(self, heading: bool = True) -> str:
        lines = []
        if heading:
            lines += ["## ImageNet classification", ""]
            setup = ", ".join(f"{key} {value}" for key, value in self.settings.items())
            lines += [setup, ""]
        reference = self.reference or "none"
        lines += [
            f"| method | images | top-1 | top-5 | agreement with {reference} | ms/image |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for model in self.models:
            agreement = "-" if model.agreement is None else f"{100 * model.agreement:.2f}%"
            lines.append(
                f"| {model.label} | {self.num_images} | {100 * model.top1:.2f}% | {100 * model.top5:.2f}% | "
                f"{agreement} | {model.forward_ms_per_image:.1f} |"
            )
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- evaluation


def _named_models(models: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    named = {"model": models} if isinstance(models, nn.Module) else dict(models)
    if not named:
        raise ValueError("models is empty: give a module or a mapping label -> module")
    for label, model in named.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"model labels must be non-empty strings, got {label!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{label!r}] must be a torch.nn.Module, got {type(model).__name__}")
    return named


@contextlib.contextmanager
def _evaluating(models: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Models on ``device`` in eval mode inside; afterwards back on their device with their train flags."""
    unique = list({id(model): model for model in models}.values())
    saved = []
    for model in unique:
        devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
        if len(devices) > 1:
            raise ValueError(
                f"{type(model).__name__} is spread over devices {sorted(map(str, devices))}; "
                "the evaluation runs a model on one device"
            )
        saved.append((model, next(iter(devices), None), [(m, m.training) for m in model.modules()]))
    try:
        for model, original, _ in saved:
            if original is not None and original != device:
                model.to(device)
            model.eval()
        yield
    finally:
        for model, original, modes in saved:
            if original is not None and original != device:
                model.to(original)
            for module, training in modes:
                module.training = training  # set directly: train() would recurse into children


def _data_transform(
    named: Mapping[str, nn.Module], first: str, data_config: Mapping[str, Any] | None
) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """One transform for all models (the data is read once); models wanting different ones are refused."""
    configs = {label: model_data_config(model, data_config) for label, model in named.items()}
    base = configs[first]
    differing = [label for label, config in configs.items() if config != base]
    if differing:
        raise ValueError(
            f"models {differing} need another input transform than {first!r} ({configs[differing[0]]} vs {base}); "
            "evaluate them in separate calls, or pass data_config= / transform= to use one for all"
        )
    from timm.data import create_transform

    return create_transform(**base, is_training=False), base


def evaluate_imagenet(
    models: nn.Module | Mapping[str, nn.Module],
    data: str | Path | ImageNetDataset,
    labels: str | Path | Mapping[str, int] | None = None,
    *,
    reference: str | Mapping[str, int] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    max_images: int | None = None,
    progress: bool = True,
    transform: Callable[[Any], Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    distributed: bool | None = None,
) -> ImageNetResult:
    """Top-1 / top-5 accuracy of one or several models on labelled images, and top-1 agreement with a reference.

    The data is read once; each batch goes through every model (all of them are on ``device`` at once).
    Under ``torchrun`` each process evaluates every ``world_size``-th image and rank 0 computes the
    metrics from the gathered records; every process returns the same result, equal to a
    single-process run (write files where :func:`cubistmerge.eval.distributed.is_main_process`).

    Args:
        models: a module (labelled ``"model"``) or a mapping label -> module, e.g.
            ``{"none": model, "cubist r=2": patched_copy}``. They are moved to ``device`` and set to
            eval mode for the evaluation and put back (device and train flags) afterwards.
        data: a folder (see :class:`ImageNetDataset`) or an :class:`ImageNetDataset`.
        labels: label file or mapping file -> class index for a flat folder (only with a folder ``data``).
        reference: the label of the model to agree with (normally the unmerged one), or precomputed
            reference top-1 classes by file name (e.g. ``earlier.top1_by_file("none")``); ``None``: no agreement.
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` worker processes decoding images.
        device: where the models run; under torchrun a bare ``"cuda"`` means ``cuda:LOCAL_RANK``.
        dtype: ``"float32"``, or ``"float16"`` / ``"bfloat16"`` to run the models under ``torch.autocast``
            (the weights are not converted, so the given models are unchanged).
        max_images: evaluate only the first N images in dataset order (label-file order, or class folder
            then file name).
        progress: a tqdm progress bar on stderr (rank 0 only).
        transform: the image transform for all models (default: timm's eval transform of the reference,
            else of the first model; all models must resolve the same one). An :class:`ImageNetDataset`'s
            own transform is used when it has one and neither this nor ``data_config`` is given.
        data_config: overrides of timm's data config (e.g. ``{"crop_pct": 1.0, "input_size": (3, 64, 64)}``).
        distributed: ``None`` (or ``True``) shards over torchrun's processes when ``WORLD_SIZE > 1``,
            initialising the process group if needed (see :func:`~cubistmerge.eval.distributed.init_distributed`);
            ``False`` evaluates everything in this process even under torchrun.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    named = _named_models(models)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    amp_dtype = parse_dtype(dtype)
    if isinstance(reference, str) and reference not in named:
        raise ValueError(f"reference {reference!r} is not one of the model labels {list(named)}")

    if isinstance(data, ImageNetDataset):
        if labels is not None:
            raise ValueError("labels= is only for a folder; an ImageNetDataset already has its labels")
        dataset = data
    else:
        dataset = ImageNetDataset(data, labels)
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    selected_files = dataset.files[:count]
    reference_top1: Mapping[str, int] | None = None
    if reference is not None and not isinstance(reference, str):
        reference_top1 = dict(reference)
        absent = [name for name in selected_files if name not in reference_top1]
        if absent:
            raise ValueError(f"reference predictions lack {len(absent)} of the evaluated files, e.g. {absent[:3]}")
    for label, model in named.items():
        # Fail before the data pass when a timm model says how many classes it has.
        num_classes = getattr(model, "num_classes", None)
        if isinstance(num_classes, int) and num_classes > 0:
            dataset.check_num_classes(num_classes, f"model {label!r}", count)

    data_settings: dict[str, Any]
    first = reference if isinstance(reference, str) else next(iter(named))
    if transform is not None:
        data_settings = {"transform": "given"}
    elif dataset.transform is not None and data_config is None:
        transform, data_settings = dataset.transform, {"transform": "the dataset's"}
    else:
        transform, config = _data_transform(named, first, data_config)
        data_settings = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    loader_dataset = dataset if transform is dataset.transform else dataset.with_transform(transform)

    env = init_distributed(device) if distributed is not False else DistEnv()
    device = resolve_device(device, env)
    indices = list(shard_indices(count, env))
    loader = DataLoader(
        Subset(loader_dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )

    records: list[SampleRecord] = []
    forward_seconds = dict.fromkeys(named, 0.0)
    shown, shown_correct = first, 0  # running top-1 of one model for the progress bar
    bar = tqdm(
        total=len(indices), desc="ImageNet eval", unit="img", disable=not (progress and env.is_main), leave=False
    )
    try:
        with _evaluating(list(named.values()), device), torch.no_grad():
            for images, targets, positions in loader:
                images = images.to(device, non_blocking=True)
                top: dict[str, list[list[int]]] = {}
                for label, model in named.items():
                    synchronize(device)
                    t0 = time.perf_counter()
                    with autocast(device, amp_dtype):
                        logits = model(images)
                    synchronize(device)
                    forward_seconds[label] += time.perf_counter() - t0
                    top[label] = _top_classes(logits, label, targets, positions, dataset)
                for row, (target, position) in enumerate(zip(targets.tolist(), positions.tolist(), strict=True)):
                    predictions = {label: classes[row] for label, classes in top.items()}
                    if isinstance(reference, str):
                        ref = predictions[reference][0]
                    elif reference_top1 is not None:
                        ref = int(reference_top1[dataset.files[position]])
                    else:
                        ref = None
                    records.append(SampleRecord(position, dataset.files[position], target, predictions, ref))
                shown_correct += sum(int(top[shown][row][0] == t) for row, t in enumerate(targets.tolist()))
                bar.update(len(positions))
                bar.set_postfix(top1=f"{shown_correct / len(records):.4f}")
    finally:
        bar.close()

    gathered = gather_records(records, key=lambda record: record.index, env=env)
    seconds_per_rank = gather_objects(forward_seconds, env)
    result: ImageNetResult | None = None
    if gathered is not None and seconds_per_rank is not None:
        if [record.index for record in gathered] != list(range(count)):
            raise RuntimeError(f"gathered {len(gathered)} records for {count} images: the shards did not cover them")
        total_seconds = {label: sum(part[label] for part in seconds_per_rank) for label in named}
        settings = {
            "data": display_path(dataset.root),
            "layout": dataset.layout,
            "labels": dataset.label_source,
            "images_available": len(dataset),
            "max_images": max_images,
            "reference": reference if isinstance(reference, str) or reference is None else "given predictions",
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": str(device),
            "dtype": str(amp_dtype).removeprefix("torch."),
            "world_size": env.world_size,
            **data_settings,
            "torch": torch.__version__,
            "timm": _timm_version(),
        }
        result = ImageNetResult(
            models=accuracy_from_records(gathered, list(named), total_seconds),
            num_images=count,
            reference=settings["reference"],
            seconds=time.perf_counter() - start,
            settings=settings,
            samples=gathered,
        )
    return broadcast_from_main(result, env)


def _top_classes(
    logits: Any, label: str, targets: torch.Tensor, positions: torch.Tensor, dataset: ImageNetDataset
) -> list[list[int]]:
    """Per row, the min(5, C) best classes of ``logits`` (B, C), best first; checks shape and label range."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(targets):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model {label!r} must return logits of shape ({len(targets)}, num_classes), got {shape}")
    num_classes = logits.shape[1]
    too_big = (targets >= num_classes).nonzero().flatten().tolist()
    if too_big:
        row = too_big[0]
        raise ValueError(
            f"label {int(targets[row])} of {dataset.files[int(positions[row])]!r} is out of range for model "
            f"{label!r} with {num_classes} classes (labels must be 0..{num_classes - 1})"
        )
    # rank in float32 whatever the autocast dtype, so every model's ranking is done the same way
    return logits.float().topk(min(TOP_K, num_classes), dim=1).indices.cpu().tolist()


def _timm_version() -> str:
    import timm

    return str(timm.__version__)


# --------------------------------------------------------------------------- sweeps

# The curves ``cubistmerge eval imagenet --curves`` / ``sweep imagenet`` measure on a 12-block ViT at 224
# (a 14 x 14 grid): the paper's DeiT settings for CubistMerge, ToMe with constant r, Expedite at block 1,
# PiToMe, ToFu, and the model at a lower input resolution.
IMAGENET_CURVE_SETTINGS: tuple[str, ...] = (
    "cubist r=1 loc=1",
    "cubist r=2 loc=1",
    "cubist r=3 loc=1",
    "tome r=6",
    "tome r=9",
    "tome r=13",
    "expedite r=1 loc=1",
    "expedite r=2 loc=1",
    "expedite r=3 loc=1",
    "pitome ratio=0.975",
    "pitome ratio=0.95",
    "pitome ratio=0.925",
    "tofu r=6",
    "tofu r=9",
    "tofu r=13",
    # by FLOP ratio, so the curves fit any --img-size (at 224 with patch 16: 208, 192 and 176 px)
    "resize flop_ratio=1.15",
    "resize flop_ratio=1.35",
    "resize flop_ratio=1.6",
)


class ImageNetSweep:
    """:func:`cubistmerge.sweep.run_sweep` task: classification of labelled images; the whole model is merged.

    Metrics per model: ``top1``, ``top5`` and ``agreement`` (top-1 agreement with the unmerged copy).
    The curves plot ``top1`` for real weights and ``agreement`` otherwise (``primary_metric``). The speed
    input is the first ``batch_size`` images.
    """

    name = "imagenet-classification"
    higher_is_better = True

    def __init__(
        self,
        data: str | Path,
        labels: str | Path | None = None,
        *,
        transform: Callable[[Any], Any],
        max_images: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        progress: bool = True,
        real_weights: bool = False,
        description: dict[str, Any] | None = None,
    ) -> None:
        self.dataset = ImageNetDataset(data, labels, transform=transform)
        if len(self.dataset) == 0:
            raise ValueError(f"no labelled images in {str(data)!r}")
        self.max_images = max_images
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress
        self.primary_metric = "top1" if real_weights else "agreement"
        self.description = dict(description or {})
        self.num_images = len(self.dataset) if max_images is None else min(len(self.dataset), max_images)

    def speed_module(self, model: nn.Module) -> nn.Module:
        return model

    def speed_input(self) -> torch.Tensor:
        count = min(self.batch_size, self.num_images)
        return torch.stack([self.dataset[i][0] for i in range(count)]).to(self.device)

    def evaluate(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        result = evaluate_imagenet(
            models,
            self.dataset,
            reference="unmerged",
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            dtype=self.dtype,
            max_images=self.max_images,
            progress=self.progress,
        )
        return {
            label: {"top1": result[label].top1, "top5": result[label].top5, "agreement": result[label].agreement}
            for label in models
        }

    def describe(self) -> dict[str, Any]:
        return {
            "data": f"{display_path(self.dataset.root)} ({self.dataset.layout}, labels {self.dataset.label_source}): "
            f"{self.num_images} images",
            **self.description,
        }
