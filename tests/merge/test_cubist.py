"""Property tests for CubistMerge (``cubist_merge`` and its 1D pass ``merge_sequences``).

The package is checked against the loop reference in ``reference.py``, which
is written from the specification alone. Grids of small integers stored as
float64 make every dot product and squared norm exact, so ties really happen
and the tie rules are compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge import cubist_merge, merge_sequences

from . import reference as ref

METRICS = ("cosine", "l2")
REPRESENTATIONS = ("maxmag", "maxmag_vector", "mean")
SELECTING = ("maxmag", "maxmag_vector")  # representations that pick existing values

FAST = settings(max_examples=60, deadline=None)
THOROUGH = settings(max_examples=120, deadline=None)


# ----------------------------------------------------------------------------
# Strategies and helpers
# ----------------------------------------------------------------------------


@st.composite
def int_grids(draw, max_batch=2, min_side=2, max_side=9, max_channels=4, low=-4, high=4):
    """(x, r_h, r_w): a float64 (B, H, W, C) grid of small integers and valid reductions."""
    batch = draw(st.integers(1, max_batch))
    height = draw(st.integers(min_side, max_side))
    width = draw(st.integers(min_side, max_side))
    channels = draw(st.integers(1, max_channels))
    count = batch * height * width * channels
    values = draw(st.lists(st.integers(low, high), min_size=count, max_size=count))
    x = torch.tensor(values, dtype=torch.float64).reshape(batch, height, width, channels)
    r_h = draw(st.integers(0, height // 2))
    r_w = draw(st.integers(0, width // 2))
    return x, r_h, r_w


@st.composite
def random_grids(draw, max_batch=2, min_side=2, max_side=9, max_channels=4, dtype=torch.float64):
    """(x, r_h, r_w): a seeded standard-normal grid (no exact ties) and valid reductions."""
    batch = draw(st.integers(1, max_batch))
    height = draw(st.integers(min_side, max_side))
    width = draw(st.integers(min_side, max_side))
    channels = draw(st.integers(1, max_channels))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, height, width, channels, generator=generator, dtype=torch.float64).to(dtype)
    r_h = draw(st.integers(0, height // 2))
    r_w = draw(st.integers(0, width // 2))
    return x, r_h, r_w


@st.composite
def int_sequences(draw, max_rows=3, max_length=12, max_channels=4):
    """(x, r, size): float64 (M, N, C) integer sequences, a valid r and positive integer sizes."""
    rows = draw(st.integers(1, max_rows))
    length = draw(st.integers(1, max_length))
    channels = draw(st.integers(1, max_channels))
    count = rows * length * channels
    values = draw(st.lists(st.integers(-4, 4), min_size=count, max_size=count))
    sizes = draw(st.lists(st.integers(1, 5), min_size=rows * length, max_size=rows * length))
    x = torch.tensor(values, dtype=torch.float64).reshape(rows, length, channels)
    size = torch.tensor(sizes, dtype=torch.float64).reshape(rows, length)
    r = draw(st.integers(0, length // 2))
    return x, r, size


def reference_merge(x: torch.Tensor, r_h: int, r_w: int, representation: str, metric: str):
    """Reference result as tensors: merged (B, H', W', C) float64 and index (B, H*W) long."""
    merged, index = ref.cubist_merge_batch(x.double().tolist(), r_h, r_w, representation, metric)
    return torch.tensor(merged, dtype=torch.float64), torch.tensor(index, dtype=torch.long)


def runs(sequence: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive values."""
    lengths = []
    for i, value in enumerate(sequence):
        if i > 0 and value == sequence[i - 1]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def assert_ordered_runs(slots: list[int], num_out: int) -> None:
    """``slots`` (one pass over one sequence) is 0, .., num_out - 1 in order, in runs of 1 to 3."""
    assert slots[0] == 0 and slots[-1] == num_out - 1, slots
    assert all(b - a in (0, 1) for a, b in zip(slots, slots[1:], strict=False)), slots
    assert all(1 <= n <= 3 for n in runs(slots)), slots


