"""ToMe baseline: bipartite soft matching with size tracking (Bolya et al., ICLR 2023).

Written from the paper's description. Tokens are merged by a size-weighted
average; the sizes feed proportional attention (``log(size)`` added to the
attention logits). Prefix tokens (class, distillation, registers) take no part
in the matching: they are never merged away and never receive a merge.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .groups import merge_groups, scatter_into, score_dtype, slots_after_removal

_COSINE_EPS = 1e-12

RSchedule = int | tuple[int, float] | list[int]


def max_tome_r(num_tokens: int, num_protected: int) -> int:
    """Largest r one bipartite matching can remove from ``num_tokens`` tokens."""
    return max(num_tokens - num_protected, 0) // 2


class BipartiteMatch(NamedTuple):
    """ToMe's choice for one block."""

    index: torch.Tensor  # (B, N) long, slot of every token in the N - r merged tokens
    sources: torch.Tensor  # (B, r) long, positions merged away (set A)
    destinations: torch.Tensor  # (B, r) long, the set-B position each source merges into
    removed: torch.Tensor  # (B, N) bool, True at the sources


def match_bipartite(metric: torch.Tensor, r: int, *, num_protected: int = 0) -> BipartiteMatch:
    """Choose which tokens merge, ToMe style.

    The unprotected tokens alternate into set A (first, third, ...) and set B.
    Every A token finds its most similar B token (cosine; ties go to the lower
    B token); the ``r`` A tokens with the highest such similarity merge into
    their B partner (ties go to the lower A token). Survivors keep their order.

    Args:
        metric: (B, N, C) features to match on (ToMe: attention keys averaged
            over heads).
        r: tokens to remove, 0 <= r <= (N - num_protected) // 2.
        num_protected: the first ``num_protected`` tokens take no part.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    B, N, _ = metric.shape
    if not 0 <= num_protected <= N:
        raise ValueError(f"num_protected must be in [0, {N}], got {num_protected}")
    limit = max_tome_r(N, num_protected)
    if not 0 <= r <= limit:
        raise ValueError(
            f"ToMe can remove 0 to (N - protected) // 2 = {limit} tokens here "
            f"(N = {N}, protected = {num_protected}), got r = {r}"
        )
    device = metric.device
    positions = torch.arange(N, device=device)

    if r == 0:
        nothing = positions.new_empty(B, 0)
        kept_all = torch.zeros(B, N, dtype=torch.bool, device=device)
        return BipartiteMatch(positions.expand(B, N), nothing, nothing, kept_all)

    feats = metric[:, num_protected:].to(score_dtype(metric.dtype))
    a, b = feats[:, 0::2], feats[:, 1::2]
    norm_a = torch.linalg.vector_norm(a, dim=-1)
    norm_b = torch.linalg.vector_norm(b, dim=-1)
    scores = (a @ b.transpose(1, 2)) / (norm_a.unsqueeze(-1) * norm_b.unsqueeze(-2)).clamp_min(_COSINE_EPS)
    best_score, best_b = scores.max(dim=-1)  # (B, Na)

    order = torch.sort(best_score, dim=1, descending=True, stable=True).indices
    chosen_a = order[:, :r]  # (B, r)
    sources = num_protected + 2 * chosen_a
    destinations = num_protected + 2 * best_b.gather(1, chosen_a) + 1

    target = positions.expand(B, N).scatter(1, sources, destinations)
    removed = torch.zeros(B, N, dtype=torch.bool, device=device).scatter(1, sources, True)
    return BipartiteMatch(slots_after_removal(target, removed), sources, destinations, removed)


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, num_protected: int = 0) -> torch.Tensor:
    """The (B, N) index map of :func:`match_bipartite` (slot of every token in the N - r merged ones)."""
    return match_bipartite(metric, r, num_protected=num_protected).index


def merge_matched(
    x: torch.Tensor, match: BipartiteMatch, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of a bipartite match, touching only the merged tokens.

    Equal to ``merge_weighted(x, match.index, N - r, size)`` up to rounding, but
    survivors are copied with one gather and each destination d is corrected by
    sum over its sources s of size_s * (x_s - x_d) / total_size_d, instead of
    a weighted scatter over every token.

    Args:
        x: (B, N, C); match: from :func:`match_bipartite`; size: (B, N) or None (ones).

    Returns:
        merged (B, N - r, C) and merged size (B, N - r).
    """
    B, N, C = x.shape
    r = match.sources.shape[1]
    if size is None:
        size = torch.ones(B, N, dtype=x.dtype, device=x.device)
    kept = torch.sort(match.removed.to(torch.uint8), dim=1, stable=True).indices[:, : N - r]
    merged = x.gather(1, kept.unsqueeze(-1).expand(B, N - r, C))
    source_size = size.gather(1, match.sources)
    slots = match.index.gather(1, match.sources)  # (B, r): the destination's slot
    merged_size = size.gather(1, kept).scatter_add_(1, slots, source_size)
    weight = (source_size / merged_size.gather(1, slots)).to(x.dtype).unsqueeze(-1)  # (B, r, 1)
    source_values = x.gather(1, match.sources.unsqueeze(-1).expand(B, r, C))
    destination_values = x.gather(1, match.destinations.unsqueeze(-1).expand(B, r, C))
    correction = (source_values - destination_values) * weight
    return scatter_into(merged, slots.unsqueeze(-1).expand(B, r, C), correction, add=True), merged_size


def merge_weighted(
    x: torch.Tensor, index: torch.Tensor, num_out: int, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every group.

    Args:
        x: (B, N, C) tokens; index: (B, N) groups; size: (B, N) or None (ones).

    Returns:
        merged (B, N_out, C) and merged size (B, N_out).
    """
    return merge_groups(x, index, num_out, "mean", size)


def tome_schedule(r: RSchedule, num_layers: int) -> list[int]:
    """Per-layer r for a ToMe schedule.

    ``r`` may be an int (the same r in every layer), ``(r, inflection)`` with
    inflection in [-1, 1] (a linear schedule averaging r, going from
    ``r * (1 - inflection)`` in the first layer to ``r * (1 + inflection)`` in
    the last, rounded down; 0 is constant), or a list of per-layer values (a
    shorter list is padded with zeros).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(r, bool):
        raise ValueError(f"r must be an int, (r, inflection) or a list of ints, got {r!r}")
    if isinstance(r, int):
        values = [r] * num_layers
    elif isinstance(r, tuple):
        if (
            len(r) != 2
            or isinstance(r[0], bool)
            or not isinstance(r[0], int)
            or isinstance(r[1], bool)
            or not isinstance(r[1], float | int)
        ):
            raise ValueError(
                f"a tuple r must be (r: int, inflection: float), got {r!r}; use a list for per-block values"
            )
        base, inflection = r
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"inflection must be in [-1, 1], got {inflection}")
        if num_layers == 1:
            return [base]
        first, last = base * (1.0 - inflection), base * (1.0 + inflection)
        step = (last - first) / max(num_layers - 1, 1)
        values = [int(first + step * i) for i in range(num_layers)]
    elif isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        if len(r) > num_layers:
            raise ValueError(f"the r list has {len(r)} entries but the model has {num_layers} blocks")
        values = list(r) + [0] * (num_layers - len(r))
    else:
        raise ValueError(f"r must be an int, a tuple (r, inflection), or a list of per-block ints; got {r!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"r must not be negative, got schedule {values}")
    return values
