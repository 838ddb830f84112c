"""Speed / quality sweeps: many settings of several merge methods on one task, against the unmerged model.

A sweep answers "which method, which setting, how much faster, how much worse" for one model and one
task in one process:

1. every setting is applied to its own deep copy of the model (same weights) with
   :func:`cubistmerge.patch`, on the part of the model the task speeds up (a SAM image encoder, a
   ViT backbone);
2. FLOPs of that part are counted once per copy with ``torch.utils.flop_counter``;
3. all copies, the unmerged one included, are timed interleaved on the same input (every round
   runs each copy once, the order rotating from round to round, after untimed warm-up rounds), and
   speed-ups are ratios of medians;
4. the task evaluates every copy on its data (task metrics, e.g. box-prompt mIoU, or agreement with
   the unmerged outputs).

The result renders as text, JSON, a markdown table and a speed-vs-quality plot (matplotlib), one
curve per method and variant of its non-amount options (e.g. CubistMerge with ``metric=l2`` is its
own curve).
"""

from __future__ import annotations

import ast
import copy
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ._runtime import autocast, cpu_snapshot, foreign_cpu_load, parse_dtype, synchronize
from .bench import (
    RunStats,
    Variant,
    device_name,
    format_options,
    jsonable,
    text_table,
)
from .flops import count_flops

if TYPE_CHECKING:
    from .eval.stats import PairedInterval

__all__ = [
    "AMOUNT_OPTIONS",
    "METHOD_NAMES",
    "SweepConfigError",
    "SweepResult",
    "SweepRow",
    "SweepTask",
    "parse_setting",
    "run_sweep",
    "series_of",
    "time_interleaved",
]

METHOD_NAMES = {
    "none": "unmerged",
    "cubist": "CubistMerge",
    "tome": "ToMe",
    "expedite": "Expedite",
    "pitome": "PiToMe",
    "tofu": "ToFu",
    "resize": "lower resolution",
}
# Options that set how much is merged: the points along one curve. Every other option (where: loc;
# how: metric, windows, representation, ...) makes a separate curve, so a curve never mixes two
# places of reduction and its quality falls steadily as its speed rises.
AMOUNT_OPTIONS = ("r", "stages", "ratio", "size", "flop_ratio")


class SweepConfigError(ValueError):
    """A sweep setting cannot be parsed or applied to the model."""


def parse_setting(text: str) -> Variant:
    """A setting written as ``METHOD [key=value ...]``, e.g. ``"cubist r=2 loc=2 metric=l2"``.

    Values are Python literals where they parse as one (``2``, ``0.1``, ``(1,2)``, ``[0,0,49]``,
    ``[(2,3,3),(8,1,1)]``, ``False``) and strings otherwise (``l2``, ``window``). The label is the
    text itself with its whitespace normalised.
    """
    words = text.split()
    if not words:
        raise SweepConfigError("a setting is 'METHOD [key=value ...]', got an empty string")
    method, options = words[0], {}
    for word in words[1:]:
        key, sep, raw = word.partition("=")
        if not sep or not key or not raw:
            raise SweepConfigError(f"setting {text!r}: {word!r} is not key=value (no spaces inside a value)")
        if key in options:
            raise SweepConfigError(f"setting {text!r}: {key} given twice")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    try:
        return Variant(method, options, label=" ".join(words))
    except ValueError as error:
        raise SweepConfigError(f"setting {text!r}: {error}") from None


def series_of(method: str, options: dict[str, Any]) -> str:
    """The curve a setting belongs to: the method's name plus its options other than the amounts."""
    rest = {k: v for k, v in options.items() if k not in AMOUNT_OPTIONS and k != "checkpoint"}
    distilled = " (distilled)" if "checkpoint" in options else ""
    return f"{METHOD_NAMES.get(method, method)} {format_options(rest)}".strip() + distilled


