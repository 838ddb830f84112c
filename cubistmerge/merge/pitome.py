"""PiToMe baseline: energy-ordered token merging (Tran et al., NeurIPS 2024).

"Accelerating Transformers with Spectrum-Preserving Token Merging". This
follows what the authors' released code (hchautran/PiToMe,
``algo/pitome/merge.py``: ``pitome_vision``, ``pitome``, ``pitome_bsm``,
``merge_wavg``; ``algo/pitome/patch/timm.py`` and ``patch/deit.py``) computes
for timm ViT / DeiT image classification, token order included, because the
paper's numbers come from that code:

- Every block merges once, between the attention residual and the MLP, on the
  attention keys averaged over heads (the caller supplies that ``metric``).
- The class token takes no part: the energy, the sets and the matching see the
  patch tokens only, and the class token stays first.
- Energy: with m the L2-normalised metric of the T patch tokens and
  sim = m m^T (T x T, diagonal included), the energy of token i is the row
  mean of ELU(sim[i] - margin, alpha). The tokens are sorted by energy, highest
  first. ``margin`` falls linearly over the blocks (:func:`pitome_margins`).
- Amount: a keep ``ratio`` per block; ``r = floor(T - T * ratio)`` tokens go
  (:func:`pitome_r`).
- The first ceil(L / 2) blocks (:func:`pitome_bsm_blocks`) run the "bsm"
  variant (``pitome_bsm``): the energy-sorted tokens alternate into A (sorted
  places 0, 2, 4, ...) and B (1, 3, 5, ...); every A token finds its most
  similar B token (on sim) and the r A tokens with the highest such score merge
  into it. Output: [class, kept A in descending order of their best score,
  B in energy order].
- The other blocks run the "pitome" variant (``pitome``): only the 2r
  highest-energy tokens may merge; among them A and B alternate as above and
  *every* A token merges into its most similar B token. Output: [class, the
  other T - 2r tokens in energy order, B in energy order].
- Merged tokens are the size-weighted mean of their members, and sizes are
  tracked (``merge_wavg``). The authors' timm block does not pass the sizes to
  attention, so there is no proportional attention.

The authors' MAE patch (``patch/mae.py``) puts the variants the other way
round (pitome in the first ceil(L / 2) blocks, bsm after); the caller chooses
per block here, with :func:`pitome_bsm_blocks` giving the DeiT / timm layout.

Where this module differs, on purpose:

- Protected tokens generalise the class token: the first ``num_protected``
  tokens (class, distillation, registers) take no part in the energy or the
  matching and stay first, in their order. ``num_protected=1`` is the
  authors' code for a model with a class token, ``0`` for one without. The
  authors' code knows only a class token: a distillation token is scored and
  merged as a patch token there (and after the first merge the DeiT
  distillation head reads whatever token landed in slot 1); the paper's DeiT
  models have no distillation token, so its numbers do not depend on this.
- Sorts are stable (the authors' ``argsort`` is not) and a best match goes
  to the first B token in energy order, so ties, which do not occur for
  continuous inputs, may be broken differently.
- ``r = 0`` returns the tokens as they are. In the authors' code a keep
  ratio below 1 that rounds to r = 0 (only for small T) makes the "bsm"
  variant re-order the tokens without merging any, and the "pitome" variant
  fail (``max`` over an empty dimension). Attention and the later choices do
  not depend on the order (the energy sort sees a set of tokens), so the
  identity changes nothing but the order.
- Similarities and energies are computed at least in float32 (as elsewhere in
  this package); the authors' code computes them in the metric's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .groups import merge_groups, score_dtype, slots_of_survivors

# F.normalize's default: a zero metric row stays zero instead of becoming NaN.
_NORM_EPS = 1e-12
# The authors' schedule: the margin starts here in the first block and falls linearly towards 0.
_FIRST_MARGIN = 0.75
# ELU's alpha in the authors' vision code.
DEFAULT_ALPHA = 1.0
# The keep ratio of the authors' image-classification script (main_ic.py --ratio);
# their DeiT sweeps use 0.9, 0.925, 0.95 and 0.975.
DEFAULT_RATIO = 0.9125
# Below this keep ratio more than half of the tokens would have to go in one
# block, which neither variant can do (at most every A token merges).
MIN_RATIO = 0.5


class PiToMeMatch(NamedTuple):
    """PiToMe's choice for one block."""

    index: torch.Tensor  # (B, N) long, slot of every input token in the N - r merged tokens
    survivors: torch.Tensor  # (B, N - r) long, the input position that holds each output slot
    sources: torch.Tensor  # (B, r) long, positions merged away (set A)
    destinations: torch.Tensor  # (B, r) long, the set-B position each source merges into


