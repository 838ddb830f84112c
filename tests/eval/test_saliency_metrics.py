"""Per-image fidelity metrics of dense maps against numpy references and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cubistmerge.eval.saliency_metrics import binary_iou, mean_absolute_error, pearson_correlation

maps = st.integers(1, 3).flatmap(
    lambda b: st.tuples(
        arrays(np.float64, (b, 1, 3, 4), elements=st.floats(0, 1, width=32)),
        arrays(np.float64, (b, 1, 3, 4), elements=st.floats(0, 1, width=32)),
    )
)


@settings(max_examples=60, deadline=None)
@given(maps)
def test_metrics_match_numpy_per_image(pair):
    a, b = pair
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_allclose(mean_absolute_error(ta, tb).numpy(), np.abs(a - b).reshape(len(a), -1).mean(1))
    correlation = pearson_correlation(ta, tb).numpy()
    for i in range(len(a)):
        x, y = a[i].ravel(), b[i].ravel()
        if np.array_equal(x, y):
            assert correlation[i] == 1.0
        elif x.std() > 1e-6 and y.std() > 1e-6:
            assert correlation[i] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
        x_mask, y_mask = x > 0.5, y > 0.5
        union = (x_mask | y_mask).sum()
        expected = 1.0 if union == 0 else (x_mask & y_mask).sum() / union
        assert binary_iou(ta, tb)[i].item() == pytest.approx(expected)
    assert torch.equal(pearson_correlation(ta, ta), torch.ones(len(a), dtype=torch.float64))


def test_hand_made_cases():
    ref = torch.tensor([[[0.0, 0.2], [0.6, 0.9]]])
    assert mean_absolute_error(ref + 0.1, ref).item() == pytest.approx(0.1)
    assert pearson_correlation(2 * ref + 0.1, ref).item() == pytest.approx(1.0)
    assert pearson_correlation(1 - ref, ref).item() == pytest.approx(-1.0)
    assert binary_iou(ref, ref).item() == 1.0
    shifted = torch.tensor([[[0.0, 0.7], [0.6, 0.1]]])  # above 0.5: {(0,1), (1,0)} vs {(1,0), (1,1)}
    assert binary_iou(shifted, ref).item() == pytest.approx(1 / 3)
    assert binary_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == 1.0
    assert torch.isnan(pearson_correlation(torch.full((1, 4), 0.3), torch.rand(1, 4))).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        mean_absolute_error(torch.zeros(1, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="batch dimension"):
        pearson_correlation(torch.zeros(4), torch.zeros(4))
