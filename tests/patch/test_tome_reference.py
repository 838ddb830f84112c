"""ToMe on timm ViTs equals a hand-built forward of the authors' semantics (float64, 1e-6 and tighter).

The reference forward below is written out in the test from the model's own
submodules: per block, attention by hand (q/k norm, the scale, ``log(size)``
added to the logits for proportional attention), the LayerScale'd residual, the
keys averaged over heads as the metric, the loop reference of the authors'
bipartite matching (``reference.bipartite_matching``: A/B over the current
sequence, protected tokens excluded, output [protected, kept A, B]), a loop of
size-weighted means, then the MLP residual. It shares no code with
``cubistmerge`` beyond the model itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

import cubistmerge

from ..merge import reference as ref

# Small variants of real timm configs, float64. Every part that ToMe's bookkeeping touches is present:
# a class token, a distillation token, LayerScale with non-trivial gammas and registers, no prefix at all.
MODELS = {
    "vit_small_patch16_224": dict(img_size=96, depth=4, embed_dim=96, num_heads=3),  # class token
    "deit_tiny_distilled_patch16_224": dict(img_size=96, depth=4),  # class + distillation token
    "vit_small_patch14_reg4_dinov2": dict(img_size=98, depth=4, embed_dim=64, num_heads=2, init_values=0.5),
    "vit_tiny_patch16_224:gap_qknorm": dict(
        img_size=112, depth=4, class_token=False, global_pool="avg", qk_norm=True, init_values=0.5
    ),
}

SCHEDULES = [8, 16, (8, -0.5), (6, 1.0), [12, 0, 20, 5]]


def make_model(key: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(key.split(":")[0], pretrained=False, **MODELS[key]).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # LayerScale gammas far from 1 and from each other, so a dropped or misplaced one shows.
            if name.endswith(".gamma"):
                parameter.copy_(0.2 + 1.5 * torch.rand(parameter.shape, generator=generator, dtype=torch.float64))
            # Non-zero biases everywhere (timm initialises many to zero).
            elif name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model


def images_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator, dtype=torch.float64)


def hand_attention(attn: nn.Module, x: torch.Tensor, sizes: list[list[float]] | None):
    """timm Attention written out, with log(size) added to the logits; returns (output, keys (B, heads, N, d))."""
    B, N, C = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if sizes is not None:
        logits = logits + torch.tensor(sizes, dtype=x.dtype).log()[:, None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out)), k


def weighted_merge_loop(x: torch.Tensor, sizes: list[list[float]], index: list[list[int]]):
    """Size-weighted mean of every group, one slot at a time."""
    rows, new_sizes = [], []
    for b in range(x.shape[0]):
        slots = max(index[b]) + 1
        members = [[t for t, s in enumerate(index[b]) if s == slot] for slot in range(slots)]
        totals = [sum(sizes[b][t] for t in group) for group in members]
        pairs = zip(members, totals, strict=True)
        means = [sum(sizes[b][t] * x[b, t] for t in group) / total for group, total in pairs]
        rows.append(torch.stack(means))
        new_sizes.append(totals)
    return torch.stack(rows), new_sizes


def reference_forward(model: nn.Module, images: torch.Tensor, schedule: list[int], prop_attn: bool):
    """Logits and the (B, N) token -> final slot map of ToMe as its authors' code computes it."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B, N0, _ = x.shape
    p = model.num_prefix_tokens
    sizes = [[1.0] * N0 for _ in range(B)]
    merged_yet = False
    groups = [list(range(N0)) for _ in range(B)]
    for block, r in zip(model.blocks, schedule, strict=True):
        out, keys = hand_attention(block.attn, block.norm1(x), sizes if prop_attn and merged_yet else None)
        x = x + block.ls1(out)
        N = x.shape[1]
        r = min(r, (N - p) // 2)
        if r > 0:
            metric = keys.mean(dim=1)
            index = [ref.bipartite_matching(metric[b].tolist(), r, p) for b in range(B)]
            x, sizes = weighted_merge_loop(x, sizes, index)
            groups = [[index[b][slot] for slot in groups[b]] for b in range(B)]
            merged_yet = True
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x)), groups


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("key", list(MODELS))
def test_default_tome_equals_the_authors_semantics(key, schedule, prop_attn):
    model = make_model(key)
    images = images_for(model)
    per_block = cubistmerge.tome_schedule(schedule, len(model.blocks))
    with torch.no_grad():
        expected, groups = reference_forward(model, images, per_block, prop_attn)
        unmerged = model(images)
        patched = cubistmerge.patch(copy.deepcopy(model), "tome", r=schedule, prop_attn=prop_attn, trace_source=True)
        logits = patched(images)
    # The merge must matter far more than the tolerance, or the comparison proves nothing.
    assert (expected - unmerged).abs().max() > 1e-3
    assert (logits - expected).abs().max() <= 1e-10
    assert patched.cubistmerge_source.tolist() == groups


@pytest.mark.parametrize("key", list(MODELS))
def test_dense_outputs_follow_the_reordered_tokens(key):
    """recover_output copies each final merged token to every original position it holds."""
    model = make_model(key)
    images = images_for(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        merged = cubistmerge.patch(copy.deepcopy(model), "tome", r=8, recover_output=False, trace_source=True)
        tokens = merged.forward_features(images)
        source = merged.cubistmerge_source
        full = cubistmerge.patch(copy.deepcopy(model), "tome", r=8).forward_features(images)
    assert full.shape[1] == source.shape[1] > tokens.shape[1]
    assert torch.equal(source[:, :p], torch.arange(p).expand(len(images), p))  # prefix tokens stay first
    for b in range(len(images)):
        for t, slot in enumerate(source[b].tolist()):
            assert torch.equal(full[b, t], tokens[b, slot])


def test_spatial_order_is_a_different_baseline():
    """The spatial variant (an option, not the default) merges other tokens than the authors' code."""
    model = make_model("vit_small_patch16_224")
    images = images_for(model)
    with torch.no_grad():
        official = cubistmerge.patch(copy.deepcopy(model), "tome", r=8)(images)
        spatial = cubistmerge.patch(copy.deepcopy(model), "tome", r=8, order="spatial")(images)
        expected, _ = reference_forward(model, images, [8] * len(model.blocks), True)
    assert (official - expected).abs().max() <= 1e-10
    assert (spatial - expected).abs().max() > 1e-3


def test_order_option_is_checked():
    with pytest.raises(ValueError, match="order must be one of"):
        cubistmerge.patch(make_model("vit_small_patch16_224"), "tome", r=4, order="random")
