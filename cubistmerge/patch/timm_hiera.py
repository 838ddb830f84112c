"""Patching timm's Hiera family: ``hieradet_sam2.HieraDet`` (the SAM 2 image encoder trunk, ``sam2_hiera_*``)
and ``hiera.Hiera`` (the MAE-pretrained hierarchical ViT, ``hiera_*``).

HieraDet keeps its tokens as a (B, H, W, C) grid from the patch embedding on.
The absolute position embedding (a bicubically resized global table plus a
tiled window table) is added once, before the first block, so nothing in the
blocks depends on where a token sits. Blocks are grouped into stages; the
first block of stages 2, 3, ... (the first ``q_pool`` of them) max-pools its
queries and its shortcut 2x2 ("q-pooling"), halving the grid. Blocks run
window attention (zero-padded windows tiled from the top-left, no relative
positions, no mask for the padding) with one window size per stage, or global
attention (``global_att_blocks``). ``forward_intermediates`` (what SAM 2's FPN
neck reads) returns the output of the last block of every stage (``coarse``)
or of any blocks.

CubistMerge reduces the grid at the input of block ``loc`` (``loc`` counts all
blocks of all stages). The reduced grid flows through the following blocks
until the next q-pooling block: pooling 2x2 neighbourhoods of a reduced grid
would mix tokens of different sizes and give the next stage the wrong
resolution, so the grid is recovered (every merged token copied back to the
positions it stands for) right before it, and at the end of ``forward_features``
(with ``recover_output``). Every output ``forward_intermediates`` returns is
recovered, so the neck sees the usual shapes. Hence:

- any block can reduce except the q-pooling blocks (the first block of every
  pooled stage; e.g. blocks 1, 3 and 10 of ``sam2_hiera_tiny``, so its default
  ``loc=1`` is refused): their input must be the full grid for the pooling;
- a reduction lasts until the end of its stage (with the default ``q_pool``
  every stage change pools); several reductions may run in one stage.

``windows`` as for SAM (see :mod:`cubistmerge.patch._sam_common`):
``"window"`` (default) reduces inside every attention window of the stage
(e.g. 8x8 -> 6x6; HieraDet's windows are (height, width) pairs, so ``r_h`` and
``r_w`` may differ); the windowed blocks after it then run with the reduced
window, so every window keeps exactly its tokens. ``r`` counts tokens per
window row / column; the window is that of block ``loc``, or of the next
windowed block of its stage if ``loc`` is global (none: the grid is reduced).
``"grid"`` reduces the whole grid; blocks keep their window size and windows
are formed anew (with padding) on the smaller grid. Global-attention blocks see
the reduced grid either way.

ToMe (the baseline), as on SAM: in every block, inside every window-sized tile
(the block's window; the stage's window for a global block), ``r`` tokens are
merged by bipartite soft matching on the keys of the block's attention, the MLP
runs on the rest and its output is unmerged before the residual. Attention
always sees the full grid. The q-pooling blocks run unmerged (their MLP runs on
the pooled grid, whose windows are not those of the keys).

``trace_source`` leaves the (B, H * W) map of the last stage's grid (as on
TinyViT: a reduction in an earlier stage is recovered before the pooling and
leaves the identity there). Expedite and the other methods are not available.

Hiera (``hiera_*``, 2-D images) has the same stages and q-pooling, but its
tokens are a (B, N, C) sequence "unrolled" into mask units: reordered so that
the tokens of every pooling's 2x2 neighbourhood, and of every mask unit (8x8
tokens in stage 1, 4x4 in stage 2), are strided slices, and its mask-unit
attention (stages 1-2; later stages attend globally) and pooling rely on that
fixed order and size. There a reduction rolls the tokens back to the grid
(timm's ``Reroll``), reduces inside every mask unit (8x8 -> 6x6; units tile the
grid exactly, there is no padding) if a block of the stage attends within
mask units, else the whole grid, and lays the reduced grid out again with the
mask unit last, so the stage's mask-unit attention runs on the reduced units
(``windows="grid"`` cannot form units there and is refused). Before the next
q-pooling block, at the end, and for every intermediate the grid is recovered
and unrolled again into Hiera's order. Hiera takes CubistMerge only (ToMe's
tile-wise MLP merging is not implemented for mask units) and no MAE ``mask``
(masked-out mask units leave no grid).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from timm.models.hiera import Hiera, HieraBlock, MaskUnitAttention, Unroll
from timm.models.hieradet_sam2 import (
    HieraDet,
    MultiScaleAttention,
    MultiScaleBlock,
    _calc_pad,
    window_partition,
    window_unpartition,
)

from ..merge.cubist import Recover, cubist_merge
from ..merge.windows import cubist_merge_windows
from ._sam_common import WINDOW_MODES, TokenFunction, captured_keys, tome_mlp
from ._swap import options_of, restore_class, swap_class
from ._tokens import store_grid_source
from .options import CubistOptions, CubistStage, ToMeOptions

FAMILY = "timm HieraDet / Hiera (SAM 2 Hiera: sam2_hiera_*; hiera_*)"
FAMILY_OPTIONS = {"cubist": ("windows",)}
SUPPORTED_METHODS = ("cubist", "tome")

_FEATURES_PARAMS = ("self", "x")
_INTERMEDIATES_PARAMS = (
    "self",
    "x",
    "indices",
    "norm",
    "stop_early",
    "output_fmt",
    "intermediates_only",
    "coarse",
)
_HIERA_FEATURES_PARAMS = ("self", "x", "mask", "return_intermediates")
_HIERA_INTERMEDIATES_PARAMS = (*_INTERMEDIATES_PARAMS, "mask")


def why_unsupported(model: nn.Module) -> str | None:
    if isinstance(model, Hiera):
        return _why_not_hiera(model)
    if not isinstance(model, HieraDet):
        return f"{type(model).__name__} is neither a timm HieraDet nor a timm Hiera"
    others = sorted({type(blk).__name__ for blk in model.blocks if type(blk) is not MultiScaleBlock})
    others += sorted({type(blk.attn).__name__ for blk in model.blocks if type(blk.attn) is not MultiScaleAttention})
    if others:
        return f"its blocks are {others}, not timm.models.hieradet_sam2.MultiScaleBlock / MultiScaleAttention"
    for method, expected in (("forward_features", _FEATURES_PARAMS), ("forward_intermediates", _INTERMEDIATES_PARAMS)):
        unknown = set(inspect.signature(getattr(HieraDet, method)).parameters) - set(expected)
        if unknown:
            return f"this timm version's HieraDet.{method} has parameters {sorted(unknown)} not known here"
    return None


def num_blocks(model: HieraDet | Hiera) -> int:
    return len(model.blocks)


def _pools(block: MultiScaleBlock | HieraBlock) -> bool:
    """True for the blocks that q-pool (the first block of a pooled stage)."""
    if isinstance(block, HieraBlock):
        return block.attn.q_stride > 1
    return block.q_stride is not None


def _stage_of(model: HieraDet | Hiera, index: int) -> int:
    return sum(1 for end in model.stage_ends if end < index)


def _segment_end(model: HieraDet | Hiera, index: int) -> int:
    """The last block before the next q-pooling block (or the last block): where a reduction at ``index`` ends."""
    end = index
    while end + 1 < len(model.blocks) and not _pools(model.blocks[end + 1]):
        end += 1
    return end


def segment_window(model: HieraDet, index: int) -> tuple[int, int]:
    """The window a ``"window"``-mode reduction at block ``index`` runs in: the block's own, or that of the next
    windowed block before the next q-pooling; (0, 0) when there is none (the grid is reduced as a whole)."""
    for block in model.blocks[index : _segment_end(model, index) + 1]:
        if block.is_windowed:
            return tuple(block.window_size)
    return (0, 0)


def _tile(model: HieraDet, index: int) -> int:
    """ToMe's matching tile in block ``index``: its window, or the window of its stage for a global block (0: none)."""
    block = model.blocks[index]
    if block.is_windowed:
        return block.window_size[0]
    spec = model.window_spec[min(_stage_of(model, index), len(model.window_spec) - 1)]
    return spec if isinstance(spec, int) else spec[0]


