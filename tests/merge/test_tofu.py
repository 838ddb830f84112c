"""ToFu's reductions of a ToMe match (prune, MLERP) against a loop reference, and their properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge.tofu import merge_tofu, mlerp, tofu_modes
from cubistmerge.merge.tome import match_bipartite, max_tome_r

from . import reference as ref

MODES = pytest.mark.parametrize("mode", ["prune", "mlerp"])


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 2))
    tokens = draw(st.integers(2, 20))
    channels = draw(st.integers(1, 6))
    protected = draw(st.integers(0, min(3, tokens)))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    # A metric with few directions, so several sources often share a destination.
    metric = torch.randint(-2, 3, (batch, tokens, 2), generator=generator).double()
    x = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    r = draw(st.integers(0, max_tome_r(tokens, protected)))
    return metric, x, r, protected


@pytest.mark.parametrize("mlerp_norm", ["mean", "destination"])
@MODES
@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_matches_loop_reference(case, mode, mlerp_norm):
    metric, x, r, protected = case
    match = match_bipartite(metric, r, num_protected=protected)
    out = merge_tofu(x, match, mode, mlerp_norm=mlerp_norm)
    assert out.shape == (x.shape[0], x.shape[1] - r, x.shape[2])
    for b in range(x.shape[0]):
        expected = ref.tofu_reduce(x[b].tolist(), match.index[b].tolist(), mode, mlerp_norm)
        torch.testing.assert_close(out[b], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hand_example():
    # A = {0, 2}, B = {1, 3}: token 0 (A) is parallel to 1 (B), token 2 to 3; r=1 merges the best pair.
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [7.0, 7.0], [0.0, 2.0]]], dtype=torch.float64)
    match = match_bipartite(metric, 1)
    # Official order: kept A (token 2), then B (1, 3); token 0 went into token 1's slot.
    assert match.index.tolist() == [[1, 1, 0, 2]]
    assert merge_tofu(x, match, "prune").tolist() == [[[7.0, 7.0], [1.0, 0.0], [0.0, 2.0]]]
    # MLERP of (3, 4) and (1, 0): mean (2, 2) of norm 2*sqrt(2), rescaled to the largest norm 5.
    mlerped = merge_tofu(x, match, "mlerp")
    torch.testing.assert_close(mlerped[0, 1], torch.tensor([5 / 2**0.5, 5 / 2**0.5], dtype=torch.float64))
    assert mlerped[0, 0].tolist() == [7.0, 7.0] and mlerped[0, 2].tolist() == [0.0, 2.0]
    # OpenToMe divides the mean by the destination's norm (1): (2, 2) * 5.
    assert merge_tofu(x, match, "mlerp", mlerp_norm="destination")[0, 1].tolist() == [10.0, 10.0]
    torch.testing.assert_close(mlerp(x[0, [1, 0]]), mlerped[0, 1])


def test_mlerp_keeps_the_largest_norm():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 8, generator=generator, dtype=torch.float64)
    match = match_bipartite(x, 12, num_protected=1)
    out = merge_tofu(x, match, "mlerp")
    norms = x.norm(dim=-1)
    largest = torch.full((2, 18), float("-inf"), dtype=torch.float64).scatter_reduce(1, match.index, norms, "amax")
    torch.testing.assert_close(out.norm(dim=-1), largest)


@MODES
def test_r_zero_and_inputs_untouched(mode):
    x = torch.randn(2, 9, 4)
    before = x.clone()
    match = match_bipartite(x, 0, num_protected=1)
    assert torch.equal(merge_tofu(x, match, mode), x)
    match = match_bipartite(x, 3, num_protected=1)
    merge_tofu(x, match, mode)
    assert torch.equal(x, before)


def test_gradients():
    """MLERP passes gradients to every member; pruning only to the kept token (the sources are dropped)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 10, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    match = match_bipartite(x.detach(), 4)
    sources = match.sources[0].tolist()
    merge_tofu(x, match, "mlerp").sum().backward()
    assert all(x.grad[0, s].abs().sum() > 0 for s in sources)
    x.grad = None
    merge_tofu(x, match, "prune").sum().backward()
    assert all(x.grad[0, s].abs().sum() == 0 for s in sources)
    assert torch.autograd.gradcheck(lambda t: merge_tofu(t, match, "mlerp"), (x,))


def test_modes_layout_and_errors():
    assert tofu_modes(12) == ["prune"] * 7 + ["mlerp"] * 5  # OpenToMe: MLERP where i > L // 2
    assert tofu_modes(1) == ["prune"]
    match = match_bipartite(torch.randn(1, 6, 2), 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        merge_tofu(torch.randn(1, 6, 2), match, "mean")
    with pytest.raises(ValueError, match="mlerp_norm must be one of"):
        merge_tofu(torch.randn(1, 6, 2), match, "mlerp", mlerp_norm="max")
    with pytest.raises(ValueError, match="must be"):
        merge_tofu(torch.randn(1, 7, 2), match, "prune")
    with pytest.raises(ValueError, match="positive int"):
        tofu_modes(0)
