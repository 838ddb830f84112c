"""Validated settings of each merging method (fixed at patch time)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..merge.cubist import METRICS
from ..merge.expedite import (
    DEFAULT_ITERATIONS,
    DEFAULT_K,
    DEFAULT_NEIGHBOURHOOD,
    DEFAULT_TEMPERATURE,
    NORMALISATIONS,
    Normalise,
)
from ..merge.groups import REPRESENTATIONS
from ..merge.pitome import DEFAULT_ALPHA, DEFAULT_RATIO, MIN_RATIO, pitome_bsm_blocks, pitome_margins
from ..merge.tofu import MLERP_NORMS, tofu_modes
from ..merge.tome import TOKEN_ORDERS, RSchedule, tome_schedule

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


def _check_cluster_amount(name: str, value: object) -> Amount:
    """Expedite's amounts: clustering can shrink a side to one token, so fractions go up to (not including) 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an int number of tokens or a float fraction in [0, 1), got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0 tokens, got {value}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} as a fraction of the grid side must be in [0, 1), got {value}")
    return value


def _split_r(r: object, check=_check_amount) -> tuple[Amount, Amount]:
    if isinstance(r, tuple | list):
        if len(r) != 2:
            raise ValueError(f"r must be an int, a float fraction, or (r_h, r_w); got {r!r}")
        return check("r_h", r[0]), check("r_w", r[1])
    amount = check("r", r)
    return amount, amount


def _check_loc(loc: object, num_blocks: int) -> None:
    if isinstance(loc, bool) or not isinstance(loc, int) or not 0 <= loc < num_blocks:
        raise ValueError(f"loc must be a block index in [0, {num_blocks - 1}], got {loc!r}")


@dataclass(frozen=True)
class CubistOptions:
    stages: tuple[CubistStage, ...]
    representation: str = "maxmag"
    metric: str = "cosine"
    recover_output: bool = True
    trace_source: bool = False
    # log(size) of every key added to the attention logits once tokens stand for several patches (ToMe's
    # proportional attention); timm ViTs only for now, off by default until measured per family.
    prop_attn: bool = False

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
        prop_attn: bool = False,
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
            _check_loc(stage.loc, num_blocks)
            if stage.loc <= previous:
                raise ValueError(f"stage locations must be strictly increasing, got {[s.loc for s in parsed]}")
            previous = stage.loc
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(prop_attn, bool):
            raise ValueError(f"prop_attn must be True or False, got {prop_attn!r}")
        return cls(parsed, representation, metric, bool(recover_output), bool(trace_source), prop_attn)

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
    """ToMe's settings. ``order``: ``"official"`` (the authors' token bookkeeping, default) or
    ``"spatial"`` (survivors keep their order); see :mod:`cubistmerge.merge.tome`."""

    r_schedule: tuple[int, ...]
    prop_attn: bool = True
    recover_output: bool = True
    trace_source: bool = False
    order: str = "official"

    method = "tome"

    @classmethod
    def build(
        cls,
        *,
        num_blocks: int,
        r: RSchedule = 8,
        prop_attn: bool = True,
        order: str = "official",
        recover_output: bool = True,
        trace_source: bool = False,
    ) -> ToMeOptions:
        if order not in TOKEN_ORDERS:
            raise ValueError(f"order must be one of {TOKEN_ORDERS}, got {order!r}")
        schedule = tuple(tome_schedule(r, num_blocks))
        return cls(schedule, bool(prop_attn), bool(recover_output), bool(trace_source), order)