@dataclass(frozen=True)
class HieraMergeOptions:
    method: CubistOptions | ToMeOptions
    windows: str = "window"

    @property
    def recover_output(self) -> bool:
        return self.method.recover_output


def patch(model: HieraDet | Hiera, options: CubistOptions | ToMeOptions, windows: str = "window") -> HieraDet | Hiera:
    if isinstance(model, Hiera):
        return _patch_hiera(model, options, windows)
    if isinstance(options, ToMeOptions):
        _check_tome(model, options)
        return swap_class(model, _MergingHieraDet, HieraMergeOptions(options), FAMILY)
    if windows not in WINDOW_MODES:
        raise ValueError(f"windows must be one of {WINDOW_MODES}, got {windows!r}")
    _check_cubist(model, options, windows)
    return swap_class(model, _MergingHieraDet, HieraMergeOptions(options, windows), FAMILY)


def _check_tome(model: HieraDet, options: ToMeOptions) -> None:
    if options.trace_source:
        raise ValueError("trace_source is not available for ToMe on HieraDet (tokens are unmerged per block)")
    for index, (block, r) in enumerate(zip(model.blocks, options.r_schedule, strict=True)):
        if r == 0 or _pools(block):
            continue
        if block.window_size[0] != block.window_size[1]:
            raise ValueError(f"ToMe on HieraDet needs square windows, block {index} has {tuple(block.window_size)}")
        tile = _tile(model, index)
        if tile and r > tile * tile // 2:
            raise ValueError(
                f"ToMe on HieraDet merges r tokens inside every {tile}x{tile} window: r must be at most "
                f"{tile * tile // 2} in block {index}, got {r}"
            )


