"""Throughput benchmark: unmerged baseline vs. token-merging variants of a timm model.

The baseline and every variant are separate copies of one model (same weights), measured in the same
process and interleaved: each timed run does one forward pass of the baseline, then one of every
variant, round robin, so slow drifts of the machine (thermal throttling, other processes, frequency
scaling) hit all of them alike. Warm-up runs come first and are not recorded.

Per variant the result holds images/s (median and spread over runs), the speed-up over the baseline
(ratio of medians), FLOPs per image and the FLOP ratio baseline / variant, the efficiency
(speed-up / FLOP ratio: 1.0 means the wall clock shrank exactly as much as the FLOPs did), the
number of tokens entering each block, and the merge cost: the fraction of one forward pass spent
inside the patch's ``cubistmerge::`` profiler scopes, measured on one extra profiled forward pass.

Example::

    from cubistmerge.bench import Variant, benchmark

    result = benchmark(
        "deit_small_patch16_224",
        [Variant("cubist", {"r": 1, "loc": 1}), Variant("tome", {"r": 8})],
        batch_size=8,
    )
    print(result.to_markdown())
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._runtime import DTYPES, cpu_snapshot, foreign_cpu_load, synchronize
from .flops import count_flops
from .models.hf import (
    HfModelError,
    _hf_config_size,
    _input_channels,
    _transformers_version,
    build_hf_model,
    hf_timed_module,
)
from .patch import METHODS as PATCH_METHODS

__all__ = [
    "DTYPES",
    "MERGE_SCOPE_PREFIX",
    "BenchConfigError",
    "BenchResult",
    "RunStats",
    "Variant",
    "VariantResult",
    "benchmark",
    "cpu_name",
    "device_name",
    "format_options",
]

MERGE_SCOPE_PREFIX = "cubistmerge::"
_FORWARD_SCOPE = "cubistmerge_bench.forward"  # must not start with MERGE_SCOPE_PREFIX
METHODS = ("none", *PATCH_METHODS, "resize")  # "none": an unpatched copy; "resize": cubistmerge.resize


class BenchConfigError(ValueError):
    """The requested benchmark cannot be set up (unknown model, invalid merge options, ...)."""


# --------------------------------------------------------------------------- variants


def format_options(options: dict[str, Any]) -> str:
    """Compact, readable rendering of merge options: ``r=(2,2) loc=1``."""

    def fmt(value: Any) -> str:
        if isinstance(value, (tuple, list)):
            inner = ",".join(fmt(v) for v in value)
            return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    return " ".join(f"{key}={fmt(value)}" for key, value in options.items())


@dataclass(frozen=True)
class Variant:
    """One model configuration to measure: a merge ``method`` and its ``options``.

    ``method`` is ``"cubist"``, ``"tome"`` or ``"none"`` (an unpatched copy of the model, i.e. an
    A/A control: its speed-up should be 1 up to timing noise). ``options`` are passed to
    :func:`cubistmerge.patch` unchanged.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BenchConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "none" and self.options:
            raise BenchConfigError(f"method 'none' takes no options, got {self.options!r}")

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return f"{self.method} {format_options(self.options)}".strip()

    @classmethod
    def coerce(cls, value: Variant | str | Sequence[Any]) -> Variant:
        """Accept a Variant, a method name, or a ``(method, options)`` pair."""
        if isinstance(value, Variant):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, (tuple, list)) and len(value) in (1, 2):
            method = value[0]
            options = dict(value[1]) if len(value) == 2 and value[1] is not None else {}
            return cls(method, options)
        raise BenchConfigError(f"a variant is a method name or a (method, options) pair, got {value!r}")


# --------------------------------------------------------------------------- results