@dataclass(frozen=True)
class PiToMeOptions:
    """PiToMe's settings (see :mod:`cubistmerge.merge.pitome`): a keep ``ratio`` per block, the
    authors' per-block energy margins and their layout of "bsm" and "pitome" blocks."""

    ratio: float
    margins: tuple[float, ...]
    bsm_blocks: tuple[bool, ...]
    alpha: float = DEFAULT_ALPHA
    recover_output: bool = True
    trace_source: bool = False

    method = "pitome"
    prop_attn = False  # the authors' blocks do not pass the sizes to attention

    @classmethod
    def build(
        cls,
        *,
        num_blocks: int,
        ratio: float = DEFAULT_RATIO,
        alpha: float = DEFAULT_ALPHA,
        recover_output: bool = True,
        trace_source: bool = False,
    ) -> PiToMeOptions:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not MIN_RATIO <= ratio <= 1.0:
            raise ValueError(
                f"ratio is the fraction of tokens every block keeps, in [{MIN_RATIO}, 1] (1: no merging); got {ratio!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        margins, bsm = tuple(pitome_margins(num_blocks)), tuple(pitome_bsm_blocks(num_blocks))
        return cls(float(ratio), margins, bsm, float(alpha), bool(recover_output), bool(trace_source))


@dataclass(frozen=True)
class ToFuOptions:
    """ToFu's settings (see :mod:`cubistmerge.merge.tofu`): ToMe's r schedule and matching, pruning
    in the blocks before ``mlerp_from`` and MLERP merging from there on."""

    r_schedule: tuple[int, ...]
    modes: tuple[str, ...]
    mlerp_norm: str = "mean"
    recover_output: bool = True
    trace_source: bool = False

    method = "tofu"
    prop_attn = False  # no sizes are tracked
    order = "official"

    @classmethod
    def build(
        cls,
        *,
        num_blocks: int,
        r: RSchedule = 8,
        mlerp_from: int | None = None,
        mlerp_norm: str = "mean",
        recover_output: bool = True,
        trace_source: bool = False,
    ) -> ToFuOptions:
        if mlerp_from is None:
            modes = tuple(tofu_modes(num_blocks))
        else:
            if isinstance(mlerp_from, bool) or not isinstance(mlerp_from, int) or not 0 <= mlerp_from <= num_blocks:
                raise ValueError(f"mlerp_from must be a block index in [0, {num_blocks}], got {mlerp_from!r}")
            modes = tuple("mlerp" if i >= mlerp_from else "prune" for i in range(num_blocks))
        if mlerp_norm not in MLERP_NORMS:
            raise ValueError(f"mlerp_norm must be one of {MLERP_NORMS}, got {mlerp_norm!r}")
        schedule = tuple(tome_schedule(r, num_blocks))
        return cls(schedule, modes, mlerp_norm, bool(recover_output), bool(trace_source))


@dataclass(frozen=True)
class ExpediteOptions:
    """Expedite (the dense-model baseline): cluster the grid once, reconstruct it at the end.

    The amount uses CubistMerge's knob, so the methods compare at equal token
    counts: ``r_h`` / ``r_w`` tokens fewer per column / row, i.e. the grid
    (H, W) is clustered to (H - r_h, W - r_w) (on SAM encoders: every window
    (wh, ww) to (wh - r_h, ww - r_w)). A float is a fraction of the side,
    ``round(f * side)``. Unlike CubistMerge there is no limit of half a side:
    anything leaving at least one token per side works. The other settings are
    those of :func:`cubistmerge.merge.expedite.expedite_cluster`.

    There is no ``trace_source``: Expedite's reconstruction is a weighted sum
    over several clustered tokens, not a token-to-token map.
    """

    loc: int  # clustering runs on the input of this block
    r_h: Amount
    r_w: Amount
    neighbourhood: int = DEFAULT_NEIGHBOURHOOD
    iterations: int = DEFAULT_ITERATIONS
    temperature: float = DEFAULT_TEMPERATURE
    k: int = DEFAULT_K
    normalise: Normalise = "sum"
    recover_output: bool = True

    method = "expedite"
    trace_source = False  # not a dataclass field: never available for Expedite

    @classmethod
    def build(
        cls,
        *,
        num_blocks: int,
        r: object = 1,
        loc: int = 1,
        neighbourhood: int = DEFAULT_NEIGHBOURHOOD,
        iterations: int = DEFAULT_ITERATIONS,
        temperature: float = DEFAULT_TEMPERATURE,
        k: int = DEFAULT_K,
        normalise: str = "sum",
        recover_output: bool = True,
    ) -> ExpediteOptions:
        r_h, r_w = _split_r(r, _check_cluster_amount)
        _check_loc(loc, num_blocks)
        for name, value, minimum in (("neighbourhood", neighbourhood, 1), ("iterations", iterations, 0), ("k", k, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if neighbourhood % 2 == 0:
            raise ValueError(
                f"neighbourhood must be odd (a square of cells centred on a token's cell), got {neighbourhood}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        return cls(loc, r_h, r_w, neighbourhood, iterations, float(temperature), k, normalise, bool(recover_output))

    def resolve(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(r_h, r_w) in tokens for a grid (or window) of (H, W)."""
        return _tokens(self.r_h, grid[0]), _tokens(self.r_w, grid[1])

    def clustered(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) a grid (or window) of ``grid`` is clustered to; raises if a side would vanish."""
        H, W = grid
        r_h, r_w = self.resolve(grid)
        if r_h >= H or r_w >= W:
            raise ValueError(
                f"Expedite at block {self.loc} asks for r_h={r_h}, r_w={r_w} on a {H}x{W} grid; "
                f"at least one token per side must remain: at most {H - 1} per column and {W - 1} per row"
            )
        return H - r_h, W - r_w

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise if the clustering cannot run on a grid (or window) of ``grid`` (H, W)."""
        self.clustered(grid)
