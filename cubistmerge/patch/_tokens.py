"""Pieces shared by the families whose blocks see a token sequence (plain ViT, Eva).

The grid of the current input, the per-forward state at the start, the keys an
attention module computes (ToMe's metric), the optional source trace, and the
post-processing of ``forward_intermediates`` in timm's output formats.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ._swap import SOURCE_ATTR
from .state import MergeState, as_additive_bias


def patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(H, W) of the patch grid for ``images`` (dynamic image sizes included)."""
    if getattr(model, "dynamic_img_size", False):
        return tuple(model.patch_embed.dynamic_feat_size(images.shape[-2:]))
    return tuple(model.patch_embed.grid_size)


def start_state(
    model: nn.Module,
    grid: tuple[int, int],
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    needs_grid: str | None,
) -> MergeState:
    """The state at the first block. ``needs_grid``: why this merge needs every patch (None if it does not)."""
    num_prefix = model.num_prefix_tokens
    if x.shape[1] != num_prefix + grid[0] * grid[1]:
        if needs_grid:
            raise RuntimeError(
                f"{needs_grid} needs every patch of the {grid[0]}x{grid[1]} grid, but the blocks get "
                f"{x.shape[1]} tokens ({num_prefix} prefix): patch dropout or token masking removed tokens. "
                f"Run in eval mode or build the model with patch_drop_rate=0."
            )
        grid = None
    bias = as_additive_bias(attn_mask, x.dtype, x.shape[1])
    return MergeState(num_prefix=num_prefix, num_original=x.shape[1], grid=grid, attn_bias=bias)


@contextlib.contextmanager
def captured_keys(attn: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the keys (B, heads, N, head_dim) the attention module computes, right after its k_norm."""
    keys: list[torch.Tensor] = []
    handle = attn.k_norm.register_forward_hook(lambda _module, _inputs, output: keys.append(output))
    try:
        yield keys
    finally:
        handle.remove()


def store_source(model: nn.Module, state: MergeState, x: torch.Tensor) -> None:
    """Leave the last forward's (B, N) token-to-merged-token index map on the model (``trace_source``)."""
    n = state.num_original
    source = state.groups if state.groups is not None else torch.arange(n, device=x.device).expand(len(x), n)
    setattr(model, SOURCE_ATTR, source)


def store_grid_source(model: nn.Module, recover: Any, grid: torch.Tensor) -> None:
    """``trace_source`` for grid families (no prefix tokens): the (B, H * W) map from the final recover.

    ``grid`` is the (B, H, W, C) grid before any reduction, for the identity map when nothing was merged.
    """
    B, H, W = grid.shape[:3]
    if recover is None:
        source = torch.arange(H * W, device=grid.device).expand(B, H * W)
    else:
        source = recover.index
    setattr(model, SOURCE_ATTR, source)


def format_intermediates(
    model: nn.Module,
    intermediates: list[torch.Tensor],
    images_shape: torch.Size,
    output_fmt: str,
    return_prefix_tokens: bool,
) -> tuple[list, list[torch.Tensor] | None]:
    """timm's layout of token intermediates (already in the original token layout).

    Returns the spatial intermediates (NCHW or NLC, zipped with their prefix
    tokens if asked) and the prefix tokens (None without prefix tokens).
    """
    B, _, height, width = images_shape
    p = model.num_prefix_tokens
    prefix = [y[:, :p] for y in intermediates] if p else None
    spatial = [y[:, p:] for y in intermediates]
    if output_fmt == "NCHW":
        H, W = model.patch_embed.dynamic_feat_size((height, width))
        spatial = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
    if return_prefix_tokens and prefix is not None:
        return list(zip(spatial, prefix, strict=True)), prefix
    return spatial, prefix
