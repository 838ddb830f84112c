"""Patching timm's plain ViT family (``vision_transformer.VisionTransformer``).

Covers ViT, DeiT (with its distillation token), DINOv2 (LayerScale, register
tokens) and every other model whose blocks are ``vision_transformer.Block``.

The model's class is swapped for a subclass that overrides only
``forward_features`` and ``forward_intermediates``: the embedding, the blocks,
the norm and the head are the model's own modules, called as they are.
CubistMerge and Expedite need nothing inside a block (they reduce the grid
between two blocks; Expedite's reconstruction runs on the final tokens, before
the model's final ``norm``). ToMe, PiToMe and ToFu merge between a block's attention and its MLP, so
their blocks run through :func:`merging_block_forward`, which calls the block's own attention
module (fused SDPA, q/k norm, gating kept) and reads the keys it computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from ..merge.cubist import cubist_merge
from ..merge.expedite import Reconstruct, expedite_cluster
from ..merge.groups import group_sizes, score_dtype
from ._after_attention import AFTER_ATTENTION, AfterAttentionOptions, merge_after_attention
from ._swap import options_of, restore_class, swap_class
from ._tokens import captured_keys, format_intermediates, patch_grid, start_state, store_source
from .options import CubistOptions, ExpediteOptions
from .state import MergeState, with_prefix

FAMILY = "timm VisionTransformer (blocks: timm.models.vision_transformer.Block)"
SUPPORTED_METHODS = ("cubist", "tome", "expedite", "pitome", "tofu")

# The upstream signatures this override reproduces. If timm adds a parameter,
# patching refuses instead of silently ignoring it.
_FEATURES_PARAMS = ("self", "x", "attn_mask", "is_causal")
_INTERMEDIATES_PARAMS = (
    "self",
    "x",
    "indices",
    "return_prefix_tokens",
    "norm",
    "stop_early",
    "output_fmt",
    "intermediates_only",
    "output_dict",
    "attn_mask",
    "is_causal",
)


def supports(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer) and all(type(blk) is Block for blk in model.blocks)


def why_unsupported(model: nn.Module) -> str | None:
    """None if the plain-ViT patch can handle ``model``, else the reason."""
    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    others = sorted({type(blk).__name__ for blk in model.blocks if type(blk) is not Block})
    if others:
        return f"its blocks are {others}, not timm.models.vision_transformer.Block"
    for method, expected in (
        ("forward", _FEATURES_PARAMS),
        ("forward_features", _FEATURES_PARAMS),
        ("forward_intermediates", _INTERMEDIATES_PARAMS),
    ):
        found = tuple(inspect.signature(getattr(VisionTransformer, method)).parameters)
        unknown = set(found) - set(expected)
        if unknown:
            return (
                f"this timm version's VisionTransformer.{method} has parameters {sorted(unknown)} "
                "that cubistmerge does not know"
            )
    return None


def num_blocks(model: VisionTransformer) -> int:
    return len(model.blocks)


def patch(
    model: VisionTransformer, options: CubistOptions | ExpediteOptions | AfterAttentionOptions
) -> VisionTransformer:
    if isinstance(options, AFTER_ATTENTION):
        plain = [type(blk.attn).__name__ for blk in model.blocks if not isinstance(blk.attn, Attention)]
        if plain:
            raise ValueError(
                f"{options.method} needs timm Attention modules to read the keys from; this model has {plain[0]}"
            )
    if isinstance(options, CubistOptions | ExpediteOptions):
        options.check_grid(tuple(model.patch_embed.grid_size))
    return swap_class(model, _MergingViT, options, FAMILY)


def unpatch(model: VisionTransformer) -> VisionTransformer:
    return restore_class(model)


# --------------------------------------------------------------------------- forward


def _embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def cubist_reduce(x: torch.Tensor, state: MergeState, r_h: int, r_w: int, options: CubistOptions):
    """Reduce the patch grid of (B, prefix + H*W, C) tokens; prefix tokens pass through."""
    H, W = state.grid
    B, _, C = x.shape
    p = state.num_prefix
    with torch.profiler.record_function("cubistmerge::cubist_merge"):
        grid_tokens = x[:, p:].reshape(B, H, W, C)
        merged, recover = cubist_merge(
            grid_tokens, r_h, r_w, representation=options.representation, metric=options.metric
        )
        Hm, Wm = recover.merged_grid
        x = torch.cat([x[:, :p], merged.reshape(B, Hm * Wm, C)], dim=1)
        index = with_prefix(recover.index, p)
        size = None
        if options.prop_attn:
            # Sizes in the score dtype (float32, float64 for float64 models): exact counts whatever x is in.
            size = group_sizes(index, p + Hm * Wm, state.size).to(score_dtype(x.dtype))
        state = state.merged(index, p + Hm * Wm, grid=(Hm, Wm), size=size)
    return x, state


def cubist_reduce_at(
    x: torch.Tensor, state: MergeState, block: int, options: CubistOptions
) -> tuple[torch.Tensor, MergeState, bool]:
    """The reduction the options schedule at the input of ``block``, if any: (tokens, state, reduced?)."""
    stage = options.stage_at(block)
    if stage is None:
        return x, state, False
    r_h, r_w = stage.resolve(state.grid)
    if not (r_h or r_w):
        return x, state, False
    x, state = cubist_reduce(x, state, r_h, r_w, options)
    return x, state, True


def expedite_reduce(
    x: torch.Tensor, state: MergeState, options: ExpediteOptions
) -> tuple[torch.Tensor, MergeState, Reconstruct | None]:
    """Cluster the patch grid of (B, prefix + H*W, C) tokens (Expedite); prefix tokens pass through.

    Returns the tokens on the clustered grid, the state (its grid updated; no
    index map, as nothing is merged by copy) and the grid's reconstruction, or
    the inputs and None when the grid would not shrink (``r`` resolves to 0):
    then nothing is clustered and the model runs exactly as unpatched.
    """
    H, W = state.grid
    h, w = options.clustered((H, W))
    if (h, w) == (H, W):
        return x, state, None
    if state.attn_bias is not None:
        raise ValueError(
            "attn_mask cannot be combined with Expedite: its clustered tokens are weighted means of many patches, "
            "so a per-patch mask has no counterpart; use method='cubist' or 'tome', or no mask"
        )
    B, _, C = x.shape
    p = state.num_prefix
    with torch.profiler.record_function("cubistmerge::expedite_cluster"):
        centres, reconstruct = expedite_cluster(
            x[:, p:].reshape(B, H, W, C),
            (h, w),
            neighbourhood=options.neighbourhood,
            iterations=options.iterations,
            temperature=options.temperature,
            k=options.k,
            normalise=options.normalise,
        )
        x = torch.cat([x[:, :p], centres.reshape(B, h * w, C)], dim=1)
    return x, replace(state, grid=(h, w)), reconstruct


def reconstruct_tokens(x: torch.Tensor, reconstruct: Reconstruct, num_prefix: int) -> torch.Tensor:
    """(B, prefix + h*w, C) -> (B, prefix + H*W, C): Expedite's reconstruction; prefix tokens pass through."""
    B, _, C = x.shape
    h, w = reconstruct.merged_grid
    with torch.profiler.record_function("cubistmerge::expedite_reconstruct"):
        patches = reconstruct(x[:, num_prefix:].reshape(B, h, w, C))
        return torch.cat([x[:, :num_prefix], patches.reshape(B, -1, C)], dim=1)


