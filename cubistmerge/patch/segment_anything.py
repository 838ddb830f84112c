"""Patching the official ``segment_anything`` package (``ImageEncoderViT``, or a whole ``Sam``).

What most SAM users run. Patching a ``Sam`` patches its ``image_encoder``, so
``SamPredictor`` and the automatic mask generator work unchanged: the encoder
recovers the full 64x64 grid before its neck, and the prompt encoder and mask
decoder never see a merged token. See :mod:`cubistmerge.patch._sam_common` for
the two window designs (and how Expedite clusters windows).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._sam_common import SamBlockRunner, SamMergeOptions, TokenFunction, check_sam_options, recover_grid, run_blocks
from ._swap import options_of, patched_family, restore_class, swap_class
from ._tokens import store_grid_source
from .options import CubistOptions, ExpediteOptions, ToMeOptions

FAMILY = "segment_anything ImageEncoderViT (or a Sam model)"
FAMILY_OPTIONS = {"cubist": ("windows",)}
SUPPORTED_METHODS = ("cubist", "tome", "expedite")


def _classes():
    try:
        from segment_anything.modeling import ImageEncoderViT, Sam
        from segment_anything.modeling.image_encoder import Block
    except ImportError:
        return None
    return ImageEncoderViT, Sam, Block


def _encoder(model: nn.Module) -> nn.Module:
    classes = _classes()
    return model.image_encoder if classes is not None and isinstance(model, classes[1]) else model


def why_unsupported(model: nn.Module) -> str | None:
    classes = _classes()
    if classes is None:
        return "the segment_anything package is not installed"
    encoder_cls, sam_cls, block_cls = classes
    encoder = model.image_encoder if isinstance(model, sam_cls) else model
    if not isinstance(encoder, encoder_cls):
        return f"{type(model).__name__} is neither a segment_anything ImageEncoderViT nor a Sam"
    others = sorted({type(blk).__name__ for blk in encoder.blocks if type(blk) is not block_cls})
    if others:
        return f"its blocks are {others}, not segment_anything's image_encoder.Block"
    return None


def is_patched(model: nn.Module) -> bool:
    return patched_family(_encoder(model)) == FAMILY


def num_blocks(model: nn.Module) -> int:
    return len(_encoder(model).blocks)


def block_forward_with_window(
    block: nn.Module, x: torch.Tensor, window_size: int, mlp: TokenFunction | None = None
) -> torch.Tensor:
    """segment_anything block on a (B, H, W, C) grid with ``window_size`` instead of the block's own.

    ``mlp`` replaces how the normed grid goes through the block's MLP (ToMe
    merges tokens around it); by default the MLP runs on every token.
    """
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    H, W = x.shape[1], x.shape[2]
    shortcut = x
    y = block.norm1(x)
    if window_size > 0:
        y, pad_hw = window_partition(y, window_size)
    y = block.attn(y)
    if window_size > 0:
        y = window_unpartition(y, window_size, pad_hw, (H, W))
    x = shortcut + y
    normed = block.norm2(x)
    return x + (block.mlp(normed) if mlp is None else mlp(normed, block.mlp))


def keys_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """segment_anything attention: its qkv output (B', h, w, 3 * dim) -> keys averaged over heads (B', h * w, d)."""
    B = qkv.shape[0]
    return qkv.reshape(B, -1, 3, attn.num_heads, qkv.shape[-1] // (3 * attn.num_heads))[:, :, 1].mean(dim=2)


RUNNER = SamBlockRunner(
    window_size_of=lambda block: block.window_size,
    forward_with_window=block_forward_with_window,
    keys_from_qkv=keys_from_qkv,
)


def patch(
    model: nn.Module, options: CubistOptions | ToMeOptions | ExpediteOptions, windows: str = "window"
) -> nn.Module:
    encoder = _encoder(model)
    sam_options = SamMergeOptions(options, windows)
    stride_h, stride_w = encoder.patch_embed.proj.stride
    grid = (encoder.img_size // stride_h, encoder.img_size // stride_w)
    window = max((blk.window_size for blk in encoder.blocks), default=0)
    check_sam_options(sam_options, grid, window)
    swap_class(encoder, _MergingImageEncoderViT, sam_options, FAMILY)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    restore_class(_encoder(model))
    return model


class _MergingImageEncoderViT:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        options: SamMergeOptions = options_of(self)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        grid = x
        x, _, recover = run_blocks(self.blocks, x, options, RUNNER)
        if options.method.trace_source:
            store_grid_source(self, recover, grid)
        if options.recover_output:
            x = recover_grid(x, recover)
        return self.neck(x.permute(0, 3, 1, 2))
