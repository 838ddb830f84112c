"""CubistMerge: spatial-preserving 2D token reduction (Gong & Lis, 2025).

A reduction removes ``r_w`` tokens from every row and then ``r_h`` from every
column of a (B, H, W, C) grid, so the result is again a full rectangular grid
(B, H - r_h, W - r_w, C) whose rows and columns keep their order. Matching is
between neighbours only and the merged value is, by default, the per-channel
value of largest magnitude. See ``docs``/METHOD.md section 1 for the steps.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from .groups import REPRESENTATIONS, Representation, scatter_into, score_dtype, slots_after_removal

Metric = Literal["cosine", "l2"]
METRICS: tuple[str, ...] = ("cosine", "l2")

# Guards the cosine of a zero vector: it counts as 0 similarity, not NaN.
_COSINE_EPS = 1e-12


def neighbour_similarity(x: torch.Tensor, metric: Metric = "cosine") -> torch.Tensor:
    """Similarity of every token with its right neighbour.

    Args:
        x: (M, N, C) sequences.
        metric: ``"cosine"`` = dot / max(|a||b|, eps); ``"l2"`` = -||a - b||.

    Returns:
        (M, N - 1) scores in float32 (float64 for float64 input).
    """
    x = x.to(score_dtype(x.dtype))
    left, right = x[:, :-1], x[:, 1:]
    if metric == "cosine":
        norms = torch.linalg.vector_norm(x, dim=-1)
        dots = (left * right).sum(-1)
        return dots / (norms[:, :-1] * norms[:, 1:]).clamp_min(_COSINE_EPS)
    if metric == "l2":
        return -torch.linalg.vector_norm(left - right, dim=-1)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


class NeighbourMatch(NamedTuple):
    """Which tokens of every sequence merge, and where to."""

    sources: torch.Tensor  # (M, r) long, positions merged away, in order of their score
    goes_right: torch.Tensor  # (M, r) bool, True if the source merges into its right neighbour
    removed: torch.Tensor  # (M, N) bool, True at the sources
    target: torch.Tensor  # (M, N) long, position each token ends up in (itself if it stays)


def match_neighbours(scores: torch.Tensor, r: int) -> NeighbourMatch:
    """Localized matching: which odd-position tokens merge, and into which neighbour.

    Odd positions are sources, even positions destinations. A source takes its
    more similar neighbour (ties go left; the last token has no right one) and
    the ``r`` sources with the highest such scores are merged (ties between
    sources go to the lower position).

    Args:
        scores: (M, N - 1) neighbour similarities, ``scores[:, i]`` between i and i + 1.
        r: tokens to remove from every sequence, 0 <= r <= N // 2.
    """
    M, n_minus_1 = scores.shape
    N = n_minus_1 + 1
    device = scores.device
    odd = torch.arange(1, N, 2, device=device)  # (S,)
    padded = torch.cat([scores, scores.new_full((M, 1), float("-inf"))], dim=1)  # (M, N)
    left = padded[:, odd - 1]
    right = padded[:, odd]
    go_right = right > left
    best = torch.where(go_right, right, left)  # (M, S)

    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    chosen = order[:, :r]  # (M, r) indices into the odd positions
    sources = odd[chosen]
    goes_right = go_right.gather(1, chosen)
    destinations = sources + torch.where(goes_right, 1, -1)

    target = torch.arange(N, device=device).expand(M, N).scatter(1, sources, destinations)
    removed = torch.zeros(M, N, dtype=torch.bool, device=device).scatter(1, sources, True)
    return NeighbourMatch(sources, goes_right, removed, target)


def _maxmag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per channel, the value of larger magnitude (a tie between +v and -v gives +v)."""
    larger, smaller = torch.maximum(a, b), torch.minimum(a, b)
    return torch.where(larger >= -smaller, larger, smaller)