def members_by_slot(index_row: list[int], num_out: int) -> list[list[int]]:
    """Flat positions (row-major, ascending) of every output slot's group."""
    members: list[list[int]] = [[] for _ in range(num_out)]
    for position, slot in enumerate(index_row):
        members[slot].append(position)
    return members


# ----------------------------------------------------------------------------
# Agreement with the reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("representation", SELECTING)
@THOROUGH
@given(case=int_grids())
def test_matches_reference_exactly_on_integer_grids(case, representation, metric):
    x, r_h, r_w = case
    merged, recover = cubist_merge(x, r_h, r_w, representation=representation, metric=metric)
    expected, expected_index = reference_merge(x, r_h, r_w, representation, metric)
    assert merged.dtype == torch.float64
    assert torch.equal(merged, expected)
    assert torch.equal(recover.index, expected_index)


@pytest.mark.parametrize("metric", METRICS)
@FAST
@given(case=random_grids())
def test_mean_matches_reference(case, metric):
    x, r_h, r_w = case
    merged, recover = cubist_merge(x, r_h, r_w, representation="mean", metric=metric)
    expected, expected_index = reference_merge(x, r_h, r_w, "mean", metric)
    assert torch.equal(recover.index, expected_index)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("metric", METRICS)
@FAST
@given(case=int_grids())
def test_mean_matches_reference_on_integer_grids(case, metric):
    # Integer grids have ties everywhere: the matching must still agree exactly.
    x, r_h, r_w = case
    merged, recover = cubist_merge(x, r_h, r_w, representation="mean", metric=metric)
    expected, expected_index = reference_merge(x, r_h, r_w, "mean", metric)
    assert torch.equal(recover.index, expected_index)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("representation", REPRESENTATIONS)
@FAST
@given(case=int_sequences())
def test_one_pass_matches_reference(case, representation, metric):
    x, r, size = case
    merged, index, merged_size = merge_sequences(
        x, r, representation=representation, metric=metric, size=size
    )
    assert merged.shape == (x.shape[0], x.shape[1] - r, x.shape[2])
    for row in range(x.shape[0]):
        tokens, slots, sizes = ref.cubist_pass(
            x[row].tolist(), r, representation, metric, size[row].tolist()
        )
        assert index[row].tolist() == slots
        assert merged_size[row].tolist() == sizes
        expected = torch.tensor(tokens, dtype=torch.float64)
        if representation == "mean":
            torch.testing.assert_close(merged[row], expected, rtol=0, atol=1e-10)
        else:
            assert torch.equal(merged[row], expected)


