"""Tests for the index-map group operations: merge_groups, unmerge_groups, compose_groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge import compose_groups, merge_groups, unmerge_groups
from cubistmerge.merge.groups import reduce_pairwise_bias

from . import reference as ref

REPRESENTATIONS = ("maxmag", "maxmag_vector", "mean")
SETTINGS = settings(max_examples=80, deadline=None)


@st.composite
def grouped_tokens(draw, max_batch=3, max_tokens=12, max_channels=4):
    """(x, index, num_out, size): integer-valued float64 tokens, a surjective map per image
    (every image gets the same number of groups), and positive integer sizes."""
    batch = draw(st.integers(1, max_batch))
    tokens = draw(st.integers(1, max_tokens))
    channels = draw(st.integers(1, max_channels))
    num_out = draw(st.integers(1, tokens))
    index = []
    for _ in range(batch):
        # Every slot appears at least once: a permutation of "one of each slot" plus extras.
        extras = draw(st.lists(st.integers(0, num_out - 1), min_size=tokens - num_out, max_size=tokens - num_out))
        index.append(draw(st.permutations(list(range(num_out)) + extras)))
    count = batch * tokens * channels
    values = draw(st.lists(st.integers(-4, 4), min_size=count, max_size=count))
    sizes = draw(st.lists(st.integers(1, 6), min_size=batch * tokens, max_size=batch * tokens))
    x = torch.tensor(values, dtype=torch.float64).reshape(batch, tokens, channels)
    size = torch.tensor(sizes, dtype=torch.float64).reshape(batch, tokens)
    return x, torch.tensor(index, dtype=torch.long), num_out, size


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("with_size", [False, True])
@SETTINGS
@given(case=grouped_tokens())
def test_merge_groups_matches_reference(case, representation, with_size):
    x, index, num_out, size = case
    merged, merged_size = merge_groups(x, index, num_out, representation, size if with_size else None)
    assert merged.shape == (x.shape[0], num_out, x.shape[2])
    assert merged_size.shape == (x.shape[0], num_out)
    for b in range(x.shape[0]):
        values, sizes = ref.reduce_groups(
            x[b].tolist(), index[b].tolist(), num_out, representation, size[b].tolist() if with_size else None
        )
        assert merged_size[b].tolist() == sizes
        expected = torch.tensor(values, dtype=torch.float64)
        if representation == "mean":
            torch.testing.assert_close(merged[b], expected, rtol=0, atol=1e-12)
        else:
            assert torch.equal(merged[b], expected)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@SETTINGS
@given(case=grouped_tokens())
def test_merge_groups_does_not_modify_inputs(case, representation):
    x, index, num_out, size = case
    copies = [t.clone() for t in (x, index, size)]
    versions = [t._version for t in (x, index, size)]
    merge_groups(x, index, num_out, representation, size)
    for tensor, copy, version in zip((x, index, size), copies, versions, strict=True):
        assert torch.equal(tensor, copy)
        assert tensor._version == version


def test_worked_example_maxmag():
    x = torch.tensor([[[-3.0, 1.0], [2.0, -0.5]]])
    merged, merged_size = merge_groups(x, torch.tensor([[0, 0]]), 1, "maxmag")
    assert merged.tolist() == [[[-3.0, 1.0]]]
    assert merged_size.tolist() == [[2.0]]


@pytest.mark.parametrize("order", [[-3.0, 3.0], [3.0, -3.0]])
def test_maxmag_tie_keeps_positive(order):
    x = torch.tensor(order).reshape(1, 2, 1)
    merged, _ = merge_groups(x, torch.tensor([[0, 0]]), 1, "maxmag")
    assert merged.item() == 3.0


def test_maxmag_over_three_members():
    x = torch.tensor([[[5.0, 1.0, 1.0], [1.0, -5.0, 1.0], [1.0, 1.0, 5.0]]])
    merged, _ = merge_groups(x, torch.tensor([[0, 0, 0]]), 1, "maxmag")
    assert merged.tolist() == [[[5.0, -5.0, 5.0]]]


def test_maxmag_vector_tie_keeps_lowest_position():
    # Slot 0 holds positions 1 and 2, slot 1 holds 0 and 3; all norms are 5.
    x = torch.tensor([[[3.0, 4.0], [0.0, -5.0], [-5.0, 0.0], [4.0, 3.0]]])
    merged, _ = merge_groups(x, torch.tensor([[1, 0, 0, 1]]), 2, "maxmag_vector")
    assert merged.tolist() == [[[0.0, -5.0], [3.0, 4.0]]]


def test_maxmag_vector_takes_whole_largest_vector():
    x = torch.tensor([[[10.0, 0.0], [-6.0, -9.0]]])  # norms 10 and ~10.8
    merged, _ = merge_groups(x, torch.tensor([[0, 0]]), 1, "maxmag_vector")
    assert merged.tolist() == [[[-6.0, -9.0]]]


def test_mean_is_size_weighted():
    x = torch.tensor([[[1.0], [4.0], [10.0]]], dtype=torch.float64)
    size = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    merged, merged_size = merge_groups(x, torch.tensor([[0, 0, 1]]), 2, "mean", size)
    assert merged.flatten().tolist() == [7.0 / 4.0, 10.0]
    assert merged_size.tolist() == [[4.0, 2.0]]


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_identity_map_returns_copy_of_input(representation):
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    index = torch.arange(5).expand(2, 5)
    merged, merged_size = merge_groups(x, index, 5, representation)
    assert torch.equal(merged, x)
    assert torch.equal(merged_size, torch.ones(2, 5, dtype=torch.float64))


def test_maxmag_gradient_is_exact_on_repeated_calls():
    # d(sum)/dx is 1 on each selected value and 0 elsewhere (distinct magnitudes).
    # A gradient that depends on uninitialised memory only shows on some calls.
    index = (torch.arange(64) // 2).unsqueeze(0)
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(1, 64, 4, generator=generator, dtype=torch.float64)
    for attempt in range(40):
        x = base.clone().requires_grad_(True)
        first, _ = merge_groups(x, index, 32, "maxmag")
        second, _ = merge_groups(x * 1.0, index, 32, "maxmag")
        (first + second).sum().backward()
        selected = (unmerge_groups(first.detach(), index) == base).double()
        if not torch.equal(x.grad, 2.0 * selected):
            wrong = (x.grad != 2.0 * selected).nonzero().tolist()
            pytest.fail(
                f"attempt {attempt}: {len(wrong)} wrong gradient entries, first at {wrong[0]}: "
                f"{x.grad[tuple(wrong[0])].item()} instead of {2.0 * selected[tuple(wrong[0])].item()}"
            )


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_gradients_flow(representation):
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 0, 1, 2, 2, 2, 3], [0, 1, 1, 2, 3, 3, 3]])
    merged, _ = merge_groups(x, index, 4, representation)
    merged.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(float(merged.numel()), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_dtypes_preserved(dtype, representation):
    x = torch.randn(2, 6, 3).to(dtype)
    index = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2]])
    merged, _ = merge_groups(x, index, 3, representation)
    assert merged.dtype == dtype


@pytest.mark.parametrize("bad", ["max", "average", ""])
def test_unknown_representation(bad):
    with pytest.raises(ValueError, match="maxmag"):
        merge_groups(torch.zeros(1, 2, 2), torch.tensor([[0, 0]]), 1, bad)


def test_index_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        merge_groups(torch.zeros(1, 3, 2), torch.tensor([[0, 0]]), 1, "mean")


# ----------------------------------------------------------------------------
# unmerge_groups and compose_groups
# ----------------------------------------------------------------------------


@SETTINGS
@given(case=grouped_tokens(), out_channels=st.integers(1, 5))
def test_unmerge_groups_matches_reference(case, out_channels):
    x, index, num_out, _ = case
    y = torch.randn(x.shape[0], num_out, out_channels, dtype=torch.float64)
    out = unmerge_groups(y, index)
    assert out.shape == (x.shape[0], x.shape[1], out_channels)
    for b in range(x.shape[0]):
        assert out[b].tolist() == ref.unmerge(y[b].tolist(), index[b].tolist())


@SETTINGS
@given(case=grouped_tokens())
def test_unmerge_of_merge_is_constant_on_groups(case):
    x, index, num_out, size = case
    merged, _ = merge_groups(x, index, num_out, "mean", size)
    restored = unmerge_groups(merged, index)
    assert restored.shape == x.shape
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            assert torch.equal(restored[b, t], merged[b, index[b, t]])


def test_unmerge_batch_mismatch():
    with pytest.raises(ValueError, match="batch"):
        unmerge_groups(torch.zeros(2, 3, 4), torch.zeros(1, 5, dtype=torch.long))


@st.composite
def two_maps(draw, max_batch=3, max_tokens=12):
    batch = draw(st.integers(1, max_batch))
    tokens = draw(st.integers(1, max_tokens))
    middle = draw(st.integers(1, tokens))
    final = draw(st.integers(1, middle))
    first, second = [], []
    for _ in range(batch):
        extra = draw(st.lists(st.integers(0, middle - 1), min_size=tokens - middle, max_size=tokens - middle))
        first.append(draw(st.permutations(list(range(middle)) + extra)))
        extra = draw(st.lists(st.integers(0, final - 1), min_size=middle - final, max_size=middle - final))
        second.append(draw(st.permutations(list(range(final)) + extra)))
    return torch.tensor(first), torch.tensor(second), middle, final


@SETTINGS
@given(maps=two_maps())
def test_compose_groups_matches_reference(maps):
    first, second, _, final = maps
    composed = compose_groups(first, second)
    assert composed.shape == first.shape
    assert composed.dtype == torch.long
    for b in range(first.shape[0]):
        assert composed[b].tolist() == ref.compose(first[b].tolist(), second[b].tolist())
    assert composed.min() >= 0 and composed.max() < final


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@SETTINGS
@given(maps=two_maps(), channels=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_merging_twice_equals_merging_with_composed_map(maps, channels, seed, representation):
    # Selections compose (up to which of two equal candidates wins: values are
    # continuous here, so no ties) and a size-weighted mean of means is the mean.
    first, second, middle, final = maps
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(first.shape[0], first.shape[1], channels, generator=generator, dtype=torch.float64)
    once, _ = merge_groups(x, first, middle, representation)
    mid_size = merge_groups(x, first, middle, "mean")[1]
    twice, twice_size = merge_groups(once, second, final, representation, mid_size)
    direct, direct_size = merge_groups(x, compose_groups(first, second), final, representation)
    torch.testing.assert_close(twice, direct, rtol=0, atol=1e-12)
    assert torch.equal(twice_size, direct_size)


def _loop_reduce_bias(bias: torch.Tensor, index: torch.Tensor, num_out: int) -> torch.Tensor:
    B, N = index.shape
    heads = bias.shape[1]
    out = torch.full((B, heads, num_out, num_out), float("-inf"), dtype=bias.dtype)
    for b in range(B):
        for h in range(heads):
            for i in range(N):
                for j in range(N):
                    gi, gj = index[b, i], index[b, j]
                    out[b, h, gi, gj] = max(out[b, h, gi, gj], bias[min(b, bias.shape[0] - 1), h, i, j])
    return out


@pytest.mark.parametrize("batch_of_bias", [1, 2])
def test_reduce_pairwise_bias_is_max_over_member_pairs(batch_of_bias):
    torch.manual_seed(0)
    index = torch.tensor([[0, 1, 1, 2, 3, 3], [0, 0, 1, 2, 2, 3]])
    bias = torch.randn(batch_of_bias, 2, 6, 6)
    bias[..., 4] = float("-inf")  # a key nobody may attend, but merged with key 5 (image 0) or 3 (image 1)
    reduced = reduce_pairwise_bias(bias, index, 4)
    assert torch.equal(reduced, _loop_reduce_bias(bias, index, 4))


def test_reduce_pairwise_bias_gradient_is_exact():
    index = torch.tensor([[0, 0, 1, 2]])
    for _ in range(50):  # uninitialised starting values once split gradients at random
        bias = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_(True)
        reduce_pairwise_bias(bias, index, 3).sum().backward()
        # each of the 9 output entries takes its gradient from exactly one member pair (the largest)
        assert bias.grad.sum() == 9 and set(bias.grad.unique().tolist()) == {0.0, 1.0}
