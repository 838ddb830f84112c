"""Expedite's clustering and reconstruction equal a loop reference of the authors' released code (float64).

The reference below is written from the authors' SAM code (Expedit-SAM,
``segment_anything/modeling/hourglass_image_encoder.py``: ``TokenClusteringBlock``,
``TokenReconstructionBlock``, ``HourglassImageEncoderViT.cluster``), with plain
Python lists and loops; nothing of ``cubistmerge`` is used to compute it.

What the authors' code computes, and what the reference therefore does:

- Initial centres: ``adaptive_avg_pool2d`` of the grid to (h, w); pooling cell
  (a, b) averages rows [floor(a H / h), ceil((a + 1) H / h)) and the same for columns.
- Initial cell of token (i, j): the (h, w) label map resized to (H, W) with
  ``F.interpolate(mode="nearest")``, i.e. torch's nearest source index, computed
  with a float32 scale ``h / H`` (:func:`nearest_source_index` emulates it and is
  checked against ``F.interpolate`` itself).
- A token may join centre (a, b) iff |a - a0| <= n // 2 and |b - b0| <= n // 2
  (``mask``; masked distances get +1e16, i.e. a zero weight).
- ``iterations`` rounds of soft k-means: logits ``-temperature * ||x - c||^2``
  (squared distance, temperature multiplying it), softmax over each token's
  allowed centres (``softmax(1)`` on the (B, centres, tokens) matrix), then every
  centre is the assignment-weighted mean of the ORIGINAL tokens
  (``bmm(affinity, pixel_features) / affinity.sum``).
- Reconstruction: for every original token, the squared distances between the
  token saved at the clustering layer (``feat_before_pooling``) and the final
  centres at the clustering layer (``feat_after_pooling``), weights
  ``exp(-temperature * d^2)`` kept on the ``k`` largest, L2-normalised
  (``F.normalize``); the reconstructed token is the weighted sum of the clustered
  tokens of the LAST layer. Every centre of the window is a candidate.

Where the library deviates on purpose (its docstrings say so), the reference
follows the library:

- ``normalise="sum"`` (the default) rescales the kept weights to sum 1;
  ``"l2"`` is the authors' ``F.normalize``.
- The weights are computed from logits shifted by the nearest centre's, which
  never underflows to an all-zero row (the authors' code would give a zero
  token there), and ``k`` is capped at the number of centres (the authors'
  ``topk`` would raise).
- A centre whose assignment mass is exactly zero keeps its previous value (the
  authors' clamp of the mass at 1e-16 makes it zero); see
  :func:`test_a_centre_nobody_joins_keeps_its_value`.
- Inside SAM's windows, padding takes no part and edge windows are clustered in
  proportion (:func:`window_extent`); the authors' code clusters the
  zero-padded window to the full ``ws_new`` x ``ws_new`` like any other.

The initial cells once followed exact integer arithmetic instead of the
authors' nearest resizing (float32 scale), which differ for some sizes:
:func:`test_initial_cells_follow_torch_nearest_resizing_at_every_size` pins it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cubistmerge.merge import expedite_cluster, expedite_cluster_windows

TOL = 1e-10
HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True)

Token = list[float]


# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the loop reference


def nearest_source_index(dst: int, src_size: int, dst_size: int) -> int:
    """Which of ``src_size`` cells ``F.interpolate(mode="nearest")`` copies to output index ``dst``.

    torch computes ``min(floorf(dst * scale), src_size - 1)`` with the float32
    scale ``src_size / dst_size`` (special cases: equal sizes, exact doubling).
    """
    if src_size == dst_size:
        return dst
    if dst_size == 2 * src_size:
        return dst >> 1
    scale = np.float32(src_size) / np.float32(dst_size)
    return min(int(math.floor(np.float32(dst) * scale)), src_size - 1)


def sq_dist(a: Token, b: Token) -> float:
    """||a - b||^2 (``math.dist``: a loop over the coordinates, accurate to about an ulp)."""
    return math.dist(a, b) ** 2


def pooled_centres(grid: list[list[Token]], h: int, w: int) -> list[Token]:
    """Adaptive average pooling of an H x W grid of tokens to h x w, row-major."""
    H, W, C = len(grid), len(grid[0]), len(grid[0][0])
    centres = []
    for a in range(h):
        r0, r1 = a * H // h, -(-(a + 1) * H // h)
        for b in range(w):
            c0, c1 = b * W // w, -(-(b + 1) * W // w)
            members = [grid[i][j] for i in range(r0, r1) for j in range(c0, c1)]
            centres.append([sum(t[c] for t in members) / len(members) for c in range(C)])
    return centres


def allowed_centres(H: int, W: int, h: int, w: int, neighbourhood: int) -> list[list[int]]:
    """For every token (row-major), the centres (a * w + b) it may join."""
    radius = neighbourhood // 2
    allowed = []
    for i in range(H):
        a0 = nearest_source_index(i, h, H)
        for j in range(W):
            b0 = nearest_source_index(j, w, W)
            allowed.append(
                [a * w + b for a in range(h) for b in range(w) if abs(a - a0) <= radius and abs(b - b0) <= radius]
            )
    return allowed


def cluster(
    grid: list[list[Token]], h: int, w: int, neighbourhood: int, iterations: int, temperature: float
) -> list[Token]:
    """Expedite's token clustering of one H x W grid (lists) to h * w centres (row-major)."""
    H, W = len(grid), len(grid[0])
    tokens = [token for row in grid for token in row]
    C = len(tokens[0])
    centres = pooled_centres(grid, h, w)
    allowed = allowed_centres(H, W, h, w, neighbourhood)
    for _ in range(iterations):
        sums = [[0.0] * C for _ in centres]
        mass = [0.0] * len(centres)
        for n, token in enumerate(tokens):
            logits = {m: -temperature * sq_dist(token, centres[m]) for m in allowed[n]}
            top = max(logits.values())
            exps = {m: math.exp(logit - top) for m, logit in logits.items()}
            total = sum(exps.values())
            for m, e in exps.items():
                share = e / total
                mass[m] += share
                sums[m] = [s + share * t for s, t in zip(sums[m], token, strict=True)]
        centres = [
            [s / mass[m] for s in sums[m]] if mass[m] > 0 else centres[m]  # nobody joined: keep it
            for m in range(len(centres))
        ]
    return centres


