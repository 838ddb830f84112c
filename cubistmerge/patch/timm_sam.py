"""Patching timm's SAM image encoders (``vision_transformer_sam.VisionTransformerSAM``: samvit_*).

See :mod:`cubistmerge.patch._sam_common` for the two window designs (and how
Expedite clusters windows). The model class is swapped for a subclass overriding ``forward_features`` and
``forward_intermediates``; blocks run through their own ``forward`` except when
the window size was reduced, where :func:`block_forward_with_window` runs the
same steps (norm, window partition, attention, unpartition, residuals with
LayerScale and drop-path, MLP) with the smaller window.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models._features import feature_take_indices
from timm.models.vision_transformer_sam import Block, VisionTransformerSAM, window_partition, window_unpartition

from ._sam_common import SamBlockRunner, SamMergeOptions, TokenFunction, check_sam_options, recover_grid, run_blocks
from ._swap import options_of, restore_class, swap_class
from ._tokens import store_grid_source
from .options import CubistOptions, ExpediteOptions, ToMeOptions

FAMILY = "timm VisionTransformerSAM (samvit_*)"
FAMILY_OPTIONS = {"cubist": ("windows",)}
SUPPORTED_METHODS = ("cubist", "tome", "expedite")

_FEATURES_PARAMS = ("self", "x")
_INTERMEDIATES_PARAMS = ("self", "x", "indices", "norm", "stop_early", "output_fmt", "intermediates_only")


def why_unsupported(model: nn.Module) -> str | None:
    if not isinstance(model, VisionTransformerSAM):
        return f"{type(model).__name__} is not a timm VisionTransformerSAM"
    others = sorted({type(blk).__name__ for blk in model.blocks if type(blk) is not Block})
    if others:
        return f"its blocks are {others}, not timm.models.vision_transformer_sam.Block"
    if any(blk.attn.rope is not None for blk in model.blocks):
        return "it uses RoPE in its SAM blocks, whose fixed grid cannot follow a reduction"
    for method, expected in (("forward_features", _FEATURES_PARAMS), ("forward_intermediates", _INTERMEDIATES_PARAMS)):
        unknown = set(inspect.signature(getattr(VisionTransformerSAM, method)).parameters) - set(expected)
        if unknown:
            return f"this timm version's VisionTransformerSAM.{method} has parameters {sorted(unknown)} not known here"
    return None


def num_blocks(model: VisionTransformerSAM) -> int:
    return len(model.blocks)


def block_forward_with_window(
    block: Block, x: torch.Tensor, window_size: int, mlp: TokenFunction | None = None
) -> torch.Tensor:
    """timm SAM block on a (B, H, W, C) grid with ``window_size`` instead of the block's own.

    ``mlp`` replaces how the normed grid goes through the block's MLP (ToMe
    merges tokens around it); by default the MLP runs on every token.
    """
    B, H, W, _ = x.shape
    shortcut = x
    x = block.norm1(x)
    if window_size > 0:
        x, pad_hw = window_partition(x, window_size)
    x = block.drop_path1(block.ls1(block.attn(x)))
    if window_size > 0:
        x = window_unpartition(x, window_size, (H, W), pad_hw)
    x = shortcut + x
    normed = block.norm2(x)
    y = block.mlp(normed.reshape(B, H * W, -1)).reshape(B, H, W, -1) if mlp is None else mlp(normed, block.mlp)
    return x + block.drop_path2(block.ls2(y))


def keys_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """timm samvit attention: its qkv output (B', N, 3 * dim) -> keys after k_norm, averaged over heads (B', N, d)."""
    B, N, _ = qkv.shape
    keys = qkv.view(B, N, 3, attn.num_heads, -1)[:, :, 1]  # (B', N, heads, d)
    # k_norm normalises every head's vector (over d), so it applies to this layout as to the attention's.
    return attn.k_norm(keys).mean(dim=2)


RUNNER = SamBlockRunner(
    window_size_of=lambda block: block.window_size,
    forward_with_window=block_forward_with_window,
    keys_from_qkv=keys_from_qkv,
)


def patch(
    model: VisionTransformerSAM, options: CubistOptions | ToMeOptions | ExpediteOptions, windows: str = "window"
) -> VisionTransformerSAM:
    sam_options = SamMergeOptions(options, windows)
    window = max((blk.window_size for blk in model.blocks), default=0)
    check_sam_options(sam_options, tuple(model.patch_embed.grid_size), window)
    return swap_class(model, _MergingSAM, sam_options, FAMILY)


def unpatch(model: VisionTransformerSAM) -> VisionTransformerSAM:
    return restore_class(model)


def _embed(model: VisionTransformerSAM, x: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(x)
    if model.pos_embed is not None:
        x = x + resample_abs_pos_embed_nhwc(model.pos_embed, x.shape[1:3])
    x = model.pos_drop(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


class _MergingSAM:
    def _merged_grid(self, x, take_indices=None, last_block=None):
        options: SamMergeOptions = options_of(self)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        x = _embed(self, x)
        grid = x
        x, intermediates, recover = run_blocks(
            self.blocks,
            x,
            options,
            RUNNER,
            take_indices=take_indices,
            last_block=last_block,
            checkpointing=checkpointing,
        )
        if options.method.trace_source:
            store_grid_source(self, recover, grid)
        if options.recover_output:
            x = recover_grid(x, recover)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._merged_grid(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for SAM encoders, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, intermediates = self._merged_grid(x, set(take_indices), max_index if stop_early else None)
        if norm:
            intermediates = [self.neck(y.permute(0, 3, 1, 2)) for y in intermediates]
        else:
            intermediates = [y.permute(0, 3, 1, 2) for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.neck(x.permute(0, 3, 1, 2)), intermediates
