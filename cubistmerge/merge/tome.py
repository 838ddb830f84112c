"""ToMe baseline: bipartite soft matching with size tracking (Bolya et al., ICLR 2023).

The default follows what the authors' released code (facebookresearch/ToMe,
``tome/merge.py`` and ``tome/patch/timm.py``) computes, token order included,
because users compare against that code and the paper's numbers come from it:

- The *current* sequence alternates into set A (positions 0, 2, 4, ...) and
  set B (1, 3, 5, ...), prefix tokens included. Protected tokens (class,
  distillation, registers: the first ``num_protected``) take part in no match:
  an A row of a protected token scores -inf (the class token), a B column of a
  protected token scores -inf (the distillation token, at B's first place).
- Every A token finds its most similar B token (cosine); the ``r`` A tokens
  with the highest such score merge into their partners (size-weighted mean).
- The output is re-ordered: [protected tokens] + [A tokens that did not merge]
  + [all B tokens, in their order]. With protected tokens the kept A tokens
  keep their order; without any they come in descending order of their best
  score (the authors' code sorts them only when a class token is present). So
  from the second block on the A/B partition runs over that re-ordered
  sequence, and the tokens are no longer in spatial order; the index maps
  below record where every token went, so unmerging and source tracing follow.

The authors' code knows a class and a distillation token only; here every
prefix token is protected the same way (registers too), which reproduces it
exactly for one or two prefix tokens and keeps registers out of the matching.
Its sort is not stable; ties (absent for continuous inputs) go to the lower A
token here.

``order="spatial"`` is this library's earlier variant: the alternation starts
at the first unprotected token and survivors keep their relative order, so
tokens stay in reading order (handy for inspecting them; ToMe inside SAM
windows uses whichever, as it unmerges right away).

Tokens are merged by a size-weighted average; the sizes feed proportional
attention (``log(size)`` added to the attention logits).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .groups import merge_groups, scatter_into, score_dtype, slots_of_survivors

_COSINE_EPS = 1e-12

RSchedule = int | tuple[int, float] | list[int]
TokenOrder = Literal["official", "spatial"]
TOKEN_ORDERS: tuple[str, ...] = ("official", "spatial")


def max_tome_r(num_tokens: int, num_protected: int) -> int:
    """Largest r one bipartite matching can remove from ``num_tokens`` tokens."""
    return max(num_tokens - num_protected, 0) // 2


class BipartiteMatch(NamedTuple):
    """ToMe's choice for one block."""

    index: torch.Tensor  # (B, N) long, slot of every token in the N - r merged tokens
    sources: torch.Tensor  # (B, r) long, positions merged away (set A)
    destinations: torch.Tensor  # (B, r) long, the set-B position each source merges into
    removed: torch.Tensor  # (B, N) bool, True at the sources
    survivors: torch.Tensor  # (B, N - r) long, the input position that holds each output slot


