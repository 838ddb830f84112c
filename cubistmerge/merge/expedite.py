"""Expedite (Liang et al., NeurIPS 2022): token clustering and reconstruction, the dense-model baseline.

A **clustering** step turns a (B, H, W, C) grid into a smaller (B, h, w, C)
grid of cluster centres, and a **reconstruction** step later maps any tensor
laid out like the small grid back to (B, H, W, C') by a per-token weighted sum
of clustered tokens. See ``docs``/METHOD.md section 3.

Clustering (:func:`expedite_cluster`):

1. Initial centres: adaptive average pooling of the grid to (h, w)
   (``torch.nn.functional.adaptive_avg_pool2d``).
2. Every token (i, j) has an *initial cell* of the h x w grid: what
   nearest-neighbour resizing of the cell map to H x W gives it, as in the
   authors' code (``F.interpolate(mode="nearest")``: floor(i * h / H) with the
   scale in float32, one cell off exact arithmetic for a few sizes).
   It may only join the centres within a ``neighbourhood`` x ``neighbourhood``
   square (default 5 x 5) around that cell.
3. ``iterations`` (default 5) rounds of soft k-means: every token's soft
   assignment is a softmax over its allowed centres of
   ``-temperature * ||x - c||^2`` (squared Euclidean distance, float32 or
   better), and every centre becomes the assignment-weighted mean of the
   tokens. As in the authors' released SAM code, ``temperature`` (default
   0.01) *multiplies* the negative squared distance: it is an inverse
   temperature (larger values give harder assignments), i.e. logits
   ``-||x - c||^2 / 100`` by default. Dividing by 0.01 instead would make the
   assignment practically hard; the authors' Swin code, which divides by its
   ``temperature = 200``, confirms that soft scale. The softness depends on
   the feature scale: a token shares its weight nearly evenly between centres
   whose squared distances to it differ by much less than 100. The assignment is treated as a
   constant for autograd (as in the released code: gradients reach the tokens
   through the weighted means only). A centre whose weights all underflow to
   zero keeps its previous value (the released code would set it to zero).

The clustered features are the tokens themselves (the input of the block the
clustering runs before); the centres are the tokens of the smaller grid.

Reconstruction (:class:`Reconstruct`): original token n becomes
``sum_m a[n, m] * y[m]`` over the ``k`` (default 20) clustered tokens nearest
to it, where the nearness and the weights come from the features saved at the
clustering step: the squared distance between original token n *at the
clustering layer* and the final centre m *at the clustering layer*, with
weights ``exp(-temperature * d^2)`` (the same temperature, as in the released
code) over those k centres, and zero elsewhere. Every centre of the grid (or of
the window) is a candidate, not only the neighbourhood of the token's cell (as
in the released code). Exactly ``k`` centres are kept (``min(k, h * w)``); an
exact tie at the k-th place is broken by ``torch.topk`` (the released code
keeps every centre tied with the k-th).

Normalisation of the k weights (``normalise``):

- ``"sum"`` (default): the weights sum to 1 (a softmax over the k logits), so
  every reconstructed token is a convex combination of clustered tokens: a
  constant map stays constant and intermediate features keep their scale.
- ``"l2"``: the weight vector has unit L2 norm, what METHOD.md section 3 and
  the authors' released code (``F.normalize``) do. Its reconstructed token is
  the ``"sum"`` one times ``sum(w) / ||w||_2``, a per-token factor in
  [1, sqrt(k)]. Where the reconstruction feeds a per-token LayerNorm (the
  plain ViT's final ``norm``; SAM's neck, a bias-free 1x1 convolution followed
  by LayerNorm2d) that factor cancels up to the norm's epsilon, so both
  choices give the same model outputs there; elsewhere (``norm=False``
  intermediates, ViTs with ``fc_norm`` and no final norm) ``"l2"`` rescales
  tokens, which is why it is not the default.

The weights are computed from shifted logits (``-temperature * (d^2 - min d^2)``),
which is mathematically the same for both normalisations and never underflows
to an all-zero row (the released code reconstructs such a token as zero).

Cost: clustering builds (B, H*W, h*w) distance matrices (one per iteration,
plus one for the reconstruction weights); :func:`expedite_cluster_windows`
keeps them per window, which is how Expedite runs SAM.

These are pure functions: inputs are never modified.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

import torch
import torch.nn.functional as F

from .groups import score_dtype
from .windows import _bands, _from_windows, _to_windows

Normalise = Literal["sum", "l2"]
NORMALISATIONS: tuple[str, ...] = ("sum", "l2")

DEFAULT_NEIGHBOURHOOD = 5
DEFAULT_ITERATIONS = 5
DEFAULT_TEMPERATURE = 0.01
DEFAULT_K = 20


# --------------------------------------------------------------------------- validation


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _pair(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, tuple | list) and len(value) == 2:
        return _int(f"{name}[0]", value[0], 1), _int(f"{name}[1]", value[1], 1)
    if isinstance(value, tuple | list):
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    size = _int(name, value, 1)
    return size, size


def _check_settings(neighbourhood: object, iterations: object, temperature: object, k: object, normalise: object):
    neighbourhood = _int("neighbourhood", neighbourhood, 1)
    if neighbourhood % 2 == 0:
        raise ValueError(
            f"neighbourhood must be an odd number of cells (a square centred on a cell), got {neighbourhood}"
        )
    iterations = _int("iterations", iterations, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    k = _int("k", k, 1)
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    return neighbourhood, iterations, float(temperature), k


# --------------------------------------------------------------------------- building blocks


def initial_cells(grid: tuple[int, int], out_hw: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Flat index ``a * w + b`` of every token's initial cell, (H * W,) long.

    Token (i, j) of an H x W grid starts in the cell that nearest-neighbour
    resizing of the h x w cell map to H x W gives it (h <= H, w <= W), computed
    by ``F.interpolate(mode="nearest")`` as the authors' code does: that is
    floor(i * h / H) with the scale in float32, which for some sizes (e.g.
    H = 44, h = 26) differs from exact integer arithmetic by one cell. Every
    cell holds at least one token.
    """
    (H, W), (h, w) = grid, out_hw
    rows, cols = _nearest_cells(H, h, device), _nearest_cells(W, w, device)
    return (rows[:, None] * w + cols[None, :]).reshape(H * W)