class SweepTask(Protocol):
    """What a sweep needs from a task (COCO box prompts, dense saliency, classification, ...)."""

    name: str  # e.g. "sam-coco"
    primary_metric: str  # the quality the curves plot, a key of evaluate()'s dicts
    higher_is_better: bool

    def speed_module(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` that is patched, timed and FLOP-counted (e.g. its image encoder)."""
        ...

    def speed_input(self) -> torch.Tensor:
        """A real input batch for ``speed_module`` (timing and FLOPs)."""
        ...

    def evaluate(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        """Metrics per label; ``models`` holds the unmerged copy under the label ``"unmerged"``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Model, weights and data of the task, recorded in the result."""
        ...


@dataclass
class SweepRow:
    """One setting: its quality metrics next to its speed-up and FLOP ratio."""

    label: str
    method: str
    options: dict[str, Any]
    series: str
    metrics: dict[str, float]
    speedup: float  # median time of the unmerged copy / median time of this copy
    paired_speedup: RunStats  # per-round ratios (robust to slow drift of the machine)
    ms_per_call: RunStats  # wall-clock ms of one call of the speed module on the speed input
    flops: int  # of the speed module on the speed input
    flop_ratio: float  # unmerged FLOPs / these FLOPs
    # each image's share of the metrics where the task records it: {"ids", "totals": {metric: [...]}, "counts"};
    # a metric over a set of images is sum(totals) / sum(counts) (what SweepResult.paired resamples)
    per_image: dict[str, Any] | None = None

    @property
    def efficiency(self) -> float:
        return self.speedup / self.flop_ratio

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["options"] = jsonable(self.options)
        out["paired_speedup"] = self.paired_speedup.to_dict()
        out["ms_per_call"] = self.ms_per_call.to_dict()
        out["efficiency"] = self.efficiency
        return out


@dataclass
class SweepResult:
    """Every row of a sweep (the unmerged reference first) and the setup that produced them."""

    task: str
    primary_metric: str
    higher_is_better: bool
    rows: list[SweepRow]
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> SweepRow:
        return self.rows[0]

    def delta(self, row: SweepRow, metric: str | None = None) -> float:
        """``row``'s metric minus the unmerged model's."""
        metric = metric or self.primary_metric
        return row.metrics[metric] - self.reference.metrics[metric]

    def paired(
        self, row: SweepRow, base: SweepRow | None = None, metric: str | None = None, **options: Any
    ) -> PairedInterval:
        """``row``'s metric minus ``base``'s (default the unmerged model's) with a paired bootstrap interval over
        the images both were scored on (an image where either metric is undefined is left out).

        Raises:
            ValueError: a row without per-image results (older results, or a task that records none).
        """
        from .eval.stats import paired_bootstrap

        base = base or self.reference
        metric = metric or self.primary_metric
        if row.per_image is None or base.per_image is None:
            raise ValueError(f"no per-image results for {row.label!r} or {base.label!r}: rerun the sweep")
        ours, other = row.per_image, base.per_image
        mine = dict(zip(ours["ids"], zip(ours["totals"][metric], ours["counts"], strict=True), strict=True))
        theirs = dict(zip(other["ids"], other["totals"][metric], strict=True))
        shared = [i for i in mine if i in theirs and not math.isnan(mine[i][0]) and not math.isnan(theirs[i])]
        return paired_bootstrap(
            [mine[i][0] for i in shared], [theirs[i] for i in shared], [mine[i][1] for i in shared], **options
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "primary_metric": self.primary_metric,
            "higher_is_better": self.higher_is_better,
            "setup": jsonable(self.setup),
            "rows": [row.to_dict() for row in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        rows = []
        for raw in data["rows"]:
            row = {k: v for k, v in raw.items() if k != "efficiency"}
            row["paired_speedup"] = RunStats.of(raw["paired_speedup"]["samples"])
            row["ms_per_call"] = RunStats.of(raw["ms_per_call"]["samples"])
            rows.append(SweepRow(**row))
        return cls(data["task"], data["primary_metric"], data["higher_is_better"], rows, data.get("setup", {}))

    def metric_names(self) -> list[str]:
        names = [self.primary_metric]
        for row in self.rows:
            names += [m for m in row.metrics if m not in names]
        return names

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        metrics = self.metric_names()
        header = ["setting", *metrics, f"Δ {self.primary_metric}", "speed-up", "FLOP ratio", "efficiency", "ms/call"]
        cells = []
        for row in self.rows:
            values = [_format_metric(row.metrics.get(m)) for m in metrics]
            delta = self.delta(row)
            cells.append(
                [
                    row.label,
                    *values,
                    f"{delta:+.4f}",
                    f"{row.speedup:.3f}×",
                    f"{row.flop_ratio:.3f}",
                    f"{row.efficiency:.3f}",
                    f"{row.ms_per_call.median:.1f}",
                ]
            )
        return header, cells

    def setup_line(self) -> str:
        s = self.setup
        parts = [f"{k} {s[k]}" for k in ("model", "weights", "data", "device", "dtype") if s.get(k) is not None]
        if "runs" in s:
            parts.append(f"{s['runs']} timed rounds after {s.get('warmup', 0)} warm-up")
        if "threads" in s:
            parts.append(f"{s['threads']} threads")
        return ", ".join(parts)

    def pareto_front(self, x_of: Callable[[SweepRow], float] | None = None) -> list[SweepRow]:
        """The rows no other row beats on both speed (``x_of``, default the measured speed-up) and quality.

        The unmerged reference takes part (at its own speed-up, ~1). Sorted by speed.
        """
        x_of = x_of or (lambda row: row.speedup)
        sign = 1.0 if self.higher_is_better else -1.0
        rows = [r for r in self.rows if not math.isnan(r.metrics.get(self.primary_metric, math.nan))]
        front = []
        for row in rows:
            quality = sign * row.metrics[self.primary_metric]
            dominated = any(
                x_of(other) >= x_of(row)
                and sign * other.metrics[self.primary_metric] >= quality
                and (x_of(other) > x_of(row) or sign * other.metrics[self.primary_metric] > quality)
                for other in rows
            )
            if not dominated:
                front.append(row)
        return sorted(front, key=x_of)

    def best_at(self, speedup: float) -> SweepRow | None:
        """The best-quality setting measured at least ``speedup`` times faster (None if none is that fast)."""
        sign = 1.0 if self.higher_is_better else -1.0
        fast = [r for r in self.rows[1:] if r.speedup >= speedup]
        return max(fast, key=lambda r: sign * r.metrics[self.primary_metric], default=None)

    def to_markdown(self, heading: bool = True) -> str:
        header, cells = self.table_rows()
        lines = []
        if heading:
            lines += [f"**{self.task}** — {self.setup_line()}", ""]
            if self.setup.get("command"):
                lines += [f"Command: `{self.setup['command']}`", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        header, cells = self.table_rows()
        return "\n".join([f"{self.task}: {self.setup_line()}", *text_table(header, cells)]) + (
            "\nspeed-up = unmerged median time / median time of the setting (interleaved rounds); "
            "FLOP ratio = unmerged FLOPs / FLOPs; efficiency = speed-up / FLOP ratio\n"
        )

    def plot(
        self, path: str | os.PathLike[str], title: str | None = None, ylim: tuple[float, float] | None = None
    ) -> None:
        """Write a PNG: the primary metric against the speed-up and against the FLOP ratio, one curve per series.

        ``ylim`` zooms the quality axis (points outside it are left out of view, say so in the title).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        reference = self.reference.metrics[self.primary_metric]
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
        series: dict[str, list[SweepRow]] = {}
        for row in self.rows[1:]:
            series.setdefault(row.series, []).append(row)
        markers = "osD^vP*Xh<>"
        colours = plt.get_cmap("tab20").colors
        for axis, x_of, x_label in (
            (axes[0], lambda r: r.speedup, "measured speed-up (×)"),
            (axes[1], lambda r: r.flop_ratio, "FLOP ratio (unmerged / merged)"),
        ):
            axis.axhline(reference, color="0.4", linestyle="--", linewidth=1, label=f"unmerged ({reference:.4f})")
            # The Pareto front over every method: what the best choice at each speed gives.
            front = self.pareto_front(x_of)
            axis.plot(
                [x_of(r) for r in front],
                [r.metrics[self.primary_metric] for r in front],
                color="0.75",
                linewidth=7,
                solid_capstyle="round",
                zorder=0,
                label="Pareto front (all methods)",
            )
            for i, (name, rows) in enumerate(series.items()):
                rows = sorted(rows, key=x_of)  # along the x axis, so a curve never doubles back
                axis.plot(
                    [x_of(r) for r in rows],
                    [r.metrics[self.primary_metric] for r in rows],
                    marker=markers[i % len(markers)],
                    color=colours[i % len(colours)],
                    label=name,
                )
            axis.set_xlabel(x_label)
            axis.grid(True, alpha=0.3)
            if ylim is not None:
                axis.set_ylim(*ylim)
        axes[0].set_ylabel(self.primary_metric)
        axes[1].legend(fontsize=7, loc="best")
        axes[0].plot([1.0], [reference], marker="*", markersize=12, color="0.3", linestyle="none")
        axes[1].plot([1.0], [reference], marker="*", markersize=12, color="0.3", linestyle="none")
        fig.suptitle(textwrap.fill(title or f"{self.task}: {self.setup_line()}", width=140), fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _format_metric(value: float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def replace_submodule(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``old`` sits inside ``root`` (or return ``new`` if ``old`` is ``root``); returns the root."""
    if root is old:
        return new
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return root
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")


def time_interleaved(
    modules: Sequence[nn.Module],
    example: torch.Tensor,
    runs: int,
    warmup: int,
    progress: bool,
    dtype: torch.dtype = torch.float32,
) -> list[list[float]]:
    """Seconds per call of every module, ``runs`` rounds after ``warmup``; each round runs every module once.

    The order rotates by one every round, so no module always runs first (cold caches) or right
    after the same neighbour.
    """
    from tqdm.auto import tqdm

    device = example.device
    seconds: list[list[float]] = [[] for _ in modules]
    order = list(range(len(modules)))
    with torch.inference_mode(), autocast(device, dtype):
        for round_index in tqdm(
            range(warmup + runs), desc="timing", unit="round", disable=None if progress else True, leave=False
        ):
            shift = round_index % len(order)
            for i in order[shift:] + order[:shift]:
                synchronize(device)
                start = time.perf_counter()
                modules[i](example)
                synchronize(device)
                if round_index >= warmup:
                    seconds[i].append(time.perf_counter() - start)
    return seconds


def run_sweep(
    task: SweepTask,
    model: nn.Module,
    settings: Sequence[Variant | str],
    *,
    runs: int = 10,
    warmup: int = 2,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    dtype: str | torch.dtype = "float32",
) -> SweepResult:
    """Measure every setting on ``task``; see the module docstring.

    Args:
        task: the task (e.g. :class:`cubistmerge.eval.coco_sam.SamCocoSweep`).
        model: the unmerged model with its weights, on the device the task runs on. It is not
            modified: every setting patches its own deep copy.
        settings: :class:`~cubistmerge.bench.Variant` objects or strings for :func:`parse_setting`.
            An unmerged reference row is always measured first.
        runs / warmup: timed and untimed interleaved rounds over all copies.
        progress: progress bars on stderr.
        log: receives short status messages.
        command: the command line recorded in the result.
        dtype: ``float32``, or ``float16`` / ``bfloat16``: the timed calls run under ``torch.autocast``
            (the task's evaluation takes its own dtype).

    Raises:
        SweepConfigError: a setting does not parse or cannot be applied to this model.
    """
    if runs < 1 or warmup < 0:
        raise SweepConfigError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    say = log or (lambda _message: None)
    try:
        amp_dtype = parse_dtype(dtype)
    except ValueError as error:
        raise SweepConfigError(str(error)) from None
    variants = [parse_setting(s) if isinstance(s, str) else Variant.coerce(s) for s in settings]
    variants = [v for v in variants if v.method != "none"]
    labels = [v.name for v in variants]
    duplicates = sorted({name for name in labels if labels.count(name) > 1})
    if duplicates:
        raise SweepConfigError(f"settings must have distinct labels, repeated: {duplicates}")
    if METHOD_NAMES["none"] in labels:
        raise SweepConfigError(f"the label {METHOD_NAMES['none']!r} is reserved for the unmerged reference")

    from .patch import patch
    from .resize import resize_from_options

    example = task.speed_input()
    copies: dict[str, nn.Module] = {METHOD_NAMES["none"]: copy.deepcopy(model).eval()}
    for position, variant in enumerate(variants):
        patched = copy.deepcopy(model).eval()
        try:
            if variant.method == "resize":
                speed_module = task.speed_module(patched)
                resized = resize_from_options(speed_module, variant.options, example[:1])
                # The chosen size belongs in the record, whichever way it was asked for.
                variants[position] = replace(variant, options={**variant.options, "size": list(resized.size)})
                patched = replace_submodule(patched, speed_module, resized)
            else:
                options = dict(variant.options)
                checkpoint = options.pop("checkpoint", None)
                if checkpoint is not None:
                    # A distilled student (cubistmerge.train): its weights, then the setting as given.
                    from .train.checkpoint import load_distilled_weights

                    load_distilled_weights(patched, checkpoint, variant.method, options)
                patch(task.speed_module(patched), variant.method, **options)
        except (ValueError, TypeError, NotImplementedError) as error:  # UnsupportedModelError is a TypeError
            raise SweepConfigError(f"cannot apply {variant.name!r}: {error}") from error
        copies[variant.name] = patched

    say(f"counting FLOPs of {len(copies)} copies")
    flops = {}
    for label, candidate in copies.items():
        try:
            flops[label] = count_flops(task.speed_module(candidate), example[:1])
        except (ValueError, RuntimeError) as error:
            raise SweepConfigError(f"{label}: forward pass failed: {error}") from error

    say(f"timing {len(copies)} copies: {warmup} warm-up + {runs} interleaved rounds")
    modules = [task.speed_module(m).to(example.device) for m in copies.values()]
    before = cpu_snapshot()
    seconds = time_interleaved(modules, example, runs, warmup, progress, amp_dtype)
    foreign = foreign_cpu_load(before, cpu_snapshot())
    if foreign is not None and foreign > 0.25:
        say(f"note: other processes kept {foreign:.2f} CPUs busy while timing; the speed-ups are noisy")
    times = dict(zip(copies, seconds, strict=True))

    say("evaluating")
    metrics = task.evaluate(copies)

    base_label = METHOD_NAMES["none"]
    base_ms = RunStats.of([1000.0 * s for s in times[base_label]])
    rows = []
    for label, variant in [(base_label, Variant("none")), *zip(labels, variants, strict=True)]:
        ms = RunStats.of([1000.0 * s for s in times[label]])
        rows.append(
            SweepRow(
                label=label,
                method=variant.method,
                options=dict(variant.options),
                series=series_of(variant.method, variant.options),
                metrics=dict(metrics[label]),
                speedup=base_ms.median / ms.median,
                paired_speedup=RunStats.of([b / s for b, s in zip(times[base_label], times[label], strict=True)]),
                ms_per_call=ms,
                flops=flops[label],
                flop_ratio=flops[base_label] / flops[label] if flops[label] else math.nan,
                per_image=getattr(task, "per_image", {}).get(label),
            )
        )
    device = example.device
    setup = {
        **task.describe(),
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(amp_dtype).removeprefix("torch."),
        "speed_input": list(example.shape),
        "runs": runs,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "foreign_cpu_load": foreign,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command or shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return SweepResult(task.name, task.primary_metric, task.higher_is_better, rows, setup)