def reconstruction_weights(
    tokens: list[Token], centres: list[Token], k: int, temperature: float, normalise: str
) -> list[list[float]]:
    """(N, M) weights: token n rebuilt from its k nearest centres, exp(-t d^2), normalised."""
    M = len(centres)
    rows = []
    for token in tokens:
        d2 = [sq_dist(token, centre) for centre in centres]
        kept = sorted(range(M), key=lambda m: d2[m])[: min(k, M)]
        nearest = d2[kept[0]]
        raw = {m: math.exp(-temperature * (d2[m] - nearest)) for m in kept}
        if normalise == "sum":
            scale = sum(raw.values())
        else:
            scale = math.sqrt(sum(v * v for v in raw.values()))
        row = [0.0] * M
        for m, v in raw.items():
            row[m] = v / scale
        rows.append(row)
    return rows


def apply_weights(weights: list[list[float]], values: list[Token]) -> list[Token]:
    out = []
    for row in weights:
        token = [0.0] * len(values[0])
        for m, a in enumerate(row):
            if a:
                token = [s + a * v for s, v in zip(token, values[m], strict=True)]
        out.append(token)
    return out


def cluster_image(
    grid: list[list[Token]],
    h: int,
    w: int,
    *,
    neighbourhood: int,
    iterations: int,
    temperature: float,
    k: int,
    normalise: str,
) -> tuple[list[Token], list[list[float]]]:
    """Centres (h * w, row-major) and reconstruction weights (H * W, h * w) of one image."""
    centres = cluster(grid, h, w, neighbourhood, iterations, temperature)
    tokens = [token for row in grid for token in row]
    return centres, reconstruction_weights(tokens, centres, k, temperature, normalise)


def window_extent(extent: int, window: int, out_window: int) -> int:
    """Clustered side of a window side with ``extent`` real tokens (the library's documented rule)."""
    if extent == window:
        return out_window
    return max(1, math.floor(Fraction(extent * out_window, window) + Fraction(1, 2)))


