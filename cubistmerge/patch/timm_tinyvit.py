"""Patching timm's TinyViT (``tiny_vit.TinyVit``), the MobileSAM encoder family.

TinyViT runs its attention stages on (B, H, W, C) grids: window attention with
a learned bias per relative offset, a depthwise 3x3 conv between attention and
MLP, and a PatchMerging downsample at the start of most stages. ``loc`` counts
attention blocks over all stages in forward order (MobileSAM: 0-1 on the
128x128 grid with 7x7 windows, 2-7 on the 64x64 grid with 14x14 windows, 8-9
on 64x64 with 7x7 windows). The reduced grid flows on through later blocks and
stages as long as no stage downsamples it (a stride-1 PatchMerging keeps it);
it is recovered to the full grid before a downsampling stage and at the end,
so the head or SAM's neck gets the full grid.

ToMe (baseline) merges, as on SAM, only around the MLP: inside every window
``r`` tokens (per full window) are merged by bipartite soft matching on the
keys of the block's attention (averaged over heads), the MLP runs on the rest
and its output is unmerged before the residual.

``windows`` as for SAM: ``"window"`` reduces inside every attention window
(blocks then use the smaller window and their per-offset bias table is
resampled to the stretched offsets of the smaller window), ``"grid"`` reduces
the whole grid and windows are formed anew with the blocks' own size and bias.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.tiny_vit import PatchMerging, TinyVit, TinyVitBlock, TinyVitStage

from ..merge.cubist import Recover, cubist_merge
from ..merge.windows import cubist_merge_windows
from ._sam_common import WINDOW_MODES, TokenFunction, captured_keys, tome_mlp
from ._swap import options_of, restore_class, swap_class
from ._tokens import store_grid_source
from .options import CubistOptions, ToMeOptions

FAMILY = "timm TinyVit (TinyViT, MobileSAM's encoder)"
FAMILY_OPTIONS = {"cubist": ("windows",)}
_FEATURES_PARAMS = ("self", "x")


def _attention_blocks(model: TinyVit) -> list[tuple[int, TinyVitBlock]]:
    return [
        (stage_index, block)
        for stage_index, stage in enumerate(model.stages)
        if isinstance(stage, TinyVitStage)
        for block in stage.blocks
    ]


def why_unsupported(model: nn.Module) -> str | None:
    if not isinstance(model, TinyVit):
        return f"{type(model).__name__} is not a timm TinyVit"
    others = sorted({type(b).__name__ for _, b in _attention_blocks(model) if type(b) is not TinyVitBlock})
    if others:
        return f"its attention blocks are {others}, not timm.models.tiny_vit.TinyVitBlock"
    unknown = set(inspect.signature(TinyVit.forward_features).parameters) - set(_FEATURES_PARAMS)
    if unknown:
        return f"this timm version's TinyVit.forward_features has parameters {sorted(unknown)} not known here"
    return None


def num_blocks(model: TinyVit) -> int:
    return len(_attention_blocks(model))


@dataclass(frozen=True)
class TinyVitMergeOptions:
    method: CubistOptions | ToMeOptions
    windows: str


def patch(model: TinyVit, options: CubistOptions | ToMeOptions, windows: str = "window") -> TinyVit:
    if isinstance(options, ToMeOptions):
        blocks = _attention_blocks(model)
        for (_, block), r in zip(blocks, options.r_schedule, strict=True):
            if r > block.window_size**2 // 2:
                raise ValueError(
                    f"ToMe on TinyViT merges r tokens inside every {block.window_size}x{block.window_size} window: "
                    f"r must be at most {block.window_size**2 // 2} there, got {r}"
                )
        if options.trace_source:
            raise ValueError("trace_source is not available for ToMe on TinyViT (tokens are unmerged per block)")
        return swap_class(model, _MergingTinyVit, TinyVitMergeOptions(options, "window"), FAMILY)
    if windows not in WINDOW_MODES:
        raise ValueError(f"windows must be one of {WINDOW_MODES}, got {windows!r}")
    if windows == "window":
        _check_window_reductions(options, _attention_blocks(model))
    return swap_class(model, _MergingTinyVit, TinyVitMergeOptions(options, windows), FAMILY)


def _check_window_reductions(options: CubistOptions, blocks: list[tuple[int, TinyVitBlock]]) -> None:
    """Every reduction must fit the window it runs in (reduced again by earlier ones in the same stage)."""
    window, current_stage = 0, None
    for reduction in options.stages:
        stage_index, block = blocks[reduction.loc]
        if stage_index != current_stage:
            window, current_stage = block.window_size, stage_index
        r_h, r_w = reduction.resolve((window, window))
        if r_h > window // 2 or r_w > window // 2:
            raise ValueError(
                f"the reduction at block {reduction.loc} asks for r_h={r_h}, r_w={r_w} inside {window}x{window} "
                f"windows; one reduction removes at most {window // 2} per window row and column"
            )
        window -= r_h


def unpatch(model: TinyVit) -> TinyVit:
    return restore_class(model)


def _keeps_grid(stage: nn.Module) -> bool:
    """True if the stage's downsample leaves the token grid's size as it is."""
    downsample = getattr(stage, "downsample", None)
    if downsample is None or isinstance(downsample, nn.Identity):
        return True
    return isinstance(downsample, PatchMerging) and tuple(downsample.conv2.conv.stride) == (1, 1)


def offset_bias_table(attn: nn.Module) -> torch.Tensor:
    """(heads, w, w) bias for every (|dy|, |dx|) offset inside the attention's w x w window."""
    h, w = attn.resolution
    if h != w:
        raise ValueError(f"only square TinyViT windows are supported, got {attn.resolution}")
    offsets = attn.attention_bias_idxs[0].view(h, w)  # from point (0, 0) to (dy, dx)
    return attn.attention_biases[:, offsets]