def merge_neighbours(
    x: torch.Tensor,
    match: NeighbourMatch,
    index: torch.Tensor,
    representation: Representation,
    size: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged values of one pass, touching only the merged tokens.

    Same result as :func:`cubistmerge.merge.groups.merge_groups` with ``index``,
    but survivors are copied with one gather and only the r merged sources per
    sequence are combined, instead of reducing over every token: the merge
    step then costs a small fraction of the block it precedes.

    Args:
        x: (M, N, C); match: the pass's matching; index: (M, N) slot of every
        token; representation: as in merge_groups; size: (M, N).

    Returns:
        merged (M, N - r, C) and merged size (M, N - r).
    """
    M, N, C = x.shape
    r = match.sources.shape[1]
    n_out = N - r
    # Survivor positions in order, plus one spare slot that absorbs the writes of
    # sources a step does not apply to (a survivor's value stands in for it).
    kept = torch.sort(match.removed.to(torch.uint8), dim=1, stable=True).indices[:, : n_out + 1]
    buffer = x.gather(1, kept.unsqueeze(-1).expand(M, kept.shape[1], C))  # (M, n_out + 1, C); n_out if r = 0
    merged_size = size.gather(1, kept[:, :n_out])
    source_size = size.gather(1, match.sources)
    slots = index.gather(1, match.sources)  # (M, r) slot each source merges into
    merged_size.scatter_add_(1, slots, source_size)
    source_values = x.gather(1, match.sources.unsqueeze(-1).expand(M, r, C))

    if representation == "mean":
        weighted = buffer[:, :n_out] * size.gather(1, kept[:, :n_out]).unsqueeze(-1)
        weighted.scatter_add_(1, slots.unsqueeze(-1).expand(M, r, C), source_values * source_size.unsqueeze(-1))
        return weighted / merged_size.unsqueeze(-1), merged_size

    # A destination receives at most one source from its right (going left) and
    # one from its left (going right): apply the two kinds one after the other,
    # so no slot is written twice in one scatter. Right-hand sources come first;
    # a left-hand source is the lowest position in its group and wins norm ties.
    spare = torch.full_like(slots, n_out)
    for from_left in (False, True):
        step = match.goes_right if from_left else ~match.goes_right
        step_slots = torch.where(step, slots, spare).unsqueeze(-1).expand(M, r, C)
        current = buffer.gather(1, step_slots)
        if representation == "maxmag":
            combined = _maxmag(current, source_values)
        elif representation == "maxmag_vector":
            source_norm = torch.linalg.vector_norm(source_values.to(score_dtype(x.dtype)), dim=-1, keepdim=True)
            current_norm = torch.linalg.vector_norm(current.to(score_dtype(x.dtype)), dim=-1, keepdim=True)
            wins = source_norm >= current_norm if from_left else source_norm > current_norm
            combined = torch.where(wins, source_values, current)
        else:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        buffer = scatter_into(buffer, step_slots, combined, add=False)
    return buffer[:, :n_out], merged_size


def merge_sequences(
    x: torch.Tensor,
    r: int,
    *,
    representation: Representation = "maxmag",
    metric: Metric = "cosine",
    size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 1D pass: remove ``r`` tokens from every sequence by neighbour merging.

    Args:
        x: (M, N, C) independent sequences (rows or columns of grids).
        r: tokens to remove from each sequence, 0 <= r <= N // 2.
        representation: merged value, see :func:`cubistmerge.merge.groups.merge_groups`.
        metric: neighbour similarity, ``"cosine"`` or ``"l2"``.
        size: (M, N) original tokens each token stands for (for ``"mean"``).

    Returns:
        merged (M, N - r, C), index (M, N) long slot of every token's group,
        and merged size (M, N - r).
    """
    M, N, _ = x.shape
    if not 0 <= r <= N // 2:
        raise ValueError(f"one pass can remove 0 to N // 2 = {N // 2} tokens from a sequence of N = {N}, got r = {r}")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    if size is None:
        size = torch.ones(M, N, dtype=x.dtype, device=x.device)
    match = match_neighbours(neighbour_similarity(x, metric), r)
    index = slots_after_removal(match.target, match.removed)
    merged, merged_size = merge_neighbours(x, match, index, representation, size)
    return merged, index, merged_size


@dataclass(frozen=True)
class Recover:
    """Maps tensors laid out like a merged grid back to the original grid.

    ``index[b, h * W + w]`` is the flat slot ``h' * W' + w'`` of the merged
    token that original token (h, w) of image b belongs to.
    """

    index: torch.Tensor  # (B, H * W) long
    grid: tuple[int, int]  # (H, W) original
    merged_grid: tuple[int, int]  # (H', W')

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H', W', C') -> (B, H, W, C'): every original position gets its group's token."""
        B = self.index.shape[0]
        Hm, Wm = self.merged_grid
        if y.dim() != 4 or y.shape[0] != B or tuple(y.shape[1:3]) != (Hm, Wm):
            raise ValueError(f"recover expects a tensor of shape ({B}, {Hm}, {Wm}, C), got {tuple(y.shape)}")
        flat = y.reshape(B, Hm * Wm, y.shape[-1])
        out = flat.gather(1, self.index.unsqueeze(-1).expand(B, self.index.shape[1], y.shape[-1]))
        return out.reshape(B, *self.grid, y.shape[-1])

    def then(self, later: Recover) -> Recover:
        """The recover of this reduction followed by ``later`` (a reduction of the merged grid)."""
        if later.grid != self.merged_grid:
            raise ValueError(
                f"cannot chain: the later reduction starts from {later.grid}, this one ends at {self.merged_grid}"
            )
        return Recover(later.index.gather(1, self.index), self.grid, later.merged_grid)