def cluster_image_windows(
    grid: list[list[Token]], window: int, out_window: int, **settings
) -> tuple[list[list[Token]], list[list[float]]]:
    """Clustering inside every window (SAM): the clustered grid (H', W') and (H * W, H' * W') weights.

    Windows tile the grid from the top-left corner; each window is clustered on
    its own to ``window_extent`` of its real sides, its centres placed in the
    clustered grid in the same window order, and its tokens rebuilt only from them.
    """
    H, W = len(grid), len(grid[0])
    row_starts = list(range(0, H, window))
    col_starts = list(range(0, W, window))
    heights = [window_extent(min(window, H - r0), window, out_window) for r0 in row_starts]
    widths = [window_extent(min(window, W - c0), window, out_window) for c0 in col_starts]
    Hm, Wm = sum(heights), sum(widths)
    merged: list[list[Token | None]] = [[None] * Wm for _ in range(Hm)]
    weights = [[0.0] * (Hm * Wm) for _ in range(H * W)]
    mr = 0
    for p, r0 in enumerate(row_starts):
        mc = 0
        for q, c0 in enumerate(col_starts):
            piece = [row[c0 : c0 + window] for row in grid[r0 : r0 + window]]
            eh, ew = len(piece), len(piece[0])
            h, w = heights[p], widths[q]
            centres, local = cluster_image(piece, h, w, **settings)
            for a in range(h):
                for b in range(w):
                    merged[mr + a][mc + b] = centres[a * w + b]
            for i in range(eh):
                for j in range(ew):
                    for a in range(h):
                        for b in range(w):
                            weights[(r0 + i) * W + c0 + j][(mr + a) * Wm + mc + b] = local[i * ew + j][a * w + b]
            mc += w
        mr += heights[p]
    return merged, weights


# ----------------------------------------------------------------------------- helpers


def features(batch: int, H: int, W: int, C: int, seed: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, H, W, C, generator=generator, dtype=torch.float64)


def weight_matrix(reconstruct, batch: int, merged_hw: tuple[int, int]) -> torch.Tensor:
    """(B, N, M) matrix of any reconstruct, read off by reconstructing the identity."""
    h, w = merged_hw
    eye = torch.eye(h * w, dtype=torch.float64).reshape(1, h, w, h * w).expand(batch, h, w, h * w)
    return reconstruct(eye.contiguous()).reshape(batch, -1, h * w)


def check_against_reference(x: torch.Tensor, out_hw: tuple[int, int], **settings) -> None:
    B, H, W, C = x.shape
    h, w = out_hw
    centres, reconstruct = expedite_cluster(x, out_hw, **settings)
    y = torch.randn(B, h, w, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rebuilt = reconstruct(y)
    for b in range(B):
        ref_centres, ref_weights = cluster_image(x[b].tolist(), h, w, **settings)
        assert (centres[b].reshape(h * w, C) - torch.tensor(ref_centres, dtype=x.dtype)).abs().max() <= TOL
        assert (reconstruct.weights[b] - torch.tensor(ref_weights, dtype=x.dtype)).abs().max() <= TOL
        expected = torch.tensor(apply_weights(ref_weights, y[b].reshape(h * w, 3).tolist()), dtype=x.dtype)
        assert (rebuilt[b].reshape(H * W, 3) - expected).abs().max() <= TOL


# ----------------------------------------------------------------------------- the reference itself


def test_nearest_source_index_is_torch_nearest_resizing():
    """The emulation of the authors' ``F.interpolate(label_map, mode="nearest")`` is exact, sizes up to 80."""
    for H in range(1, 81):
        for h in range(1, H + 1):
            labels = torch.arange(h, dtype=torch.float64).reshape(1, 1, h, 1)
            resized = F.interpolate(labels, size=(H, 1), mode="nearest").reshape(-1).long().tolist()
            assert resized == [nearest_source_index(i, h, H) for i in range(H)], (H, h)


def test_pooled_centres_are_adaptive_average_pooling():
    x = features(1, 7, 9, 3, seed=0, scale=1.0)
    pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (4, 5)).permute(0, 2, 3, 1).reshape(20, 3)
    assert (pooled - torch.tensor(pooled_centres(x[0].tolist(), 4, 5), dtype=torch.float64)).abs().max() <= 1e-14