def test_reference_sweep_all_reductions():
    # A deterministic sweep over every (r_h, r_w) of a few fixed grids.
    generator = torch.Generator().manual_seed(1234)
    for height, width in ((2, 3), (5, 4), (7, 8)):
        x = torch.randint(-2, 3, (2, height, width, 2), generator=generator).double()
        for r_h in range(height // 2 + 1):
            for r_w in range(width // 2 + 1):
                for metric in METRICS:
                    for representation in SELECTING:
                        merged, recover = cubist_merge(
                            x, r_h, r_w, representation=representation, metric=metric
                        )
                        expected, expected_index = reference_merge(x, r_h, r_w, representation, metric)
                        assert torch.equal(merged, expected), (height, width, r_h, r_w, representation, metric)
                        assert torch.equal(recover.index, expected_index)


# ----------------------------------------------------------------------------
# Hand-built cases
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_worked_example_maxmag(metric):
    x = torch.tensor([[[[-3.0, 1.0], [2.0, -0.5]]]])  # (1, 1, 2, 2)
    merged, recover = cubist_merge(x, 0, 1, representation="maxmag", metric=metric)
    assert merged.shape == (1, 1, 1, 2)
    assert merged.flatten().tolist() == [-3.0, 1.0]
    assert recover.index.tolist() == [[0, 0]]


def test_worked_example_maxmag_in_height_pass():
    x = torch.tensor([[[[-3.0, 1.0]], [[2.0, -0.5]]]])  # (1, 2, 1, 2)
    merged, recover = cubist_merge(x, 1, 0, representation="maxmag")
    assert merged.flatten().tolist() == [-3.0, 1.0]
    assert recover.index.tolist() == [[0, 0]]


# Tokens 1, 2 and 3 are alike and unlike tokens 0 and 4 (cosine): source 1
# goes right and source 3 goes left, both into destination 2, and r = 2 takes
# both. Each channel's largest magnitude sits in a different member.
GROUP_OF_THREE = [[-1.0, 0.0, 0.0], [5.0, 1.0, 1.0], [1.0, -5.0, 1.0], [1.0, 1.0, 5.0], [0.0, 0.0, -1.0]]


@pytest.mark.parametrize(
    ("representation", "middle"),
    [
        ("maxmag", [5.0, -5.0, 5.0]),
        ("maxmag_vector", [5.0, 1.0, 1.0]),  # all three have norm sqrt(27): lowest position wins
        ("mean", [7.0 / 3.0, -1.0, 7.0 / 3.0]),
    ],
)
@pytest.mark.parametrize("axis", ["width", "height"])
def test_two_sources_share_one_destination(representation, middle, axis):
    row = torch.tensor(GROUP_OF_THREE, dtype=torch.float64)
    if axis == "width":
        x, r_h, r_w = row.reshape(1, 1, 5, 3), 0, 2
    else:
        x, r_h, r_w = row.reshape(1, 5, 1, 3), 2, 0
    merged, recover = cubist_merge(x, r_h, r_w, representation=representation, metric="cosine")
    assert recover.index.tolist() == [[0, 1, 1, 1, 2]]
    values = merged.reshape(3, 3)
    assert values[0].tolist() == GROUP_OF_THREE[0]
    assert values[2].tolist() == GROUP_OF_THREE[4]
    torch.testing.assert_close(values[1], torch.tensor(middle, dtype=torch.float64), rtol=0, atol=1e-12)


def test_group_of_three_sizes_feed_the_height_pass():
    # Width pass builds a group of 3 in row 0 (size 3) and leaves row 1 as singletons;
    # the height pass then averages the middle column with weights 3 and 1.
    top = torch.tensor(GROUP_OF_THREE, dtype=torch.float64)
    bottom = torch.tensor(
        [[-1.0, 0.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0]],
        dtype=torch.float64,
    )
    x = torch.stack([top, bottom]).reshape(1, 2, 5, 3)
    merged, recover = cubist_merge(x, 1, 2, representation="mean", metric="cosine")
    expected, expected_index = reference_merge(x, 1, 2, "mean", "cosine")
    assert torch.equal(recover.index, expected_index)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)


def test_ties_go_left_and_to_the_lower_source():
    # All tokens identical: every score ties. Sources go left (ties go left), and
    # the lowest r sources are chosen, so with r = 2 of N = 6: 1 -> 0, 3 -> 2.
    x = torch.ones(1, 1, 6, 2, dtype=torch.float64)
    for metric in METRICS:
        _, recover = cubist_merge(x, 0, 2, metric=metric)
        assert recover.index.tolist() == [[0, 0, 1, 1, 2, 3]]


def test_last_source_without_right_neighbour_goes_left():
    # N = 4: source 3 has no right neighbour and must merge into 2.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    _, recover = cubist_merge(x.reshape(1, 1, 4, 2), 0, 1)
    assert recover.index.tolist() == [[0, 1, 2, 2]]


def test_zero_vectors_have_zero_cosine():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64).reshape(1, 1, 3, 2)
    merged, recover = cubist_merge(x, 0, 1, metric="cosine")
    assert torch.isfinite(merged).all()
    # Both scores of source 1 are 0 (no NaN): tie goes left.
    assert recover.index.tolist() == [[0, 0, 1]]


