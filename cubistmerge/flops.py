"""FLOP counting for (patched or unpatched) models.

:func:`count_flops` runs one real forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`
and returns the total. The counter follows the usual convention of counting a multiply-add as two
FLOPs and only counting matrix products (linear layers, convolutions, ``bmm``/``matmul`` and the fused
attention kernels); element-wise work (softmax, norms, activations, the gathers/scatters of a merge)
is not counted.

Fused attention needs care. timm's ``Attention`` calls ``F.scaled_dot_product_attention``, which is
dispatched to a backend-specific ATen op (``_scaled_dot_product_flash_attention_for_cpu`` on CPU,
``_scaled_dot_product_flash_attention`` / ``_efficient_attention`` / ``_cudnn_attention`` on CUDA,
``_scaled_dot_product_fused_attention_overrideable`` on some other backends). Recent torch releases
register FLOP formulas for most of them, but not every release registers every one, and an
unregistered op is silently counted as zero -- which would make attention, the part of a ViT that
token merging shrinks quadratically, invisible. :func:`count_flops` therefore registers its own
formula (``4 * batch * heads * len_q * len_k * head_dim``, the two matmuls ``Q @ K^T`` and
``P @ V``) for every forward SDPA op of this torch build that the counter does not already know.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter as _flop_counter

__all__ = ["SDPA_OP_NAMES", "count_flops", "flop_breakdown", "sdpa_flops"]

# Forward fused-attention ops whose first three arguments are query, key and value, each laid out as
# (batch, heads, tokens, head_dim).
SDPA_OP_NAMES: tuple[str, ...] = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """FLOPs of ``softmax(Q K^T) V`` for (batch, heads, tokens, head_dim) shaped q/k/v.

    ``Q K^T`` costs ``2 * B * H * Lq * Lk * D`` and ``P V`` costs ``2 * B * H * Lq * Lk * Dv``; with
    ``Dv == D`` that is ``4 * B * H * Lq * Lk * D``. Key/value heads may be fewer than query heads
    (grouped-query attention): they are broadcast, so the query head count is what matters.
    """
    if len(query_shape) != 4 or len(key_shape) != 4 or len(value_shape) != 4:
        raise ValueError(
            f"expected 4-d (batch, heads, tokens, head_dim) q/k/v, got {tuple(query_shape)}, "
            f"{tuple(key_shape)}, {tuple(value_shape)}"
        )
    batch, heads, len_q, head_dim = (int(s) for s in query_shape)
    len_k = int(key_shape[2])
    value_dim = int(value_shape[3])
    return 2 * batch * heads * len_q * len_k * head_dim + 2 * batch * heads * len_q * len_k * value_dim


def _sdpa_formula(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # Signature expected by FlopCounterMode's custom_mapping: tensors arrive as their shapes.
    return sdpa_flops(query_shape, key_shape, value_shape)


def _missing_sdpa_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the fused-attention ops of this torch build that FlopCounterMode does not count."""
    mapping: dict[Any, Callable[..., int]] = {}
    registry = getattr(_flop_counter, "flop_registry", {})  # absent in old torch: register every op
    for name in SDPA_OP_NAMES:
        try:
            packet = getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):  # op absent from this torch build
            continue
        if packet not in registry:
            mapping[packet] = _sdpa_formula
    return mapping


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def flop_breakdown(model: nn.Module, example_input: Any) -> dict[str, int]:
    """FLOPs of one forward pass per ATen op (e.g. ``{"aten.addmm": ..., "aten.convolution": ...}``).

    Runs like :func:`count_flops`: eval mode, ``torch.no_grad``, the model's training flag restored
    afterwards.
    """
    counter = _flop_counter.FlopCounterMode(display=False, custom_mapping=_missing_sdpa_formulas())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            _call(model, example_input)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts().get("Global", {})
    return {str(op): int(flops) for op, flops in counts.items()}


def count_flops(model: nn.Module, example_input: Any) -> int:
    """Total FLOPs (multiply-add = 2) of one forward pass of ``model`` on ``example_input``.

    ``example_input`` is a tensor, a tuple/list of positional arguments or a dict of keyword
    arguments. The count scales with the batch size of the input; pass a batch of one for FLOPs per
    image. The forward pass is real (not symbolic), so a patched model's data-dependent merging runs
    as it would in inference; the model runs in eval mode under ``torch.no_grad`` and its training
    flag is restored afterwards.
    """
    return sum(flop_breakdown(model, example_input).values())