def _nearest_cells(size: int, cells: int, device: torch.device | None) -> torch.Tensor:
    """(size,) long: the cell of each of ``size`` positions when ``cells`` cells are resized to ``size`` (nearest)."""
    labels = torch.arange(cells, device=device, dtype=torch.float32).reshape(1, 1, cells)
    return F.interpolate(labels, size=size, mode="nearest").reshape(size).long()


def neighbourhood_mask(
    grid: tuple[int, int],
    out_hw: tuple[int, int],
    neighbourhood: int = DEFAULT_NEIGHBOURHOOD,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Which centres each token may join: (H * W, h * w) bool.

    True where centre (a, b) lies within the ``neighbourhood`` x ``neighbourhood``
    square around the token's initial cell (|a - a0| <= n // 2 and |b - b0| <= n // 2);
    every row has at least its own cell.
    """
    (H, W), (h, w) = grid, out_hw
    radius = neighbourhood // 2
    row_cell = _nearest_cells(H, h, device)  # (H,)
    col_cell = _nearest_cells(W, w, device)  # (W,)
    row_ok = (row_cell[:, None] - torch.arange(h, device=device)[None, :]).abs() <= radius  # (H, h)
    col_ok = (col_cell[:, None] - torch.arange(w, device=device)[None, :]).abs() <= radius  # (W, w)
    return (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(H * W, h * w)


def squared_distances(tokens: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||t_n - c_m||^2 for (B, N, C) tokens and (B, M, C) centres: (B, N, M), clamped at 0.

    Computed as |t|^2 + |c|^2 - 2 t.c (one batched matrix product); inputs
    should already be in the dtype to compute in.
    """
    t_sq = tokens.square().sum(-1, keepdim=True)  # (B, N, 1)
    c_sq = centres.square().sum(-1).unsqueeze(1)  # (B, 1, M)
    return torch.baddbmm(t_sq + c_sq, tokens, centres.transpose(1, 2), alpha=-2.0).clamp_min(0.0)


def soft_assignment(
    tokens: torch.Tensor, centres: torch.Tensor, allowed: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """Soft k-means assignment of every token over its allowed centres.

    Args:
        tokens: (B, N, C); centres: (B, M, C), both in the dtype to compute in.
        allowed: (N, M) bool, at least one True per row (see :func:`neighbourhood_mask`).
        temperature: multiplies the negative squared distance (Expedite's convention).

    Returns:
        (B, N, M): ``softmax_m(-temperature * ||t_n - c_m||^2)`` over the allowed
        centres, exactly 0 at the others; every row sums to 1.
    """
    logits = squared_distances(tokens, centres).mul(-temperature)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def reconstruction_weights(
    tokens: torch.Tensor,
    centres: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    normalise: Normalise = "sum",
) -> torch.Tensor:
    """Expedite's token-reconstruction weights, (B, N, M) with at most ``k`` nonzeros per row.

    Args:
        tokens: (B, N, C) original tokens at the clustering layer.
        centres: (B, M, C) cluster centres at the clustering layer.
        k: clustered tokens each original token is rebuilt from (``min(k, M)`` are used).
        temperature: weights are ``exp(-temperature * ||t_n - c_m||^2)``.
        normalise: ``"sum"`` (rows sum to 1) or ``"l2"`` (rows have unit L2 norm).

    Returns:
        weights in the dtype of ``tokens``.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    logits = squared_distances(tokens, centres).mul(-temperature)
    top, index = logits.topk(min(k, logits.shape[-1]), dim=-1)  # sorted: top[..., 0] is the largest
    if normalise == "sum":
        kept = top.softmax(dim=-1)
    else:
        kept = (top - top[..., :1]).exp()  # the nearest centre gets 1: no underflow to an all-zero row
        kept = kept / torch.linalg.vector_norm(kept, dim=-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, index, kept)


# --------------------------------------------------------------------------- reconstruct


@dataclass(frozen=True)
class Reconstruct:
    """Maps tensors laid out like the clustered grid back to the original grid.

    ``weights[b, i * W + j, a * w + c]`` is the weight of clustered token (a, c)
    in the reconstruction of original token (i, j) of image b (see
    :func:`reconstruction_weights`).
    """

    weights: torch.Tensor  # (B, H * W, h * w), float32 (float64 for float64 input)
    grid: tuple[int, int]  # (H, W) original
    merged_grid: tuple[int, int]  # (h, w) clustered

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C') -> (B, H, W, C'): every original token is its weighted sum of clustered tokens."""
        B = self.weights.shape[0]
        h, w = self.merged_grid
        if y.dim() != 4 or y.shape[0] != B or tuple(y.shape[1:3]) != (h, w):
            raise ValueError(f"reconstruct expects a tensor of shape ({B}, {h}, {w}, C), got {tuple(y.shape)}")
        out = torch.bmm(self.weights.to(y.dtype), y.reshape(B, h * w, y.shape[-1]))
        return out.reshape(B, *self.grid, y.shape[-1])


def expedite_cluster(
    x: torch.Tensor,
    out_hw: int | tuple[int, int],
    *,
    neighbourhood: int = DEFAULT_NEIGHBOURHOOD,
    iterations: int = DEFAULT_ITERATIONS,
    temperature: float = DEFAULT_TEMPERATURE,
    k: int = DEFAULT_K,
    normalise: Normalise = "sum",
) -> tuple[torch.Tensor, Reconstruct]:
    """Expedite's token clustering of a grid, and the matching reconstruction.

    Args:
        x: (B, H, W, C) grid of patch tokens (no prefix tokens).
        out_hw: (h, w) clustered grid, 1 <= h <= H and 1 <= w <= W (an int for h == w).
        neighbourhood: side of the square of cells (odd) a token may join around its initial cell.
        iterations: soft k-means rounds (0 keeps the pooled centres).
        temperature: multiplies the negative squared distances in the clustering
            softmax and in the reconstruction weights.
        k: clustered tokens each original token is reconstructed from.
        normalise: reconstruction weights summing to 1 (``"sum"``) or of unit L2 norm (``"l2"``).

    Returns:
        centres (B, h, w, C) in the dtype of ``x``, and a :class:`Reconstruct`
        mapping any (B, h, w, C') tensor back to (B, H, W, C').
    """
    if x.dim() != 4:
        raise ValueError(f"expedite_cluster expects a 4-D grid (B, H, W, C), got a tensor of shape {tuple(x.shape)}")
    neighbourhood, iterations, temperature, k = _check_settings(neighbourhood, iterations, temperature, k, normalise)
    B, H, W, C = x.shape
    h, w = _pair("out_hw", out_hw)
    if h > H or w > W:
        raise ValueError(f"out_hw = {(h, w)} cannot be larger than the {H}x{W} grid being clustered")

    work = x.to(score_dtype(x.dtype))
    tokens = work.reshape(B, H * W, C)
    centres = F.adaptive_avg_pool2d(work.permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1).reshape(B, h * w, C)
    allowed = neighbourhood_mask((H, W), (h, w), neighbourhood, device=x.device)
    for _ in range(iterations):
        with torch.no_grad():
            assignment = soft_assignment(tokens, centres, allowed, temperature)  # (B, N, M)
            mass = assignment.sum(dim=1).unsqueeze(-1)  # (B, M, 1)
        updated = torch.bmm(assignment.transpose(1, 2), tokens) / mass.clamp_min(torch.finfo(mass.dtype).tiny)
        centres = torch.where(mass > 0, updated, centres)
    weights = reconstruction_weights(tokens, centres, k=k, temperature=temperature, normalise=normalise)
    return centres.reshape(B, h, w, C).to(x.dtype), Reconstruct(weights, (H, W), (h, w))


# --------------------------------------------------------------------------- inside windows


def window_cluster_extent(extent: int, window: int, out_window: int) -> int:
    """Clustered size of a window side of ``extent`` real tokens (``window`` for full windows).

    A full window side becomes ``out_window``; a smaller edge window keeps the
    same proportion, ``max(1, floor(extent * out_window / window + 1/2))``,
    which is never more than ``out_window`` (so the reduced grid, tiled with
    ``out_window``, has the same windows as before).
    """
    if extent >= window:
        return out_window
    return max(1, (2 * extent * out_window + window) // (2 * window))


@dataclass(frozen=True)
class _WindowTile:
    """A rectangle of equal windows, clustered together."""

    rows: tuple[int, int, int]  # windows along the height, their real extent, their clustered extent
    cols: tuple[int, int, int]
    merged_start: tuple[int, int]  # where the rectangle starts in the clustered grid
    reconstruct: Reconstruct  # per window: (B * windows, h', w', C) -> (B * windows, extent_h, extent_w, C)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        (n_rows, _, m_rows), (n_cols, _, m_cols) = self.rows, self.cols
        r0, c0 = self.merged_start
        piece = y[:, r0 : r0 + n_rows * m_rows, c0 : c0 + n_cols * m_cols]
        rebuilt = self.reconstruct(_to_windows(piece, n_rows, n_cols, m_rows, m_cols))
        return _from_windows(rebuilt, y.shape[0], n_rows, n_cols)


@dataclass(frozen=True)
class WindowReconstruct:
    """The reconstruction of :func:`expedite_cluster_windows`: one :class:`Reconstruct` per window."""

    tiles: tuple[tuple[_WindowTile, ...], ...]  # rows of rectangles, top to bottom, left to right
    batch: int
    grid: tuple[int, int]  # (H, W) original
    merged_grid: tuple[int, int]  # (H', W') clustered

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H', W', C') -> (B, H, W, C'), every window rebuilt from its own clustered tokens."""
        Hm, Wm = self.merged_grid
        if y.dim() != 4 or y.shape[0] != self.batch or tuple(y.shape[1:3]) != (Hm, Wm):
            raise ValueError(
                f"reconstruct expects a tensor of shape ({self.batch}, {Hm}, {Wm}, C), got {tuple(y.shape)}"
            )
        bands = [torch.cat([tile(y) for tile in row], dim=2) if len(row) > 1 else row[0](y) for row in self.tiles]
        return torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]


def expedite_cluster_windows(
    x: torch.Tensor,
    window: int | tuple[int, int],
    out_window: int | tuple[int, int],
    *,
    neighbourhood: int = DEFAULT_NEIGHBOURHOOD,
    iterations: int = DEFAULT_ITERATIONS,
    temperature: float = DEFAULT_TEMPERATURE,
    k: int = DEFAULT_K,
    normalise: Normalise = "sum",
) -> tuple[torch.Tensor, WindowReconstruct, tuple[int, int]]:
    """Expedite inside every attention window (how Expedite runs SAM).

    Windows tile the grid from the top-left corner as in SAM's
    ``window_partition`` (see :mod:`cubistmerge.merge.windows`); the last row
    and column of windows may hold fewer real tokens, and padding never takes
    part in the clustering. Every window is clustered on its own (its tokens
    join only its own centres, and are rebuilt only from them), full windows
    to ``out_window``, edge windows in proportion (:func:`window_cluster_extent`).

    Args:
        x: (B, H, W, C) grid (no padding).
        window: window size (wh, ww), or one int for square windows.
        out_window: clustered size of a full window, 1 <= out <= window.
        neighbourhood, iterations, temperature, k, normalise: as in :func:`expedite_cluster`.

    Returns:
        centres (B, H', W', C), a :class:`WindowReconstruct` back to (B, H, W, C'),
        and the clustered window size that tiles the new grid into the same windows.
    """
    if x.dim() != 4:
        raise ValueError(f"expedite_cluster_windows expects a 4-D grid (B, H, W, C), got shape {tuple(x.shape)}")
    wh, ww = _pair("window", window)
    oh, ow = _pair("out_window", out_window)
    if oh > wh or ow > ww:
        raise ValueError(f"out_window = {(oh, ow)} cannot be larger than the window {(wh, ww)}")
    settings = dict(neighbourhood=neighbourhood, iterations=iterations, temperature=temperature, k=k)
    _check_settings(**settings, normalise=normalise)
    B, H, W, _ = x.shape
    row_bands = [(h0, h1, n, extent, window_cluster_extent(extent, wh, oh)) for h0, h1, extent, n in _bands(H, wh)]
    col_bands = [(w0, w1, n, extent, window_cluster_extent(extent, ww, ow)) for w0, w1, extent, n in _bands(W, ww)]
    row_starts = [0, *accumulate(n * m for _, _, n, _, m in row_bands)]
    col_starts = [0, *accumulate(n * m for _, _, n, _, m in col_bands)]

    centre_rows, tile_rows = [], []
    for i, (h0, h1, n_rows, height, m_rows) in enumerate(row_bands):
        centre_cols, tiles = [], []
        for j, (w0, w1, n_cols, width, m_cols) in enumerate(col_bands):
            windows = _to_windows(x[:, h0:h1, w0:w1], n_rows, n_cols, height, width)
            centres, reconstruct = expedite_cluster(windows, (m_rows, m_cols), normalise=normalise, **settings)
            centre_cols.append(_from_windows(centres, B, n_rows, n_cols))
            tiles.append(
                _WindowTile(
                    (n_rows, height, m_rows), (n_cols, width, m_cols), (row_starts[i], col_starts[j]), reconstruct
                )
            )
        centre_rows.append(torch.cat(centre_cols, dim=2) if len(centre_cols) > 1 else centre_cols[0])
        tile_rows.append(tuple(tiles))
    merged = torch.cat(centre_rows, dim=1) if len(centre_rows) > 1 else centre_rows[0]
    reconstruct = WindowReconstruct(tuple(tile_rows), B, (H, W), (row_starts[-1], col_starts[-1]))
    return merged, reconstruct, (oh, ow)
