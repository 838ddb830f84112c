"""FLOP counting: matmuls and (fused) attention of a tiny timm ViT against a hand-derived formula."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils import flop_counter

import cubistmerge
from cubistmerge.flops import count_flops, flop_breakdown, sdpa_flops

IMG = 64
PATCH = 16
DIM = 192  # vit_tiny: width 192, 3 heads of 64, MLP ratio 4, 12 blocks
DEPTH = 12
CLASSES = 1000


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, **kwargs).eval()


def analytic_vit_flops(batch: int, tokens_per_block: list[int]) -> int:
    """Multiply-adds x 2 of a timm ViT: patch conv, per-block linears and attention, class head."""
    patches = (IMG // PATCH) ** 2
    total = 2 * batch * patches * DIM * (3 * PATCH * PATCH)  # patch embedding convolution
    for n in tokens_per_block:
        linears = 2 * batch * n * DIM * (3 * DIM + DIM + 4 * DIM + 4 * DIM)  # qkv, proj, fc1, fc2
        attention = 4 * batch * n * n * DIM  # Q K^T and P V over all heads
        total += linears + attention
    return total + 2 * batch * DIM * CLASSES  # head on the pooled class token


def attention_flops(batch: int, tokens_per_block: list[int]) -> int:
    return sum(4 * batch * n * n * DIM for n in tokens_per_block)


TOKENS = [1 + (IMG // PATCH) ** 2] * DEPTH  # class token + 4x4 patches in every block


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Shared by the tests; a test that changes it restores it."""
    return tiny_vit()


def test_model_uses_fused_attention(model):
    # The point of the tests below: timm's Attention dispatches to F.scaled_dot_product_attention.
    assert all(block.attn.fused_attn for block in model.blocks)


@pytest.mark.parametrize("batch", [1, 2])
def test_count_matches_analytic_formula(model, batch):
    x = torch.randn(batch, 3, IMG, IMG)
    assert count_flops(model, x) == analytic_vit_flops(batch, TOKENS)


def test_fused_attention_is_counted(model):
    breakdown = flop_breakdown(model, torch.randn(1, 3, IMG, IMG))
    sdpa = {op: flops for op, flops in breakdown.items() if "scaled_dot_product" in op}
    assert sdpa, f"no fused attention op counted: {breakdown}"
    assert sum(sdpa.values()) == attention_flops(1, TOKENS)
    # attention is a visible share of the total, not silently zero
    assert sum(sdpa.values()) / sum(breakdown.values()) > 0.01


def test_explicit_attention_path_counts_the_same(model):
    x = torch.randn(1, 3, IMG, IMG)
    fused = count_flops(model, x)
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
        explicit = count_flops(model, x)
    finally:
        for block in model.blocks:
            block.attn.fused_attn = True
    assert explicit == fused == analytic_vit_flops(1, TOKENS)


def test_unregistered_sdpa_op_is_still_counted(model, monkeypatch):
    """Torch builds without a formula for the CPU flash-attention op must not drop attention."""
    registry = flop_counter.flop_registry
    removed = [
        packet
        for packet in list(registry)
        if "scaled_dot_product" in str(packet) and "backward" not in str(packet) and "attention" in str(packet)
    ]
    assert removed
    for packet in removed:
        monkeypatch.delitem(registry, packet)
    x = torch.randn(1, 3, IMG, IMG)
    # A bare counter now misses attention entirely ...
    bare = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), bare:
        model(x)
    assert bare.get_total_flops() == analytic_vit_flops(1, TOKENS) - attention_flops(1, TOKENS)
    # ... count_flops registers its own formula and gets the full count.
    assert count_flops(model, x) == analytic_vit_flops(1, TOKENS)


def test_training_flag_restored_and_no_grad(model):
    model.train()
    try:
        count_flops(model, torch.randn(1, 3, IMG, IMG))
        assert model.training
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())
    count_flops(model, torch.randn(1, 3, IMG, IMG))
    assert not model.training


def test_tuple_and_dict_inputs(model):
    x = torch.randn(1, 3, IMG, IMG)
    expected = count_flops(model, x)
    assert count_flops(model, (x,)) == expected
    assert count_flops(model, {"x": x}) == expected


def test_sdpa_flops_formula():
    assert sdpa_flops((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)) == 4 * 2 * 3 * 5 * 7 * 8
    # grouped-query attention: query heads count
    assert sdpa_flops((1, 8, 4, 16), (1, 2, 4, 16), (1, 2, 4, 16)) == 4 * 8 * 4 * 4 * 16
    with pytest.raises(ValueError):
        sdpa_flops((2, 5, 8), (2, 7, 8), (2, 7, 8))


def test_merged_model_counts_fewer_flops(model):
    x = torch.randn(1, 3, IMG, IMG)
    baseline = count_flops(model, x)
    merged = count_flops(cubistmerge.patch(copy.deepcopy(model), method="cubist", r=1, loc=1), x)
    # class token + 3x3 grid from block 1 on; the merge's own similarity matmuls may add a little
    lower = analytic_vit_flops(1, [17] + [10] * (DEPTH - 1))
    assert lower <= merged < baseline
    assert merged < lower * 1.01
