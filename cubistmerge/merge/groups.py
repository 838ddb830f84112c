"""Token groups described by an index map, and the ways to merge or unmerge them.

Every merge in this package is described the same way: an ``index`` tensor of
shape (B, N) whose entry ``index[b, t]`` is the slot, in ``[0, N_out)``, of the
merged token that token ``t`` of image ``b`` became. Unmerging is then a gather
(each original position receives a copy of its group's token), and composing
two merges is a gather of one index map by the other. No N x N matrix is built.

These are pure functions over tensors: nothing here modifies its inputs (the
in-place scatters below write only into tensors allocated here, which saves a
copy of every output).
"""

from __future__ import annotations

from typing import Literal

import torch

Representation = Literal["maxmag", "maxmag_vector", "mean"]
REPRESENTATIONS: tuple[str, ...] = ("maxmag", "maxmag_vector", "mean")

# Scores, norms and similarities are computed at least in float32: in bf16 or
# fp16, neighbouring cosine similarities collapse onto a handful of values and
# the choice of which tokens merge would become mostly tie-breaking.
_MIN_SCORE_DTYPE = torch.float32


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute similarities and norms in for inputs of ``dtype``."""
    return dtype if dtype == torch.float64 else _MIN_SCORE_DTYPE


def slots_after_removal(target: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Index map for "each token goes to ``target``; ``removed`` tokens disappear".

    Survivors keep their relative order, so the output slot of a survivor is
    the number of survivors before it.

    Args:
        target: (B, N) long, the position (in the input sequence) of the
            survivor each token merges into; survivors point to themselves.
        removed: (B, N) bool, True for the tokens merged away.

    Returns:
        (B, N) long, output slot of every input token's group.
    """
    slot_of_position = torch.cumsum((~removed).to(torch.long), dim=1) - 1
    return slot_of_position.gather(1, target)


