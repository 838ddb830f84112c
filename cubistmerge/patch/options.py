"""Validated settings of each merging method (fixed at patch time)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..merge.cubist import METRICS
from ..merge.groups import REPRESENTATIONS
from ..merge.tome import RSchedule, tome_schedule

# A per-stage reduction amount: an int number of tokens, or a fraction of the
# grid side that is current when the stage runs.
Amount = int | float


@dataclass(frozen=True)
class CubistStage:
    loc: int  # the reduction runs on the input of this block
    r_h: Amount
    r_w: Amount

    def resolve(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(r_h, r_w) in tokens for a grid of (H, W)."""
        return _tokens(self.r_h, grid[0]), _tokens(self.r_w, grid[1])


def _tokens(amount: Amount, side: int) -> int:
    # round() rounds half to even; the paper's r = 0.1 example means "nearest".
    return amount if isinstance(amount, int) else int(math.floor(amount * side + 0.5))


def _check_amount(name: str, value: object) -> Amount:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an int number of tokens or a float fraction in [0, 0.5], got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0 tokens, got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 0.5:
        raise ValueError(f"{name} as a fraction of the grid side must be in [0, 0.5], got {value}")
    return value


def _split_r(r: object) -> tuple[Amount, Amount]:
    if isinstance(r, tuple | list):
        if len(r) != 2:
            raise ValueError(f"r must be an int, a float fraction, or (r_h, r_w); got {r!r}")
        return _check_amount("r_h", r[0]), _check_amount("r_w", r[1])
    amount = _check_amount("r", r)
    return amount, amount


@dataclass(frozen=True)
class CubistOptions:
    stages: tuple[CubistStage, ...]
    representation: str = "maxmag"
    metric: str = "cosine"
    recover_output: bool = True
    trace_source: bool = False

    method = "cubist"

    @classmethod
    def build(
        cls,
        *,
        num_blocks: int,
        r: object = None,
        loc: int | None = None,
        stages: object = None,
        representation: str = "maxmag",
        metric: str = "cosine",
        recover_output: bool = True,
        trace_source: bool = False,
    ) -> CubistOptions:
        if stages is not None and (r is not None or loc is not None):
            raise ValueError("give either stages=[(loc, r_h, r_w), ...] or r= and loc=, not both")
        if stages is None:
            r_h, r_w = _split_r(1 if r is None else r)
            parsed = (CubistStage(1 if loc is None else loc, r_h, r_w),)
        else:
            if not isinstance(stages, list | tuple) or not stages:
                raise ValueError(f"stages must be a non-empty list of (loc, r_h, r_w) or (loc, r), got {stages!r}")
            parsed_list = []
            for stage in stages:
                if not isinstance(stage, tuple | list) or len(stage) not in (2, 3):
                    raise ValueError(f"every stage must be (loc, r_h, r_w) or (loc, r), got {stage!r}")
                r_h, r_w = _split_r(stage[1] if len(stage) == 2 else tuple(stage[1:]))
                parsed_list.append(CubistStage(stage[0], r_h, r_w))
            parsed = tuple(parsed_list)
        previous = -1
        for stage in parsed:
            if isinstance(stage.loc, bool) or not isinstance(stage.loc, int) or not 0 <= stage.loc < num_blocks:
                raise ValueError(f"loc must be a block index in [0, {num_blocks - 1}], got {stage.loc!r}")
            if stage.loc <= previous:
                raise ValueError(f"stage locations must be strictly increasing, got {[s.loc for s in parsed]}")
            previous = stage.loc
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return cls(parsed, representation, metric, bool(recover_output), bool(trace_source))

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise if the stages cannot run on a patch grid of ``grid`` (H, W)."""
        H, W = grid
        for stage in self.stages:
            r_h, r_w = stage.resolve((H, W))
            if r_h > H // 2 or r_w > W // 2:
                raise ValueError(
                    f"the reduction at block {stage.loc} asks for r_h={r_h}, r_w={r_w} on a {H}x{W} grid; "
                    f"one reduction removes at most {H // 2} per column and {W // 2} per row"
                )
            H, W = H - r_h, W - r_w

    def stage_at(self, block: int) -> CubistStage | None:
        for stage in self.stages:
            if stage.loc == block:
                return stage
        return None


@dataclass(frozen=True)
class ToMeOptions:
    r_schedule: tuple[int, ...]
    prop_attn: bool = True
    recover_output: bool = True
    trace_source: bool = False

    method = "tome"

    @classmethod
    def build(
        cls,
        *,
        num_blocks: int,
        r: RSchedule = 8,
        prop_attn: bool = True,
        recover_output: bool = True,
        trace_source: bool = False,
    ) -> ToMeOptions:
        return cls(tuple(tome_schedule(r, num_blocks)), bool(prop_attn), bool(recover_output), bool(trace_source))
