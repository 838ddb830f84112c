"""Expedite's token clustering and reconstruction (``cubistmerge.merge.expedite``).

The neighbourhood rule is checked against a loop written from the
specification (METHOD.md section 3): token (i, j) of an H x W grid starts in
cell (floor(i h / H), floor(j w / W)) and may join the centres at most
``neighbourhood // 2`` cells away along each axis.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge import (
    Reconstruct,
    expedite_cluster,
    expedite_cluster_windows,
    neighbourhood_mask,
    reconstruction_weights,
    soft_assignment,
)
from cubistmerge.merge.expedite import initial_cells, squared_distances, window_cluster_extent

FAST = settings(max_examples=50, deadline=None)


def _allowed_by_loops(H: int, W: int, h: int, w: int, neighbourhood: int) -> torch.Tensor:
    radius = neighbourhood // 2
    allowed = torch.zeros(H * W, h * w, dtype=torch.bool)
    for i in range(H):
        for j in range(W):
            # torch's nearest resizing: the scale h / H in float32 (as the authors' code uses it)
            a0 = min(math.floor(i * float(torch.tensor(h / H, dtype=torch.float32))), h - 1)
            b0 = min(math.floor(j * float(torch.tensor(w / W, dtype=torch.float32))), w - 1)
            for a in range(h):
                for b in range(w):
                    allowed[i * W + j, a * w + b] = abs(a - a0) <= radius and abs(b - b0) <= radius
    return allowed


@st.composite
def problems(draw, max_side=10, max_channels=4):
    """(x, (h, w)): a seeded float64 (B, H, W, C) grid and a clustered size h <= H, w <= W."""
    batch = draw(st.integers(1, 2))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    h, w = draw(st.integers(1, H)), draw(st.integers(1, W))
    channels = draw(st.integers(1, max_channels))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(batch, H, W, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, (h, w)


# ----------------------------------------------------------------------------- shapes and weights


@FAST
@given(
    problem=problems(),
    neighbourhood=st.sampled_from([1, 3, 5, 7]),
    iterations=st.integers(0, 3),
    k=st.integers(1, 25),
    normalise=st.sampled_from(["sum", "l2"]),
)
def test_shapes_and_reconstruction_weights(problem, neighbourhood, iterations, k, normalise):
    x, (h, w) = problem
    B, H, W, C = x.shape
    centres, reconstruct = expedite_cluster(
        x, (h, w), neighbourhood=neighbourhood, iterations=iterations, k=k, normalise=normalise
    )
    assert centres.shape == (B, h, w, C) and centres.dtype == x.dtype
    assert reconstruct.grid == (H, W) and reconstruct.merged_grid == (h, w)
    assert reconstruct(centres).shape == x.shape
    assert reconstruct(torch.randn(B, h, w, 7, dtype=x.dtype)).shape == (B, H, W, 7)
    weights = reconstruct.weights
    assert weights.shape == (B, H * W, h * w) and (weights >= 0).all()
    nonzero = (weights > 0).sum(-1)
    assert (nonzero >= 1).all() and (nonzero <= min(k, h * w)).all()
    norms = weights.sum(-1) if normalise == "sum" else torch.linalg.vector_norm(weights, dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms))


@FAST
@given(problem=problems(), k=st.integers(1, 12))
def test_reconstruction_uses_the_k_nearest_centres(problem, k):
    """Support = the k centres nearest to each token at the clustering layer; weights follow exp(-t d^2)."""
    x, (h, w) = problem
    B, H, W, C = x.shape
    centres, reconstruct = expedite_cluster(x, (h, w), k=k, temperature=0.3)
    tokens, flat_centres = x.reshape(B, H * W, C), centres.reshape(B, h * w, C)
    d2 = torch.cdist(tokens, flat_centres).square()
    kk = min(k, h * w)
    nearest = d2.topk(kk, dim=-1, largest=False).indices
    expected = torch.zeros_like(d2).scatter(-1, nearest, torch.exp(-0.3 * d2).gather(-1, nearest))
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(reconstruct.weights, expected, atol=1e-9)


def test_l2_normalisation_is_the_sum_one_times_a_per_token_factor():
    x = torch.randn(2, 8, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    centres, as_sum = expedite_cluster(x, (5, 6), temperature=0.2)
    _, as_l2 = expedite_cluster(x, (5, 6), temperature=0.2, normalise="l2")
    y = torch.randn(2, 5, 6, 3, dtype=torch.float64)
    factor = as_sum.weights.sum(-1) / torch.linalg.vector_norm(as_sum.weights, dim=-1)  # (B, N)
    assert ((factor >= 1 - 1e-12) & (factor <= math.sqrt(20) + 1e-12)).all()
    assert torch.allclose(as_l2(y), as_sum(y) * factor.reshape(2, 8, 9, 1))


# ----------------------------------------------------------------------------- neighbourhood


@FAST
@given(
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    data=st.data(),
    neighbourhood=st.sampled_from([1, 3, 5]),
)
def test_neighbourhood_mask_matches_the_rule(H, W, data, neighbourhood):
    h, w = data.draw(st.integers(1, H)), data.draw(st.integers(1, W))
    allowed = neighbourhood_mask((H, W), (h, w), neighbourhood)
    assert torch.equal(allowed, _allowed_by_loops(H, W, h, w, neighbourhood))
    cells = initial_cells((H, W), (h, w))
    assert torch.equal(torch.unique(cells), torch.arange(h * w))  # every cell starts with a token
    for flat, cell in enumerate(cells.tolist()):
        (i, j), (a, b) = divmod(flat, W), divmod(cell, w)
        # the token lies in its cell's adaptive-average-pooling region
        assert a * H // h <= i < math.ceil((a + 1) * H / h) and b * W // w <= j < math.ceil((b + 1) * W / w)


@FAST
@given(problem=problems(), neighbourhood=st.sampled_from([1, 3, 5]), temperature=st.sampled_from([0.01, 1.0, 50.0]))
def test_no_weight_outside_the_neighbourhood(problem, neighbourhood, temperature):
    x, (h, w) = problem
    B, H, W, C = x.shape
    tokens = x.reshape(B, H * W, C)
    centres = torch.randn(B, h * w, C, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    allowed = neighbourhood_mask((H, W), (h, w), neighbourhood)
    assignment = soft_assignment(tokens, centres, allowed, temperature)
    assert (assignment[:, ~allowed] == 0).all()
    assert torch.allclose(assignment.sum(-1), torch.ones(B, H * W, dtype=x.dtype))


@pytest.mark.parametrize("neighbourhood", [1, 3, 5])
def test_clustering_follows_the_neighbourhood_end_to_end(neighbourhood):
    """With a near-zero temperature every token spreads evenly over its allowed centres.

    One k-means round then gives centre m = sum_i x_i / n_i / sum_i 1 / n_i over
    the tokens i allowed to join m (n_i = how many centres token i may join).
    Any token assigned outside its neighbourhood would change these means.
    """
    x = torch.randn(2, 13, 11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h, w = 7, 4
    centres, _ = expedite_cluster(x, (h, w), neighbourhood=neighbourhood, iterations=1, temperature=1e-12)
    allowed = _allowed_by_loops(13, 11, h, w, neighbourhood).double()
    share = allowed / allowed.sum(1, keepdim=True)  # (N, M)
    expected = torch.einsum("nm,bnc->bmc", share, x.reshape(2, -1, 3)) / share.sum(0)[None, :, None]
    assert torch.allclose(centres.reshape(2, h * w, 3), expected, atol=1e-9)


@FAST
@given(problem=problems(), iterations=st.integers(1, 4))
def test_centres_are_convex_combinations_of_allowed_tokens(problem, iterations):
    x, (h, w) = problem
    B, H, W, C = x.shape
    centres, _ = expedite_cluster(x, (h, w), iterations=iterations, temperature=0.5)
    # Every round's centre is a weighted mean of the tokens allowed to join it.
    allowed = neighbourhood_mask((H, W), (h, w), 5).T  # (M, N)
    tokens = x.reshape(B, H * W, C)
    for m in range(h * w):
        members = tokens[:, allowed[m]]  # (B, n, C)
        value = centres.reshape(B, h * w, C)[:, m]
        assert (value >= members.amin(1) - 1e-9).all() and (value <= members.amax(1) + 1e-9).all()


# ----------------------------------------------------------------------------- exact properties


@FAST
@given(problem=problems(), normalise=st.sampled_from(["sum", "l2"]), iterations=st.integers(0, 3))
def test_constant_maps(problem, normalise, iterations):
    """A constant grid clusters to the same constant; reconstruction keeps constants ("sum") or scales them ("l2")."""
    x, (h, w) = problem
    B, H, W, C = x.shape
    constant = torch.full_like(x, -1.75)
    centres, reconstruct = expedite_cluster(constant, (h, w), iterations=iterations, normalise=normalise)
    assert torch.allclose(centres, torch.full_like(centres, -1.75))
    y = torch.full((B, h, w, 2), 3.0, dtype=x.dtype)
    # all distances are equal: exactly min(k, h * w) centres are kept, with equal weights
    scale = 1.0 if normalise == "sum" else math.sqrt(min(20, h * w))
    assert torch.allclose(reconstruct(y), torch.full((B, H, W, 2), 3.0 * scale, dtype=x.dtype))
    # any constant map reconstructs to a constant map with "sum", whatever the clustered features
    _, reconstruct = expedite_cluster(x, (h, w), iterations=iterations)
    assert torch.allclose(reconstruct(y), torch.full((B, H, W, 2), 3.0, dtype=x.dtype))


@FAST
@given(problem=problems())
def test_full_size_is_exact_without_iterations_and_with_k_1(problem):
    """out_hw == (H, W): pooling is the identity; soft k-means moves the centres, so only
    ``iterations=0`` keeps them exactly, and only ``k=1`` (each token rebuilt from its
    nearest centre, itself) makes the reconstruction exact."""
    x, _ = problem
    H, W = x.shape[1:3]
    centres, reconstruct = expedite_cluster(x, (H, W), iterations=0, k=1)
    assert torch.equal(centres, x)
    assert torch.equal(reconstruct(centres), x)


def test_full_size_with_hard_assignments_is_exact():
    """A large (inverse) temperature makes the assignment hard: every token stays its own centre.

    Distinct integer tokens make every squared distance exact and at least 1, so
    exp(-1000 d^2) is exactly 0 for every other centre.
    """
    x = torch.randperm(2 * 7 * 5 * 3, generator=torch.Generator().manual_seed(0)).double().reshape(2, 7, 5, 3)
    centres, reconstruct = expedite_cluster(x, (7, 5), iterations=3, temperature=1000.0, k=4)
    assert torch.equal(centres, x) and torch.equal(reconstruct(centres), x)


def test_full_size_with_iterations_moves_the_centres():
    x = torch.randn(1, 6, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    centres, _ = expedite_cluster(x, (6, 6))  # default temperature 0.01: soft on unit-scale features
    assert not torch.allclose(centres, x, atol=1e-3)
    assert torch.allclose(centres.mean(), x.mean(), atol=0.5)


def test_images_of_a_batch_are_independent():
    x = torch.randn(3, 9, 7, 4, generator=torch.Generator().manual_seed(1))
    centres, reconstruct = expedite_cluster(x, (5, 4))
    y = torch.randn(3, 5, 4, 6)
    for b in range(3):
        alone, alone_reconstruct = expedite_cluster(x[b : b + 1], (5, 4))
        assert torch.allclose(centres[b : b + 1], alone, atol=1e-6)
        assert torch.allclose(reconstruct(y)[b : b + 1], alone_reconstruct(y[b : b + 1]), atol=1e-5)


def test_inputs_not_modified_and_gradients():
    x = torch.randn(2, 8, 8, 3, requires_grad=True)
    before, version = x.detach().clone(), x._version
    centres, reconstruct = expedite_cluster(x, (5, 5))
    reconstruct(centres * 2).square().sum().backward()
    assert torch.equal(x.detach(), before) and x._version == version
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_low_precision_inputs():
    x = torch.randn(1, 8, 8, 4).to(torch.bfloat16)
    centres, reconstruct = expedite_cluster(x, (6, 6))
    assert centres.dtype == torch.bfloat16 and reconstruct.weights.dtype == torch.float32
    out = reconstruct(centres)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_far_features_never_underflow_to_zero_rows():
    """Squared distances of 1e6 would make exp(-0.01 d^2) zero everywhere: the weights are shifted first."""
    x = torch.randn(1, 6, 6, 3, dtype=torch.float64) * 1000
    centres, reconstruct = expedite_cluster(x, (3, 3))
    assert torch.isfinite(centres).all()
    assert torch.allclose(reconstruct.weights.sum(-1), torch.ones(1, 36, dtype=torch.float64))
    weights = reconstruction_weights(x.reshape(1, 36, 3), x.reshape(1, 36, 3) + 500, normalise="l2")
    assert torch.allclose(torch.linalg.vector_norm(weights, dim=-1), torch.ones(1, 36, dtype=torch.float64))


def test_squared_distances():
    a, b = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    assert torch.allclose(squared_distances(a, b), torch.cdist(a, b).square())
    assert (squared_distances(a, a).diagonal(dim1=1, dim2=2) >= 0).all()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(out_hw=(9, 4)), "cannot be larger than the 8x8 grid"),
        (dict(out_hw=(0, 4)), r"out_hw\[0\] must be an int >= 1"),
        (dict(out_hw=2.5), "out_hw must be an int >= 1"),
        (dict(out_hw=(1, 2, 3)), r"an \(h, w\) pair"),
        (dict(neighbourhood=4), "odd"),
        (dict(neighbourhood=0), "neighbourhood must be an int >= 1"),
        (dict(iterations=-1), "iterations must be an int >= 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
        (dict(k=0), "k must be an int >= 1"),
        (dict(k=True), "k must be an int"),
        (dict(normalise="softmax"), "normalise must be one of"),
    ],
)
def test_errors(kwargs, message):
    arguments = {"out_hw": (4, 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        expedite_cluster(torch.randn(1, 8, 8, 2), arguments.pop("out_hw"), **arguments)


def test_not_a_grid_and_wrong_reconstruct_input():
    with pytest.raises(ValueError, match="4-D grid"):
        expedite_cluster(torch.randn(8, 8, 2), (4, 4))
    centres, reconstruct = expedite_cluster(torch.randn(2, 8, 8, 2), (4, 4))
    assert isinstance(reconstruct, Reconstruct)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4, C\)"):
        reconstruct(torch.randn(2, 5, 4, 2))
    with pytest.raises(ValueError, match="4-D grid"):
        expedite_cluster_windows(torch.randn(8, 8, 2), 4, 3)
    with pytest.raises(ValueError, match="cannot be larger than the window"):
        expedite_cluster_windows(torch.randn(1, 8, 8, 2), 4, 5)


# ----------------------------------------------------------------------------- inside windows


def test_window_cluster_extent():
    assert window_cluster_extent(14, 14, 10) == 10
    assert window_cluster_extent(8, 14, 10) == 6  # 5.71 -> 6: SAM's 64 = 4 * 14 + 8
    assert window_cluster_extent(2, 7, 5) == 1  # 1.43 -> 1
    assert window_cluster_extent(1, 14, 1) == 1  # never below one token
    assert all(window_cluster_extent(e, 9, o) <= o for e in range(1, 10) for o in range(1, 10))


@settings(max_examples=25, deadline=None)
@given(H=st.integers(1, 17), W=st.integers(1, 17), window=st.integers(2, 7), data=st.data(), seed=st.integers(0, 999))
def test_windows_never_mix_and_keep_their_layout(H, W, window, data, seed):
    out = data.draw(st.integers(1, window))
    x = torch.randn(2, H, W, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    merged, reconstruct, new_window = expedite_cluster_windows(x, window, out)
    assert new_window == (out, out)
    full_h, rest_h = divmod(H, window)
    full_w, rest_w = divmod(W, window)
    Hm = full_h * out + (window_cluster_extent(rest_h, window, out) if rest_h else 0)
    Wm = full_w * out + (window_cluster_extent(rest_w, window, out) if rest_w else 0)
    assert merged.shape == (2, Hm, Wm, 3) and reconstruct.merged_grid == (Hm, Wm)
    assert reconstruct(merged).shape == x.shape
    # One clustered token set to 1 (all others 0) reaches only the original window it belongs to,
    # and that window is the one the reduced window size tiles it into.
    i, j = data.draw(st.integers(0, Hm - 1)), data.draw(st.integers(0, Wm - 1))
    probe = torch.zeros(2, Hm, Wm, 1, dtype=torch.float64)
    probe[:, i, j] = 1.0
    reached = reconstruct(probe)[..., 0] != 0
    rows, cols = torch.nonzero(reached[0], as_tuple=True)
    assert {(r // window, c // window) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)} <= {
        (i // out, j // out)
    }
    # And a window's clustered tokens depend only on that window's tokens.
    changed_x = x.clone()
    changed_x[:, :window, :window] += 5.0
    changed, _, _ = expedite_cluster_windows(changed_x, window, out)
    differs = (changed - merged).abs().amax(dim=(0, 3)) > 1e-9
    differs[: min(out, Hm), : min(out, Wm)] = False
    assert not differs.any()


def test_one_window_covering_the_grid_equals_clustering_the_grid():
    x = torch.randn(2, 9, 12, 4, generator=torch.Generator().manual_seed(4))
    merged, reconstruct, window = expedite_cluster_windows(x, (9, 12), (6, 8))
    alone, alone_reconstruct = expedite_cluster(x, (6, 8))
    assert window == (6, 8)
    assert torch.equal(merged, alone)
    y = torch.randn(2, 6, 8, 3)
    assert torch.equal(reconstruct(y), alone_reconstruct(y))


def test_full_windows_equal_clustering_each_window_alone():
    x = torch.randn(2, 12, 8, 5, generator=torch.Generator().manual_seed(0))
    merged, reconstruct, _ = expedite_cluster_windows(x, 4, 3)
    assert merged.shape == (2, 9, 6, 5)
    y = torch.randn(2, 9, 6, 2)
    rebuilt = reconstruct(y)
    for b in range(2):
        for i in range(3):
            for j in range(2):
                alone, alone_reconstruct = expedite_cluster(x[b : b + 1, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], 3)
                assert torch.allclose(merged[b, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3], alone[0], atol=1e-6)
                window_y = y[b : b + 1, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3]
                expected = alone_reconstruct(window_y)[0]
                assert torch.allclose(rebuilt[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], expected, atol=1e-6)


def test_sam_layout_64_grid_with_14_windows():
    """SAM-B at 1024 px, Expedite's 10x10 clusters per 14x14 window: the 8-token edge windows get 6."""
    x = torch.randn(1, 64, 64, 4)
    merged, reconstruct, window = expedite_cluster_windows(x, 14, 10)
    assert window == (10, 10)
    assert merged.shape == (1, 4 * 10 + 6, 4 * 10 + 6, 4)
    assert reconstruct(merged).shape == x.shape


def test_windows_inputs_unchanged_and_gradients():
    x = torch.randn(1, 10, 10, 3, requires_grad=True)
    before = x.detach().clone()
    merged, reconstruct, _ = expedite_cluster_windows(x, (4, 5), (3, 3))
    reconstruct(merged).sum().backward()
    assert torch.equal(x.detach(), before) and torch.isfinite(x.grad).all()