def _check_loc(model: HieraDet | Hiera, loc: int) -> None:
    pooling = [i for i, block in enumerate(model.blocks) if _pools(block)]
    if loc in pooling:
        allowed = [i for i in range(len(model.blocks)) if i not in pooling]
        raise ValueError(
            f"block {loc} cannot reduce: it opens stage {_stage_of(model, loc) + 1} by q-pooling (2x2 max "
            f"pooling halves the grid), which needs the full grid. Blocks that can: {_ranges(allowed)}"
        )


def _check_cubist(model: HieraDet, options: CubistOptions, windows: str) -> None:
    current: tuple[int, tuple[int, int], tuple[int, int]] | None = None  # (segment end, own window, reduced window)
    for reduction in options.stages:
        loc = reduction.loc
        _check_loc(model, loc)
        if windows != "window":
            continue
        end = _segment_end(model, loc)
        if current is None or current[0] != end:
            own = segment_window(model, loc)
            current = (end, own, own)
            others = {tuple(b.window_size) for b in model.blocks[loc : end + 1] if b.is_windowed} - {own}
            if others:
                raise ValueError(
                    f"windows='window' needs one window size from block {loc} to block {end}, which use "
                    f"{sorted({own, *others})}; use windows='grid'"
                )
        end, own, window = current
        if window == (0, 0):
            continue  # no windowed block follows: the grid is reduced; checked when the grid is known
        r_h, r_w = reduction.resolve(window)
        if r_h > window[0] // 2 or r_w > window[1] // 2:
            raise ValueError(
                f"the reduction at block {loc} asks for r_h={r_h}, r_w={r_w} inside {window[0]}x{window[1]} "
                f"windows; one reduction removes at most {window[0] // 2} per window column and {window[1] // 2} "
                "per window row"
            )
        current = (end, own, (window[0] - r_h, window[1] - r_w))


def _ranges(indices: list[int]) -> str:
    """[0, 2, 4, 5, 6] -> '0, 2, 4-6'."""
    parts: list[str] = []
    start = previous = None
    for i in [*indices, None]:
        if i is not None and previous is not None and i == previous + 1:
            previous = i
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = i
    return ", ".join(parts)


def unpatch(model: HieraDet | Hiera) -> HieraDet | Hiera:
    return restore_class(model)


def block_forward_with_window(
    block: MultiScaleBlock, x: torch.Tensor, window: tuple[int, int], mlp: TokenFunction | None = None
) -> torch.Tensor:
    """A HieraDet block without q-pooling on a (B, H, W, C) grid with ``window`` instead of its own window size.

    The steps of ``MultiScaleBlock.forward``; ``(0, 0)`` is global attention. ``mlp`` replaces how the normed
    grid goes through the block's MLP (ToMe merges tokens around it); by default the MLP runs on every token.
    """
    if _pools(block):
        raise ValueError("q-pooling blocks run on the full grid with their own window")
    shortcut = x
    x = block.norm1(x)
    if block.dim != block.dim_out:
        shortcut = block.proj(x)
    H, W = x.shape[1:3]
    windowed = any(window)
    if windowed:
        Hp, Wp, pad_h, pad_w = _calc_pad(H, W, window)
        x = window_partition(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)), window)
    x = block.attn(x)
    if windowed:
        x = window_unpartition(x, window, (Hp, Wp))[:, :H, :W, :]
    x = shortcut + block.drop_path1(block.ls1(x))
    normed = block.norm2(x)
    y = block.mlp(normed) if mlp is None else mlp(normed, block.mlp)
    return x + block.drop_path2(block.ls2(y))