def stretched_window_bias(attn: nn.Module, window: int) -> torch.Tensor:
    """The attention bias (heads, window**2, window**2) for a window reduced from the attention's own size.

    A reduced window covers the same area as the original one, so the offset
    between reduced positions i and j stands for |i - j| * (w - 1) / (window - 1)
    original positions; the per-offset table is sampled there bilinearly.
    """
    table = offset_bias_table(attn)  # (heads, w, w)
    w = table.shape[-1]
    steps = torch.arange(window, device=table.device)
    # integer numerator first, so offsets that land on whole original offsets are exact
    distance = ((steps[:, None] - steps[None, :]).abs() * (w - 1)).to(table.dtype) / max(window - 1, 1)
    lower = distance.floor().long().clamp_max(w - 1)
    upper = (lower + 1).clamp_max(w - 1)
    frac = distance - lower.to(distance.dtype)
    # interpolate along dy (rows of pairs) and dx (columns of pairs)
    dy_lo, dy_hi, fy = lower[:, :, None, None], upper[:, :, None, None], frac[:, :, None, None]
    dx_lo, dx_hi, fx = lower[None, None], upper[None, None], frac[None, None]

    def at(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return table[:, dy, dx]  # (heads, window, window, window, window)

    bias = (
        at(dy_lo, dx_lo) * (1 - fy) * (1 - fx)
        + at(dy_hi, dx_lo) * fy * (1 - fx)
        + at(dy_lo, dx_hi) * (1 - fy) * fx
        + at(dy_hi, dx_hi) * fy * fx
    )  # indexed (heads, yi, yj, xi, xj)
    heads = table.shape[0]
    return bias.permute(0, 1, 3, 2, 4).reshape(heads, window * window, window * window)


def _window_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """TinyViT attention on (B', N, C) windows with a given (heads, N, N) bias."""
    B, N, _ = x.shape
    qkv = attn.qkv(attn.norm(x))
    q, k, v = qkv.view(B, N, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.to(q.dtype)
    )
    return attn.proj(out.transpose(1, 2).reshape(B, N, attn.out_dim))


def keys_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """TinyViT attention: its qkv output (B', N, heads * (2 * key_dim + val_dim)) -> keys averaged over heads."""
    B, N, _ = qkv.shape
    return qkv.view(B, N, attn.num_heads, -1)[..., attn.key_dim : 2 * attn.key_dim].mean(dim=2)


def block_forward_with_window(
    block: TinyVitBlock, x: torch.Tensor, window: int, mlp: TokenFunction | None = None
) -> torch.Tensor:
    """A TinyViT block on a (B, H, W, C) grid with the given window size.

    With the block's own window size its attention runs as is; with a smaller
    one, with the stretched offset biases. ``mlp`` replaces how the tokens go
    through the block's MLP (ToMe merges around it; it gets and returns a grid).
    """
    B, H, W, C = x.shape
    pad_b, pad_r = (window - H % window) % window, (window - W % window) % window
    windows = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
    pH, pW = H + pad_b, W + pad_r
    nH, nW = pH // window, pW // window
    windows = windows.view(B, nH, window, nW, window, C).transpose(2, 3).reshape(B * nH * nW, window * window, C)
    if window == block.window_size:
        out = block.attn(windows)
    else:
        out = _window_attention(block.attn, windows, stretched_window_bias(block.attn, window))
    out = out.view(B, nH, nW, window, window, C).transpose(2, 3).reshape(B, pH, pW, C)[:, :H, :W]
    x = x + block.drop_path1(out)
    y = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
    if mlp is None:
        update = block.mlp(y.reshape(B, H * W, C)).view(B, H, W, C)
    else:
        update = mlp(y, block.mlp)
    return (y + block.drop_path2(update)).contiguous()


class _MergingTinyVit:
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        options: TinyVitMergeOptions = options_of(self)
        if isinstance(options.method, ToMeOptions):
            return self._tome_features(x, options.method)
        cubist = options.method
        x = self.patch_embed(x)
        index = 0  # attention-block counter over all stages
        recover: Recover | None = None
        window = 0  # the reduced window size in force, 0 if windows are the blocks' own
        for stage in self.stages:
            if not isinstance(stage, TinyVitStage):
                x = stage(x)
                continue
            if recover is not None and not _keeps_grid(stage):
                x = recover(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                recover, window = None, 0
            x = stage.downsample(x).permute(0, 2, 3, 1)  # BCHW -> BHWC
            for block in stage.blocks:
                reduction = cubist.stage_at(index)
                if reduction is not None:
                    x, step, window = _reduce(x, reduction, block.window_size if window == 0 else window, options)
                    recover = step if recover is None else recover.then(step)
                if window and window != block.window_size:
                    x = block_forward_with_window(block, x, window)
                else:
                    x = block(x)
                index += 1
            x = x.permute(0, 3, 1, 2)
            if window:
                window = 0  # a later stage has its own window size
        if cubist.trace_source:
            # the map onto the last stage's grid (a reduction recovered before a downsampling leaves none there)
            store_grid_source(self, recover, x.permute(0, 2, 3, 1))
        if recover is not None and cubist.recover_output:
            x = recover(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x

    def _tome_features(self, x: torch.Tensor, options: ToMeOptions) -> torch.Tensor:
        x = self.patch_embed(x)
        index = 0
        for stage in self.stages:
            if not isinstance(stage, TinyVitStage):
                x = stage(x)
                continue
            x = stage.downsample(x).permute(0, 2, 3, 1)
            for block in stage.blocks:
                r = options.r_schedule[index]
                if r == 0:
                    x = block(x)
                else:
                    window = block.window_size
                    with captured_keys(block.attn, keys_from_qkv) as keys:
                        x = block_forward_with_window(block, x, window, mlp=tome_mlp(keys, window, window, r))
                index += 1
            x = x.permute(0, 3, 1, 2)
        return x


def _reduce(x: torch.Tensor, reduction, window: int, options: TinyVitMergeOptions):
    cubist = options.method
    with torch.profiler.record_function("cubistmerge::cubist_merge"):
        if options.windows == "window":
            r_h, r_w = reduction.resolve((window, window))
            merged, recover, (wh, ww) = cubist_merge_windows(
                x, window, r_h, r_w, representation=cubist.representation, metric=cubist.metric
            )
            if wh != ww:
                raise ValueError(f"TinyViT windows are square: use r_h == r_w inside windows (got {r_h}, {r_w})")
            return merged, recover, wh
        r_h, r_w = reduction.resolve(tuple(x.shape[1:3]))
        merged, recover = cubist_merge(x, r_h, r_w, representation=cubist.representation, metric=cubist.metric)
        return merged, recover, 0
