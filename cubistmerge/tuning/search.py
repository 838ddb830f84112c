"""The best merge setting for a speed target, on the user's model, device and unlabelled images.

The search, and what it costs (C candidates, n calibration images, F finalists):

1. **Enumerate** the settings every requested method supports on this model's family
   (:func:`candidate_settings`): CubistMerge's r, loc, metric and representation; ToMe's r; Expedite's r and
   loc; PiToMe's ratio; ToFu's r. Settings the model cannot run are dropped with their reason.
2. **Prune by FLOPs** (no timing): one forward pass of one image per candidate with
   ``torch.utils.flop_counter``. Candidates whose FLOP ratio is below ``flop_slack * target`` cannot reach
   the target (measured speed-ups track FLOP ratios within ~10% here, see BENCHMARKS.md) and are dropped.
3. **Successive halving on fidelity**: every survivor is scored on the first ``n0`` calibration images against
   the unmerged model (:mod:`cubistmerge.tuning.fidelity`), the better half goes on to twice as many images, and
   so on until ``finalists`` remain or all ``n`` images are used: about ``C * n0 * log2(C / F) + F * n`` image
   forwards instead of ``C * n``. "Better" ranks by layer of each method's fidelity-vs-FLOP-ratio front first,
   then by fidelity: by fidelity alone only the least-merging (slowest) settings would survive.
4. **Time the finalists** interleaved with the unmerged model on the target device (medians over ``runs``
   rounds after ``warmup``): ``F`` front members (settings no other setting of the same method beats on both
   FLOP ratio and fidelity; methods turn FLOPs into time differently) spread over FLOP ratios from
   ``flop_slack * target`` to ``target / flop_slack``. If some meet the target, up to ``F`` untimed front
   members more faithful than the best hit, whose FLOP ratio times their method's measured efficiency
   (speed-up / FLOP ratio) comes close to the target, are timed too. If none meets it, a second round times the
   most faithful front settings predicted to reach it that way; if still none, the fastest timed setting is
   returned with ``met=False`` and a message that says so. The pick is the best fidelity, on all ``n`` images,
   among the timed settings that meet the target. At most ``2 F`` settings are timed.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .fidelity import fidelity

Timer = Callable[[Sequence[nn.Module], torch.Tensor], list[list[float]]]


class TuneError(ValueError):
    """A tuning request that cannot run as given; the message says what is allowed."""


@dataclass
class Candidate:
    """One setting the tuner considered."""

    setting: str
    method: str
    options: dict[str, Any]
    flop_ratio: float | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    images_scored: int = 0
    speedup: float | None = None
    dropped: str | None = None  # why it left the search, None while it is in

    @property
    def score(self) -> float:
        return self.fidelity.get("score", -math.inf)


@dataclass
class TuneResult:
    """The chosen setting and everything the search tried."""

    setting: str
    method: str
    options: dict[str, Any]
    target_speedup: float
    speedup: float
    flop_ratio: float
    fidelity: dict[str, float]
    met: bool
    message: str
    kind: str
    candidates: list[Candidate]
    seconds: dict[str, float]
    setup: dict[str, Any]

    def setting_dict(self) -> dict[str, Any]:
        """``{"method": ..., **options}``: ``cubistmerge.patch(model, **result.setting_dict())`` applies it."""
        return {"method": self.method, **self.options}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out

    def save_setting(self, path: str | Path) -> Path:
        """Write the setting file read by ``cubistmerge.patch(model, setting=path)`` and ``--setting-file``."""
        import json

        target = Path(path)
        target.write_text(json.dumps(self.setting_dict(), indent=2) + "\n")
        return target

    def to_markdown(self) -> str:
        lines = [
            f"Target {self.target_speedup:g}x: **{self.setting}** — measured {self.speedup:.3f}x "
            f"(FLOP ratio {self.flop_ratio:.3f}), fidelity {_fmt(self.fidelity)}. {self.message}",
            "",
            "| setting | FLOP ratio | fidelity score | images | measured speed-up | left the search |",
            "|---|---:|---:|---:|---:|---|",
        ]
        ordered = sorted(self.candidates, key=lambda c: (c.dropped is not None, -(c.flop_ratio or 0)))
        for c in ordered:
            ratio = "" if c.flop_ratio is None else f"{c.flop_ratio:.3f}"
            score = f"{c.score:.5f}" if c.fidelity else ""
            speed = "" if c.speedup is None else f"{c.speedup:.3f}x"
            mark = " (chosen)" if c.setting == self.setting else ""
            lines.append(
                f"| {c.setting}{mark} | {ratio} | {score} | {c.images_scored or ''} | {speed} | {c.dropped or ''} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Fidelity score against FLOP ratio of every scored candidate; finalists by measured speed-up."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        scored = [c for c in self.candidates if c.fidelity and c.flop_ratio]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for method in sorted({c.method for c in scored}):
            mine = [c for c in scored if c.method == method]
            axis.scatter([c.flop_ratio for c in mine], [c.score for c in mine], label=method, alpha=0.6)
        timed = [c for c in scored if c.speedup is not None]
        axis.scatter(
            [c.speedup for c in timed],
            [c.score for c in timed],
            marker="x",
            color="black",
            label="finalists at measured speed-up",
        )
        axis.axvline(self.target_speedup, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("FLOP ratio (dots) / measured speed-up (crosses)")
        axis.set_ylabel("fidelity score (higher: closer to the unmerged model)")
        axis.set_title(f"cubistmerge tune: target {self.target_speedup:g}x -> {self.setting}", fontsize=9)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return Path(path)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score")


def _setting_text(method: str, options: dict[str, Any]) -> str:
    from ..bench import format_options

    return f"{method} {format_options(options)}".strip()


def _locs(num_blocks: int) -> list[int]:
    return sorted({loc for loc in (1, 2, num_blocks // 4, num_blocks // 2) if 0 < loc < num_blocks})


def candidate_settings(merging_module: nn.Module, methods: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(method, options)`` pairs worth trying on this family; the grid is described in the module docstring."""
    from ..patch import METHODS, _family_of, _methods_of

    family = _family_of(merging_module)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TuneError(f"unknown method(s) {unknown}; methods are {METHODS}")
    supported = _methods_of(family)
    refused = [m for m in methods if m not in supported]
    if refused:
        raise TuneError(f"{family.FAMILY} cannot run {refused}; it supports {supported}")
    num_blocks = family.num_blocks(merging_module)
    locs = _locs(num_blocks)
    # Proportional attention for CubistMerge runs on plain timm ViTs only (see cubistmerge.patch).
    prop_choices = (False, True) if family.__name__.endswith(".timm_vit") else (False,)
    out: list[tuple[str, dict[str, Any]]] = []
    for method in methods:
        if method == "cubist":
            for loc in locs:
                for r in (1, 2, 3):
                    for metric in ("cosine", "l2"):
                        for representation in ("maxmag", "mean"):
                            for prop_attn in prop_choices:
                                options = {"r": r, "loc": loc, "metric": metric, "representation": representation}
                                out.append(("cubist", {**options, "prop_attn": True} if prop_attn else options))
        elif method in ("tome", "tofu"):
            out += [(method, {"r": r}) for r in (2, 4, 8, 12, 16, 20, 24)]
        elif method == "expedite":
            out += [("expedite", {"r": r, "loc": loc}) for loc in locs for r in (1, 2, 3)]
        elif method == "pitome":
            out += [("pitome", {"ratio": ratio}) for ratio in (0.975, 0.95, 0.925, 0.9)]
    return out


