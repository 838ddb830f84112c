"""Tests for the ToMe baseline: bipartite_soft_matching, merge_weighted, tome_schedule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge import (
    bipartite_soft_matching,
    compose_groups,
    match_bipartite,
    max_tome_r,
    merge_matched,
    merge_weighted,
    tome_schedule,
    unmerge_groups,
)

from . import reference as ref

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def int_metrics(draw, max_batch=2, max_tokens=16, max_channels=4, max_protected=3):
    """(metric, r, p): integer-valued float64 (B, N, C) features, a valid r and p protected."""
    batch = draw(st.integers(1, max_batch))
    tokens = draw(st.integers(1, max_tokens))
    channels = draw(st.integers(1, max_channels))
    protected = draw(st.integers(0, min(max_protected, tokens)))
    count = batch * tokens * channels
    values = draw(st.lists(st.integers(-4, 4), min_size=count, max_size=count))
    metric = torch.tensor(values, dtype=torch.float64).reshape(batch, tokens, channels)
    r = draw(st.integers(0, (tokens - protected) // 2))
    return metric, r, protected


def reference_index(metric: torch.Tensor, r: int, protected: int, order: str = "official") -> torch.Tensor:
    return torch.tensor(
        [ref.bipartite_matching(row, r, protected, order) for row in metric.tolist()], dtype=torch.long
    )


ORDERS = pytest.mark.parametrize("order", ["official", "spatial"])

# ----------------------------------------------------------------------------
# bipartite_soft_matching
# ----------------------------------------------------------------------------


@ORDERS
@SETTINGS
@given(case=int_metrics())
def test_matching_matches_reference_exactly(case, order):
    metric, r, protected = case
    index = bipartite_soft_matching(metric, r, num_protected=protected, order=order)
    assert index.dtype == torch.long
    assert index.shape == metric.shape[:2]
    assert torch.equal(index, reference_index(metric, r, protected, order))


@ORDERS
@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(2, 24), st.integers(1, 8)),
    protected=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_matching_matches_reference_on_continuous_values(shape, protected, seed, data, order):
    batch, tokens, channels = shape
    protected = min(protected, tokens)
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    r = data.draw(st.integers(0, (tokens - protected) // 2))
    match = match_bipartite(metric, r, num_protected=protected, order=order)
    assert torch.equal(match.index, reference_index(metric, r, protected, order))
    # survivors: the input position holding each output slot, consistent with the index map.
    assert torch.equal(match.index.gather(1, match.survivors), torch.arange(tokens - r).expand(batch, -1))


@SETTINGS
@given(case=int_metrics())
def test_official_matching_structure(case):
    metric, r, protected = case
    batch, tokens, _ = metric.shape
    match = match_bipartite(metric, r, num_protected=protected)
    if r == 0:  # nothing merges, nothing moves
        assert torch.equal(match.index, torch.arange(tokens).expand(batch, -1))
        return
    for b in range(batch):
        slots = match.index[b].tolist()
        counts = torch.bincount(match.index[b], minlength=tokens - r).tolist()
        assert len(counts) == tokens - r and min(counts, default=1) >= 1
        # Protected tokens keep slots 0..p-1, alone.
        assert slots[:protected] == list(range(protected))
        assert all(counts[s] == 1 for s in range(protected))
        # Only even positions (set A) merge away, never a protected one; all odd ones (set B) survive.
        sources = match.sources[b].tolist()
        assert all(t % 2 == 0 and t >= protected for t in sources)
        # The unprotected B tokens take the last slots, in their order.
        set_b = [t for t in range(1, tokens, 2) if t >= protected]
        assert [slots[t] for t in set_b] == list(range(tokens - r - len(set_b), tokens - r))
        # With protected tokens the kept A tokens keep their order between the protected and B tokens.
        kept_a = [t for t in range(0, tokens, 2) if t >= protected and t not in sources]
        if protected:
            assert [slots[t] for t in kept_a] == list(range(protected, protected + len(kept_a)))


@SETTINGS
@given(case=int_metrics())
def test_spatial_matching_structure(case):
    metric, r, protected = case
    batch, tokens, _ = metric.shape
    index = bipartite_soft_matching(metric, r, num_protected=protected, order="spatial")
    for b in range(batch):
        slots = index[b].tolist()
        counts = torch.bincount(index[b], minlength=tokens - r).tolist()
        assert len(counts) == tokens - r and min(counts, default=1) >= 1
        # Protected tokens keep slots 0..p-1 and are alone in them.
        assert slots[:protected] == list(range(protected))
        assert all(counts[s] == 1 for s in range(protected))
        # Set B tokens (p+1, p+3, ...) never merge away: they are in distinct slots,
        # increasing with position, as are the A tokens left alone.
        set_b = slots[protected + 1 :: 2]
        assert set_b == sorted(set(set_b))
        # Exactly r A tokens share a slot with a B token; they sit in a B token's slot.
        b_slots = set(set_b)
        merged_a = [slot for slot in slots[protected::2] if slot in b_slots]
        assert len(merged_a) == r
        # Survivors (B tokens and unmerged A tokens) keep their relative order.
        survivors = [s for t, s in enumerate(slots) if t < protected or (t - protected) % 2 or s not in b_slots]
        assert survivors == list(range(tokens - r))


def test_matching_hand_example():
    # A = {0, 2, 4}, B = {1, 3, 5}. Token 2 equals token 3 (cosine 1) and token 4
    # is closest to 5 (0.98); token 0 is orthogonal to every B token but 1 (score 0, ties -> B 1).
    metric = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.2, 1.0]]],
        dtype=torch.float64,
    )
    # Spatial order: survivors keep their places.
    assert bipartite_soft_matching(metric, 1, order="spatial").tolist() == [[0, 1, 2, 2, 3, 4]]
    assert bipartite_soft_matching(metric, 2, order="spatial").tolist() == [[0, 1, 2, 2, 3, 3]]
    assert bipartite_soft_matching(metric, 3, order="spatial").tolist() == [[0, 0, 1, 1, 2, 2]]
    # Official order: [kept A, best score first] + [B 1, 3, 5].
    # r=1: token 2 merges; kept A = 4 (0.98), 0 (0.0) -> slots 0, 1; B 1, 3, 5 -> 2, 3, 4.
    assert bipartite_soft_matching(metric, 1).tolist() == [[1, 2, 3, 3, 0, 4]]
    assert bipartite_soft_matching(metric, 2).tolist() == [[0, 1, 2, 2, 3, 3]]
    assert bipartite_soft_matching(metric, 3).tolist() == [[0, 0, 1, 1, 2, 2]]
    # One protected token (a class token at 0): kept A by position, then B.
    assert bipartite_soft_matching(metric, 1, num_protected=1).tolist() == [[0, 2, 3, 3, 1, 4]]
    # Two (class + distillation at B's first place 1): token 2 can only go to 3, token 4 to 5.
    assert bipartite_soft_matching(metric, 2, num_protected=2).tolist() == [[0, 1, 2, 2, 3, 3]]


def test_matching_ties_go_to_lowest_b_and_lowest_a():
    metric = torch.ones(1, 6, 2, dtype=torch.float64)
    # All scores tie: A tokens 0, 2 (the first two) merge into B token 1.
    assert bipartite_soft_matching(metric, 2, order="spatial").tolist() == [[0, 0, 0, 1, 2, 3]]
    # Official order: kept A token 4 first, then B 1, 3, 5.
    assert bipartite_soft_matching(metric, 2).tolist() == [[1, 1, 1, 2, 0, 3]]


@ORDERS
@pytest.mark.parametrize("protected", [1, 2, 3])
def test_matching_protected_tokens_never_take_part(order, protected):
    # Protected tokens are identical to every other token; nothing merges into or out of them.
    metric = torch.ones(1, 9, 3, dtype=torch.float64)
    r = (9 - protected) // 2
    index = bipartite_soft_matching(metric, r, num_protected=protected, order=order)
    slots = index[0].tolist()
    assert slots[:protected] == list(range(protected))
    assert all(s >= protected for s in slots[protected:])


def test_matching_r_zero_is_identity():
    metric = torch.randn(2, 7, 3)
    assert torch.equal(bipartite_soft_matching(metric, 0, num_protected=2), torch.arange(7).expand(2, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matching_low_precision(dtype):
    metric = torch.randn(2, 11, 6).to(dtype)
    index = bipartite_soft_matching(metric, 4, num_protected=1)
    assert index.shape == (2, 11) and index.dtype == torch.long
    assert index.max() == 11 - 4 - 1


def test_matching_does_not_modify_input():
    metric = torch.randn(2, 9, 4)
    before, version = metric.clone(), metric._version
    bipartite_soft_matching(metric, 3, num_protected=1)
    assert torch.equal(metric, before) and metric._version == version


@pytest.mark.parametrize(
    ("tokens", "protected", "r"),
    [(8, 0, 5), (8, 0, -1), (9, 1, 5), (9, 3, 4), (4, 3, 1), (1, 0, 1), (10, 2, 100)],
)
def test_matching_rejects_out_of_range_r(tokens, protected, r):
    metric = torch.randn(1, tokens, 3)
    with pytest.raises(ValueError, match="0 to"):
        bipartite_soft_matching(metric, r, num_protected=protected)


@pytest.mark.parametrize(("tokens", "protected"), [(8, 0), (9, 1), (9, 3), (4, 3), (1, 0), (3, 3)])
def test_matching_largest_r_allowed(tokens, protected):
    metric = torch.randn(1, tokens, 3)
    r = (tokens - protected) // 2
    assert max_tome_r(tokens, protected) == r
    index = bipartite_soft_matching(metric, r, num_protected=protected)
    assert int(index.max()) == tokens - r - 1


# ----------------------------------------------------------------------------
# merge_weighted and unmerge
# ----------------------------------------------------------------------------


@SETTINGS
@given(case=int_metrics(), seed=st.integers(0, 2**31 - 1), with_size=st.booleans())
def test_merge_weighted_matches_loop_reference(case, seed, with_size):
    metric, r, protected = case
    batch, tokens, _ = metric.shape
    index = bipartite_soft_matching(metric, r, num_protected=protected)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 5, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 9, (batch, tokens), generator=generator).double() if with_size else None
    merged, merged_size = merge_weighted(x, index, tokens - r, size)
    assert merged.shape == (batch, tokens - r, 5)
    assert merged_size.shape == (batch, tokens - r)
    for b in range(batch):
        values, sizes = ref.weighted_mean(
            x[b].tolist(), index[b].tolist(), tokens - r, size[b].tolist() if with_size else None
        )
        torch.testing.assert_close(merged[b], torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-12)
        assert merged_size[b].tolist() == sizes

    restored = unmerge_groups(merged, index)
    assert restored.shape == x.shape
    for b in range(batch):
        assert restored[b].tolist() == ref.unmerge(merged[b].tolist(), index[b].tolist())


def test_merge_weighted_keeps_total_mass():
    x = torch.randn(2, 10, 4, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 10)).double()
    index = bipartite_soft_matching(x, 4, num_protected=1)
    merged, merged_size = merge_weighted(x, index, 6, size)
    torch.testing.assert_close((merged * merged_size.unsqueeze(-1)).sum(1), (x * size.unsqueeze(-1)).sum(1))
    assert torch.equal(merged_size.sum(1), size.sum(1))


def test_merge_weighted_does_not_modify_inputs():
    x = torch.randn(1, 6, 3)
    size = torch.ones(1, 6)
    index = torch.tensor([[0, 1, 1, 2, 3, 3]])
    copies = [x.clone(), size.clone(), index.clone()]
    merge_weighted(x, index, 4, size)
    for tensor, copy in zip((x, size, index), copies, strict=True):
        assert torch.equal(tensor, copy)


@settings(max_examples=60, deadline=None)
@given(case=int_metrics(max_tokens=14), data=st.data())
def test_two_rounds_compose(case, data):
    # Matching twice and merging with sizes equals one merge with the composed map.
    metric, r, protected = case
    batch, tokens, _ = metric.shape
    first = bipartite_soft_matching(metric, r, num_protected=protected)
    middle = tokens - r
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, tokens, 3, generator=generator, dtype=torch.float64)
    once, once_size = merge_weighted(x, first, middle)
    r2 = data.draw(st.integers(0, max_tome_r(middle, protected)))
    second = bipartite_soft_matching(once, r2, num_protected=protected)
    twice, twice_size = merge_weighted(once, second, middle - r2, once_size)
    composed = compose_groups(first, second)
    for b in range(batch):
        assert composed[b].tolist() == ref.compose(first[b].tolist(), second[b].tolist())
    direct, direct_size = merge_weighted(x, composed, middle - r2)
    torch.testing.assert_close(twice, direct, rtol=0, atol=1e-12)
    assert torch.equal(twice_size, direct_size)


# ----------------------------------------------------------------------------
# tome_schedule
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("r", "layers"), [(0, 1), (3, 1), (8, 12), (16, 24)])
def test_schedule_int(r, layers):
    assert tome_schedule(r, layers) == [r] * layers


@pytest.mark.parametrize(
    ("r", "layers", "expected"),
    [
        ((8, 0.0), 4, [8, 8, 8, 8]),
        ((8, 1.0), 5, [0, 4, 8, 12, 16]),
        ((8, -1.0), 5, [16, 12, 8, 4, 0]),
        ((10, 0.5), 3, [5, 10, 15]),
        # The authors' parse_r rounds the first layer down and mirrors it: int(4.9) = 4, last 14 - 4 = 10.
        ((7, 0.3), 4, [4, 6, 8, 10]),
        ((8, -0.3), 12, [10, 9, 9, 8, 8, 8, 7, 7, 7, 6, 6, 6]),
    ],
)
def test_schedule_tuple_values(r, layers, expected):
    assert tome_schedule(r, layers) == expected


@settings(max_examples=200, deadline=None)
@given(
    r=st.integers(0, 40),
    inflection=st.one_of(st.floats(-1.0, 1.0, allow_nan=False), st.sampled_from([-1, 0, 1])),
    layers=st.integers(2, 32),
)
def test_schedule_tuple_matches_reference(r, inflection, layers):
    values = tome_schedule((r, inflection), layers)
    assert values == ref.tome_schedule((r, inflection), layers)
    assert all(isinstance(v, int) and v >= 0 for v in values)


@pytest.mark.parametrize(
    ("r", "layers", "expected"),
    [([], 3, [0, 0, 0]), ([1, 2], 4, [1, 2, 0, 0]), ([5, 4, 3], 3, [5, 4, 3]), ([0], 1, [0])],
)
def test_schedule_list(r, layers, expected):
    assert tome_schedule(r, layers) == expected
    assert tome_schedule(r, layers) == ref.tome_schedule(r, layers)


def test_schedule_list_is_not_aliased():
    r = [1, 2]
    values = tome_schedule(r, 2)
    values[0] = 9
    assert r == [1, 2]


@pytest.mark.parametrize(
    ("r", "layers"),
    [
        (-1, 4),
        ([1, -2], 4),
        ([1, 2, 3], 2),
        ((-4, 0.0), 3),
        ((4, 1.5), 3),
        ((4, -1.01), 3),
    ],
)
def test_schedule_errors(r, layers):
    with pytest.raises(ValueError):
        tome_schedule(r, layers)


def test_schedule_error_messages():
    with pytest.raises(ValueError, match="negative"):
        tome_schedule(-1, 4)
    with pytest.raises(ValueError, match=r"\b3\b.*\b2\b"):
        tome_schedule([1, 2, 3], 2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tome_schedule((4, 2.0), 3)


def test_schedule_tuple_single_layer_is_the_average():
    assert tome_schedule((8, 1.0), 1) == [8]
    assert tome_schedule((8, -0.5), 1) == [8]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(2, 24),
    protected=st.integers(0, 3),
    channels=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_merge_matched_equals_merge_weighted(batch, tokens, protected, channels, seed, data):
    """The fast path (survivors + corrections) is the size-weighted group mean, values and gradients."""
    protected = min(protected, tokens)
    r = data.draw(st.integers(0, max_tome_r(tokens, protected)))
    generator = torch.Generator().manual_seed(seed)
    # Few distinct metric directions, so several sources often share one destination.
    metric = torch.randint(-1, 2, (batch, tokens, 2), generator=generator).double()
    x = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens), generator=generator).double()
    match = match_bipartite(metric, r, num_protected=protected)
    assert torch.equal(match.index, bipartite_soft_matching(metric, r, num_protected=protected))
    x_fast, x_slow = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast, fast_size = merge_matched(x_fast, match, size)
    slow, slow_size = merge_weighted(x_slow, match.index, tokens - r, size)
    assert torch.allclose(fast, slow, atol=1e-12) and torch.equal(fast_size, slow_size)
    weights = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    assert torch.allclose(x_fast.grad, x_slow.grad, atol=1e-12)
    with torch.no_grad():  # the in-place path
        assert torch.allclose(merge_matched(x, match, size)[0], slow, atol=1e-12)


@pytest.mark.parametrize("order", ["official", "spatial"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matching_equals_float32_matching_on_the_same_values(dtype, order):
    """Scores are computed in float32 for low-precision inputs: the choice equals matching the same values
    held in float32 (ties aside, which continuous inputs do not have); in bf16/fp16 arithmetic it would not."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(4, 61, 16, generator=generator).to(dtype)
    for r in (1, 10, 30):
        low = match_bipartite(metric, r, num_protected=1, order=order)
        full = match_bipartite(metric.float(), r, num_protected=1, order=order)
        assert torch.equal(low.index, full.index)