# ----------------------------------------------------------------------------
# Shape and order properties
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@FAST
@given(case=int_grids(), metric=st.sampled_from(METRICS))
def test_grid_shape_order_and_group_structure(case, representation, metric):
    x, r_h, r_w = case
    batch, height, width, channels = x.shape
    merged_height, merged_width = height - r_h, width - r_w
    merged, recover = cubist_merge(x, r_h, r_w, representation=representation, metric=metric)

    assert merged.shape == (batch, merged_height, merged_width, channels)
    assert recover(merged).shape == x.shape
    assert recover.index.shape == (batch, height * width)
    assert recover.index.dtype == torch.long
    assert recover.index.min() >= 0 and recover.index.max() < merged_height * merged_width

    for b in range(batch):
        flat = recover.index[b]
        counts = torch.bincount(flat, minlength=merged_height * merged_width)
        assert counts.min() >= 1  # every output slot has a member
        assert counts.max() <= 9  # at most 3 x 3 originals per 2D group

        w_slot = (flat % merged_width).reshape(height, width).tolist()
        h_slot = (flat // merged_width).reshape(height, width).tolist()
        # Width pass: every row is merged in order, in contiguous runs of 1 to 3.
        for h in range(height):
            assert_ordered_runs(w_slot[h], merged_width)
        # Height pass: tokens of one width-pass group share their h'; every column
        # of the width-pass result is merged in order, in runs of 1 to 3.
        column_slot = [[None] * merged_width for _ in range(height)]
        for h in range(height):
            for w in range(width):
                previous = column_slot[h][w_slot[h][w]]
                assert previous is None or previous == h_slot[h][w]
                column_slot[h][w_slot[h][w]] = h_slot[h][w]
        for w in range(merged_width):
            assert_ordered_runs([column_slot[h][w] for h in range(height)], merged_height)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@FAST
@given(case=int_grids(), metric=st.sampled_from(METRICS))
def test_each_output_is_its_whole_2d_group_reduced(case, representation, metric):
    # maxmag and maxmag_vector compose across passes (ties resolve to the lowest
    # row-major position), and a size-weighted mean of means is the plain mean.
    x, r_h, r_w = case
    merged, recover = cubist_merge(x, r_h, r_w, representation=representation, metric=metric)
    batch, height, width, channels = x.shape
    num_out = merged.shape[1] * merged.shape[2]
    tokens = x.reshape(batch, height * width, channels).tolist()
    outputs = merged.reshape(batch, num_out, channels)
    for b in range(batch):
        for slot, members in enumerate(members_by_slot(recover.index[b].tolist(), num_out)):
            value = ref.group_value([tokens[b][m] for m in members], [1.0] * len(members), representation)
            expected = torch.tensor(value, dtype=torch.float64)
            if representation == "mean":
                torch.testing.assert_close(outputs[b, slot], expected, rtol=0, atol=1e-10)
            else:
                assert torch.equal(outputs[b, slot], expected)


@FAST
@given(case=random_grids(max_channels=3))
def test_recover_gathers_group_tokens(case):
    x, r_h, r_w = case
    merged, recover = cubist_merge(x, r_h, r_w)
    batch, merged_height, merged_width, _ = merged.shape
    slots = torch.arange(merged_height * merged_width, dtype=torch.float64)
    payload = slots.reshape(1, merged_height, merged_width, 1).expand(batch, -1, -1, -1)
    restored = recover(payload)
    assert restored.shape == (*x.shape[:3], 1)
    assert torch.equal(restored.reshape(x.shape[0], -1), recover.index.double())
    # Same for a payload with more channels than the input.
    wide = torch.randn(*merged.shape[:3], 7, dtype=torch.float64)
    out = recover(wide)
    flat = wide.reshape(x.shape[0], -1, 7)
    for b in range(x.shape[0]):
        assert torch.equal(out[b].reshape(-1, 7), flat[b][recover.index[b]])


def test_no_reduction_returns_input_and_identity():
    x = torch.randn(2, 4, 5, 3)
    merged, recover = cubist_merge(x, 0, 0)
    assert torch.equal(merged, x)
    assert merged.shape == x.shape
    assert torch.equal(recover.index, torch.arange(20).expand(2, 20))
    y = torch.randn(2, 4, 5, 6)
    assert torch.equal(recover(y), y)


# ----------------------------------------------------------------------------
# Batch independence, purity, gradients, dtypes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@FAST
@given(case=int_grids(max_batch=4, max_side=7), metric=st.sampled_from(METRICS))
def test_batch_images_are_independent(case, representation, metric):
    x, r_h, r_w = case
    merged, recover = cubist_merge(x, r_h, r_w, representation=representation, metric=metric)
    singles = [cubist_merge(x[b : b + 1], r_h, r_w, representation=representation, metric=metric)
               for b in range(x.shape[0])]
    assert torch.equal(merged, torch.cat([m for m, _ in singles]))
    assert torch.equal(recover.index, torch.cat([rec.index for _, rec in singles]))


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("r_h", "r_w"), [(0, 0), (0, 2), (2, 0), (2, 3), (3, 3)])
def test_input_not_modified(representation, metric, r_h, r_w):
    x = torch.randn(2, 6, 7, 5)
    before = x.clone()
    version = x._version
    merged, recover = cubist_merge(x, r_h, r_w, representation=representation, metric=metric)
    recover(merged)
    assert x._version == version
    assert torch.equal(x, before)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("r_h", "r_w"), [(0, 0), (1, 0), (0, 2), (3, 2)])
