"""CubistMerge inside every attention window (SAM / ViTDet / TinyViT window layouts).

Windows tile a (B, H, W, C) grid from the top-left corner, as SAM's
``window_partition`` does: all windows are ``window`` tokens tall and wide
except the last row and column of windows, which hold only the remaining
``H % wh`` rows or ``W % ww`` columns (the rest of such a window is padding in
the attention, and padding never takes part in merging here: it is not part of
the grid). Every window is reduced on its own, so no token ever merges with a
token of another window, and the reduced grid tiled with the reduced window
size has exactly the same windows as before.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch

from .cubist import Metric, Recover, cubist_merge
from .groups import Representation, unmerge_groups
from .tome import match_bipartite, merge_matched


def _bands(length: int, window: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, extent, count): runs of equal windows along one axis."""
    bands = []
    full, rest = divmod(length, window)
    if full:
        bands.append((0, full * window, window, full))
    if rest:
        bands.append((full * window, length, rest, 1))
    return bands


def window_reduction(extent: int, r: int) -> int:
    """Tokens removed from a window row or column of ``extent`` real tokens (edge windows may be smaller)."""
    return min(r, extent // 2)


def _to_windows(x: torch.Tensor, rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """(B, rows*height, cols*width, C) -> (B*rows*cols, height, width, C)."""
    B, C = x.shape[0], x.shape[-1]
    return x.reshape(B, rows, height, cols, width, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)


def _from_windows(windows: torch.Tensor, batch: int, rows: int, cols: int) -> torch.Tensor:
    """(B*rows*cols, height, width, C) -> (B, rows*height, cols*width, C)."""
    _, height, width, C = windows.shape
    grid = windows.reshape(batch, rows, cols, height, width, C).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(batch, rows * height, cols * width, C)


def cubist_merge_windows(
    x: torch.Tensor,
    window: int | tuple[int, int],
    r_h: int,
    r_w: int,
    *,
    representation: Representation = "maxmag",
    metric: Metric = "cosine",
) -> tuple[torch.Tensor, Recover, tuple[int, int]]:
    """Remove ``r_h`` rows and ``r_w`` columns of tokens inside every window.

    Args:
        x: (B, H, W, C) grid (no padding).
        window: window size (wh, ww) or one int for square windows.
        r_h, r_w: tokens removed from every column / row of a full window,
            0 <= r <= window // 2. An edge window with only ``e`` real rows
            loses ``min(r_h, e // 2)`` of them (likewise columns).
        representation, metric: as in :func:`cubistmerge.cubist_merge`.

    Returns:
        merged (B, H', W', C), a :class:`Recover` back to (B, H, W, C'), and
        the reduced window size (wh - r_h, ww - r_w) that tiles the merged grid
        into the same windows.
    """
    if x.dim() != 4:
        raise ValueError(f"cubist_merge_windows expects a 4-D grid (B, H, W, C), got shape {tuple(x.shape)}")
    wh, ww = (window, window) if isinstance(window, int) else window
    if wh < 1 or ww < 1:
        raise ValueError(f"window size must be positive, got {(wh, ww)}")
    for name, r, size in (("r_h", r_h, wh), ("r_w", r_w, ww)):
        if not 0 <= r <= size // 2:
            raise ValueError(f"{name} = {r} is not possible inside windows of {wh}x{ww}: allowed 0 to {size // 2}")
    B, H, W, C = x.shape
    row_bands, col_bands = _bands(H, wh), _bands(W, ww)
    # Merged extents of every band, and where each band starts in the merged grid.
    merged_rows = [extent - window_reduction(extent, r_h) for _, _, extent, _ in row_bands]
    merged_cols = [extent - window_reduction(extent, r_w) for _, _, extent, _ in col_bands]
    row_spans = [m * band[3] for m, band in zip(merged_rows, row_bands, strict=True)]
    col_spans = [m * band[3] for m, band in zip(merged_cols, col_bands, strict=True)]
    row_starts, col_starts = [0, *accumulate(row_spans)], [0, *accumulate(col_spans)]
    Hm, Wm = row_starts[-1], col_starts[-1]

    merged_ids = torch.arange(Hm * Wm, device=x.device).view(1, Hm, Wm, 1).expand(B, Hm, Wm, 1)
    index = torch.empty(B, H, W, dtype=torch.long, device=x.device)
    band_rows = []
    for i, (h0, h1, height, n_rows) in enumerate(row_bands):
        band_cols = []
        for j, (w0, w1, width, n_cols) in enumerate(col_bands):
            windows = _to_windows(x[:, h0:h1, w0:w1], n_rows, n_cols, height, width)
            reduced, recover = cubist_merge(
                windows,
                window_reduction(height, r_h),
                window_reduction(width, r_w),
                representation=representation,
                metric=metric,
            )
            band_cols.append(_from_windows(reduced, B, n_rows, n_cols))
            # Slot ids of this rectangle in the merged grid, taken back through the windows' recover.
            m0, m1 = row_starts[i], row_starts[i + 1]
            c0, c1 = col_starts[j], col_starts[j + 1]
            ids = _to_windows(merged_ids[:, m0:m1, c0:c1], n_rows, n_cols, merged_rows[i], merged_cols[j])
            index[:, h0:h1, w0:w1] = _from_windows(recover(ids), B, n_rows, n_cols).squeeze(-1)
        band_rows.append(torch.cat(band_cols, dim=2) if len(band_cols) > 1 else band_cols[0])
    merged = torch.cat(band_rows, dim=1) if len(band_rows) > 1 else band_rows[0]
    return merged, Recover(index.reshape(B, H * W), (H, W), (Hm, Wm)), (wh - r_h, ww - r_w)


def merge_apply_unmerge_in_windows(
    x: torch.Tensor,
    window: int,
    r: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
    metric: torch.Tensor | None = None,
) -> torch.Tensor:
    """ToMe's merge -> compute -> unmerge, inside every window of a grid.

    In each window the tokens are matched by bipartite soft matching on
    ``metric`` (ToMe's: the attention keys averaged over heads; ``x`` itself
    when None) and ``r`` of them are merged away (means); an edge window with
    only ``n`` real tokens (never padding) merges ``floor(r * n / window**2)``.
    ``fn`` runs on the remaining tokens and every original token receives its
    group's output. This is how the ToMe baseline runs on window-attention encoders,
    whose attention, relative positions and necks need the full grid: only the
    token-wise part (the MLP) sees merged tokens.

    Args:
        x: (B, H, W, C) grid.
        window: tile size for matching (the attention window size).
        r: tokens merged away in every full window, 0 <= r <= window**2 // 2.
        fn: token-wise function (B', N', C) -> (B', N', C_out).
        metric: (B, H, W, C_m) features to match on, or None for ``x``.

    Returns:
        (B, H, W, C_out).
    """
    full = window * window
    if not 0 <= r <= full // 2:
        raise ValueError(f"r = {r} tokens per {window}x{window} window is not possible: allowed 0 to {full // 2}")
    B, H, W, C = x.shape
    if metric is None:
        metric = x
    elif metric.shape[:3] != x.shape[:3]:
        raise ValueError(f"metric {tuple(metric.shape)} must cover the grid of x {tuple(x.shape)}")
    rows = []
    for h0, h1, height, n_rows in _bands(H, window):
        cols = []
        for w0, w1, width, n_cols in _bands(W, window):
            # Profiler scopes cover the merge and the unmerge, not ``fn``: the bench's merge time is the
            # overhead ToMe adds, not the (smaller) MLP it runs.
            with torch.profiler.record_function("cubistmerge::tome_merge"):
                tokens = _to_windows(x[:, h0:h1, w0:w1], n_rows, n_cols, height, width).flatten(1, 2)
                features = _to_windows(metric[:, h0:h1, w0:w1], n_rows, n_cols, height, width).flatten(1, 2)
                match = match_bipartite(features, min(r * height * width // full, height * width // 2))
                merged, _ = merge_matched(tokens, match)
            computed = fn(merged)
            with torch.profiler.record_function("cubistmerge::tome_unmerge"):
                out = unmerge_groups(computed, match.index)
            cols.append(_from_windows(out.reshape(-1, height, width, out.shape[-1]), B, n_rows, n_cols))
        rows.append(torch.cat(cols, dim=2) if len(cols) > 1 else cols[0])
    return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