def _as_int(name: str, r: object) -> int:
    if isinstance(r, bool) or isinstance(r, float):
        raise ValueError(f"{name} must be an int number of tokens, got {r!r}")
    try:
        return operator.index(r)  # int, numpy and 0-d torch integers
    except TypeError:
        raise ValueError(f"{name} must be an int number of tokens, got {r!r}") from None


def _check_request(x: torch.Tensor, r_h: int, r_w: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"cubist_merge expects a 4-D grid (B, H, W, C), got a tensor of shape {tuple(x.shape)}")
    _, H, W, _ = x.shape
    for name, r, n, axis in (("r_h", r_h, H, "column"), ("r_w", r_w, W, "row")):
        if not 0 <= r <= n // 2:
            raise ValueError(
                f"{name} = {r} is not possible: one reduction removes 0 to {n // 2} tokens "
                f"from every {axis} of length {n} (grid {H}x{W})"
            )


def cubist_merge(
    x: torch.Tensor,
    r_h: int,
    r_w: int,
    *,
    representation: Representation = "maxmag",
    metric: Metric = "cosine",
) -> tuple[torch.Tensor, Recover]:
    """Spatial-preserving 2D token reduction.

    Removes ``r_w`` tokens from every row (width pass), then ``r_h`` from every
    column of the result (height pass). Images of a batch are independent.

    Args:
        x: (B, H, W, C) grid of patch tokens (no prefix tokens).
        r_h: tokens removed from every column, 0 <= r_h <= H // 2.
        r_w: tokens removed from every row, 0 <= r_w <= W // 2.
        representation: ``"maxmag"`` (default), ``"maxmag_vector"`` or ``"mean"``.
        metric: neighbour similarity, ``"cosine"`` (default) or ``"l2"``.

    Returns:
        merged (B, H - r_h, W - r_w, C), and a :class:`Recover` mapping any
        (B, H - r_h, W - r_w, C') tensor back to (B, H, W, C').
    """
    r_h, r_w = _as_int("r_h", r_h), _as_int("r_w", r_w)
    _check_request(x, r_h, r_w)
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    B, H, W, C = x.shape
    Hm, Wm = H - r_h, W - r_w
    device = x.device
    if r_h == 0 and r_w == 0:
        identity = torch.arange(H * W, device=device).expand(B, H * W)
        return x, Recover(identity, (H, W), (H, W))

    # Width pass: every row is a sequence over w.
    rows, row_index, row_size = merge_sequences(
        x.reshape(B * H, W, C), r_w, representation=representation, metric=metric
    )
    # Height pass: every column of the (H, W') result is a sequence over h.
    columns = rows.reshape(B, H, Wm, C).transpose(1, 2).reshape(B * Wm, H, C)
    column_size = row_size.reshape(B, H, Wm).transpose(1, 2).reshape(B * Wm, H)
    cols, col_index, _ = merge_sequences(columns, r_h, representation=representation, metric=metric, size=column_size)
    merged = cols.reshape(B, Wm, Hm, C).transpose(1, 2).contiguous()

    # Original (h, w) -> (h, w') in the width pass -> (h', w') in the height pass.
    w_slot = row_index.reshape(B, H, W)
    col_index = col_index.reshape(B, Wm, H)
    h_slot = col_index.gather(1, w_slot.transpose(1, 2)).transpose(1, 2)  # (B, H, W): col_index[b, w', h]
    flat = (h_slot * Wm + w_slot).reshape(B, H * W)
    return merged, Recover(flat, (H, W), (Hm, Wm))