@dataclass
class RunStats:
    """Spread of a per-run quantity (images/s): median, quartiles, extremes, and every sample."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    samples: list[float]

    @property
    def iqr(self) -> float:
        return self.p75 - self.p25

    @classmethod
    def of(cls, samples: Sequence[float]) -> RunStats:
        values = np.asarray(samples, dtype=np.float64)
        if values.size == 0:
            raise ValueError("no samples")
        p25, median, p75 = np.percentile(values, [25, 50, 75])
        return cls(
            median=float(median),
            p25=float(p25),
            p75=float(p75),
            min=float(values.min()),
            max=float(values.max()),
            samples=[float(v) for v in values],
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["iqr"] = self.iqr
        return out


@dataclass
class VariantResult:
    """Measurements of one model copy. The baseline's row has method ``"none"`` and label ``baseline``."""

    label: str
    method: str
    options: dict[str, Any]
    images_per_s: RunStats
    speedup: float  # median images/s of this copy / median images/s of the baseline
    paired_speedup: RunStats  # per-run ratios variant / baseline of the same round (robust to drift)
    flops_per_image: int
    flop_ratio: float  # baseline FLOPs / variant FLOPs
    efficiency: float  # speedup / flop_ratio
    merge_fraction: float  # share of one profiled forward spent in "cubistmerge::" scopes
    merge_ms: float  # time in those scopes during the profiled forward (whole batch)
    profiled_forward_ms: float
    tokens_per_block: list[int] | None  # tokens entering each block's attention (batch 1)

    @property
    def ms_per_batch(self) -> float:
        return 0.0 if self.images_per_s.median == 0 else 1000.0 / self.images_per_s.median

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["images_per_s"] = self.images_per_s.to_dict()
        out["paired_speedup"] = self.paired_speedup.to_dict()
        out["options"] = jsonable(self.options)
        return out


@dataclass
class BenchResult:
    """A benchmark of one model: the baseline row first, then one row per variant, plus the setup."""

    model: str
    weights: str  # "random", "pretrained", or the checkpoint path
    device: str  # torch device string, e.g. "cpu" or "cuda:0"
    device_name: str  # CPU model string or CUDA device name
    dtype: str
    batch_size: int
    img_size: int
    runs: int
    warmup: int
    threads: int
    torch_version: str
    timm_version: str
    cubistmerge_version: str
    python_version: str
    platform: str
    command: str
    timestamp: str
    rows: list[VariantResult]
    # CPUs' worth of time other processes (and the hypervisor) used while the rounds ran: 0.0 on an
    # otherwise idle machine; None where /proc/stat is unavailable
    foreign_cpu_load: float | None = None
    cpu_count: int | None = None
    profile_runs: int = 1
    transformers_version: str | None = None  # of a Hugging Face model's run, else None
    hf_config: str | None = None  # the config file or model type a random-weight transformers model came from

    @property
    def baseline(self) -> VariantResult:
        return self.rows[0]

    @property
    def variants(self) -> list[VariantResult]:
        return self.rows[1:]

    def to_dict(self) -> dict[str, Any]:
        out = {key: value for key, value in asdict(self).items() if key != "rows"}
        out["rows"] = [row.to_dict() for row in self.rows]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def setup_line(self) -> str:
        return (
            f"{self.model} ({self.weights} weights), {self.device} [{self.device_name}], {self.dtype}, "
            f"batch {self.batch_size}, {self.img_size}x{self.img_size}, {self.threads} threads, "
            f"{self.runs} runs after {self.warmup} warm-up, torch {self.torch_version}, timm {self.timm_version}"
            + ("" if self.transformers_version is None else f", transformers {self.transformers_version}")
            + ("" if self.foreign_cpu_load is None else f", other processes busy {self.foreign_cpu_load:.2f} CPUs")
        )

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and cells of the result table (shared by the markdown and the plain-text rendering)."""
        header = [
            "variant",
            "tokens first→last block",
            "img/s median",
            "img/s p25–p75",
            "img/s min–max",
            "speed-up",
            "GFLOPs/img",
            "FLOP ratio",
            "efficiency",
            "merge time",
        ]
        cells = []
        for row in self.rows:
            s = row.images_per_s
            tokens = f"{row.tokens_per_block[0]}→{row.tokens_per_block[-1]}" if row.tokens_per_block else "?"
            cells.append(
                [
                    row.label,
                    tokens,
                    f"{s.median:.1f}",
                    f"{s.p25:.1f}–{s.p75:.1f}",
                    f"{s.min:.1f}–{s.max:.1f}",
                    f"{row.speedup:.3f}×",
                    f"{row.flops_per_image / 1e9:.3f}",
                    f"{row.flop_ratio:.3f}",
                    f"{row.efficiency:.3f}",
                    f"{100 * row.merge_fraction:.1f}%",
                ]
            )
        return header, cells

    def to_markdown(self, heading: bool = True) -> str:
        """A markdown table, one row per model copy, preceded (``heading=True``) by the setup."""
        header, cells = self.table_rows()
        lines = []
        if heading:
            lines += [
                f"**{self.model}** — {self.setup_line()}",
                "",
                f"Command: `{self.command}`",
                "",
            ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """A plain-text aligned table for terminals."""
        header, cells = self.table_rows()
        out = [self.setup_line(), *text_table(header, cells)]
        out.append(
            "speed-up = median img/s / baseline median img/s; FLOP ratio = baseline FLOPs / variant FLOPs; "
            "efficiency = speed-up / FLOP ratio; merge time = share of a profiled forward pass spent in "
            "cubistmerge:: scopes"
        )
        return "\n".join(out) + "\n"


def text_table(header: list[str], cells: list[list[str]]) -> list[str]:
    """Lines of a plain-text table between rules: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(padded)

    rule = "-" * len(line(header))
    return [rule, line(header), rule, *(line(r) for r in cells), rule]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