# ----------------------------------------------------------------------------- the library against it


@st.composite
def grids(draw, max_side: int = 9):
    B = draw(st.integers(1, 2))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    h, w = draw(st.integers(1, H)), draw(st.integers(1, W))
    C = draw(st.integers(1, 4))
    temperature = draw(st.sampled_from([0.01, 0.1, 1.0, 5.0]))
    # temperature * feature variance: 0.1 = nearly even shares, 3 = nearly hard assignments
    softness = draw(st.sampled_from([0.1, 1.0, 3.0]))
    x = features(B, H, W, C, draw(st.integers(0, 2**31 - 1)), math.sqrt(softness / temperature))
    return x, (h, w), temperature


@HYPOTHESIS
@given(
    problem=grids(),
    neighbourhood=st.sampled_from([1, 3, 5, 7]),
    iterations=st.integers(0, 4),
    k=st.integers(1, 25),
    normalise=st.sampled_from(["sum", "l2"]),
)
def test_cluster_and_reconstruction_equal_the_loop_reference(problem, neighbourhood, iterations, k, normalise):
    x, out_hw, temperature = problem
    check_against_reference(
        x,
        out_hw,
        neighbourhood=neighbourhood,
        iterations=iterations,
        temperature=temperature,
        k=k,
        normalise=normalise,
    )


# Fixed cases each property depends on (the hypothesis search above covers them too, at random).
CASES = {
    # centres = pooling exactly: a wrong pooling shows at once
    "pooling_only": dict(shape=(2, 7, 9, 3), out_hw=(3, 4), iterations=0, temperature=0.5, k=5),
    # a 3x3 neighbourhood on a 6x6 grid of cells: many centres out of reach of every token
    "neighbourhood_3": dict(shape=(1, 9, 8, 2), out_hw=(6, 6), neighbourhood=3, iterations=2, temperature=0.5),
    "neighbourhood_1": dict(shape=(1, 8, 7, 2), out_hw=(5, 4), neighbourhood=1, iterations=3, temperature=1.0),
    # the authors' defaults (5x5, 5 rounds, t = 0.01, k = 20) on feature variances where t = 0.01 is soft
    "defaults": dict(shape=(2, 9, 9, 4), out_hw=(7, 6), scale=3.0),
    "defaults_l2": dict(shape=(1, 9, 8, 4), out_hw=(6, 6), scale=5.0, normalise="l2"),
    "hard": dict(shape=(1, 8, 8, 3), out_hw=(5, 5), temperature=5.0, k=7),
    "k_1": dict(shape=(1, 6, 6, 2), out_hw=(4, 4), k=1, temperature=0.3),
    "k_above_centres": dict(shape=(1, 5, 6, 2), out_hw=(2, 3), k=20, temperature=0.3, normalise="l2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fixed_cases_equal_the_loop_reference(case):
    spec = dict(CASES[case])
    shape, out_hw, scale = spec.pop("shape"), spec.pop("out_hw"), spec.pop("scale", 1.0)
    settings_ = dict(neighbourhood=5, iterations=5, temperature=0.01, k=20, normalise="sum") | spec
    x = features(*shape, seed=sum(map(ord, case)), scale=scale)
    check_against_reference(x, out_hw, **settings_)
    # The clustering must matter far more than the tolerance: it moves the centres off the pooled grid.
    if settings_["iterations"]:
        pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), out_hw).permute(0, 2, 3, 1)
        assert (expedite_cluster(x, out_hw, **settings_)[0] - pooled).abs().max() > 1e-3


def test_a_centre_nobody_joins_keeps_its_value():
    """Documented deviation: a centre whose mass underflows to 0 keeps its value (the authors' code zeroes it).

    Rows [-100]*2 | [-100, 100] | [100]*2 pool to -100, 0, 100; with t = 1 the
    middle centre's logits are -1e4 below the others' for every token, so no
    token joins it: it stays 0 + 101 (the whole map is shifted by 101), while
    the two others do not move.
    """
    x = (torch.tensor([-100.0, -100.0, -100.0, 100.0, 100.0, 100.0], dtype=torch.float64) + 101).reshape(1, 6, 1, 1)
    settings_ = dict(neighbourhood=3, iterations=2, temperature=1.0, k=2, normalise="sum")
    centres, _ = expedite_cluster(x, (3, 1), **settings_)
    assert centres.reshape(-1).tolist() == [1.0, 101.0, 201.0]
    check_against_reference(x, (3, 1), **settings_)