def slots_of_survivors(
    survivors: torch.Tensor, sources: torch.Tensor, destinations: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Index map of a merge given as "these tokens survive, in this order; those go into these".

    Args:
        survivors: (B, N_out) long, the input position that holds each output slot.
        sources: (B, r) long, positions merged away; destinations: (B, r) long, the survivor each goes into.
        num_tokens: N, the number of input tokens.

    Returns:
        (B, N) long, the output slot of every input token.
    """
    B, kept = survivors.shape
    places = torch.arange(kept, device=survivors.device).expand(B, kept)
    index = survivors.new_zeros(B, num_tokens).scatter(1, survivors, places)
    return index.scatter(1, sources, index.gather(1, destinations))


def scatter_into(buffer: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, add: bool) -> torch.Tensor:
    """``buffer.scatter(1, index, src)`` (or ``scatter_add``) for a buffer this package just made.

    Without autograd the write goes in place, which saves a copy of the whole
    buffer; with autograd, out of place, because autograd may have saved it.
    """
    if buffer.requires_grad:
        return buffer.scatter_add(1, index, src) if add else buffer.scatter(1, index, src)
    return buffer.scatter_add_(1, index, src) if add else buffer.scatter_(1, index, src)


def merge_groups(
    x: torch.Tensor,
    index: torch.Tensor,
    num_out: int,
    representation: Representation = "mean",
    size: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce every group of tokens to one token.

    Args:
        x: (B, N, C) tokens.
        index: (B, N) long, the group (output slot) of every token.
        num_out: number of groups N_out; every slot must have a member.
        representation: how a group's value is formed:
            ``"maxmag"`` per channel, the member value with the largest
            magnitude, sign kept (a tie between +v and -v keeps +v);
            ``"maxmag_vector"`` the whole vector of the member with the largest
            L2 norm (ties keep the member at the lowest position);
            ``"mean"`` the ``size``-weighted mean of the members.
        size: (B, N) number of original tokens each token stands for; ones if
            None. Only ``"mean"`` uses it as weights; it is summed for all.

    Returns:
        merged (B, N_out, C) and the merged size (B, N_out), both new tensors.
    """
    B, N, C = x.shape
    if index.shape != (B, N):
        raise ValueError(f"index must have shape {(B, N)} to match x {tuple(x.shape)}, got {tuple(index.shape)}")
    if size is None:
        size = torch.ones(B, N, dtype=x.dtype, device=x.device)
    merged_size = size.new_zeros(B, num_out).scatter_add_(1, index, size)
    channel_index = index.unsqueeze(-1).expand(B, N, C)

    if representation == "mean":
        weighted = x * size.unsqueeze(-1).to(x.dtype)
        total = x.new_zeros(B, num_out, C).scatter_add_(1, channel_index, weighted)
        return total / merged_size.unsqueeze(-1).to(x.dtype), merged_size

    if representation == "maxmag":
        # Start from -inf / +inf with include_self=True: with include_self=False autograd would also
        # compare against the (ignored) starting values and split gradients with them.
        largest = x.new_full((B, num_out, C), float("-inf")).scatter_reduce_(1, channel_index, x, "amax")
        smallest = x.new_full((B, num_out, C), float("inf")).scatter_reduce_(1, channel_index, x, "amin")
        # The member with the largest magnitude is either the group's maximum or
        # its minimum: whichever is further from zero.
        return torch.where(largest >= -smallest, largest, smallest), merged_size

    if representation == "maxmag_vector":
        norms = torch.linalg.vector_norm(x.to(score_dtype(x.dtype)), dim=-1)  # (B, N)
        group_best = norms.new_full((B, num_out), float("-inf")).scatter_reduce_(1, index, norms, "amax")
        is_best = norms == group_best.gather(1, index)
        positions = torch.arange(N, device=x.device).expand(B, N)
        candidate = torch.where(is_best, positions, torch.full_like(positions, N))
        winner = candidate.new_full((B, num_out), N).scatter_reduce_(1, index, candidate, "amin")
        return x.gather(1, winner.unsqueeze(-1).expand(B, num_out, C)), merged_size

    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")


def group_sizes(index: torch.Tensor, num_out: int, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """How many original tokens each merged slot stands for.

    Args:
        index: (B, N) long, the slot of every current token.
        num_out: N_out, the number of slots.
        sizes: (B, N) float, what each current token already stands for (None: 1 each).

    Returns:
        (B, N_out) float (the dtype of ``sizes``, float32 without), the summed sizes per slot.
    """
    if sizes is None:
        sizes = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    return torch.zeros(index.shape[0], num_out, dtype=sizes.dtype, device=index.device).scatter_add_(1, index, sizes)


def unmerge_groups(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Give every original token a copy of its group's merged token.

    Args:
        y: (B, N_out, C) merged tokens.
        index: (B, N) long, the group of every original token.

    Returns:
        (B, N, C).
    """
    B, N = index.shape
    if y.shape[0] != B:
        raise ValueError(f"y has batch size {y.shape[0]} but index has {B}")
    return y.gather(1, index.unsqueeze(-1).expand(B, N, y.shape[-1]))


def compose_groups(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Index map of merging with ``first`` (B, N -> N1) and then ``second`` (B, N1 -> N2)."""
    return second.gather(1, first)


def reduce_pairwise_bias(bias: torch.Tensor, index: torch.Tensor, num_out: int) -> torch.Tensor:
    """Reduce an additive attention bias over (query, key) pairs to merged tokens.

    A merged query may attend a merged key if any member pair could: the
    reduced bias is the maximum over all member pairs (for a boolean mask
    written as 0 / -inf, that is "any pair allowed").

    Args:
        bias: (B or 1, heads or 1, N, N) float.
        index: (B, N) long groups.
        num_out: N_out.

    Returns:
        (B, heads or 1, N_out, N_out) new tensor.
    """
    B, N = index.shape
    bias = bias.expand(B, bias.shape[1], N, N)
    heads = bias.shape[1]
    key_index = index.view(B, 1, 1, N).expand(B, heads, N, N)
    # -inf start and include_self=True: see merge_groups (exact gradients for a learned bias).
    by_key = bias.new_full((B, heads, N, num_out), float("-inf")).scatter_reduce_(3, key_index, bias, "amax")
    query_index = index.view(B, 1, N, 1).expand(B, heads, N, num_out)
    return by_key.new_full((B, heads, num_out, num_out), float("-inf")).scatter_reduce_(2, query_index, by_key, "amax")
