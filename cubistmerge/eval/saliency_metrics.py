"""Fidelity of a merged model's dense maps to the unmerged model's: pure functions over (B, ...) tensors.

Every function compares ``merged`` and ``reference`` image by image (the first dimension is the
batch) and returns one value per image, so results can be gathered across processes and averaged
in any grouping.
"""

from __future__ import annotations

import torch

__all__ = ["binary_iou", "mean_absolute_error", "pearson_correlation"]


def _flat_pair(merged: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if merged.shape != reference.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(merged.shape)} and {tuple(reference.shape)}")
    if merged.dim() < 2:
        raise ValueError(f"maps must be (B, ...) with a batch dimension, got shape {tuple(merged.shape)}")
    return merged.detach().flatten(1).double(), reference.detach().flatten(1).double()


def mean_absolute_error(merged: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) mean |merged - reference| over each image's values."""
    a, b = _flat_pair(merged, reference)
    return (a - b).abs().mean(dim=1)


def pearson_correlation(merged: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) Pearson correlation of each image's values.

    A constant map has no defined correlation: NaN, unless both maps are the same constant (1.0),
    so identical outputs always score 1.
    """
    a, b = _flat_pair(merged, reference)
    a_centred, b_centred = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    denominator = a_centred.norm(dim=1) * b_centred.norm(dim=1)
    correlation = (a_centred * b_centred).sum(dim=1) / denominator
    identical = (a == b).all(dim=1)
    return torch.where(identical, torch.ones_like(correlation), correlation)


def binary_iou(merged: torch.Tensor, reference: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B,) IoU of the maps thresholded at ``threshold`` (value > threshold); two empty masks give 1."""
    a, b = _flat_pair(merged, reference)
    a_mask, b_mask = a > threshold, b > threshold
    intersection = (a_mask & b_mask).sum(dim=1).double()
    union = (a_mask | b_mask).sum(dim=1).double()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
