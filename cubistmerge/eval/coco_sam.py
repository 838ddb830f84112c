"""COCO box-prompt evaluation of a SAM model (MiniSam): mask IoU against the ground-truth masks.

Protocol (the one of the assets ``MANIFEST.md`` baseline):

* images in ascending image-id order (``image_ids`` restricts them, ``max_images`` keeps the first N);
* per image, every annotation with ``iscrowd == 0`` and ``area >= 32**2`` (COCO's ``area`` field),
  in ascending annotation-id order; images without such an annotation are skipped;
* the prompt is the ground-truth box, xywh -> xyxy, scaled to the 1024 input frame like SAM's
  ``apply_coords`` and given as the two corner points (labels 2, 3) without a padding point (SAM pads
  only prompts without a box), so ``sam.onnx``'s single output is the best of its three multimask
  masks by predicted IoU (``pad_point=True`` adds the padding point: the single-mask token instead);
* predicted mask = mask logits > 0 at the original resolution; IoU with pycocotools' ``annToMask``.

Reported: mIoU, median IoU, fraction of instances with IoU > 0.5, instance and image counts and the
image-encoder time per image.

The model is used through ``model.image_encoder(x)`` (x: (B, 3, 1024, 1024) from
:func:`cubistmerge.models.preprocess_image`) and ``model.predict_boxes(embedding, boxes_xyxy,
original_size, pad_point=...)`` (see :class:`cubistmerge.models.MiniSam`), so a patched encoder is
measured as is.

``COCO_TINY_IMAGE_IDS`` are the 80 images of ``zzowenzz/COCO_Tiny`` (commit e7a689f,
``annotations/instances_val2017.json``), the part of ``coco-val2017-subset`` that the MANIFEST calls
"its first 80 images" (467 instances). They are *not* the 80 smallest ids of the subset (those hold
421 instances).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._runtime import autocast, parse_dtype, synchronize
from ..assets import display_path
from .distributed import (
    DistEnv,
    broadcast_from_main,
    gather_objects,
    gather_records,
    init_distributed,
    resolve_device,
    shard,
)

__all__ = [
    "COCO_TINY_IMAGE_IDS",
    "MIN_AREA",
    "MOBILESAM_CURVE_SETTINGS",
    "EncoderSpeedResult",
    "InstanceResult",
    "SamCocoResult",
    "SamCocoSweep",
    "eligible_annotations",
    "evaluate_sam_coco",
    "load_coco",
    "mask_iou",
    "prepared_coco_images",
    "resolve_image_path",
    "sam_encoder_speed",
    "select_image_ids",
    "xywh_to_xyxy",
]

MIN_AREA = 32**2

# ascending; checked in tests: 80 images of the subset, 467 prompted instances
COCO_TINY_IMAGE_IDS: tuple[int, ...] = (
    5001, 10764, 20992, 25603, 25986, 30213, 47112, 51712, 55299, 56344,
    60932, 64523, 104455, 119828, 125952, 158227, 161799, 166918, 168458, 168974,
    173057, 175364, 184321, 184324, 199681, 208901, 221708, 223747, 239041, 239627,
    241668, 243204, 253452, 256518, 261888, 269314, 269316, 277005, 300039, 311303,
    318080, 324614, 329219, 331799, 333956, 338304, 343937, 346638, 349184, 357888,
    359937, 360960, 364557, 376322, 384513, 385029, 402433, 404484, 415748, 416256,
    417285, 435205, 435206, 435208, 436738, 453634, 454661, 458255, 478721, 485895,
    491008, 515077, 520707, 521601, 532481, 547336, 555009, 560256, 566282, 577539,
)  # fmt: skip

SUBSETS = {"all": None, "coco-tiny": COCO_TINY_IMAGE_IDS}


# --------------------------------------------------------------------------- building blocks


def mask_iou(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    a = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    b = target.cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def xywh_to_xyxy(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """COCO boxes (N, 4) x, y, width, height -> x0, y0, x1, y1 (float64)."""
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)


def load_coco(annotations: str | Path | Any) -> Any:
    """A pycocotools ``COCO`` from a json path (its loading chatter on stdout is silenced); COCO objects pass."""
    try:
        from pycocotools.coco import COCO
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the COCO evaluation needs pycocotools (pip install pycocotools, or pip install 'cubistmerge[eval]')"
        ) from error
    if isinstance(annotations, COCO):
        return annotations
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {str(path)!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def select_image_ids(coco: Any, image_ids: Sequence[int] | None = None, max_images: int | None = None) -> list[int]:
    """Image ids to evaluate, ascending: all of ``coco`` or ``image_ids`` (which must exist), then the first
    ``max_images``."""
    available = set(coco.getImgIds())
    if image_ids is None:
        ids = sorted(available)
    else:
        ids = sorted({int(i) for i in image_ids})
        missing = [i for i in ids if i not in available]
        if missing:
            more = " ..." if len(missing) > 10 else ""
            raise ValueError(f"image ids not in the annotation file: {missing[:10]}{more}")
    if max_images is not None:
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        ids = ids[:max_images]
    return ids


def eligible_annotations(coco: Any, image_id: int, min_area: float = MIN_AREA) -> list[dict[str, Any]]:
    """Annotations of one image used as prompts: not crowd, ``area >= min_area``, ascending annotation id."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    kept = [a for a in annotations if not a.get("iscrowd", 0) and a["area"] >= min_area]
    return sorted(kept, key=lambda a: a["id"])