def _interleaved_timer(runs: int, warmup: int, dtype: torch.dtype) -> Timer:
    def timer(modules: Sequence[nn.Module], example: torch.Tensor) -> list[list[float]]:
        from ..sweep import time_interleaved

        return time_interleaved(modules, example, runs, warmup, progress=False, dtype=dtype)

    return timer


def tune(
    model: nn.Module,
    images: str | Path | Sequence[str | Path] | torch.Tensor,
    target_speedup: float = 1.3,
    *,
    methods: Sequence[str] = ("cubist", "tome"),
    settings: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    batch_size: int = 4,
    calibration_images: int = 16,
    first_rung: int = 4,
    finalists: int = 4,
    flop_slack: float = 0.85,
    runs: int = 5,
    warmup: int = 1,
    task: str = "auto",
    timer: Timer | None = None,
    progress: bool = True,
) -> TuneResult:
    """The setting with the best label-free fidelity that meets ``target_speedup`` on this device.

    Args:
        model: the unmerged model (MiniSam / Sam, ImgFocus, a timm classifier; see
            :mod:`cubistmerge.train.tasks`). It is not modified.
        images: a folder of unlabelled images (recursive), a list of files, or a preprocessed
            (N, 3, H, W) tensor. The first ``calibration_images`` are used.
        target_speedup: the measured speed-up of the merged part (a SAM's image encoder, ImgFocus's
            backbone, a classifier) over the unmerged one, on ``device`` at ``batch_size``.
        methods: the methods to search (their settings from :func:`candidate_settings`), or
        settings: an explicit list of settings (``"cubist r=2 loc=1"``) instead.
        dtype: ``float32`` or an autocast dtype for the timing and the fidelity.
        calibration_images / first_rung / finalists / flop_slack: the search budget (module docstring).
        runs / warmup: interleaved timing rounds of the finalists.
        timer: ``timer(modules, example) -> seconds per module per run`` instead of the interleaved timing
            (the tests pass a fake one).

    Raises:
        TuneError: an impossible target (<= 1), no candidate that runs, an unknown method, too few images.
    """
    from .._runtime import autocast, parse_dtype
    from ..eval.distributed import resolve_device
    from ..patch import patch
    from ..sweep import parse_setting
    from ..train.tasks import make_task

    if not target_speedup > 1.0:
        raise TuneError(f"target_speedup must be > 1 (a speed-up over the unmerged model), got {target_speedup}")
    if calibration_images < 1 or first_rung < 1 or finalists < 1 or batch_size < 1:
        raise TuneError("calibration_images, first_rung, finalists and batch_size must be >= 1")
    if not 0 < flop_slack <= 1:
        raise TuneError(f"flop_slack must be in (0, 1], got {flop_slack}")
    device = resolve_device(device)
    amp = parse_dtype(dtype)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    distill_task = make_task(model, task)
    kind = distill_task.name
    reference = copy.deepcopy(model).to(device).eval()
    batch = _calibration_batch(images, distill_task, model, calibration_images)
    if batch.shape[0] < min(first_rung, calibration_images):
        raise TuneError(f"need at least {first_rung} calibration images, got {batch.shape[0]}")
    batch = batch.to(device)
    example = batch[: min(batch_size, batch.shape[0])]

    if settings is not None:
        pairs = [(v.method, v.options) for v in (parse_setting(s) for s in settings)]
    else:
        pairs = candidate_settings(distill_task.merging_module(model), methods)
    if not pairs:
        raise TuneError("no candidate settings to try")

    # 2. FLOP ratios; settings the model cannot run leave here with their reason.
    from ..flops import count_flops

    base_flops = count_flops(distill_task.merging_module(reference), example[:1])
    candidates: list[Candidate] = []
    student = copy.deepcopy(model).to(device).eval()
    merging = distill_task.merging_module(student)
    for method, options in pairs:
        candidate = Candidate(_setting_text(method, options), method, dict(options))
        candidates.append(candidate)
        try:
            patch(merging, method, **options)
            candidate.flop_ratio = base_flops / count_flops(merging, example[:1])
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
            candidate.dropped = f"cannot run: {str(error).splitlines()[0][:120]}"
            continue
        if candidate.flop_ratio < flop_slack * target_speedup:
            candidate.dropped = f"FLOP ratio below {flop_slack:g} x target"
    alive = [c for c in candidates if c.dropped is None]
    seconds["flops"] = time.perf_counter() - clock
    if not alive:
        ran = [c for c in candidates if c.flop_ratio is not None]
        best = max((c.flop_ratio for c in ran), default=None)
        raise TuneError(
            f"no candidate reaches a FLOP ratio of {flop_slack * target_speedup:.2f} (target {target_speedup:g}x"
            + (f"; the largest was {best:.2f}" if best else "; none ran on this model")
            + "): lower the target or widen the methods"
        )

    # 3. Successive halving on fidelity, over the layers of the fidelity-vs-FLOP-ratio front.
    clock = time.perf_counter()
    with torch.no_grad(), autocast(device, amp):
        targets = torch.cat([distill_task.outputs(reference, part) for part in batch.split(batch_size)])
    from tqdm.auto import tqdm

    bar = tqdm(desc="tune: fidelity", unit="setting", disable=not progress)

    def score(pool: list[Candidate], images: int) -> None:
        for candidate in pool:
            if candidate.images_scored >= images:
                continue
            patch(merging, candidate.method, **candidate.options)
            with torch.no_grad(), autocast(device, amp):
                outputs = torch.cat([distill_task.outputs(student, p) for p in batch[:images].split(batch_size)])
            candidate.fidelity = fidelity(kind, outputs.float(), targets[:images].float())
            candidate.images_scored = images
            bar.update(1)

    rung = min(first_rung, batch.shape[0])
    while True:
        score(alive, rung)
        # Ranked by front layer first: halving by fidelity alone would keep only the slowest settings (the
        # least merging is the most faithful), and none of them might reach the target.
        alive = _by_front(alive)
        if len(alive) <= finalists or rung >= batch.shape[0]:
            break
        keep = max(finalists, math.ceil(len(alive) / 2))
        for candidate in alive[keep:]:
            candidate.dropped = f"below the better half (fidelity vs FLOP ratio) on {rung} images"
        alive = alive[:keep]
        rung = min(2 * rung, batch.shape[0])
    seconds["fidelity"] = time.perf_counter() - clock

    # 4. Time the finalists: front members spread over the FLOP ratios that may meet the target, then the
    # untimed front members that could still beat the best hit, or (if nothing met) a second round.
    clock = time.perf_counter()
    timer = timer or _interleaved_timer(runs, warmup, amp)
    front = _front(alive)
    for candidate in alive:
        if candidate not in front:
            candidate.dropped = "dominated: a setting of its method has a higher FLOP ratio and a better fidelity"
    chosen_pool = _spread(front, finalists, flop_slack * target_speedup, target_speedup / flop_slack)
    _time(chosen_pool, model, distill_task, reference, example, timer, device)
    message = ""
    meeting = [c for c in chosen_pool if c.speedup >= target_speedup]
    efficiency = _efficiencies(chosen_pool)
    if meeting:
        # Only an untimed setting more faithful than the best hit, predicted fast enough by its method's
        # measured efficiency, could change the answer.
        score(meeting, batch.shape[0])
        bar_score = max(c.score for c in meeting)
        contenders = [
            c
            for c in front
            if c.speedup is None
            and c.score > bar_score
            and c.flop_ratio * efficiency(c.method) >= flop_slack * target_speedup
        ]
        contenders = sorted(contenders, key=lambda c: c.score, reverse=True)[:finalists]
        if contenders:
            _time(contenders, model, distill_task, reference, example, timer, device)
            chosen_pool += contenders
            meeting += [c for c in contenders if c.speedup >= target_speedup]
            message = (
                f"Refined: timed {len(contenders)} more front setting(s) more faithful than the best hit that "
                "their method's measured efficiency predicted close to the target. "
            )
    else:
        second = [
            c
            for c in candidates
            if c.fidelity and c.speedup is None and c.flop_ratio * efficiency(c.method) >= target_speedup
        ]
        score(second, batch.shape[0])
        second = sorted(_front(second), key=lambda c: c.score, reverse=True)[:finalists]
        if second:
            _time(second, model, distill_task, reference, example, timer, device)
            chosen_pool += second
            meeting = [c for c in second if c.speedup >= target_speedup]
            overall = ", ".join(f"{m} {efficiency(m):.2f}" for m in sorted({c.method for c in chosen_pool}))
            message = (
                f"No first-round finalist reached {target_speedup:g}x (measured efficiency: {overall}); a "
                f"second round timed the most faithful front settings whose FLOP ratio times their method's "
                f"efficiency reaches the target, scored on all {batch.shape[0]} images. "
            )
    for candidate in chosen_pool:
        if candidate not in meeting:
            candidate.dropped = f"measured {candidate.speedup:.3f}x < target"
    seconds["timing"] = time.perf_counter() - clock
    score(meeting, batch.shape[0])  # compared on the same images, however far each went in the halving
    bar.close()
    if meeting:
        best = max(meeting, key=lambda c: c.score)
        message += f"The best fidelity among the {len(meeting)} timed setting(s) that meet the target."
        met = True
    else:
        best = max(chosen_pool, key=lambda c: c.speedup)
        message += (
            f"No setting met {target_speedup:g}x on this device: returning the fastest timed one "
            f"({best.speedup:.3f}x). Lower the target or add methods."
        )
        met = False
    best.dropped = None
    for candidate in candidates:
        if candidate.dropped is None and candidate is not best:
            candidate.dropped = (
                "meets the target, less faithful than the pick"
                if candidate.speedup is not None
                else "on the front, not timed (its FLOP ratio was not needed to find the target)"
            )
    seconds["total"] = sum(seconds.values())
    return TuneResult(
        setting=best.setting,
        method=best.method,
        options=best.options,
        target_speedup=float(target_speedup),
        speedup=float(best.speedup),
        flop_ratio=float(best.flop_ratio),
        fidelity=best.fidelity,
        met=met,
        message=message,
        kind=kind,
        candidates=candidates,
        seconds=seconds,
        setup={
            "device": str(device),
            "dtype": dtype,
            "batch_size": batch_size,
            "calibration_images": int(batch.shape[0]),
            "first_rung": first_rung,
            "finalists": finalists,
            "flop_slack": flop_slack,
            "runs": runs,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "task": distill_task.describe(),
        },
    )