# --------------------------------------------------------------------------- environment


def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo``'s "model name" on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


def _timm_version() -> str:
    import timm

    return str(timm.__version__)


def _package_version() -> str:
    from . import __version__

    return __version__


def _default_command() -> str:
    return shlex.join([os.path.basename(sys.executable), *sys.argv])


# --------------------------------------------------------------------------- model setup


def build_model(
    model_name: str,
    *,
    img_size: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Create a timm model in eval mode (random weights unless ``checkpoint``/``pretrained``)."""
    import timm

    if checkpoint is not None and pretrained:
        raise BenchConfigError("give either a checkpoint or pretrained=True, not both")
    if not timm.is_model(model_name):
        raise BenchConfigError(f"unknown timm model {model_name!r}{_suggest_models(model_name)}")
    kwargs: dict[str, Any] = {}
    if img_size is not None and not _takes_any_size(model_name):
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as error:  # e.g. a model without an img_size argument
        raise BenchConfigError(f"cannot create {model_name!r} with {kwargs}: {error}") from error
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise BenchConfigError(f"checkpoint file not found: {path}")
        from timm.models import load_checkpoint

        # The model family's own filter adapts original-format checkpoints and resizes position
        # embeddings when img_size differs from the checkpoint's.
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        try:
            load_checkpoint(model, path, filter_fn=filter_fn)
        except (RuntimeError, ValueError, KeyError, TypeError, EOFError) as error:
            raise BenchConfigError(f"cannot load checkpoint {path} into {model_name!r}: {error}") from error
    return model.eval()


def _suggest_models(name: str) -> str:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"


# timm families built without an img_size argument that take any input size (interpolating their position
# embeddings in every forward): SAM2's Hiera image encoder (HieraDet, sam2_hiera_*).
_ANY_SIZE_MODULES = ("timm.models.hieradet_sam2",)
# SAM2 runs its image encoder at 1024 px for every size of model; timm's pretrained_cfg says 896 for T / S / B+.
SAM2_IMG_SIZE = 1024


def _takes_any_size(model_name: str) -> bool:
    import timm.models

    try:
        entrypoint = timm.models.model_entrypoint(model_name)
    except (RuntimeError, KeyError, ValueError):
        return False
    return getattr(entrypoint, "__module__", "") in _ANY_SIZE_MODULES


def _model_img_size(model: nn.Module) -> int:
    if type(model).__module__ in _ANY_SIZE_MODULES:
        return SAM2_IMG_SIZE
    hf_size = _hf_config_size(model) if type(model).__module__.startswith("transformers.") else None
    if hf_size is not None:
        return hf_size
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size") or (3, 224, 224)
    return int(input_size[-1])


def _make_copy(baseline: nn.Module, variant: Variant, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(baseline)
    if variant.method == "none":
        return model
    from .patch import patch
    from .resize import resize_from_options

    try:
        if variant.method == "resize":
            return resize_from_options(model, variant.options, example)
        return patch(model, method=variant.method, **variant.options)
    except (ValueError, TypeError) as error:  # UnsupportedModelError is a TypeError
        raise BenchConfigError(f"cannot apply {variant.name!r}: {error}") from error


# --------------------------------------------------------------------------- Hugging Face transformers models
# Loading and building them is cubistmerge.models.hf; here only what timing them needs.


def _hf_forward_kwargs(module: nn.Module, size: int) -> dict[str, Any]:
    """Keyword arguments a transformers model needs for ``size`` x ``size`` pixel values."""
    own = _hf_config_size(module)
    if own is None or own == size:
        return {}
    if type(module).__name__ == "SamVisionEncoder":
        raise BenchConfigError(
            f"SAM's vision encoder takes only {own}x{own} inputs (its position embeddings are not interpolated), "
            f"not {size}x{size}; build a random-weight one for {size} px with --hf-config (hf_config=)"
        )
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    # ViT / DeiT interpolate their position embeddings only when asked; DINOv2 always does, DINOv3 uses RoPE.
    return {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in parameters else {}


def _hf_label(
    full: nn.Module, timed: nn.Module, name: str | None, config: str | os.PathLike[str] | dict[str, Any] | None
) -> str:
    """``facebook/dinov2-small (Dinov2Model)``, ``Dinov2Model (config docs/configs/dinov2-base.json)``."""
    what = type(full).__name__ + ("" if timed is full else ".vision_encoder")
    if name is not None:
        return f"{name} ({what})"
    if isinstance(config, dict):
        return f"{what} (config dict)"
    text = os.fspath(config)
    return f"{what} (config {'JSON' if text.lstrip().startswith('{') else text})"


# --------------------------------------------------------------------------- measurement


def _timed_forward(
    model: nn.Module, images: torch.Tensor, device: torch.device, kwargs: dict[str, Any] | None = None
) -> float:
    synchronize(device)
    start = time.perf_counter()
    model(images, **(kwargs or {}))
    synchronize(device)
    return time.perf_counter() - start


# Where a model keeps its blocks (timm: blocks; transformers ViT/DeiT and SAM: layers, DINOv2: encoder.layer,
# DINOv3: model.layer) and the norm in front of each block's attention.
_BLOCK_PATHS = ("blocks", "layers", "encoder.layer", "model.layer")
_FIRST_NORMS = ("norm1", "layernorm_before", "layer_norm1")


def _block_list(model: nn.Module) -> nn.Module | None:
    for path in _BLOCK_PATHS:
        blocks: Any = model
        for part in path.split("."):
            blocks = getattr(blocks, part, None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList):
            return blocks
    return None


def _first_norm(block: nn.Module) -> nn.Module | None:
    for name in _FIRST_NORMS:
        norm = getattr(block, name, None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def _flops_and_tokens(
    model: nn.Module, images: torch.Tensor, kwargs: dict[str, Any] | None = None
) -> tuple[int, list[int] | None]:
    """FLOPs of a batch-1 forward and the tokens entering each block's attention (via its first norm)."""
    blocks = _block_list(model)
    tokens: list[int] = []
    handles = []
    if blocks is not None:
        for block in blocks:
            norm1 = _first_norm(block)
            if norm1 is not None:
                # tokens per image: (B, N, C) sequences and (B, H, W, C) grids (SAM) alike
                handles.append(
                    norm1.register_forward_pre_hook(
                        lambda _m, args: tokens.append(args[0].shape[:-1].numel() // args[0].shape[0])
                    )
                )
    try:
        # keyword arguments (transformers' interpolate_pos_encoding) ride along with pixel_values
        flops = count_flops(model, {"pixel_values": images, **kwargs} if kwargs else images)
    finally:
        for handle in handles:
            handle.remove()
    num_blocks = len(blocks) if blocks is not None else 0
    return flops, (tokens if handles and len(tokens) == num_blocks else None)


def _merge_time(
    model: nn.Module, images: torch.Tensor, device: torch.device, kwargs: dict[str, Any] | None = None
) -> tuple[float, float]:
    """(time inside ``cubistmerge::`` scopes, time of the whole forward), seconds, one profiled pass.

    On CPU the wall-clock intervals of the scopes are merged (nested scopes count once). On CUDA the
    device (kernel) time attributed to the outermost scopes is compared with the kernel time of the
    whole forward pass, since host-side intervals only measure kernel launches.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with warnings.catch_warnings(), _quiet_native_stderr():
        warnings.simplefilter("ignore")
        with profile(activities=activities) as prof:
            with record_function(_FORWARD_SCOPE):
                model(images, **(kwargs or {}))
            synchronize(device)
        events = list(prof.events())
    forward = [e for e in events if e.name == _FORWARD_SCOPE]
    merges = [e for e in events if e.name.startswith(MERGE_SCOPE_PREFIX)]
    if not forward:
        return 0.0, 0.0
    if device.type == "cuda":
        outermost = [e for e in merges if not _has_merge_ancestor(e)]
        merge_us = sum(e.device_time_total for e in outermost)
        total_us = sum(e.device_time_total for e in forward)
    else:
        merge_us = _union_length([(e.time_range.start, e.time_range.end) for e in merges])
        total_us = sum(e.time_range.end - e.time_range.start for e in forward)
    return merge_us / 1e6, total_us / 1e6


def _median_merge_time(
    model: nn.Module, images: torch.Tensor, device: torch.device, passes: int, kwargs: dict[str, Any] | None = None
) -> tuple[float, float]:
    measured = [_merge_time(model, images, device, kwargs) for _ in range(passes)]
    measured.sort(key=lambda m: m[0] / m[1] if m[1] > 0 else 0.0)
    return measured[(len(measured) - 1) // 2]


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence native (C++) writes to file descriptor 2, e.g. the profiler backend's start/stop log.

    The profiled forward pass has already run cleanly during the timed rounds, so nothing of value
    is hidden. Falls back to doing nothing where descriptor 2 cannot be duplicated.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _has_merge_ancestor(event: Any) -> bool:
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith(MERGE_SCOPE_PREFIX):
            return True
        parent = getattr(parent, "cpu_parent", None)
    return False


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise BenchConfigError(f"invalid device {device!r}: {error}") from error
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(f"device {device!r} requested but CUDA is not available in this torch build/machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _resolve_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name, value
    elif dtype in DTYPES:
        return dtype, DTYPES[dtype]
    raise BenchConfigError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")


def benchmark(
    model_name: str | None,
    variants: Sequence[Variant | str | Sequence[Any]],
    *,
    batch_size: int = 8,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    runs: int = 10,
    warmup: int = 2,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    progress: bool = True,
    seed: int = 0,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    profile_runs: int = 1,
    hf_model: str | None = None,
    hf_config: str | os.PathLike[str] | dict[str, Any] | None = None,
    hf_options: dict[str, Any] | None = None,
) -> BenchResult:
    """Measure the unmerged model and each variant; see the module docstring for the method.

    Args:
        model_name: a timm model name, e.g. ``"deit_small_patch16_224"`` (sam2_hiera_* run at 1024 px by
            default, as SAM2 does); None with ``hf_model`` or ``hf_config``.
        variants: :class:`Variant` objects, method names, or ``(method, options)`` pairs. The
            baseline (unpatched model) is always measured and is the first row of the result.
        batch_size: images per forward pass.
        img_size: input resolution (square); None uses the model's default.
        device / dtype: where and in which precision to run (``"float32"``, ``"bfloat16"``,
            ``"float16"``).
        runs / warmup: timed rounds and untimed warm-up rounds (each round runs every copy once).
        checkpoint: a state_dict file to load (timm's ``load_checkpoint``); default random weights.
        pretrained: ask timm for pretrained weights (they must already be cached without internet).
        progress: show a tqdm bar over the rounds (only on a terminal).
        seed: seed of the random weights and the random input batch.
        command: the command line recorded in the result (default: this process's ``sys.argv``).
        log: optional callable receiving short status messages.
        profile_runs: profiled forward passes per copy for the merge cost (after the timed rounds);
            with more than one, the pass with the median merge fraction is reported.
        hf_model: instead of a timm model, a Hugging Face transformers model with its pretrained weights
            (hub id or local directory; ``AutoModel.from_pretrained``). A ``SamModel``'s vision encoder is
            timed; ViT / DeiT get ``interpolate_pos_encoding=True`` at a size other than their config's.
        hf_config: instead of a timm model, a random-weight transformers model built from this config (see
            :func:`cubistmerge.models.hf.build_hf_model`: a config.json, a directory holding one, a dict, or a
            model type).
        hf_options: config fields to override for ``hf_model`` / ``hf_config`` (``{"hidden_size": 768}``).

    Raises:
        BenchConfigError: the model or a variant cannot be set up.
    """
    if batch_size < 1 or runs < 1 or warmup < 0 or profile_runs < 1:
        raise BenchConfigError(
            f"need batch_size >= 1, runs >= 1, warmup >= 0, profile_runs >= 1; "
            f"got {batch_size}, {runs}, {warmup}, {profile_runs}"
        )
    if img_size is not None and img_size < 1:
        raise BenchConfigError(f"img_size must be positive, got {img_size}")
    hf = hf_model is not None or hf_config is not None
    if sum(x is not None for x in (model_name, hf_model, hf_config)) != 1:
        raise BenchConfigError("give exactly one of a timm model name, hf_model and hf_config")
    if hf and (checkpoint is not None or pretrained):
        raise BenchConfigError(
            "checkpoint and pretrained apply to timm models; hf_model loads its own pretrained weights, "
            "hf_config builds random ones"
        )
    if hf_options and not hf:
        raise BenchConfigError("hf_options apply only to hf_model or hf_config")
    parsed = [Variant.coerce(v) for v in variants]
    dev = _resolve_device(device)
    dtype_name, torch_dtype = _resolve_dtype(dtype)
    say = log or (lambda _message: None)

    if hf:
        say(f"building the Hugging Face model {hf_model if hf_model is not None else 'from its config'}")
        try:
            full = build_hf_model(hf_model, config=hf_config, options=hf_options, img_size=img_size, seed=seed)
        except HfModelError as error:
            raise BenchConfigError(str(error)) from error
        base = hf_timed_module(full)
        size = img_size if img_size is not None else _model_img_size(base)
        forward_kwargs = _hf_forward_kwargs(base, size)
        model_name = _hf_label(full, base, hf_model, hf_config)
    else:
        assert model_name is not None
        say(f"building {model_name}")
        base = build_model(model_name, img_size=img_size, checkpoint=checkpoint, pretrained=pretrained, seed=seed)
        size = img_size if img_size is not None else _model_img_size(base)
        forward_kwargs = {}
    base = base.to(device=dev, dtype=torch_dtype)
    channels = _input_channels(base)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, channels, size, size, generator=generator).to(device=dev, dtype=torch_dtype)
    single = images[:1].clone()
    labels = ["baseline"] + [v.name for v in parsed]
    models = [base] + [_make_copy(base, v, single) for v in parsed]

    say("counting FLOPs")
    flops: list[int] = []
    tokens: list[list[int] | None] = []
    for label, model in zip(labels, models, strict=True):
        try:
            count, block_tokens = _flops_and_tokens(model, single, forward_kwargs)
        except (ValueError, RuntimeError) as error:
            raise BenchConfigError(f"{label}: forward pass failed: {error}") from error
        flops.append(count)
        tokens.append(block_tokens)

    times: list[list[float]] = [[] for _ in models]
    cpu_before = cpu_snapshot()
    with torch.inference_mode():
        say(f"warming up ({warmup} rounds)")
        for _ in range(warmup):
            for model in models:
                _timed_forward(model, images, dev, forward_kwargs)
        from tqdm.auto import tqdm

        bar = tqdm(range(runs), desc=f"bench {model_name}", unit="round", disable=None if progress else True)
        for _ in bar:
            for i, model in enumerate(models):
                times[i].append(_timed_forward(model, images, dev, forward_kwargs))
        bar.close()
        foreign = foreign_cpu_load(cpu_before, cpu_snapshot())
        if foreign is not None and foreign > 0.25:
            say(
                f"note: other processes kept {foreign:.2f} CPUs busy while timing; "
                f"the timings are noisy (look at the spread)"
            )
        say("profiling merge cost")
        merge = [_median_merge_time(model, images, dev, profile_runs, forward_kwargs) for model in models]

    throughput = [[batch_size / t for t in ts] for ts in times]
    base_stats = RunStats.of(throughput[0])
    rows = []
    for i, (label, model_variant) in enumerate(zip(labels, [None, *parsed], strict=True)):
        stats = RunStats.of(throughput[i])
        speedup = stats.median / base_stats.median
        paired = RunStats.of([v / b for v, b in zip(throughput[i], throughput[0], strict=True)])
        flop_ratio = flops[0] / flops[i] if flops[i] else math.nan
        merge_s, forward_s = merge[i]
        if model_variant is not None and model_variant.method != "none" and merge_s == 0.0:
            warnings.warn(
                f"{label}: no {MERGE_SCOPE_PREFIX!r} profiler scope was recorded; merge_fraction is 0",
                stacklevel=2,
            )
        rows.append(
            VariantResult(
                label=label,
                method="none" if model_variant is None else model_variant.method,
                options={} if model_variant is None else dict(model_variant.options),
                images_per_s=stats,
                speedup=speedup,
                paired_speedup=paired,
                flops_per_image=flops[i],
                flop_ratio=flop_ratio,
                efficiency=speedup / flop_ratio,
                merge_fraction=merge_s / forward_s if forward_s > 0 else 0.0,
                merge_ms=1000.0 * merge_s,
                profiled_forward_ms=1000.0 * forward_s,
                tokens_per_block=tokens[i],
            )
        )

    if checkpoint is not None:
        weights = os.fspath(checkpoint)
    else:
        weights = "pretrained" if pretrained or hf_model is not None else "random"
    return BenchResult(
        model=model_name,
        weights=weights,
        device=str(dev),
        device_name=device_name(dev),
        dtype=dtype_name,
        batch_size=batch_size,
        img_size=size,
        runs=runs,
        warmup=warmup,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        timm_version=_timm_version(),
        cubistmerge_version=_package_version(),
        python_version=platform.python_version(),
        platform=platform.platform(),
        command=command if command is not None else _default_command(),
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        rows=rows,
        foreign_cpu_load=foreign,
        cpu_count=os.cpu_count(),
        profile_runs=profile_runs,
        transformers_version=_transformers_version() if hf else None,
        hf_config=os.fspath(hf_config) if isinstance(hf_config, str | os.PathLike) else None,
    )
