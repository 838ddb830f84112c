"""ToMe, PiToMe and ToFu on timm ViTs equal a hand-built forward of their authors' semantics (float64).

The reference forward below is written out in the test from the model's own
submodules: per block, attention by hand (q/k norm, the scale, ``log(size)``
added to the logits for proportional attention), the LayerScale'd residual, the
keys averaged over heads as the metric, the method's loop reference from
``tests/merge/reference.py`` (ToMe: the authors' bipartite matching, A/B over
the current sequence, protected tokens excluded, output [protected, kept A, B],
and a loop of size-weighted means; PiToMe: energies, its two variants; ToFu:
ToMe's matching, pruning then MLERP), then the MLP residual. It shares no code
with ``cubistmerge`` beyond the model itself; the metric being the keys (not
the tokens) is part of what it checks.
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

# Tiny float64 models: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

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


def reference_forward(model: nn.Module, images: torch.Tensor, rule, prop_attn: bool):
    """Logits and the (B, N) token -> final slot map of a merge-after-attention method.

    ``rule(block, x, sizes, metric, p)`` merges one block's tokens and returns
    (per-image index maps, merged x, merged sizes), or None when it merges nothing.
    """
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B, N0, _ = x.shape
    p = model.num_prefix_tokens
    sizes = [[1.0] * N0 for _ in range(B)]
    merged_yet = False
    groups = [list(range(N0)) for _ in range(B)]
    for i, block in enumerate(model.blocks):
        out, keys = hand_attention(block.attn, block.norm1(x), sizes if prop_attn and merged_yet else None)
        x = x + block.ls1(out)
        result = rule(i, x, sizes, keys.mean(dim=1), p)
        if result is not None:
            index, x, sizes = result
            groups = [[index[b][slot] for slot in groups[b]] for b in range(B)]
            merged_yet = True
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x)), groups


def tome_rule(schedule: list[int]):
    def rule(i, x, sizes, metric, p):
        r = min(schedule[i], (x.shape[1] - p) // 2)
        if r == 0:
            return None
        index = [ref.bipartite_matching(metric[b].tolist(), r, p) for b in range(len(x))]
        merged, new_sizes = weighted_merge_loop(x, sizes, index)
        return index, merged, new_sizes

    return rule


def tome_reference(model, images, schedule, prop_attn):
    per_block = cubistmerge.tome_schedule(schedule, len(model.blocks))
    return reference_forward(model, images, tome_rule(per_block), prop_attn)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("key", list(MODELS))
def test_default_tome_equals_the_authors_semantics(key, schedule, prop_attn):
    model = make_model(key)
    images = images_for(model)
    with torch.no_grad():
        expected, groups = tome_reference(model, images, schedule, prop_attn)
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
        expected, _ = tome_reference(model, images, 8, True)
    assert (official - expected).abs().max() <= 1e-10
    assert (spatial - expected).abs().max() > 1e-3


def test_order_option_is_checked():
    with pytest.raises(ValueError, match="order must be one of"):
        cubistmerge.patch(make_model("vit_small_patch16_224"), "tome", r=4, order="random")


# --------------------------------------------------------------------- PiToMe and ToFu


def pitome_rule(ratio: float, num_blocks: int):
    def rule(i, x, sizes, metric, p):
        tokens = x.shape[1] - p
        r = math.floor(tokens - tokens * ratio)  # the authors' amount, as their code writes it
        if r == 0:
            return None
        margin = 0.75 - 0.75 * (i / num_blocks)
        bsm = i < math.ceil(num_blocks / 2)
        results = [
            ref.pitome_merge(metric[b].tolist(), x[b].tolist(), sizes[b], r, margin, bsm, p, 1.0)
            for b in range(len(x))
        ]
        merged = torch.tensor([values for _, values, _ in results], dtype=x.dtype)
        return [index for index, _, _ in results], merged, [new for _, _, new in results]

    return rule


def tofu_rule(schedule: list[int], mlerp_norm: str):
    def rule(i, x, sizes, metric, p):
        r = min(schedule[i], (x.shape[1] - p) // 2)
        if r == 0:
            return None
        mode = "mlerp" if i > len(schedule) // 2 else "prune"
        index = [ref.bipartite_matching(metric[b].tolist(), r, p) for b in range(len(x))]
        merged = [ref.tofu_reduce(x[b].tolist(), index[b], mode, mlerp_norm) for b in range(len(x))]
        return index, torch.tensor(merged, dtype=x.dtype), sizes

    return rule


@pytest.mark.parametrize("ratio", [0.9125, 0.8, 0.5])
@pytest.mark.parametrize("key", list(MODELS))
def test_pitome_equals_the_authors_semantics(key, ratio):
    model = make_model(key)
    images = images_for(model)
    with torch.no_grad():
        # The authors' PiToMe blocks do not pass sizes to attention: no proportional attention.
        expected, groups = reference_forward(model, images, pitome_rule(ratio, len(model.blocks)), prop_attn=False)
        unmerged = model(images)
        patched = cubistmerge.patch(copy.deepcopy(model), "pitome", ratio=ratio, trace_source=True)
        logits = patched(images)
    assert (expected - unmerged).abs().max() > 1e-3
    assert (logits - expected).abs().max() <= 1e-10
    assert patched.cubistmerge_source.tolist() == groups


@pytest.mark.parametrize("mlerp_norm", ["mean", "destination"])
@pytest.mark.parametrize("schedule", [8, (8, -0.5), [12, 0, 20, 5]], ids=str)
@pytest.mark.parametrize("key", list(MODELS))
def test_tofu_equals_the_authors_semantics(key, schedule, mlerp_norm):
    model = make_model(key)
    images = images_for(model)
    per_block = cubistmerge.tome_schedule(schedule, len(model.blocks))
    with torch.no_grad():
        # No sizes are tracked, so no proportional attention.
        expected, groups = reference_forward(model, images, tofu_rule(per_block, mlerp_norm), prop_attn=False)
        unmerged = model(images)
        patched = cubistmerge.patch(
            copy.deepcopy(model), "tofu", r=schedule, mlerp_norm=mlerp_norm, trace_source=True
        )
        logits = patched(images)
    assert (expected - unmerged).abs().max() > 1e-3
    assert (logits - expected).abs().max() <= 1e-10
    assert patched.cubistmerge_source.tolist() == groups


@pytest.mark.parametrize(("method", "options"), [("pitome", dict(ratio=1.0)), ("tofu", dict(r=0))])
@pytest.mark.parametrize("key", list(MODELS))
def test_zero_reduction_is_the_unpatched_model(key, method, options):
    model = make_model(key)
    images = images_for(model)
    with torch.no_grad():
        expected = model(images)
        features = model.forward_features(images)
        patched = cubistmerge.patch(copy.deepcopy(model), method, **options)
        assert (patched(images) - expected).abs().max() <= 1e-12
        assert (patched.forward_features(images) - features).abs().max() <= 1e-12
    assert type(cubistmerge.unpatch(patched)) is type(model)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("pitome", dict(ratio=0.4), r"ratio .* in \[0.5, 1\]"),
        ("pitome", dict(ratio=1.5), r"ratio .* in \[0.5, 1\]"),
        ("pitome", dict(r=8), "Options of method='pitome' for this model: ratio, alpha"),
        ("tofu", dict(r=-1), "must not be negative"),
        ("tofu", dict(mlerp_from=9), r"mlerp_from must be a block index in \[0, 4\]"),
        ("tofu", dict(mlerp_norm="max"), "mlerp_norm must be one of"),
        ("tofu", dict(prop_attn=True), "Options of method='tofu' for this model: r, mlerp_from"),
    ],
)
def test_bad_settings_raise(method, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cubistmerge.patch(make_model("vit_small_patch16_224"), method, **options)


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_other_families_refuse_pitome_and_tofu(method):
    sam = timm.create_model("samvit_base_patch16", img_size=64, depth=2, embed_dim=32, num_heads=2)
    with pytest.raises(cubistmerge.UnsupportedModelError, match=f"method='{method}' is not available"):
        cubistmerge.patch(sam, method)