def test_gradients_flow(representation, metric, dtype, r_h, r_w):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 5, 4, generator=generator).to(dtype).requires_grad_(True)
    merged, _ = cubist_merge(x, r_h, r_w, representation=representation, metric=metric)
    merged.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()
    # Every output is a selection or convex combination of inputs (selection and
    # matching carry no gradient), so d(sum)/dx sums to the number of outputs.
    torch.testing.assert_close(
        x.grad.sum().double(), torch.tensor(float(merged.numel()), dtype=torch.float64), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    ("shape", "r_h", "r_w"), [((1, 2, 2, 1), 1, 0), ((1, 1, 4, 1), 0, 2), ((2, 6, 5, 4), 3, 2)]
)
def test_maxmag_gradient_goes_exactly_to_the_selected_values(shape, r_h, r_w):
    # With distinct magnitudes, d(sum of outputs)/dx is 1 on the selected input
    # values and 0 elsewhere, every time. Repeated because a wrong gradient that
    # depends on uninitialised memory (scatter_reduce backward compares the
    # result with ``self``) shows up only on some calls.
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(*shape, generator=generator, dtype=torch.float64)
    for attempt in range(40):
        x = base.clone().requires_grad_(True)
        merged, recover = cubist_merge(x, r_h, r_w, representation="maxmag")
        merged.sum().backward()
        selected = (recover(merged.detach()) == base).double()
        if not torch.equal(x.grad, selected):
            wrong = (x.grad != selected).nonzero().tolist()
            pytest.fail(
                f"attempt {attempt}: {len(wrong)} wrong gradient entries, first at {wrong[0]}: "
                f"{x.grad[tuple(wrong[0])].item()} instead of {selected[tuple(wrong[0])].item()}"
            )


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(representation, metric, dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 6, 5, generator=generator).to(dtype)
    merged, recover = cubist_merge(x, 3, 2, representation=representation, metric=metric)
    assert merged.dtype == dtype
    assert merged.shape == (2, 5, 4, 5)
    # The same groups in float64: a mean is off by a few roundings in the dtype (one per pass), so by at most
    # one unit in the last place at the scale of the largest input; selections are checked exactly below.
    exact, exact_recover = cubist_merge(x.double(), 3, 2, representation=representation, metric=metric)
    assert torch.equal(exact_recover.index, recover.index)
    ulp = torch.finfo(dtype).eps * float(x.double().abs().max())
    assert float((merged.double() - exact).abs().max()) <= ulp
    restored = recover(merged)
    assert restored.dtype == dtype and restored.shape == x.shape
    if representation != "mean":
        # Selections are exact whatever the dtype: compare with the whole 2D group.
        tokens = x.double().reshape(2, 48, 5).tolist()
        outputs = merged.double().reshape(2, 20, 5)
        for b in range(2):
            for slot, members in enumerate(members_by_slot(recover.index[b].tolist(), 20)):
                value = ref.group_value([tokens[b][m] for m in members], [1.0] * len(members), representation)
                assert outputs[b, slot].tolist() == value


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4), (2, 4, 4), (1, 2, 4, 4, 3), ()])
def test_rejects_non_4d_input(shape):
    with pytest.raises(ValueError, match=r"4-D|\(B, H, W, C\)"):
        cubist_merge(torch.zeros(shape), 0, 0)


