"""What timm's samvit and the official segment-anything encoder share.

Both keep tokens as an NHWC grid, run window attention (zero-padded windows,
decomposed relative positions interpolated to the runtime window/grid size) in
most blocks and global attention in a few, and need the full grid for the conv
neck. CubistMerge reduces the grid before block ``loc`` in one of two ways
(``windows`` option):

- ``"window"``: inside every attention window (e.g. 14x14 -> 12x12); windowed
  blocks then use the reduced window size, so every window keeps exactly its
  tokens, and the relative-position tables are interpolated to the new size by
  the attention itself. ``r`` counts tokens per window row / column.
- ``"grid"``: the whole grid (e.g. 64x64 -> 56x56); blocks keep their window
  size and windows are formed anew on the smaller grid. ``r`` counts tokens per
  grid row / column.

Global-attention blocks see the reduced grid either way. Before the neck the
grid is recovered to its full size, so the neck and everything after it (SAM's
prompt encoder and mask decoder) run unchanged.

Expedite (the baseline) clusters before block ``loc`` the way Expedite runs
SAM: inside every attention window (each window (wh, ww) to (wh - r, ww - r)
cluster centres, edge windows in proportion; see
:func:`cubistmerge.merge.expedite.expedite_cluster_windows`), so windowed blocks
then run with the smaller window exactly as in CubistMerge's ``"window"`` mode,
and global blocks see the clustered grid. Before the neck every token is
reconstructed from its window's clustered tokens. An encoder without windowed
blocks is clustered as one grid.

ToMe (the baseline) cannot feed window attention, relative positions or the
neck with its unordered tokens, so here it merges only around the token-wise
part: in every block, inside every window-sized tile, ``r`` tokens are merged
by bipartite soft matching on ToMe's metric (the keys of the block's own
attention, averaged over heads), the MLP runs on the rest, and its output is
unmerged before the residual ("unmerge before every spatial operation").
Attention always sees the full grid, so ToMe's speed-up here is bounded by the
MLP's share of the FLOPs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from ..merge.cubist import Recover, cubist_merge
from ..merge.expedite import Reconstruct, WindowReconstruct, expedite_cluster, expedite_cluster_windows
from ..merge.windows import cubist_merge_windows, merge_apply_unmerge_in_windows
from .options import CubistOptions, ExpediteOptions, ToMeOptions

# (normed grid (B, H, W, C), the block's MLP) -> MLP output grid (B, H, W, C)
TokenFunction = Callable[[torch.Tensor, nn.Module], torch.Tensor]

WINDOW_MODES = ("window", "grid")
DEFAULT_WINDOW_MODE = "window"

# What maps the current grid back to the full one (CubistMerge's copy, Expedite's weighted sum).
GridRecover = Recover | Reconstruct | WindowReconstruct


@dataclass(frozen=True)
class SamMergeOptions:
    """The method's settings plus how windows are treated (CubistMerge only)."""

    method: CubistOptions | ToMeOptions | ExpediteOptions
    windows: str = DEFAULT_WINDOW_MODE

    @property
    def cubist(self) -> CubistOptions:
        return self.method

    @property
    def recover_output(self) -> bool:
        return self.method.recover_output


@dataclass(frozen=True)
class SamBlockRunner:
    """How one implementation runs a block with a given window size (and optionally its MLP replaced)."""

    window_size_of: Callable[[nn.Module], int]
    forward_with_window: Callable[..., torch.Tensor]  # (block, x, window_size, mlp=None) -> x
    # (attention module, output of its qkv Linear) -> (B', N, head_dim) keys averaged over heads, where B' counts
    # the attention's batch (windows) and N its tokens; what ToMe matches on
    keys_from_qkv: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    # True where a block's own forward already checkpoints itself when asked (transformers' layers): run_blocks then
    # checkpoints only the steps it runs in the block's place (a reduced window, ToMe around the MLP)
    checkpoints_itself: bool = False


@contextlib.contextmanager
def captured_keys(attn: nn.Module, keys_from_qkv) -> Iterator[list[torch.Tensor]]:
    """Collect the keys (averaged over heads) every call of ``attn`` computes, from its ``qkv`` Linear."""
    keys: list[torch.Tensor] = []
    handle = attn.qkv.register_forward_hook(lambda _module, _inputs, out: keys.append(keys_from_qkv(attn, out)))
    try:
        yield keys
    finally:
        handle.remove()


