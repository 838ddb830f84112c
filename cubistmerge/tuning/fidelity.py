"""Label-free fidelity: how far a merged model's output is from the unmerged model's on the same images.

Pure functions over output tensors, one per kind of output; each returns its metrics and a ``score`` where
higher is better, which the tuner ranks by:

* classifier logits (B, K): KL(unmerged || merged) at temperature 1 and top-1 agreement; score = -KL (the
  agreement is too coarse to rank close settings on a few images);
* SAM image embeddings (B, C, H, W): mean cosine similarity per position and the relative error
  ||merged - unmerged|| / ||unmerged||; score = -relative error;
* dense maps (B, 1, H, W) or recovered tokens (B, N, C): Pearson correlation per image, averaged; score = it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("classifier", "sam", "dense")


def _check(merged: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if merged.shape != reference.shape:
        raise ValueError(f"outputs must have the same shape, got {tuple(merged.shape)} and {tuple(reference.shape)}")
    if merged.dim() < 2 or merged.shape[0] == 0:
        raise ValueError(f"outputs must be (B, ...) with B >= 1, got shape {tuple(merged.shape)}")
    return merged.detach().double(), reference.detach().double()


def logit_fidelity(merged: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """(B, K) logits: ``kl`` (mean over images of KL(reference || merged)), ``top1_agreement``, ``score``."""
    a, b = _check(merged, reference)
    kl = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="batchmean")
    agreement = (a.argmax(-1) == b.argmax(-1)).double().mean()
    return {"kl": float(kl), "top1_agreement": float(agreement), "score": -float(kl)}


def embedding_fidelity(merged: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """(B, C, ...) embeddings: ``cosine`` (per position over C, averaged), ``relative_error``, ``score``."""
    a, b = _check(merged, reference)
    cosine = F.cosine_similarity(a, b, dim=1).mean()
    relative = ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()
    return {"cosine": float(cosine), "relative_error": float(relative), "score": -float(relative)}


def map_fidelity(merged: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """(B, ...) maps: ``correlation`` (Pearson per image, averaged), ``mae``, ``score`` = correlation."""
    from ..eval.saliency_metrics import mean_absolute_error, pearson_correlation

    a, b = _check(merged, reference)
    correlation = pearson_correlation(a, b).nan_to_num(0.0).mean()
    return {
        "correlation": float(correlation),
        "mae": float(mean_absolute_error(a, b).mean()),
        "score": float(correlation),
    }


def fidelity(kind: str, merged: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """The fidelity of ``kind`` (``classifier``, ``sam`` or ``dense``, the distillation task names)."""
    if kind == "classifier":
        return logit_fidelity(merged, reference)
    if kind == "sam":
        return embedding_fidelity(merged, reference)
    if kind == "dense":
        return map_fidelity(merged, reference)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