def merging_block_forward(
    block: Block,
    x: torch.Tensor,
    state: MergeState,
    index: int,
    options: AfterAttentionOptions,
    is_causal: bool = False,
) -> tuple[torch.Tensor, MergeState]:
    """One ViT block that merges after its attention (ToMe, PiToMe, ToFu): attention, merge, MLP.

    The block's own attention module runs (fused SDPA, q/k norm, gating) with
    proportional attention where the method uses it, and the keys it computes
    are the matching metric. ``index`` is the block's place in the model.
    """
    bias = state.attention_bias(options.prop_attn, x.dtype)
    if is_causal and bias is not None:
        raise ValueError(
            f"is_causal cannot be combined with {options.method}'s merged tokens; use method='cubist' or no mask"
        )
    with captured_keys(block.attn) as keys:
        attn_kwargs: dict[str, Any] = {}
        if bias is not None:
            attn_kwargs["attn_mask"] = bias
        if is_causal:
            attn_kwargs["is_causal"] = True
        attn_out = block.attn(block.norm1(x), **attn_kwargs)
    x = x + block.drop_path1(block.ls1(attn_out))
    x, state = merge_after_attention(x, keys[-1], state, index, options)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, state


def _plain_block_forward(
    block: Block, x: torch.Tensor, state: MergeState, is_causal: bool, prop_attn: bool = False
) -> torch.Tensor:
    # Only pass what is set: older timm (1.0.16) blocks take no is_causal argument.
    kwargs: dict[str, Any] = {}
    bias = state.attention_bias(prop_attn, x.dtype)
    if bias is not None:
        if is_causal and prop_attn and state.size is not None:
            raise ValueError("is_causal cannot be combined with CubistMerge's prop_attn; drop one of them")
        kwargs["attn_mask"] = bias
    if is_causal:
        kwargs["is_causal"] = True
    return block(x, **kwargs)


