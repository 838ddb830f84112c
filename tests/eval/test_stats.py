"""The paired bootstrap interval of a metric's change (cubistmerge.eval.stats)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.eval.stats import paired_bootstrap


def _loop_reference(a, b, counts, resamples, confidence, seed):
    """Resample image by image with the same draws, recompute both ratios, take percentiles."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(a), size=(resamples, len(a)))
    changes = []
    for draw in draws:
        count = sum(counts[i] for i in draw)
        changes.append(sum(a[i] for i in draw) / count - sum(b[i] for i in draw) / count)
    tail = 100 * (1 - confidence) / 2
    return np.percentile(changes, [tail, 100 - tail])


def test_the_interval_equals_a_loop_over_resampled_images():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 9, size=30).tolist()  # instances per image
    a = [float(rng.uniform(0.5, 0.9) * n) for n in counts]  # per-image IoU sums
    b = [float(rng.uniform(0.4, 0.9) * n) for n in counts]
    interval = paired_bootstrap(a, b, counts, resamples=500, confidence=0.9, seed=7)
    low, high = _loop_reference(a, b, counts, 500, 0.9, 7)
    assert interval.low == pytest.approx(low, rel=1e-12) and interval.high == pytest.approx(high, rel=1e-12)
    # the change itself is over instances (sum / count), not a mean of per-image means
    assert interval.delta == pytest.approx((sum(a) - sum(b)) / sum(counts), rel=1e-12)
    assert interval.images == 30 and interval.resamples == 500


def test_a_change_shared_by_every_image_has_no_spread_and_identical_models_none():
    same = paired_bootstrap([0.5, 0.7, 0.9], [0.4, 0.6, 0.8], resamples=200)
    assert same.low == pytest.approx(0.1) and same.high == pytest.approx(0.1) and same.excludes_zero
    zero = paired_bootstrap([0.5, 0.7], [0.5, 0.7], resamples=200)
    assert (zero.delta, zero.low, zero.high) == (0.0, 0.0, 0.0) and not zero.excludes_zero
    assert same.format(scale=100, digits=1) == "+10.0 [+10.0, +10.0]"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=40), st.integers(0, 2**16))
def test_the_interval_brackets_the_change_and_flips_with_the_order(pairs, seed):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    forward = paired_bootstrap(a, b, resamples=300, seed=seed)
    backward = paired_bootstrap(b, a, resamples=300, seed=seed)
    assert forward.low <= forward.high
    assert min(a_ - b_ for a_, b_ in pairs) - 1e-12 <= forward.low
    assert forward.high <= max(a_ - b_ for a_, b_ in pairs) + 1e-12
    assert backward.low == pytest.approx(-forward.high, abs=1e-12)
    assert backward.high == pytest.approx(-forward.low, abs=1e-12)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no image"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="count > 0"):
        paired_bootstrap([1.0], [1.0], [0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [1.0], confidence=95)