def resolve_image_path(coco_dir: str | Path, file_name: str) -> Path:
    """``coco_dir/file_name``, else ``coco_dir/images/file_name`` or ``coco_dir/val2017/file_name``."""
    root = Path(coco_dir)
    for candidate in (root / file_name, root / "images" / file_name, root / "val2017" / file_name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image {file_name!r} not found in {str(root)!r} (nor in its images/ or val2017/)")


def prepared_coco_images(
    coco_dir: str | Path,
    annotations: str | Path | Any,
    *,
    max_images: int | None = None,
    image_ids: Sequence[int] | None = None,
) -> list[Any]:
    """Preprocessed images (:class:`~cubistmerge.models.PreparedImage`) in evaluation order, e.g. for timing."""
    from ..models.minisam import load_image, preprocess_image

    coco = load_coco(annotations)
    ids = select_image_ids(coco, image_ids, max_images)
    return [preprocess_image(load_image(resolve_image_path(coco_dir, coco.imgs[i]["file_name"]))) for i in ids]


def _ground_truth_mask(coco: Any, ann: dict[str, Any]) -> np.ndarray:
    """pycocotools' ``annToMask`` (its numpy-2 DeprecationWarning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco.annToMask(ann)


# --------------------------------------------------------------------------- results


@dataclass
class InstanceResult:
    """One prompted instance: its ids, COCO area, the IoU of the predicted mask and the model's IoU estimate."""

    image_id: int
    annotation_id: int
    category_id: int
    area: float
    iou: float
    predicted_iou: float


@dataclass
class SamCocoResult:
    """Box-prompt mask IoU on COCO: summary statistics, per-instance results and the setup."""

    miou: float
    median_iou: float
    frac_iou_above_half: float
    num_instances: int
    num_images: int  # images with at least one prompted instance (the ones encoded)
    num_images_selected: int  # images selected, including those without an eligible instance
    encoder_ms_per_image: float  # total encoder time / num_images
    encoder_ms_per_image_median: float  # median over batches of (batch time / batch size)
    seconds: float  # wall-clock time of the whole evaluation
    label: str = "none"
    settings: dict[str, Any] = field(default_factory=dict)
    instances: list[InstanceResult] = field(default_factory=list)

    def to_dict(self, instances: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not instances:
            out.pop("instances")
        return out

    def to_json(self, indent: int | None = 2, instances: bool = True) -> str:
        return json.dumps(self.to_dict(instances=instances), indent=indent)

    def summary_line(self) -> str:
        return (
            f"mIoU {self.miou:.4f}  median {self.median_iou:.4f}  IoU>0.5 {100 * self.frac_iou_above_half:.1f}%  "
            f"{self.num_instances} instances in {self.num_images} images  "
            f"encoder {self.encoder_ms_per_image:.1f} ms/image (median {self.encoder_ms_per_image_median:.1f})"
        )

    def to_text(self) -> str:
        where = self.settings.get("annotations", "")
        return f"SAM box prompts on COCO ({where}), method {self.label}:\n  {self.summary_line()}\n"

    def to_markdown(self, heading: bool = True) -> str:
        lines = []
        if heading:
            lines += ["## SAM box prompts on COCO", ""]
            setup = ", ".join(f"{key} {value}" for key, value in self.settings.items() if key != "image_ids")
            lines += [setup, ""]
        lines += [
            "| method | instances | images | mIoU | median IoU | IoU > 0.5 | encoder ms/image |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| {self.label} | {self.num_instances} | {self.num_images} | {self.miou:.4f} | {self.median_iou:.4f} | "
            f"{100 * self.frac_iou_above_half:.1f}% | {self.encoder_ms_per_image:.1f} |",
        ]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- evaluation


def evaluate_sam_coco(
    model: Any,
    coco_dir: str | Path,
    annotations: str | Path | Any,
    *,
    max_images: int | None = None,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    min_area: float = MIN_AREA,
    pad_point: bool = False,
    label: str = "none",
    distributed: bool | None = None,
    dtype: str | torch.dtype = "float32",
) -> SamCocoResult:
    """Box-prompt mask IoU of ``model`` on a COCO set (see the module docstring for the protocol).

    Under ``torchrun`` (``distributed`` None or True) every process encodes its share of the images
    (image ``i`` goes to rank ``i % world_size``), the per-instance results are gathered on rank 0 in
    single-process order and every rank returns the same result; ``distributed=False`` evaluates
    everything in this process.

    Args:
        model: a :class:`~cubistmerge.models.MiniSam` (moved to ``device`` and put in eval mode when
            it is an ``nn.Module``), or any object with ``image_encoder`` and ``predict_boxes``.
        coco_dir: directory of the images (or its parent holding ``images/`` or ``val2017/``).
        annotations: COCO instances json (path or a pycocotools ``COCO``).
        max_images: evaluate only the first N selected images (ascending id).
        image_ids: restrict to these images (e.g. :data:`COCO_TINY_IMAGE_IDS`).
        batch_size: images per image-encoder call.
        device: torch device for the encoder and decoder.
        progress: show a tqdm progress bar on stderr.
        min_area: smallest COCO ``area`` of a prompted instance (default 32**2).
        pad_point: add SAM's padding point after the box corners (not the MANIFEST protocol).
        label: name of the model variant, stored in the result.
        dtype: ``float32``, or ``bfloat16`` / ``float16``: the encoder and decoder run under
            ``torch.autocast`` (the weights are not converted); masks and IoU are computed in float32.
    """
    from tqdm.auto import tqdm

    from ..models.minisam import load_image, preprocess_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    amp_dtype = parse_dtype(dtype)
    env = init_distributed(device) if distributed is not False else DistEnv()
    device = resolve_device(device, env)
    start = time.perf_counter()
    coco = load_coco(annotations)
    ids = select_image_ids(coco, image_ids, max_images)
    work = [(i, eligible_annotations(coco, i, min_area)) for i in ids]
    work = [(i, anns) for i, anns in work if anns]
    mine = shard(work, env)
    if isinstance(model, nn.Module):
        model.to(device).eval()

    instances: list[InstanceResult] = []
    per_image_ms: list[float] = []
    encoder_seconds = 0.0
    bar = tqdm(total=len(mine), desc="SAM COCO eval", unit="img", disable=not (progress and env.is_main), leave=False)
    try:
        for offset in range(0, len(mine), batch_size):
            batch = mine[offset : offset + batch_size]
            prepared = [
                preprocess_image(load_image(resolve_image_path(coco_dir, coco.imgs[i]["file_name"]))) for i, _ in batch
            ]
            images = torch.stack([p.tensor for p in prepared]).to(device)
            with torch.no_grad(), autocast(device, amp_dtype):
                synchronize(device)
                t0 = time.perf_counter()
                embeddings = model.image_encoder(images)
                synchronize(device)
                elapsed = time.perf_counter() - t0
                encoder_seconds += elapsed
                per_image_ms.append(1000.0 * elapsed / len(batch))
                for (image_id, anns), image, embedding in zip(batch, prepared, embeddings, strict=True):
                    boxes = xywh_to_xyxy([a["bbox"] for a in anns])
                    prediction = model.predict_boxes(embedding[None], boxes, image.original_size, pad_point=pad_point)
                    masks = (prediction.masks > 0).cpu().numpy()
                    scores = prediction.iou_predictions.float().cpu().numpy()
                    for ann, mask, score in zip(anns, masks, scores, strict=True):
                        iou = mask_iou(mask, _ground_truth_mask(coco, ann))
                        instances.append(
                            InstanceResult(
                                image_id=int(image_id),
                                annotation_id=int(ann["id"]),
                                category_id=int(ann["category_id"]),
                                area=float(ann["area"]),
                                iou=float(iou),
                                predicted_iou=float(score),
                            )
                        )
            bar.update(len(batch))
            if instances:
                bar.set_postfix(mIoU=f"{statistics.fmean(r.iou for r in instances):.4f}")
    finally:
        bar.close()

    if env.distributed:
        gathered = gather_records(instances, key=lambda r: (r.image_id, r.annotation_id), env=env)
        timings = gather_objects((encoder_seconds, per_image_ms), env)
        if gathered is None or timings is None:  # not rank 0: take rank 0's result
            return broadcast_from_main(None, env)
        instances = gathered
        encoder_seconds = sum(seconds for seconds, _ in timings)
        per_image_ms = [ms for _, part in timings for ms in part]
    ious = [r.iou for r in instances]
    settings = {
        "annotations": str(annotations) if isinstance(annotations, (str, Path)) else "COCO object",
        "coco_dir": str(coco_dir),
        "min_area": min_area,
        "pad_point": pad_point,
        "max_images": max_images,
        "image_ids": None if image_ids is None else [int(i) for i in ids],
        "batch_size": batch_size,
        "device": str(device),
        "dtype": str(amp_dtype).removeprefix("torch."),
        "world_size": env.world_size,
        "torch": torch.__version__,
    }
    result = SamCocoResult(
        miou=statistics.fmean(ious) if ious else math.nan,
        median_iou=statistics.median(ious) if ious else math.nan,
        frac_iou_above_half=sum(iou > 0.5 for iou in ious) / len(ious) if ious else math.nan,
        num_instances=len(ious),
        num_images=len(work),
        num_images_selected=len(ids),
        encoder_ms_per_image=1000.0 * encoder_seconds / len(work) if work else math.nan,
        encoder_ms_per_image_median=statistics.median(per_image_ms) if per_image_ms else math.nan,
        seconds=time.perf_counter() - start,
        label=label,
        settings=settings,
        instances=instances,
    )
    return broadcast_from_main(result, env) if env.distributed else result


# --------------------------------------------------------------------------- encoder speed


@dataclass
class EncoderSpeedResult:
    """Interleaved timing of two image encoders on the same batch (ms per image), with their output gap."""

    baseline_ms: Any  # cubistmerge.bench.RunStats of ms per image
    patched_ms: Any
    speedup: float  # median baseline ms / median patched ms
    paired_speedup: Any  # RunStats of per-round baseline / patched
    relative_error: float  # ||patched(x) - baseline(x)|| / ||baseline(x)|| on the timed batch
    batch_size: int
    runs: int
    warmup: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("baseline_ms", "patched_ms", "paired_speedup"):
            out[key] = getattr(self, key).to_dict()
        return out

    def to_text(self) -> str:
        return (
            f"encoder on {self.batch_size} image(s), {self.device}, {self.runs} interleaved runs: "
            f"baseline {self.baseline_ms.median:.1f} ms/image, patched {self.patched_ms.median:.1f} ms/image, "
            f"speed-up {self.speedup:.3f} (paired {self.paired_speedup.median:.3f}), "
            f"embedding relative error {self.relative_error:.3g}\n"
        )


def sam_encoder_speed(
    baseline: nn.Module,
    patched: nn.Module,
    images: torch.Tensor | Sequence[Any],
    *,
    runs: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
) -> EncoderSpeedResult:
    """Time two image encoders (e.g. ``model.image_encoder`` and a patched copy) interleaved on one batch.

    ``images``: a (B, 3, S, S) tensor or a list of :class:`~cubistmerge.models.PreparedImage`. Every
    round runs both encoders once, alternating which goes first; ``warmup`` rounds are not timed.
    Both encoders are moved to ``device`` and put in eval mode.
    """
    from ..bench import RunStats

    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = torch.device(device)
    if not isinstance(images, torch.Tensor):
        images = torch.stack([image.tensor for image in images])
    images = images.to(device)
    baseline.to(device).eval()
    patched.to(device).eval()

    from ..sweep import time_interleaved

    with torch.no_grad():
        reference = baseline(images).float()
        output = patched(images).float()
        relative_error = float((output - reference).norm() / reference.norm().clamp_min(1e-30))
    # two modules: the rotating order alternates which one goes first
    base_s, patched_s = time_interleaved([baseline, patched], images, runs, warmup, progress=False)
    base_ms = [1000.0 * t / images.shape[0] for t in base_s]
    patched_ms = [1000.0 * t / images.shape[0] for t in patched_s]
    baseline_stats, patched_stats = RunStats.of(base_ms), RunStats.of(patched_ms)
    return EncoderSpeedResult(
        baseline_ms=baseline_stats,
        patched_ms=patched_stats,
        speedup=baseline_stats.median / patched_stats.median,
        paired_speedup=RunStats.of([b / p for b, p in zip(base_ms, patched_ms, strict=True)]),
        relative_error=relative_error,
        batch_size=int(images.shape[0]),
        runs=runs,
        warmup=warmup,
        device=str(device),
    )


# --------------------------------------------------------------------------- speed / mIoU curves

# The curves ``cubistmerge eval sam --curves`` measures on MiniSam (MobileSAM's TinyViT-5M encoder:
# attention blocks 0-1 on 128x128 with 7x7 windows, 2-7 on 64x64 with 14x14 windows, 8-9 on 64x64
# with 7x7 windows). Reductions start at block 2, where most of the encoder's time goes. ToMe's lists
# give the tokens merged per full window in every block (around the MLP only).
MOBILESAM_CURVE_SETTINGS: tuple[str, ...] = (
    "cubist r=1 loc=2",
    "cubist r=2 loc=2",
    "cubist r=3 loc=2",
    "cubist r=1 loc=2 metric=l2",
    "cubist r=2 loc=2 metric=l2",
    "cubist r=3 loc=2 metric=l2",
    "cubist r=2 loc=5",
    "cubist r=2 loc=5 metric=l2",
    "cubist r=8 loc=2 windows=grid",
    "cubist r=12 loc=2 windows=grid",
    "tome r=[0,0,49,49,49,49,49,49,12,12]",
    "tome r=[12,12,98,98,98,98,98,98,24,24]",
    "tome r=[24,24,98,98,98,98,98,98,24,24]",
    # the free baseline: the encoder at a lower input resolution (FLOP ratios 1.13-1.78), its embedding resized
    # back to 64 x 64 for the unchanged mask decoder
    "resize size=960",
    "resize size=928",
    "resize size=896",
    "resize size=832",
    "resize size=768",
)


def _per_image_totals(instances: Sequence[InstanceResult]) -> dict[str, Any]:
    """Each image's instance-IoU sum and instance count, in image-id order: mIoU over any set of images is
    the ratio of their sums (what a paired bootstrap over images resamples)."""
    totals: dict[int, list[float]] = {}
    for instance in instances:
        total = totals.setdefault(instance.image_id, [0.0, 0])
        total[0] += instance.iou
        total[1] += 1
    ids = sorted(totals)
    return {"ids": ids, "totals": {"miou": [totals[i][0] for i in ids]}, "counts": [totals[i][1] for i in ids]}


class SamCocoSweep:
    """COCO box-prompt mIoU as a :func:`cubistmerge.sweep.run_sweep` task; the image encoder is what is merged.

    Metrics per model: ``miou``, ``median_iou``, ``iou_above_half`` (fraction of instances with
    IoU > 0.5). The speed input is the first selected image (batch 1, SAM's usual case).
    """

    name = "sam-coco"
    primary_metric = "miou"
    higher_is_better = True

    def __init__(
        self,
        coco_dir: str | Path,
        annotations: str | Path | Any,
        *,
        image_ids: Sequence[int] | None = None,
        max_images: int | None = None,
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        pad_point: bool = False,
        progress: bool = True,
        description: dict[str, Any] | None = None,
        dtype: str = "float32",
    ) -> None:
        self.dtype = dtype
        self.coco_dir = coco_dir
        self.coco = load_coco(annotations)
        self.annotations = annotations
        self.image_ids = select_image_ids(self.coco, image_ids, max_images)
        if not self.image_ids:
            raise ValueError("no images selected")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.pad_point = pad_point
        self.progress = progress
        self.description = dict(description or {})
        self.num_instances: int | None = None
        self.per_image: dict[str, dict[str, Any]] = {}  # label -> per-image IoU sums and counts (see sweep)

    def speed_module(self, model: nn.Module) -> nn.Module:
        return model.image_encoder

    def speed_input(self) -> torch.Tensor:
        from ..models.minisam import load_image, preprocess_image

        first = self.coco.imgs[self.image_ids[0]]["file_name"]
        return preprocess_image(load_image(resolve_image_path(self.coco_dir, first))).tensor[None].to(self.device)

    def evaluate(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        from tqdm.auto import tqdm

        metrics = {}
        for label, model in tqdm(models.items(), desc="settings", unit="setting", disable=not self.progress):
            result = evaluate_sam_coco(
                model,
                self.coco_dir,
                self.coco,
                image_ids=self.image_ids,
                batch_size=self.batch_size,
                device=self.device,
                progress=self.progress,
                pad_point=self.pad_point,
                label=label,
                dtype=self.dtype,
            )
            self.num_instances = result.num_instances
            self.per_image[label] = _per_image_totals(result.instances)
            metrics[label] = {
                "miou": result.miou,
                "median_iou": result.median_iou,
                "iou_above_half": result.frac_iou_above_half,
            }
        return metrics

    def describe(self) -> dict[str, Any]:
        where = display_path(self.annotations) if isinstance(self.annotations, (str, Path)) else "COCO object"
        instances = "" if self.num_instances is None else f", {self.num_instances} box prompts"
        return {
            "model": "MiniSam (MobileSAM port)",
            "data": f"{where}: {len(self.image_ids)} images{instances}",
            "image_ids": list(self.image_ids),
            "pad_point": self.pad_point,
            **self.description,
        }
