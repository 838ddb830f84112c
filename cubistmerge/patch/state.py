"""Per-forward merge state.

A :class:`MergeState` is created at the start of every forward of a patched
model and passed along explicitly; merges return a new state instead of
modifying the old one. Nothing of it is stored on the model, so calls never
see each other's state (and gradient checkpointing can re-run a block safely).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..merge.groups import compose_groups, reduce_pairwise_bias, score_dtype, unmerge_groups


def as_additive_bias(attn_mask: torch.Tensor | None, dtype: torch.dtype, num_tokens: int) -> torch.Tensor | None:
    """A user's attention mask as a 4-D additive float bias (bool True = may attend)."""
    if attn_mask is None:
        return None
    if attn_mask.shape[-2:] != (num_tokens, num_tokens) or not 2 <= attn_mask.dim() <= 4:
        raise ValueError(
            f"attn_mask must have shape (N, N), (B or 1, N, N) or (B or 1, heads or 1, N, N) with "
            f"N = {num_tokens} tokens, got {tuple(attn_mask.shape)}"
        )
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        return bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


@dataclass(frozen=True)
class MergeState:
    """What a forward knows about its merges so far.

    groups: (B, N_orig) long slot of every original token in the current
        sequence, or None while nothing has been merged.
    grid: (H, W) of the current patch grid, None once the order is not a grid
        (ToMe) or unknown (patch dropout).
    size: (B, N) number of original tokens behind each current token (ToMe),
        None while all are 1.
    attn_bias: the user's attention mask as an additive bias reduced to the
        current tokens, or None.
    """

    num_prefix: int
    num_original: int
    grid: tuple[int, int] | None
    groups: torch.Tensor | None = None
    size: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None

    def merged(
        self,
        index: torch.Tensor,
        num_out: int,
        *,
        grid: tuple[int, int] | None,
        size: torch.Tensor | None = None,
    ) -> MergeState:
        """The state after the current tokens were merged by ``index`` (B, N) -> N_out."""
        groups = index if self.groups is None else compose_groups(self.groups, index)
        bias = None if self.attn_bias is None else reduce_pairwise_bias(self.attn_bias, index, num_out)
        return replace(self, grid=grid, groups=groups, size=size, attn_bias=bias)

    def attention_bias(self, proportional: bool, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive attention bias for the current tokens: the user's mask, plus with
        ``proportional`` ToMe's proportional attention, log(size) of every key, (B, 1, 1, N)."""
        if not proportional or self.size is None:
            return self.attn_bias
        # The log in at least float32 (float64 for float64 models), however the sizes are stored.
        log_size = self.size.to(score_dtype(dtype)).log().to(dtype)[:, None, None, :]
        return log_size if self.attn_bias is None else self.attn_bias + log_size

    def recover(self, x: torch.Tensor) -> torch.Tensor:
        """Current tokens (B, N, C) -> the original token layout (B, N_orig, C)."""
        return x if self.groups is None else unmerge_groups(x, self.groups)


def with_prefix(patch_index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Extend a patch-only index map (B, N_patches) with prefix tokens that map to themselves."""
    B = patch_index.shape[0]
    prefix = torch.arange(num_prefix, device=patch_index.device).expand(B, num_prefix)
    return torch.cat([prefix, patch_index + num_prefix], dim=1)
