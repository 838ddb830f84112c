"""Tests for the PiToMe baseline: energy_scores, match_pitome, merge_pitome and the schedules.

The reference below is a loop-by-loop transcription of what the authors' code
(hchautran/PiToMe, algo/pitome/merge.py) does for one image, written on plain
Python lists; nothing in it comes from cubistmerge.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge.pitome import (
    PiToMeMatch,
    energy_scores,
    match_pitome,
    max_pitome_r,
    merge_pitome,
    pitome_bsm_blocks,
    pitome_margins,
    pitome_r,
)

from . import reference as ref

MARGINS = (0.75, 0.5, 0.25, 0.0625, 0.0, -0.5)
VARIANTS = pytest.mark.parametrize("bsm", [True, False], ids=["bsm", "pitome"])


# ----------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------


@st.composite
def cases(draw):
    """Continuous float64 inputs, a valid r and the settings of one block."""
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 20))
    channels = draw(st.integers(2, 6))
    protected = draw(st.integers(0, min(3, tokens)))
    bsm = draw(st.booleans())
    margin = draw(st.sampled_from(MARGINS))
    alpha = draw(st.sampled_from([1.0, 0.5]))
    r = draw(st.integers(0, max_pitome_r(tokens, protected, bsm=bsm)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    metric = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    x = torch.randn(batch, tokens, 3, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens), generator=generator).to(torch.float64)
    return metric, x, size, r, dict(margin=margin, bsm=bsm, num_protected=protected, alpha=alpha)


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_matches_loop_reference(case):
    metric, x, size, r, options = case
    match = match_pitome(metric, r, **options)
    merged, merged_size = merge_pitome(x, match, size)

    expected = [
        ref.pitome_merge(m, xb, sb, r, options["margin"], options["bsm"], options["num_protected"], options["alpha"])
        for m, xb, sb in zip(metric.tolist(), x.tolist(), size.tolist(), strict=True)
    ]
    assert match.index.dtype == torch.long
    assert torch.equal(match.index, torch.tensor([e[0] for e in expected], dtype=torch.long))
    torch.testing.assert_close(merged, torch.tensor([e[1] for e in expected], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(merged_size, torch.tensor([e[2] for e in expected], dtype=torch.float64))


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_match_fields_agree_with_index(case):
    metric, _, _, r, options = case
    batch, tokens, _ = metric.shape
    match = match_pitome(metric, r, **options)
    assert match.survivors.shape == (batch, tokens - r)
    assert match.sources.shape == match.destinations.shape == (batch, r)
    # survivors: the input position holding each output slot.
    assert torch.equal(match.index.gather(1, match.survivors), torch.arange(tokens - r).expand(batch, -1))
    # Every source sits in its destination's slot; destinations survive; protected tokens never take part.
    assert torch.equal(match.index.gather(1, match.sources), match.index.gather(1, match.destinations))
    removed = torch.zeros(batch, tokens, dtype=torch.bool).scatter(1, match.sources, True)
    assert not removed.gather(1, match.destinations).any()
    assert int(removed.sum()) == batch * r
    p = options["num_protected"]
    assert torch.equal(match.index[:, :p], torch.arange(p).expand(batch, p))
    assert bool((match.sources >= p).all()) and bool((match.destinations >= p).all())


@settings(max_examples=50, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 12), st.integers(1, 5)),
    margin=st.sampled_from(MARGINS),
    alpha=st.sampled_from([1.0, 0.5, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_energy_scores_match_reference(shape, margin, alpha, seed):
    metric = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    energy = energy_scores(metric, margin, alpha)
    assert energy.shape == shape[:2] and energy.dtype == torch.float64
    expected = torch.tensor([ref.pitome_energies(m, margin, alpha) for m in metric.tolist()], dtype=torch.float64)
    torch.testing.assert_close(energy, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------
# By hand
# ----------------------------------------------------------------------------


def _hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    # A class token, then four unit patch tokens at 0, 10, 20 and 180 degrees (t1..t4). With margin 0
    # the energies (row means of ELU(cos)) are t1 0.573, t2 0.586, t3 0.579, t4 -0.217, so the energy
    # order is t2, t3, t1, t4. cos(t2, t3) = 0.985, cos(t1, t3) = 0.940, cos(t1, t4) = -1.
    angles = torch.tensor([0.0, 10.0, 20.0, 180.0], dtype=torch.float64).deg2rad()
    patches = torch.stack([angles.cos(), angles.sin()], dim=-1)
    metric = torch.cat([torch.tensor([[3.0, -7.0]], dtype=torch.float64), patches]).unsqueeze(0)
    x = torch.tensor([[[100.0], [10.0], [20.0], [30.0], [40.0]]], dtype=torch.float64)
    return metric, x


def test_hand_example_energies():
    metric, _ = _hand_example()
    energy = energy_scores(metric[:, 1:], margin=0.0)
    assert [round(v, 3) for v in energy[0].tolist()] == [0.573, 0.586, 0.579, -0.217]


def test_hand_example_pitome_variant():
    metric, x = _hand_example()
    # r=1: mergeable = the top two (t2, t3): A = {t2}, B = {t3}; t1, t4 are protected by their energy.
    # Output [cls, t1, t4, t2+t3].
    match = match_pitome(metric, 1, margin=0.0, bsm=False, num_protected=1)
    assert match.index.tolist() == [[0, 1, 3, 3, 2]]
    merged, size = merge_pitome(x, match)
    assert merged.flatten().tolist() == [100.0, 10.0, 40.0, 25.0]
    assert size.tolist() == [[1.0, 1.0, 1.0, 2.0]]
    # r=2: A = {t2, t1}, B = {t3, t4}; t2 -> t3 and t1 -> t3 (0.940 beats -1). Output [cls, t1+t2+t3, t4].
    match = match_pitome(metric, 2, margin=0.0, bsm=False, num_protected=1)
    assert match.index.tolist() == [[0, 1, 1, 1, 2]]
    assert merge_pitome(x, match)[0].flatten().tolist() == [100.0, 20.0, 40.0]


def test_hand_example_bsm_variant():
    metric, x = _hand_example()
    # All four alternate: A = {t2, t1}, B = {t3, t4}. Best scores: t2 0.985 (t3), t1 0.940 (t3).
    # r=1: t2 merges into t3. Output [cls, kept A (t1), B in energy order (t3+t2, t4)].
    match = match_pitome(metric, 1, margin=0.0, bsm=True, num_protected=1)
    assert match.index.tolist() == [[0, 1, 2, 2, 3]]
    # Sizes weight the mean: t2 stands for 3 tokens, t3 for 1 -> (3 * 20 + 30) / 4.
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]], dtype=torch.float64)
    merged, merged_size = merge_pitome(x, match, size)
    assert merged.flatten().tolist() == [100.0, 10.0, 22.5, 40.0]
    assert merged_size.tolist() == [[1.0, 1.0, 4.0, 1.0]]
    # r=2: both A tokens merge into t3: [cls, t1+t2+t3, t4].
    assert match_pitome(metric, 2, margin=0.0, bsm=True, num_protected=1).index.tolist() == [[0, 1, 1, 1, 2]]


def test_bsm_kept_tokens_stay_in_descending_score_order():
    # Unit vectors at 285, 60, 330, 135 and 180 degrees (t0..t4), no protected token, margin 0. Energies
    # 0.079, 0.072, 0.102, 0.153, 0.101 rank t3, t2, t4, t0, t1: A = [t3, t4, t1], B = [t2, t0].
    # Best scores (cosines): t1 0 (to t2, 90 degrees apart), t4 -0.259 (to t0, 105), t3 -0.866 (to t0, 150).
    # r=1: t1 merges into t2; the kept A tokens come as the score sort left them, t4 before t3, which is
    # neither their position nor their energy order (the authors' pitome_bsm does not re-sort them).
    angles = torch.tensor([285.0, 60.0, 330.0, 135.0, 180.0], dtype=torch.float64).deg2rad()
    metric = torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(0)
    energy = energy_scores(metric, margin=0.0)
    assert [round(v, 3) for v in energy[0].tolist()] == [0.079, 0.072, 0.102, 0.153, 0.101]
    match = match_pitome(metric, 1, margin=0.0, bsm=True)
    # Output [t4, t3, t2 + t1, t0].
    assert match.index.tolist() == [[3, 2, 2, 1, 0]]
    assert match.sources.tolist() == [[1]] and match.destinations.tolist() == [[2]]


# ----------------------------------------------------------------------------
# Identity, purity, gradients
# ----------------------------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize("protected", [0, 2])
def test_r_zero_is_identity(bsm, protected):
    metric = torch.randn(2, 9, 4, dtype=torch.float64)
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    size = torch.rand(2, 9, dtype=torch.float64) * 3 + 0.5
    match = match_pitome(metric, 0, margin=0.5, bsm=bsm, num_protected=protected)
    assert torch.equal(match.index, torch.arange(9).expand(2, 9))
    assert torch.equal(match.survivors, torch.arange(9).expand(2, 9))
    assert match.sources.shape == match.destinations.shape == (2, 0)
    merged, merged_size = merge_pitome(x, match, size)
    assert torch.equal(merged, x) and torch.equal(merged_size, size)
    assert merged.data_ptr() != x.data_ptr()
    merged, merged_size = merge_pitome(x, match)
    assert torch.equal(merged, x) and torch.equal(merged_size, torch.ones(2, 9, dtype=torch.float64))


@VARIANTS
def test_inputs_are_not_modified(bsm):
    metric = torch.randn(2, 11, 4)
    x = torch.randn(2, 11, 6)
    size = torch.rand(2, 11) + 1
    before = [t.clone() for t in (metric, x, size)]
    versions = [t._version for t in (metric, x, size)]
    match = match_pitome(metric, 4, margin=0.25, bsm=bsm, num_protected=1)
    merge_pitome(x, match, size)
    for tensor, saved, version in zip((metric, x, size), before, versions, strict=True):
        assert torch.equal(tensor, saved) and tensor._version == version


@VARIANTS
def test_gradients_flow_through_the_merge(bsm):
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 10, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 10, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 10), generator=generator).to(torch.float64)
    match = match_pitome(metric, 3, margin=0.5, bsm=bsm, num_protected=1)
    assert not match.index.requires_grad  # the choice is discrete
    merged, merged_size = merge_pitome(x, match, size)
    weights = torch.randn(merged.shape, generator=generator, dtype=torch.float64)
    (merged * weights).sum().backward()
    # d merged[slot] / d x[t] = size[t] / merged_size[slot] for every member t of the slot.
    slot_weights = weights.gather(1, match.index.unsqueeze(-1).expand(2, 10, 3))
    share = (size / merged_size.gather(1, match.index)).unsqueeze(-1)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, slot_weights * share, rtol=0, atol=1e-12)
    assert metric.grad is None


def test_energy_scores_are_differentiable():
    metric = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    energy_scores(metric, 0.5).sum().backward()
    assert metric.grad is not None and torch.isfinite(metric.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@VARIANTS
def test_low_precision(dtype, bsm):
    metric = torch.randn(2, 13, 6).to(dtype)
    x = torch.randn(2, 13, 4).to(dtype)
    match = match_pitome(metric, 4, margin=0.5, bsm=bsm, num_protected=1)
    merged, size = merge_pitome(x, match)
    assert merged.shape == (2, 9, 4) and merged.dtype == dtype
    assert size.sum().item() == 2 * 13


# ----------------------------------------------------------------------------
# Protected tokens
# ----------------------------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize("protected", [1, 2, 3])
def test_protected_tokens_take_no_part(bsm, protected):
    generator = torch.Generator().manual_seed(protected)
    metric = torch.randn(2, 12, 5, generator=generator, dtype=torch.float64)
    r = max_pitome_r(12, protected, bsm=bsm)
    match = match_pitome(metric, r, margin=0.5, bsm=bsm, num_protected=protected)
    # Making the protected tokens copies of patch tokens changes nothing: they are not in the energy or matching.
    copies = metric.clone()
    copies[:, :protected] = metric[:, protected : 2 * protected]
    again = match_pitome(copies, r, margin=0.5, bsm=bsm, num_protected=protected)
    assert torch.equal(match.index, again.index)
    # They keep the first slots, alone.
    assert torch.equal(match.index[:, :protected], torch.arange(protected).expand(2, protected))
    assert bool((match.index[:, protected:] >= protected).all())
    # And the rest is what the same block does to the patch tokens alone.
    alone = match_pitome(metric[:, protected:], r, margin=0.5, bsm=bsm)
    assert torch.equal(match.index[:, protected:], alone.index + protected)


# ----------------------------------------------------------------------------
# Amount and schedules
# ----------------------------------------------------------------------------


def test_pitome_r_follows_the_official_formula():
    assert pitome_r(196, 0.9) == 19  # floor(19.6)
    assert pitome_r(196, 0.9125) == 17
    assert pitome_r(196, 1.0) == 0
    assert pitome_r(196, 0.5) == 98
    assert pitome_r(7, 0.5) == 3
    assert pitome_r(0, 0.9) == 0
    # floor(T - T * ratio), not floor(T * (1 - ratio)), which gives 0 and 2 here.
    assert pitome_r(10, 0.9) == 1
    assert pitome_r(40, 0.925) == 3


def test_deit_schedule_token_counts():
    # DeiT-S at 224 px: 196 patch tokens, 12 blocks, keep ratio 0.9 in every block.
    tokens, counts = 196, []
    for _ in range(12):
        tokens -= pitome_r(tokens, 0.9)
        counts.append(tokens)
    assert counts == [177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]


def test_deit_chain_runs_with_the_official_schedule():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 197, 8, generator=generator, dtype=torch.float64)
    size = None
    for margin, bsm in zip(pitome_margins(12), pitome_bsm_blocks(12), strict=True):
        metric = x @ torch.randn(8, 8, generator=generator, dtype=torch.float64)
        r = pitome_r(x.shape[1] - 1, 0.9)
        x, size = merge_pitome(x, match_pitome(metric, r, margin=margin, bsm=bsm, num_protected=1), size)
    assert x.shape == (2, 60, 8)
    assert torch.equal(size.sum(dim=1), torch.full((2,), 197.0, dtype=torch.float64))
    assert torch.equal(size[:, 0], torch.ones(2, dtype=torch.float64))


def test_margins_and_bsm_blocks():
    assert pitome_margins(12) == [0.75 - 0.75 * (i / 12) for i in range(12)]
    assert pitome_margins(12)[0] == 0.75 and pitome_margins(12)[6] == 0.375
    assert pitome_margins(1) == [0.75]
    assert pitome_bsm_blocks(12) == [True] * 6 + [False] * 6
    assert pitome_bsm_blocks(11) == [True] * 6 + [False] * 5
    assert pitome_bsm_blocks(1) == [True]


def test_max_r():
    assert max_pitome_r(197, 1, bsm=False) == 98
    assert max_pitome_r(198, 1, bsm=True) == 99  # ceil(197 / 2): every A token may merge
    assert max_pitome_r(198, 1, bsm=False) == 98
    assert max_pitome_r(2, 1, bsm=True) == 0  # one token: no B to merge into
    assert max_pitome_r(3, 3, bsm=True) == max_pitome_r(3, 5, bsm=False) == 0


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.49, 0.0, -0.5, 1.01, 2.0, float("nan"), float("inf")])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="ratio"):
        pitome_r(196, ratio)


@pytest.mark.parametrize("tokens", [-1, 2.0, True])
def test_bad_token_count_raises(tokens):
    with pytest.raises(ValueError, match="num_tokens"):
        pitome_r(tokens, 0.9)


@pytest.mark.parametrize(
    ("tokens", "protected", "bsm", "r"),
    [
        (9, 1, False, 5),  # pitome: at most T // 2 = 4
        (10, 1, True, 6),  # bsm: at most ceil(9 / 2) = 5
        (8, 0, False, -1),
        (2, 1, True, 1),  # a single unprotected token cannot merge
        (5, 5, False, 1),
        (5, 0, True, 1.0),
    ],
)
def test_bad_r_raises(tokens, protected, bsm, r):
    metric = torch.randn(1, tokens, 3)
    with pytest.raises(ValueError, match="can remove 0 to"):
        match_pitome(metric, r, margin=0.5, bsm=bsm, num_protected=protected)


@pytest.mark.parametrize("num_protected", [-1, 6, True])
def test_bad_num_protected_raises(num_protected):
    with pytest.raises(ValueError, match="num_protected"):
        match_pitome(torch.randn(1, 5, 3), 0, margin=0.5, bsm=True, num_protected=num_protected)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="metric"):
        match_pitome(torch.randn(5, 3), 1, margin=0.5, bsm=True)
    with pytest.raises(ValueError, match="metric"):
        energy_scores(torch.randn(5, 3), 0.5)
    match = match_pitome(torch.randn(1, 6, 3), 2, margin=0.5, bsm=False)
    assert isinstance(match, PiToMeMatch)
    with pytest.raises(ValueError, match="match is for"):
        merge_pitome(torch.randn(1, 7, 3), match)
    with pytest.raises(ValueError, match="size"):
        merge_pitome(torch.randn(1, 6, 3), match, torch.ones(1, 7))


@pytest.mark.parametrize("blocks", [0, -1, 1.5])
def test_bad_block_count_raises(blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        pitome_margins(blocks)
    with pytest.raises(ValueError, match="num_blocks"):
        pitome_bsm_blocks(blocks)


@VARIANTS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matching_equals_float32_matching_on_the_same_values(dtype, bsm):
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 41, 16, generator=generator).to(dtype)
    for r in (1, 8, 20):
        low = match_pitome(metric, r, margin=0.5, bsm=bsm, num_protected=1)
        full = match_pitome(metric.float(), r, margin=0.5, bsm=bsm, num_protected=1)
        assert torch.equal(low.index, full.index)
