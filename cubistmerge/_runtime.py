"""Small device helpers shared by the benchmark, the sweeps and the evaluations."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["DTYPES", "autocast", "parse_dtype", "synchronize"]

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
