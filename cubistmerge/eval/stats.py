"""Paired comparisons of two models evaluated on the same images.

A quality change measured on 158 images is itself uncertain; the interval that matters is the one of the
*change*, with the images as the unit that varies: two models scored on the same images share each image's
difficulty, so resampling the images (the same draw for both) gives a much tighter, honest interval than two
separate intervals would.

A metric is a ratio of per-image totals: COCO box-prompt mIoU is the sum of an image's instance IoUs over its
instance count (``totals`` = IoU sums, ``counts`` = instances), a per-image mean such as saliency correlation has
``counts`` of 1. The resampled statistic is ``sum(totals) / sum(counts)`` over the drawn images, as the metric
itself is computed over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["PairedInterval", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedInterval:
    """The change ``a - b`` of a metric on all images and its percentile bootstrap interval."""

    delta: float
    low: float
    high: float
    confidence: float
    resamples: int
    images: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, scale: float = 1.0, digits: int = 4) -> str:
        """``+1.23 [+0.80, +1.70]`` (times ``scale``)."""
        return f"{scale * self.delta:+.{digits}f} [{scale * self.low:+.{digits}f}, {scale * self.high:+.{digits}f}]"


def paired_bootstrap(
    totals_a: Sequence[float],
    totals_b: Sequence[float],
    counts: Sequence[float] | None = None,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedInterval:
    """The change of ``sum(totals) / sum(counts)`` from model b to model a, with images resampled in pairs.

    ``totals_a``, ``totals_b``, ``counts``: one value per image, in the same image order (counts default to
    1). Each resample draws ``len(totals_a)`` images with replacement, the same draw for both models.

    Raises:
        ValueError: lengths differ, no image, an image with a count <= 0, or a confidence outside (0, 1).
    """
    a = np.asarray(totals_a, dtype=np.float64)
    b = np.asarray(totals_b, dtype=np.float64)
    n = np.ones_like(a) if counts is None else np.asarray(counts, dtype=np.float64)
    if not (a.ndim == b.ndim == n.ndim == 1) or not (len(a) == len(b) == len(n)):
        raise ValueError(
            f"totals_a, totals_b and counts must be 1-D and of one length, got {a.shape}, {b.shape}, {n.shape}"
        )
    if len(a) == 0:
        raise ValueError("no image to compare")
    if (n <= 0).any():
        raise ValueError("every image needs a count > 0 (leave images without instances out)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    draws = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))  # (resamples, images)
    weights = np.stack([np.bincount(row, minlength=len(a)) for row in draws])  # times each image is drawn
    resampled = (weights @ a - weights @ b) / (weights @ n)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return PairedInterval(
        delta=float((a.sum() - b.sum()) / n.sum()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
        images=len(a),
    )