def _dominated(candidate: Candidate, other: Candidate) -> bool:
    # Within a method only: methods convert FLOPs into time differently (ToMe's gathers and sorts cost more
    # per saved FLOP than a regular grid), so a FLOP ratio says little across methods.
    return (
        other.method == candidate.method
        and other.flop_ratio >= candidate.flop_ratio
        and other.score >= candidate.score
        and (other.flop_ratio > candidate.flop_ratio or other.score > candidate.score)
    )


def _front(pool: list[Candidate]) -> list[Candidate]:
    """The candidates no other one of their method beats on both FLOP ratio and fidelity, fastest last."""
    front = [c for c in pool if not any(_dominated(c, other) for other in pool)]
    return sorted(front, key=lambda c: (c.flop_ratio, -c.score))


def _by_front(pool: list[Candidate]) -> list[Candidate]:
    """``pool`` ordered by non-dominated layer (the front, then the front of the rest, ...), each by fidelity."""
    ordered, rest = [], list(pool)
    while rest:
        layer = _front(rest)
        ordered += sorted(layer, key=lambda c: c.score, reverse=True)
        rest = [c for c in rest if c not in layer]
    return ordered


def _efficiencies(timed: list[Candidate]) -> Callable[[str], float]:
    """Measured speed-up per FLOP ratio, the median per method (over all timed settings for untimed methods)."""
    ratios: dict[str, list[float]] = {}
    for candidate in timed:
        ratios.setdefault(candidate.method, []).append(candidate.speedup / candidate.flop_ratio)
    overall = statistics.median(r for values in ratios.values() for r in values)
    per_method = {method: statistics.median(values) for method, values in ratios.items()}
    return lambda method: per_method.get(method, overall)