def pitome_r(num_tokens: int, ratio: float) -> int:
    """Tokens one block removes for a keep ``ratio``, computed as the authors' code does.

    ``floor(T - T * ratio)`` in Python floats, and 0 for ``ratio == 1``. Not
    ``floor(T * (1 - ratio))``: ``1 - 0.9`` rounds below 0.1, so that gives 0
    instead of 1 for T = 10 (and 2 instead of 3 for T = 40, ratio 0.925).

    Args:
        num_tokens: T, the current number of unprotected tokens.
        ratio: keep ratio in [0.5, 1]. The authors' code treats any ratio >= 1
            as "merge nothing"; above 1 is rejected here as meaningless. Below
            0.5 it asks for more than T / 2 tokens, which fails there for all
            but tiny T.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    if not MIN_RATIO <= ratio <= 1.0:  # also rejects NaN
        raise ValueError(
            f"ratio is the fraction of tokens a block keeps and must be in [{MIN_RATIO}, 1] "
            f"(PiToMe merges at most half of them per block), got {ratio!r}"
        )
    if ratio == 1.0:
        return 0
    return math.floor(num_tokens - num_tokens * ratio)


def pitome_margins(num_blocks: int) -> list[float]:
    """Energy margin of every block: ``0.75 - 0.75 * (i / L)`` for block i of L, as in the authors' patch."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    # The same float expression as the authors' (0.75 * i / L can differ in the last bit).
    return [_FIRST_MARGIN - _FIRST_MARGIN * (i / num_blocks) for i in range(num_blocks)]