# ----------------------------------------------------------------------------- an undocumented deviation

# (H, h) pairs where torch's nearest resizing (float32 scale) and exact floor(i * h / H) disagree.
NEAREST_MISMATCHES = [(44, 26), (46, 14), (74, 6)]


@pytest.mark.parametrize("sizes", NEAREST_MISMATCHES, ids=str)
def test_the_mismatch_sizes_are_real(sizes):
    H, h = sizes
    assert any(nearest_source_index(i, h, H) != i * h // H for i in range(H))


@pytest.mark.parametrize("sizes", NEAREST_MISMATCHES, ids=str)
def test_initial_cells_follow_torch_nearest_resizing_at_every_size(sizes):
    """The initial cell is what nearest resizing of the cell map gives, also where that differs from exact floor.

    With a 1-cell neighbourhood every token may join only its initial cell, so
    one token in another cell changes the means.
    """
    H, h = sizes
    x = features(1, H, 1, 2, seed=H, scale=1.0)
    check_against_reference(x, (h, 1), neighbourhood=1, iterations=1, temperature=0.1, k=3, normalise="sum")


# ----------------------------------------------------------------------------- inside windows


def check_windows_against_reference(x: torch.Tensor, window: int, out_window: int, **settings) -> None:
    B, H, W, C = x.shape
    merged, reconstruct, new_window = expedite_cluster_windows(x, window, out_window, **settings)
    assert new_window == (out_window, out_window)
    Hm, Wm = merged.shape[1:3]
    matrix = weight_matrix(reconstruct, B, (Hm, Wm))
    for b in range(B):
        ref_merged, ref_weights = cluster_image_windows(x[b].tolist(), window, out_window, **settings)
        assert (len(ref_merged), len(ref_merged[0])) == (Hm, Wm)
        assert (merged[b] - torch.tensor(ref_merged, dtype=x.dtype)).abs().max() <= TOL
        assert (matrix[b] - torch.tensor(ref_weights, dtype=x.dtype)).abs().max() <= TOL


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    H=st.integers(1, 13),
    W=st.integers(1, 13),
    window=st.integers(2, 6),
    data=st.data(),
    neighbourhood=st.sampled_from([1, 3, 5]),
    iterations=st.integers(0, 3),
    k=st.integers(1, 12),
    temperature=st.sampled_from([0.01, 0.3, 2.0]),
    normalise=st.sampled_from(["sum", "l2"]),
    seed=st.integers(0, 999),
)
def test_windows_equal_the_loop_reference(
    H, W, window, data, neighbourhood, iterations, k, temperature, normalise, seed
):
    out_window = data.draw(st.integers(1, window))
    x = features(2, H, W, 3, seed, math.sqrt(1.0 / temperature))
    check_windows_against_reference(
        x,
        window,
        out_window,
        neighbourhood=neighbourhood,
        iterations=iterations,
        temperature=temperature,
        k=k,
        normalise=normalise,
    )


@pytest.mark.parametrize(
    "shape,window,out_window",
    [
        ((1, 10, 10, 3), 4, 3),  # 4 + 4 + 2: the edge windows' 2 -> round(1.5) = 2
        ((2, 11, 9, 2), 4, 2),  # edges of 3 and 1: 3 -> round(1.5) = 2, 1 -> max(1, round(0.5)) = 1
        ((1, 16, 16, 3), 7, 5),  # the existing patch tests' SAM layout: 7 + 7 + 2
    ],
)
def test_fixed_windows_equal_the_loop_reference(shape, window, out_window):
    x = features(*shape, seed=window, scale=3.0)
    check_windows_against_reference(
        x, window, out_window, neighbourhood=3, iterations=3, temperature=0.05, k=4, normalise="sum"
    )
