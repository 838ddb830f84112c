"""Small device helpers shared by the benchmark, the sweeps and the evaluations."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

__all__ = ["DTYPES", "autocast", "cpu_snapshot", "foreign_cpu_load", "parse_dtype", "synchronize"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or that torch dtype) -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}") from None


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for float32.

    Autocast rather than converting weights: the models a user passes in stay as they are.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall clock s, busy CPU s of the whole machine, CPU s of this process), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    busy = sum(values[:3]) + sum(values[5:8])
    own = os.times()
    return time.perf_counter(), busy / ticks, own.user + own.system


def foreign_cpu_load(
    before: tuple[float, float, float] | None, after: tuple[float, float, float] | None
) -> float | None:
    """Average number of CPUs kept busy by anything but this process between two snapshots."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    wall = after[0] - before[0]
    foreign = (after[1] - before[1]) - (after[2] - before[2])
    return max(foreign, 0.0) / wall