def pitome_bsm_blocks(num_blocks: int) -> list[bool]:
    """True for the blocks that run the "bsm" variant: the first ceil(L / 2), as in the authors' DeiT patch."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    first = math.ceil(num_blocks * 0.5)
    return [True] * first + [False] * (num_blocks - first)


def max_pitome_r(num_tokens: int, num_protected: int, *, bsm: bool) -> int:
    """Largest r one block can remove from ``num_tokens`` tokens of which ``num_protected`` are protected.

    "pitome" needs 2r tokens to pair up: r <= T // 2. "bsm" merges at most
    every A token: r <= ceil(T / 2), and needs a B token to merge into (T >= 2).
    """
    unprotected = max(num_tokens - num_protected, 0)
    if not bsm:
        return unprotected // 2
    return (unprotected + 1) // 2 if unprotected >= 2 else 0


def _unit_similarity(metric: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, T, T) dot products of the L2-normalised rows, at least in float32."""
    feats = metric.to(score_dtype(metric.dtype))
    unit = feats / torch.linalg.vector_norm(feats, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    return unit @ unit.transpose(1, 2)


def _energy(similarity: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """(B, T, T) similarities -> (B, T) energies; the diagonal (self-similarity) counts, as in the authors' code."""
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """PiToMe's energy of every token: the row mean of ELU(cos(m_i, m_j) - margin, alpha) over all j.

    High energy marks a token in a large cluster of similar tokens (a merge
    candidate); low energy an isolated, informative one.

    Args:
        metric: (B, T, C) features of the tokens to score (protected tokens left out).
        margin: similarity below which a pair counts (softly, through ELU) against a token.
        alpha: ELU's alpha.

    Returns:
        (B, T) energies, in float32 or float64.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, T, C), got shape {tuple(metric.shape)}")
    return _energy(_unit_similarity(metric), margin, alpha)


def _pairwise(similarity: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """similarity[b, rows[b, i], cols[b, j]] for (B, T, T) similarity, (B, Na) rows, (B, Nb) cols -> (B, Na, Nb)."""
    B, T, _ = similarity.shape
    picked_rows = similarity.gather(1, rows.unsqueeze(-1).expand(B, rows.shape[1], T))
    return picked_rows.gather(2, cols.unsqueeze(1).expand(B, rows.shape[1], cols.shape[1]))


def match_pitome(
    metric: torch.Tensor,
    r: int,
    *,
    margin: float,
    bsm: bool,
    num_protected: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> PiToMeMatch:
    """Choose which tokens merge, and where every token goes, as the authors' PiToMe code does.

    See the module docstring for the two variants. The choice is discrete and
    made without autograd.

    Args:
        metric: (B, N, C) features of ALL current tokens, protected ones
            included (PiToMe: attention keys averaged over heads).
        r: tokens to remove; 0 <= r <= :func:`max_pitome_r` (T // 2 for
            "pitome", ceil(T / 2) for "bsm", T = N - num_protected).
        margin: energy margin of this block (:func:`pitome_margins`).
        bsm: True for the "bsm" variant, False for "pitome" (:func:`pitome_bsm_blocks`).
        num_protected: the first ``num_protected`` tokens take no part and stay first.
        alpha: ELU's alpha in the energy.

    Returns:
        A :class:`PiToMeMatch`; ``index`` is ``arange(N)`` for r = 0.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (B, N, C), got shape {tuple(metric.shape)}")
    B, N, _ = metric.shape
    p = num_protected
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= N:
        raise ValueError(f"num_protected must be an int in [0, {N}], got {p!r}")
    limit = max_pitome_r(N, p, bsm=bsm)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= limit:
        rule = "ceil(T / 2) when T >= 2, else 0" if bsm else "T // 2"
        raise ValueError(
            f"PiToMe's {'bsm' if bsm else 'pitome'} variant can remove 0 to {rule} = {limit} tokens here "
            f"(T = N - num_protected = {N} - {p}), got r = {r!r}"
        )
    device = metric.device
    if r == 0:
        everything = torch.arange(N, device=device).expand(B, N)
        nothing = everything.new_empty(B, 0)
        return PiToMeMatch(everything, everything, nothing, nothing)

    with torch.no_grad():
        similarity = _unit_similarity(metric[:, p:].detach())  # (B, T, T), protected tokens left out
        energy = _energy(similarity, margin, alpha)
        ranked = torch.sort(energy, dim=1, descending=True, stable=True).indices  # (B, T), highest energy first
        if bsm:
            set_a, set_b = ranked[:, 0::2], ranked[:, 1::2]
            best_score, best_b = _pairwise(similarity, set_a, set_b).max(dim=-1)  # (B, Na)
            by_score = torch.sort(best_score, dim=1, descending=True, stable=True).indices
            merging = by_score[:, :r]
            sources = set_a.gather(1, merging)
            destinations = set_b.gather(1, best_b.gather(1, merging))
            # The kept A tokens stay in descending order of their best score: the authors' code does not re-sort them.
            kept = set_a.gather(1, by_score[:, r:])
        else:
            set_a, set_b = ranked[:, 0 : 2 * r : 2], ranked[:, 1 : 2 * r : 2]  # (B, r) each
            best_b = _pairwise(similarity, set_a, set_b).argmax(dim=-1)  # (B, r)
            sources = set_a
            destinations = set_b.gather(1, best_b)
            kept = ranked[:, 2 * r :]  # the low-energy tokens, protected from merging
        protected = torch.arange(p, device=device).expand(B, p)
        # Positions above are relative to the first unprotected token.
        survivors = torch.cat([protected, kept + p, set_b + p], dim=1)
        sources, destinations = sources + p, destinations + p
        index = slots_of_survivors(survivors, sources, destinations, N)
    return PiToMeMatch(index, survivors, sources, destinations)


def merge_pitome(
    x: torch.Tensor, match: PiToMeMatch, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens as ``match`` says: size-weighted mean of every group, in the official output order.

    Args:
        x: (B, N, C) tokens (any features, not necessarily the metric).
        match: from :func:`match_pitome` on the same N tokens.
        size: (B, N) number of original tokens each token stands for; ones if None.

    Returns:
        merged (B, N - r, C) and merged size (B, N - r), new tensors; gradients
        flow to ``x`` (and to ``size`` if it requires them).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    if match.index.shape != x.shape[:2]:
        raise ValueError(f"match is for tokens of shape {tuple(match.index.shape)}, x has {tuple(x.shape[:2])}")
    if size is not None and size.shape != x.shape[:2]:
        raise ValueError(f"size must have shape {tuple(x.shape[:2])}, got {tuple(size.shape)}")
    if match.sources.shape[1] == 0:
        # Nothing merges: copy rather than divide by the sizes, so the values come back bit for bit.
        kept_size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if size is None else size.clone()
        return x.clone(), kept_size
    return merge_groups(x, match.index, match.survivors.shape[1], "mean", size)
