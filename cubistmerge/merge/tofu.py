"""ToFu baseline: pruning early, norm-preserving merging late (Kim et al., WACV 2024).

"Token Fusion: Bridging the Gap between Token Pruning and Token Merging". The
authors released no code; the implementation users run is OpenToMe's
(``opentome/timm/tofu.py`` on ``opentome/tome/tome.py``; the PiToMe authors'
``algo/tofu`` is the same). It is ToMe's bipartite matching (the authors'
token bookkeeping, :func:`cubistmerge.merge.tome.match_bipartite` with
``order="official"``) with two ways of reducing a matched group:

- ``"prune"`` in the first half of the blocks (block i of L while
  ``i <= L // 2``), where the paper finds the model too non-linear for
  averaging: the destination (set-B) token is kept as it is and its sources
  are dropped.
- ``"mlerp"`` in the later blocks: MLERP, the group's plain (unweighted)
  mean rescaled so that its norm is the largest norm among the members, which
  keeps the feature-norm distribution that averaging shrinks.

No sizes are tracked, so there is no proportional attention (OpenToMe passes
``prop_attn`` but its ToFu blocks never update the sizes).

MLERP's denominator: the paper divides the mean by its own norm. OpenToMe
divides it by the norm the destination token had before merging
(``dst / dst_norm * n`` with ``dst`` already the mean). ``mlerp_norm="mean"``
(default) is the paper's formula; ``mlerp_norm="destination"`` reproduces
OpenToMe's for comparison.
"""

from __future__ import annotations

from typing import Literal

import torch

from .groups import merge_groups, score_dtype
from .tome import BipartiteMatch

TofuMode = Literal["prune", "mlerp"]
TOFU_MODES: tuple[str, ...] = ("prune", "mlerp")
MlerpNorm = Literal["mean", "destination"]
MLERP_NORMS: tuple[str, ...] = ("mean", "destination")

_NORM_EPS = 1e-12


def tofu_modes(num_blocks: int) -> list[str]:
    """The reduction of every block: ``"prune"`` while ``i <= L // 2``, then ``"mlerp"`` (OpenToMe's layout)."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    return ["mlerp" if i > num_blocks // 2 else "prune" for i in range(num_blocks)]


def mlerp(members: torch.Tensor, *, norm: MlerpNorm = "mean") -> torch.Tensor:
    """MLERP of one group of tokens, (n, C) -> (C,): the mean, rescaled to the largest member norm.

    ``members[0]`` is the destination (used by ``norm="destination"``). For
    checking and for readers; :func:`merge_tofu` does every group at once.
    """
    mean = members.mean(dim=0)
    largest = torch.linalg.vector_norm(members, dim=-1).max()
    below = mean if norm == "mean" else members[0]
    return mean / torch.linalg.vector_norm(below).clamp_min(_NORM_EPS) * largest


def merge_tofu(
    x: torch.Tensor, match: BipartiteMatch, mode: TofuMode, *, mlerp_norm: MlerpNorm = "mean"
) -> torch.Tensor:
    """Reduce the tokens of a bipartite match as ToFu does.

    Args:
        x: (B, N, C) tokens.
        match: from :func:`cubistmerge.merge.tome.match_bipartite` on the same tokens.
        mode: ``"prune"`` (every output slot holds its surviving token as it
            was) or ``"mlerp"`` (groups that received sources hold MLERP of
            their members; the others their token as it was).
        mlerp_norm: ``"mean"`` (the paper) or ``"destination"`` (OpenToMe).

    Returns:
        (B, N - r, C), a new tensor in the match's output order; gradients
        reach every member of a MLERP group, and only the kept token when pruning.
    """
    if mode not in TOFU_MODES:
        raise ValueError(f"mode must be one of {TOFU_MODES}, got {mode!r}")
    if mlerp_norm not in MLERP_NORMS:
        raise ValueError(f"mlerp_norm must be one of {MLERP_NORMS}, got {mlerp_norm!r}")
    if x.dim() != 3 or match.index.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, N, C) with (B, N) = {tuple(match.index.shape)}, got {tuple(x.shape)}")
    B, N, C = x.shape
    survivors = match.survivors
    kept = x.gather(1, survivors.unsqueeze(-1).expand(B, survivors.shape[1], C))
    if mode == "prune" or match.sources.shape[1] == 0:
        return kept
    num_out = survivors.shape[1]
    mean, count = merge_groups(x, match.index, num_out, "mean")
    norms = torch.linalg.vector_norm(x.to(score_dtype(x.dtype)), dim=-1)  # (B, N)
    largest = norms.new_full((B, num_out), float("-inf")).scatter_reduce(1, match.index, norms, "amax")
    below = mean if mlerp_norm == "mean" else kept
    scale = largest / torch.linalg.vector_norm(below.to(norms.dtype), dim=-1).clamp_min(_NORM_EPS)
    merged = mean * scale.to(x.dtype).unsqueeze(-1)
    # Tokens that received nothing are passed through exactly, not divided and multiplied by their norm.
    return torch.where((count > 1).unsqueeze(-1), merged, kept)