@pytest.mark.parametrize(
    ("r_h", "r_w", "name"),
    [(-1, 0, "r_h"), (0, -1, "r_w"), (5, 0, "r_h"), (0, 4, "r_w"), (9, 9, "r_h"), (-2, -2, "r_h")],
)
def test_rejects_out_of_range_r(r_h, r_w, name):
    x = torch.zeros(1, 8, 7, 2)  # allowed: r_h in 0..4, r_w in 0..3
    with pytest.raises(ValueError, match="0 to") as info:
        cubist_merge(x, r_h, r_w)
    assert name in str(info.value)


def test_largest_r_is_allowed():
    x = torch.zeros(1, 8, 7, 2)
    merged, _ = cubist_merge(x, 4, 3)
    assert merged.shape == (1, 4, 4, 2)


@pytest.mark.parametrize("bad", [1.0, 2.5, "1", None, [1]])
@pytest.mark.parametrize("which", ["r_h", "r_w"])
def test_rejects_non_int_r(bad, which):
    x = torch.zeros(1, 4, 4, 2)
    r = {"r_h": 0, "r_w": 0, which: bad}
    with pytest.raises(ValueError, match="int"):
        cubist_merge(x, r["r_h"], r["r_w"])


@pytest.mark.parametrize("bad", ["max", "MAXMAG", "median", ""])
def test_rejects_unknown_representation(bad):
    with pytest.raises(ValueError, match="maxmag") as info:
        cubist_merge(torch.zeros(1, 4, 4, 2), 1, 1, representation=bad)
    assert "mean" in str(info.value)


@pytest.mark.parametrize("bad", ["dot", "COSINE", "l1", ""])
def test_rejects_unknown_metric(bad):
    with pytest.raises(ValueError, match="cosine") as info:
        cubist_merge(torch.zeros(1, 4, 4, 2), 1, 1, metric=bad)
    assert "l2" in str(info.value)


@pytest.mark.parametrize("representation", ["bogus"])
def test_rejects_unknown_representation_even_without_reduction(representation):
    with pytest.raises(ValueError, match="maxmag"):
        cubist_merge(torch.zeros(1, 4, 4, 2), 0, 0, representation=representation)


def test_rejects_unknown_metric_even_without_reduction():
    with pytest.raises(ValueError, match="cosine"):
        cubist_merge(torch.zeros(1, 4, 4, 2), 0, 0, metric="bogus")


def test_one_pass_rejects_out_of_range_r():
    x = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="0 to"):
        merge_sequences(x, 3)
    with pytest.raises(ValueError, match="0 to"):
        merge_sequences(x, -1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matching_equals_float32_matching_on_the_same_values(dtype, metric):
    """Neighbour scores are computed in float32 for bf16/fp16 grids: the merge groups equal those of the same
    values held in float32 (continuous inputs have no ties)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 14, 14, 32, generator=generator).to(dtype)
    for r in ((1, 1), (2, 3), (7, 7)):
        _, low = cubist_merge(x, *r, metric=metric)
        _, full = cubist_merge(x.float(), *r, metric=metric)
        assert torch.equal(low.index, full.index)