def keys_on_grid(keys: torch.Tensor, window: int, grid: tuple[int, int]) -> torch.Tensor:
    """Per-window keys (B * nH * nW, window**2, d) of zero-padded windows, or (B, H*W, d) -> (B, H, W, d).

    Windows tile the padded grid row-major from the top-left, as SAM's and TinyViT's window partitions do;
    padding is cut off.
    """
    H, W = grid
    d = keys.shape[-1]
    if window <= 0:
        return keys.reshape(-1, H, W, d)
    n_h, n_w = -(-H // window), -(-W // window)
    batch = keys.shape[0] // (n_h * n_w)
    padded = keys.reshape(batch, n_h, n_w, window, window, d).permute(0, 1, 3, 2, 4, 5)
    return padded.reshape(batch, n_h * window, n_w * window, d)[:, :H, :W]


def tome_mlp(keys: list[torch.Tensor], window: int, tile: int, r: int) -> TokenFunction:
    """The MLP of a ToMe block around which tokens are merged: matching on this block's attention keys.

    ``keys`` is filled by :func:`captured_keys` during the block's attention (which runs before its MLP);
    ``window`` is the window that attention used (0: global), ``tile`` the matching tile.
    """

    def merged_mlp(normed: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        metric = keys_on_grid(keys[-1], window, tuple(normed.shape[1:3]))
        return merge_apply_unmerge_in_windows(normed, tile, r, mlp, metric=metric)

    return merged_mlp


def window_size_of_model(blocks: nn.Module, runner: SamBlockRunner) -> int:
    sizes = {runner.window_size_of(block) for block in blocks} - {0}
    if len(sizes) > 1:
        raise ValueError(f"windowed blocks with different window sizes {sorted(sizes)} are not supported")
    return sizes.pop() if sizes else 0


def check_sam_options(options: SamMergeOptions, grid: tuple[int, int], window: int) -> None:
    """Raise early if a reduction cannot run on the model's default grid / windows."""
    if options.windows not in WINDOW_MODES:
        raise ValueError(f"windows must be one of {WINDOW_MODES}, got {options.windows!r}")
    if isinstance(options.method, ToMeOptions):
        tile = window or max(grid)
        limit = tile * tile // 2
        if max(options.method.r_schedule) > limit:
            raise ValueError(
                f"ToMe on this SAM encoder merges r tokens inside every {tile}x{tile} window: r must be at most "
                f"{limit}, got {max(options.method.r_schedule)}"
            )
        if options.method.trace_source:
            raise ValueError("trace_source is not available for ToMe on SAM encoders (tokens are unmerged per block)")
        return
    if isinstance(options.method, ExpediteOptions):
        if window:
            h, w = options.method.clustered((window, window))
            if h != w:
                raise ValueError(f"SAM windows are square: use r_h == r_w inside windows (clustering to {h}x{w})")
        else:
            options.method.check_grid(grid)
        return
    if options.windows == "grid" or window == 0:
        options.cubist.check_grid(grid)
        return
    options.cubist.check_grid((window, window))


@dataclass(frozen=True)
class _SamState:
    grid: tuple[int, int]
    window: int  # window size windowed blocks use now
    recover: GridRecover | None = None


def _reduce(x: torch.Tensor, state: _SamState, r_h: int, r_w: int, options: SamMergeOptions) -> tuple:
    cubist = options.cubist
    with torch.profiler.record_function("cubistmerge::cubist_merge"):
        if options.windows == "window" and state.window > 0:
            merged, recover, (wh, ww) = cubist_merge_windows(
                x, state.window, r_h, r_w, representation=cubist.representation, metric=cubist.metric
            )
            if wh != ww:
                raise ValueError(f"SAM windows are square: use r_h == r_w inside windows (got {r_h}, {r_w})")
            window = wh
        else:
            merged, recover = cubist_merge(x, r_h, r_w, representation=cubist.representation, metric=cubist.metric)
            window = state.window
        chained = recover if state.recover is None else state.recover.then(recover)
    return merged, _SamState(recover.merged_grid, window, chained)


def _cluster(x: torch.Tensor, state: _SamState, options: ExpediteOptions) -> tuple[torch.Tensor, _SamState]:
    """Expedite's clustering of the (B, H, W, C) grid: per window if the encoder has windowed blocks."""
    settings = dict(
        neighbourhood=options.neighbourhood,
        iterations=options.iterations,
        temperature=options.temperature,
        k=options.k,
        normalise=options.normalise,
    )
    with torch.profiler.record_function("cubistmerge::expedite_cluster"):
        if state.window > 0:
            out_window = options.clustered((state.window, state.window))
            if out_window[0] != out_window[1]:
                raise ValueError(f"SAM windows are square: use r_h == r_w inside windows (clustering to {out_window})")
            if out_window[0] == state.window:
                return x, state
            merged, reconstruct, (window, _) = expedite_cluster_windows(x, state.window, out_window, **settings)
        else:
            out_hw = options.clustered(state.grid)
            if out_hw == state.grid:
                return x, state
            merged, reconstruct = expedite_cluster(x, out_hw, **settings)
            window = 0
    return merged, _SamState(reconstruct.merged_grid, window, reconstruct)


def run_blocks(
    blocks: nn.Module,
    x: torch.Tensor,
    options: SamMergeOptions,
    runner: SamBlockRunner,
    *,
    take_indices: set[int] | None = None,
    last_block: int | None = None,
    checkpointing: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], GridRecover | None]:
    """Run the blocks on an NHWC grid with the scheduled reductions.

    Returns the final grid (merged, not recovered), the outputs of the blocks in
    ``take_indices`` recovered to the full grid, and the recover (CubistMerge) or
    reconstruction (Expedite) of the final grid, None if it was never reduced.
    """
    state = _SamState(tuple(x.shape[1:3]), window_size_of_model(blocks, runner))
    original_window = state.window
    intermediates = []
    for i, block in enumerate(blocks):
        if last_block is not None and i > last_block:
            break
        if isinstance(options.method, ToMeOptions):
            x = _tome_block(block, x, options.method.r_schedule[i], original_window, runner, checkpointing)
            if take_indices is not None and i in take_indices:
                intermediates.append(x)
            continue
        if isinstance(options.method, ExpediteOptions):
            if i == options.method.loc:
                x, state = _cluster(x, state, options.method)
            stage = None
        else:
            stage = options.cubist.stage_at(i)
        if stage is not None:
            reference = (state.window, state.window) if options.windows == "window" and state.window else state.grid
            r_h, r_w = stage.resolve(reference)
            if r_h or r_w:
                x, state = _reduce(x, state, r_h, r_w, options)
        block_window = runner.window_size_of(block)
        if block_window == 0 or state.window == original_window:
            step = block  # the block's own forward, untouched
            args: tuple = (x,)
        else:
            step = runner.forward_with_window
            args = (block, x, state.window)
        if checkpointing and not (step is block and runner.checkpoints_itself):
            x = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        else:
            x = step(*args)
        if take_indices is not None and i in take_indices:
            intermediates.append(recover_grid(x, state.recover))
    return x, intermediates, state.recover


def _tome_block(
    block: nn.Module, x: torch.Tensor, r: int, window: int, runner: SamBlockRunner, checkpointing: bool
) -> torch.Tensor:
    if r == 0:
        step, args = block, (x,)
    else:
        tile = window or max(x.shape[1:3])
        step, args = partial(_tome_step, runner=runner, r=r, tile=tile), (block, x)
    if checkpointing and not (step is block and runner.checkpoints_itself):
        return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
    return step(*args)


def _tome_step(block: nn.Module, x: torch.Tensor, *, runner: SamBlockRunner, r: int, tile: int) -> torch.Tensor:
    """One block with ToMe around its MLP, matching on the keys of the block's own attention."""
    block_window = runner.window_size_of(block)
    with captured_keys(block.attn, runner.keys_from_qkv) as keys:
        return runner.forward_with_window(block, x, block_window, mlp=tome_mlp(keys, block_window, tile, r))


def recover_grid(x: torch.Tensor, recover: GridRecover | None) -> torch.Tensor:
    if recover is None:
        return x
    if isinstance(recover, Recover):
        return recover(x)
    with torch.profiler.record_function("cubistmerge::expedite_reconstruct"):
        return recover(x)