class _MergingViT:
    """Mixin placed in front of the model's own class by :func:`patch`."""

    def _merging_tokens(
        self,
        images: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        take_indices: set[int] | None = None,
        last_block: int | None = None,
        norm_intermediates: bool = False,
    ) -> tuple[torch.Tensor, Callable[..., torch.Tensor], list[torch.Tensor]]:
        """Embed and run the blocks with merging.

        Returns the final tokens (not normed, still merged), the function that
        turns them into the output (``finish(tokens, recover)``: normed, and in
        the original token layout if ``recover``), and the outputs of the blocks
        in ``take_indices`` in the original token layout (optionally normed).
        """
        options = options_of(self)
        cubist = isinstance(options, CubistOptions)
        expedite = isinstance(options, ExpediteOptions)
        needs_grid = "CubistMerge" if cubist else "Expedite" if expedite else None
        x = _embed(self, images)
        state = start_state(self, patch_grid(self, images), x, attn_mask, needs_grid=needs_grid)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        intermediates = []
        reconstruct: Reconstruct | None = None  # Expedite's, once the grid is clustered

        def finish(y: torch.Tensor, recover: bool, norm: bool = True) -> torch.Tensor:
            if reconstruct is not None:
                # Expedite rebuilds the tokens before the (token-wise) norm, which then sees full tokens.
                y = reconstruct_tokens(y, reconstruct, state.num_prefix) if recover else y
                return self.norm(y) if norm else y
            y = self.norm(y) if norm else y
            return state.recover(y) if recover else y

        blocks = self.blocks if last_block is None else self.blocks[: last_block + 1]
        for i, block in enumerate(blocks):
            if cubist or expedite:
                if cubist:
                    x, state, _ = cubist_reduce_at(x, state, i, options)
                elif i == options.loc:
                    x, state, reconstruct = expedite_reduce(x, state, options)
                prop_attn = cubist and options.prop_attn
                if checkpointing:
                    x = checkpoint(_plain_block_forward, block, x, state, is_causal, prop_attn, use_reentrant=False)
                else:
                    x = _plain_block_forward(block, x, state, is_causal, prop_attn)
            elif checkpointing:
                x, state = checkpoint(
                    merging_block_forward, block, x, state, i, options, is_causal, use_reentrant=False
                )
            else:
                x, state = merging_block_forward(block, x, state, i, options, is_causal)
            if take_indices is not None and i in take_indices:
                intermediates.append(finish(x, True, norm_intermediates))
        if options.trace_source:
            store_source(self, state, x)
        return x, finish, intermediates

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # The head pools the merged tokens, as the merging methods' own code does (a mean over merged
        # tokens is not the size-weighted mean over recovered positions); Expedite's head sees the
        # reconstructed tokens, which is what its clustering stands for.
        tokens, finish, _ = self._merging_tokens(x, attn_mask, is_causal)
        return self.forward_head(finish(tokens, isinstance(options_of(self), ExpediteOptions)))

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x, finish, _ = self._merging_tokens(x, attn_mask, is_causal)
        return finish(x, options_of(self).recover_output)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        tokens, finish, intermediates = self._merging_tokens(
            x, attn_mask, is_causal, set(take_indices), max_index if stop_early else None, norm
        )
        spatial, prefix = format_intermediates(
            self, intermediates, x.shape, output_fmt, return_prefix_tokens and not output_dict
        )

        def final() -> torch.Tensor:
            return finish(tokens, options_of(self).recover_output)

        if output_dict:
            result = {"image_intermediates": spatial}
            if prefix is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = final()
            return result
        if intermediates_only:
            return spatial
        return final(), spatial