def keys_from_qkv(attn: MultiScaleAttention, qkv: torch.Tensor) -> torch.Tensor:
    """HieraDet attention: its qkv output (B', h, w, 3 * dim) -> keys averaged over heads (B', h * w, head_dim)."""
    B = qkv.shape[0]
    return qkv.reshape(B, -1, 3, attn.num_heads, attn.dim_out // attn.num_heads)[:, :, 1].mean(dim=2)


@dataclass(frozen=True)
class _Reduced:
    """A reduction in force: how to recover the full grid, and the windows (own -> reduced) in ``"window"`` mode."""

    recover: Recover
    own_window: tuple[int, int] = (0, 0)
    window: tuple[int, int] = (0, 0)


def _reduce(
    model: HieraDet,
    x: torch.Tensor,
    index: int,
    reduction: CubistStage,
    reduced: _Reduced | None,
    options: HieraMergeOptions,
) -> tuple[torch.Tensor, _Reduced | None]:
    cubist: CubistOptions = options.method
    own = segment_window(model, index) if options.windows == "window" else (0, 0)
    window = own if reduced is None else reduced.window
    reference = window if any(window) else tuple(x.shape[1:3])
    r_h, r_w = reduction.resolve(reference)
    if r_h == 0 and r_w == 0:
        return x, reduced
    merged, recover, window = _cubist_merge(x, window, r_h, r_w, cubist)
    chained = recover if reduced is None else reduced.recover.then(recover)
    return merged, _Reduced(chained, own, window)


def _recover(x: torch.Tensor, reduced: _Reduced | None) -> torch.Tensor:
    return x if reduced is None else reduced.recover(x)


class _MergingHieraDet:
    def _merged_blocks(
        self, x: torch.Tensor, take_indices: set[int] | None = None, last_block: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedding and blocks with the scheduled merging; the final grid (recovered if ``recover_output``) and
        the outputs of the blocks in ``take_indices``, recovered."""
        options: HieraMergeOptions = options_of(self)
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        x = self._pos_embed(self.patch_embed(x))
        tome = options.method if isinstance(options.method, ToMeOptions) else None
        reduced: _Reduced | None = None
        intermediates = []
        for i, block in enumerate(self.blocks):
            if last_block is not None and i > last_block:
                break
            step, args = block, (x,)
            if _pools(block):
                x, reduced = _recover(x, reduced), None
                args = (x,)
            elif tome is not None:
                if tome.r_schedule[i]:
                    step, args = _tome_step(self, i, tome.r_schedule[i]), (block, x)
            else:
                reduction = options.method.stage_at(i)
                if reduction is not None:
                    x, reduced = _reduce(self, x, i, reduction, reduced, options)
                    args = (x,)
                if reduced is not None and block.is_windowed and tuple(block.window_size) == reduced.own_window:
                    step, args = block_forward_with_window, (block, x, reduced.window)
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
            else:
                x = step(*args)
            if take_indices is not None and i in take_indices:
                intermediates.append(_recover(x, reduced))
        full = _recover(x, reduced) if options.method.trace_source or options.recover_output else x
        if options.method.trace_source:
            store_grid_source(self, None if reduced is None else reduced.recover, full)
        return full if options.recover_output else x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._merged_blocks(x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = True,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        coarse: bool = True,
    ):
        take, last = _intermediate_blocks(self, "HieraDet", indices, norm, output_fmt, coarse)
        x, intermediates = self._merged_blocks(x, take, last if stop_early else None)
        return _intermediates_output(x, intermediates, output_fmt, intermediates_only)


def _cubist_merge(x: torch.Tensor, window: tuple[int, int], r_h: int, r_w: int, cubist: CubistOptions):
    """CubistMerge of a (B, H, W, C) grid inside every ``window`` (windows / mask units), or of the whole grid
    when ``window`` is (0, 0); returns (merged grid, recover, the reduced window)."""
    with torch.profiler.record_function("cubistmerge::cubist_merge"):
        if any(window):
            return cubist_merge_windows(x, window, r_h, r_w, representation=cubist.representation, metric=cubist.metric)
        merged, recover = cubist_merge(x, r_h, r_w, representation=cubist.representation, metric=cubist.metric)
        return merged, recover, window


def _intermediate_blocks(
    model: nn.Module, name: str, indices: int | list[int] | None, norm: bool, output_fmt: str, coarse: bool
) -> tuple[set[int], int]:
    """The blocks whose outputs ``forward_intermediates`` returns (stage ends when ``coarse``) and the last one."""
    if norm:
        raise ValueError(f"{name} has no norm for its intermediates: norm must be False")
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    if coarse:
        take_indices, max_index = feature_take_indices(len(model.stage_ends), indices)
        return {model.stage_ends[i] for i in take_indices}, model.stage_ends[max_index]
    take_indices, max_index = feature_take_indices(len(model.blocks), indices)
    return set(take_indices), max_index


def _intermediates_output(x: torch.Tensor, intermediates: list[torch.Tensor], output_fmt: str, only: bool):
    # intermediates: (B, H, W, C) each, as the blocks produce them
    if output_fmt == "NCHW":
        intermediates = [y.permute(0, 3, 1, 2) for y in intermediates]
    return intermediates if only else (x, intermediates)


def _tome_step(model: HieraDet, index: int, r: int):
    """One block with ToMe around its MLP, matching on the keys of the block's own attention."""
    window = model.blocks[index].window_size
    tile = _tile(model, index)

    def step(block: MultiScaleBlock, x: torch.Tensor) -> torch.Tensor:
        with captured_keys(block.attn, keys_from_qkv) as keys:
            mlp = tome_mlp(keys, window[0], tile or max(x.shape[1:3]), r)
            return block_forward_with_window(block, x, window, mlp=mlp)

    return step


# ---- Hiera: mask units ------------------------------------------------------------------------------------


def _why_not_hiera(model: Hiera) -> str | None:
    if len(model.patch_stride) != 2 or model.pos_embed_spatial is not None:
        return "only 2-D (image) Hiera is supported, not the video (3-D) variants"
    others = sorted({type(blk).__name__ for blk in model.blocks if type(blk) is not HieraBlock})
    others += sorted({type(blk.attn).__name__ for blk in model.blocks if type(blk.attn) is not MaskUnitAttention})
    if others:
        return f"its blocks are {others}, not timm.models.hiera.HieraBlock / MaskUnitAttention"
    if any(_pools(block) and block.attn.q_stride != math.prod(model.q_stride) for block in model.blocks):
        return "its pooling blocks do not pool by q_stride"
    for method, expected in (
        ("forward_features", _HIERA_FEATURES_PARAMS),
        ("forward_intermediates", _HIERA_INTERMEDIATES_PARAMS),
    ):
        unknown = set(inspect.signature(getattr(Hiera, method)).parameters) - set(expected)
        if unknown:
            return f"this timm version's Hiera.{method} has parameters {sorted(unknown)} not known here"
    return None


def _pooled(model: Hiera, index: int, sizes) -> tuple[int, int]:
    """``sizes`` (a grid or mask-unit size of the first stage) divided by the q-pooling done up to block ``index``."""
    pools = sum(1 for block in model.blocks[: index + 1] if _pools(block))
    return tuple(size // stride**pools for size, stride in zip(sizes, model.q_stride, strict=True))


def hiera_unit(model: Hiera, index: int) -> tuple[int, int]:
    """The mask unit a reduction at block ``index`` runs in: (0, 0) if no block up to the next q-pooling block
    attends within mask units (the grid is then reduced as a whole)."""
    blocks = model.blocks[index : _segment_end(model, index) + 1]
    if any(block.attn.use_mask_unit_attn for block in blocks):
        return _pooled(model, index, model.mask_unit_size)
    return (0, 0)


def _patch_hiera(model: Hiera, options: CubistOptions | ToMeOptions, windows: str) -> Hiera:
    if isinstance(options, ToMeOptions):
        from . import UnsupportedModelError

        raise UnsupportedModelError(
            "ToMe is not available for timm Hiera (its merging around the MLP is not implemented for mask units); "
            "use method='cubist', or ToMe on HieraDet (sam2_hiera_*)"
        )
    if windows not in WINDOW_MODES:
        raise ValueError(f"windows must be one of {WINDOW_MODES}, got {windows!r}")
    current: tuple[int, tuple[int, int], tuple[int, int]] | None = None  # (segment end, unit or grid, reduced)
    for reduction in options.stages:
        loc = reduction.loc
        _check_loc(model, loc)
        end = _segment_end(model, loc)
        unit = hiera_unit(model, loc)
        if any(unit) and windows == "grid":
            raise ValueError(
                f"Hiera's mask-unit attention (blocks up to {end}) needs whole mask units, which a reduction of the "
                f"whole grid does not leave (Hiera has no padding); use windows='window' (reduce inside every unit)"
            )
        if current is None or current[0] != end:
            reference = unit if any(unit) else _pooled(model, loc, model.tokens_spatial_shape)
            current = (end, reference, reference)
        side = current[2]
        r_h, r_w = reduction.resolve(side)
        if r_h > side[0] // 2 or r_w > side[1] // 2:
            inside = "inside {}x{} mask units" if any(unit) else "on a {}x{} grid"
            raise ValueError(
                f"the reduction at block {loc} asks for r_h={r_h}, r_w={r_w} {inside.format(*side)}; "
                f"one reduction removes at most {side[0] // 2} per column and {side[1] // 2} per row there"
            )
        current = (end, current[1], (side[0] - r_h, side[1] - r_w))
    return swap_class(model, _MergingHiera, HieraMergeOptions(options, windows), FAMILY)


def to_unit_order(grid: torch.Tensor, unit: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, N, C) with the mask unit index last (token n is in unit n % units), as Hiera's
    mask-unit attention reads its tokens; raster order for ``unit`` (0, 0)."""
    B, H, W, C = grid.shape
    if not any(unit):
        return grid.reshape(B, H * W, C)
    uh, uw = unit
    units = grid.reshape(B, H // uh, uh, W // uw, uw, C).permute(0, 2, 4, 1, 3, 5)
    return units.reshape(B, H * W, C)


def from_unit_order(x: torch.Tensor, grid: tuple[int, int], unit: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`to_unit_order`."""
    B, _, C = x.shape
    H, W = grid
    if not any(unit):
        return x.reshape(B, H, W, C)
    uh, uw = unit
    units = x.reshape(B, uh, uw, H // uh, W // uw, C).permute(0, 3, 1, 4, 2, 5)
    return units.reshape(B, H, W, C)


def mask_unit_attention(attn: MaskUnitAttention, x: torch.Tensor, num_units: int) -> torch.Tensor:
    """Hiera's attention without q-pooling on (B, N, C) tokens in :func:`to_unit_order`, for any unit size.

    The steps of ``MaskUnitAttention.forward``, with the number of units given instead of derived from the
    attention's fixed unit size; global attention runs as is.
    """
    if not attn.use_mask_unit_attn:
        return attn(x)
    if attn.q_stride > 1:
        raise ValueError("q-pooling attention runs on the full grid in Hiera's own order")
    B = x.shape[0]
    qkv = attn.qkv(x).reshape(B, -1, num_units, 3, attn.heads, attn.head_dim).permute(3, 0, 4, 2, 1, 5)
    q, k, v = qkv.unbind(0)  # (B, heads, units, tokens per unit, head_dim)
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v)
    else:
        x = ((q * attn.scale) @ k.transpose(-1, -2)).softmax(dim=-1) @ v
    return attn.proj(x.transpose(1, 3).reshape(B, -1, attn.dim_out))


def hiera_block_forward(block: HieraBlock, x: torch.Tensor, num_units: int) -> torch.Tensor:
    """A Hiera block without q-pooling on tokens in :func:`to_unit_order` (the steps of ``HieraBlock.forward``)."""
    x_norm = block.norm1(x)
    if block.do_expand:  # a stage change without pooling: the max (and mean) over one token is the token
        x = block.proj(x_norm) if block.proj is not None else torch.cat([x, x], dim=-1)
    x = x + block.drop_path1(block.ls1(mask_unit_attention(block.attn, x_norm, num_units)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@dataclass(frozen=True)
class _HieraReduced:
    """A reduction in force on Hiera: the recover, the reduced grid and unit ((0, 0): raster order)."""

    recover: Recover
    grid: tuple[int, int]
    unit: tuple[int, int]

    @property
    def num_units(self) -> int:
        return (self.grid[0] // self.unit[0]) * (self.grid[1] // self.unit[1]) if any(self.unit) else 1


def _hiera_reduce(
    model: Hiera,
    x: torch.Tensor,
    index: int,
    reduction: CubistStage,
    reduced: _HieraReduced | None,
    options: CubistOptions,
) -> tuple[torch.Tensor, _HieraReduced | None]:
    if reduced is None:
        # a block that does not pool leaves the order as it is: its input is laid out as its output
        grid, unit = model.reroll(x, index), hiera_unit(model, index)
    else:
        grid, unit = from_unit_order(x, reduced.grid, reduced.unit), reduced.unit
    r_h, r_w = reduction.resolve(unit if any(unit) else tuple(grid.shape[1:3]))
    if r_h == 0 and r_w == 0:
        return x, reduced
    merged, recover, unit = _cubist_merge(grid, unit, r_h, r_w, options)
    chained = recover if reduced is None else reduced.recover.then(recover)
    return to_unit_order(merged, unit), _HieraReduced(chained, tuple(merged.shape[1:3]), unit)


def _hiera_grid(model: Hiera, x: torch.Tensor, reduced: _HieraReduced | None, index: int) -> torch.Tensor:
    """The full (B, H, W, C) grid of the output of block ``index``."""
    if reduced is None:
        return model.reroll(x, index)
    return reduced.recover(from_unit_order(x, reduced.grid, reduced.unit))


def _hiera_unrolled(model: Hiera, x: torch.Tensor, reduced: _HieraReduced | None, index: int) -> torch.Tensor:
    """The output of block ``index`` recovered and in Hiera's own order, as the block would have left it."""
    if reduced is None:
        return x
    schedule, size = model.reroll.schedule[index]
    grid = _hiera_grid(model, x, reduced, index)
    return Unroll(size, [1] * len(size), schedule)(grid.reshape(grid.shape[0], -1, grid.shape[-1]))


class _MergingHiera:
    def _merged_blocks(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        take_indices: set[int] | None = None,
        last_block: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedding, unroll and blocks with the scheduled merging; the final tokens (recovered into Hiera's order
        if ``recover_output``) and the (B, H, W, C) outputs of the blocks in ``take_indices``, recovered."""
        if mask is not None:
            raise ValueError(
                "a patched Hiera takes no MAE mask: masked-out mask units leave no grid to merge; unpatch it first"
            )
        if self.training and self.patch_drop_rate > 0:
            raise RuntimeError(
                "CubistMerge needs every patch, but this Hiera drops mask units in training (patch_drop_rate > 0); "
                "run in eval mode or build the model with patch_drop_rate=0"
            )
        cubist: CubistOptions = options_of(self).method
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        x = self.unroll(self._pos_embed(self.patch_embed(x)))
        reduced: _HieraReduced | None = None
        intermediates = []
        index = -1
        for i, block in enumerate(self.blocks):
            if last_block is not None and i > last_block:
                break
            if _pools(block):
                x, reduced = _hiera_unrolled(self, x, reduced, i - 1), None
            else:
                reduction = cubist.stage_at(i)
                if reduction is not None:
                    x, reduced = _hiera_reduce(self, x, i, reduction, reduced, cubist)
            if reduced is not None and block.attn.use_mask_unit_attn:
                step, args = hiera_block_forward, (block, x, reduced.num_units)
            else:
                step, args = block, (x,)
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
            else:
                x = step(*args)
            index = i
            if take_indices is not None and i in take_indices:
                intermediates.append(_hiera_grid(self, x, reduced, i))
        if cubist.trace_source:
            grid = _hiera_grid(self, x, reduced, index)
            store_grid_source(self, None if reduced is None else reduced.recover, grid)
        if cubist.recover_output:
            x = _hiera_unrolled(self, x, reduced, index)
        return x, intermediates

    def forward_features(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        take = set(self.stage_ends) if return_intermediates else None
        x, intermediates = self._merged_blocks(x, mask, take)
        return (x, intermediates) if return_intermediates else x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = True,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        coarse: bool = True,
    ):
        take, last = _intermediate_blocks(self, "Hiera", indices, norm, output_fmt, coarse)
        x, intermediates = self._merged_blocks(x, mask, take, last if stop_early else None)
        return _intermediates_output(x, intermediates, output_fmt, intermediates_only)