def _spread(front: list[Candidate], count: int, low: float, high: float) -> list[Candidate]:
    """Up to ``count`` front members whose FLOP ratios spread evenly over [low, high] (nearest to each point)."""
    if len(front) <= count:
        return list(front)
    points = [low + (high - low) * i / max(count - 1, 1) for i in range(count)]
    chosen: list[Candidate] = []
    for point in points:
        left = [c for c in front if c not in chosen]
        chosen.append(min(left, key=lambda c: abs(c.flop_ratio - point)))
    return sorted(chosen, key=lambda c: c.flop_ratio)


def _time(
    pool: list[Candidate],
    model: nn.Module,
    task: Any,
    reference: nn.Module,
    example: torch.Tensor,
    timer: Timer,
    device: torch.device,
) -> None:
    """Measured speed-up of each candidate's merged part, timed interleaved with the unmerged one."""
    from ..patch import patch

    copies = []
    for candidate in pool:
        copied = copy.deepcopy(model).to(device).eval()
        patch(task.merging_module(copied), candidate.method, **candidate.options)
        copies.append(task.merging_module(copied))
    seconds = timer([task.merging_module(reference), *copies], example)
    base = statistics.median(seconds[0])
    for candidate, times in zip(pool, seconds[1:], strict=True):
        candidate.speedup = base / statistics.median(times)


def _calibration_batch(images: Any, task: Any, model: nn.Module, count: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise TuneError(f"an image tensor must be (N, 3, H, W), got shape {tuple(images.shape)}")
        return images[:count]
    from ..train.data import ImageFolder

    dataset = ImageFolder(images, task.transform(model), max_images=count)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])