def _cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, Na, C) x (B, Nb, C) -> (B, Na, Nb) cosine similarities."""
    norm_a = torch.linalg.vector_norm(a, dim=-1)
    norm_b = torch.linalg.vector_norm(b, dim=-1)
    return (a @ b.transpose(1, 2)) / (norm_a.unsqueeze(-1) * norm_b.unsqueeze(-2)).clamp_min(_COSINE_EPS)


def match_bipartite(
    metric: torch.Tensor, r: int, *, num_protected: int = 0, order: TokenOrder = "official"
) -> BipartiteMatch:
    """Choose which tokens merge, and where every token goes, ToMe style.

    ``order="official"`` (default): the authors' code (see the module
    docstring): A = positions 0, 2, ..., B = 1, 3, ... of the whole sequence,
    protected tokens excluded by -inf scores; output [protected, kept A, B].
    ``order="spatial"``: A and B alternate from the first unprotected token and
    survivors keep their order. In both, every A token finds its most similar
    B token (cosine; ties go to the lower B token) and the ``r`` A tokens with
    the highest such similarity merge (ties go to the lower A token).

    Args:
        metric: (B, N, C) features to match on (ToMe: attention keys averaged
            over heads).
        r: tokens to remove, 0 <= r <= (N - num_protected) // 2.
        num_protected: the first ``num_protected`` tokens take no part and stay first.
        order: ``"official"`` or ``"spatial"``.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    if order not in TOKEN_ORDERS:
        raise ValueError(f"order must be one of {TOKEN_ORDERS}, got {order!r}")
    B, N, _ = metric.shape
    p = num_protected
    if not 0 <= p <= N:
        raise ValueError(f"num_protected must be in [0, {N}], got {p}")
    limit = max_tome_r(N, p)
    if not 0 <= r <= limit:
        raise ValueError(
            f"ToMe can remove 0 to (N - protected) // 2 = {limit} tokens here (N = {N}, protected = {p}), got r = {r}"
        )
    device = metric.device
    positions = torch.arange(N, device=device)

    if r == 0:
        nothing = positions.new_empty(B, 0)
        everything = positions.expand(B, N)
        kept_all = torch.zeros(B, N, dtype=torch.bool, device=device)
        return BipartiteMatch(everything, nothing, nothing, kept_all, everything)

    start = 0 if order == "official" else p
    a_pos, b_pos = positions[start::2], positions[start + 1 :: 2]
    feats = metric.to(score_dtype(metric.dtype))
    scores = _cosine_scores(feats[:, a_pos], feats[:, b_pos])  # (B, Na, Nb)
    if order == "official" and p:
        protected_pair = (a_pos < p).unsqueeze(-1) | (b_pos < p).unsqueeze(0)
        scores = scores.masked_fill(protected_pair, float("-inf"))
    best_score, best_b = scores.max(dim=-1)  # (B, Na)

    ranking = torch.sort(best_score, dim=1, descending=True, stable=True).indices
    chosen_a = ranking[:, :r]
    sources = a_pos[chosen_a]
    destinations = b_pos[best_b.gather(1, chosen_a)]
    removed = torch.zeros(B, N, dtype=torch.bool, device=device).scatter(1, sources, True)

    if order == "spatial":
        survivors = torch.sort(removed.to(torch.uint8), dim=1, stable=True).indices[:, : N - r]
    else:
        kept_a = a_pos[ranking[:, r:]]  # (B, Na - r), best score first
        if p:
            # Protected A tokens (score -inf) sort first by position; they are put in front with the others.
            kept_a = kept_a.sort(dim=1).values[:, (p + 1) // 2 :]
        protected = positions[:p].expand(B, p)
        b_unprotected = b_pos[b_pos >= p].expand(B, -1)
        survivors = torch.cat([protected, kept_a, b_unprotected], dim=1)
    index = slots_of_survivors(survivors, sources, destinations, N)
    return BipartiteMatch(index, sources, destinations, removed, survivors)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, *, num_protected: int = 0, order: TokenOrder = "official"
) -> torch.Tensor:
    """The (B, N) index map of :func:`match_bipartite` (slot of every token in the N - r merged ones)."""
    return match_bipartite(metric, r, num_protected=num_protected, order=order).index


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
    kept = match.survivors
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
    inflection in [-1, 1] (a linear schedule around r, computed as the
    authors' ``parse_r`` does: first layer ``int(r * (1 - inflection))``, last
    layer ``2 * r`` minus that, the layers between on the straight line and
    rounded down; 0 is constant, -1 the paper's "decreasing schedule"), or a
    list of per-layer values (a shorter list is padded with zeros).
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
        # The first layer is rounded down before the line is drawn: the authors' parse_r does so, and a
        # schedule that differs by one token in some layer is a different baseline.
        first = int(base * (1.0 - inflection))
        last = 2 * base - first
        step = (last - first) / (num_layers - 1)
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
