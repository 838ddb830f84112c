"""cubistmerge.patch on timm's plain ViT family (ViT, DeiT distilled, DINOv2 with registers)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import cubistmerge
from cubistmerge.merge import cubist as cubist_module
from cubistmerge.patch import UnsupportedModelError, _after_attention

from .._precision import low_precision_errors

# The matching functions whose choices a float32 run replays from a low-precision one.
CHOICES = ((cubist_module, "match_neighbours"), (_after_attention, "match_bipartite"))

# Small variants of real timm configs: same classes, prefix tokens and options,
# a few blocks and small images so the suite stays fast on 2 CPU cores.
MODELS = {
    "vit_tiny_patch16_224": dict(img_size=96, depth=4),  # 6x6 grid, CLS
    "deit_tiny_distilled_patch16_224": dict(img_size=96, depth=4),  # CLS + distillation token
    "vit_small_patch14_reg4_dinov2": dict(  # LayerScale (made large enough to matter), 4 registers
        img_size=98, depth=4, embed_dim=64, num_heads=2, init_values=0.1
    ),
    "vit_tiny_patch16_224:gap_qknorm": dict(
        img_size=112, depth=4, class_token=False, global_pool="avg", qk_norm=True, init_values=0.1
    ),  # no prefix token, q/k norm, LayerScale, 7x7 grid
}

SETTINGS = {
    "cubist": dict(r=(1, 2), loc=1),
    "tome": dict(r=3),
}


def make_model(key: str, **overrides) -> VisionTransformer:
    name = key.split(":")[0]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**MODELS[key], **overrides})
    return model.eval()


def images_for(model: VisionTransformer, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


def grid_of(model: VisionTransformer) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


@pytest.fixture(params=list(MODELS))
def model_key(request) -> str:
    return request.param


# --------------------------------------------------------------------- equality without reduction


@pytest.mark.parametrize("method,options", [("cubist", dict(r=0)), ("cubist", dict(stages=[(0, 0, 0)])),
                                            ("tome", dict(r=0)), ("tome", dict(r=0, prop_attn=False))])
def test_no_reduction_equals_unpatched(model_key, method, options):
    model = make_model(model_key)
    x = images_for(model)
    with torch.no_grad():
        expected = model(x)
        expected_features = model.forward_features(x)
        cubistmerge.patch(model, method, **options)
        assert (model(x) - expected).abs().max() <= 1e-5
        assert (model.forward_features(x) - expected_features).abs().max() <= 1e-5


def test_unpatch_restores_class_and_outputs(model_key):
    model = make_model(model_key)
    original_class = type(model)
    x = images_for(model)
    with torch.no_grad():
        expected = model(x)
        for method in SETTINGS:
            cubistmerge.patch(model, method, **SETTINGS[method])
            assert type(model) is not original_class and isinstance(model, original_class)
            assert (model(x) - expected).abs().max() > 1e-4, "a reduction that changes nothing is suspicious"
            cubistmerge.unpatch(model)
            assert type(model) is original_class
            assert not any(k.startswith("_cubistmerge") for k in vars(model))
            assert torch.equal(model(x), expected)


def test_state_dict_unchanged(model_key):
    model = make_model(model_key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in SETTINGS:
        cubistmerge.patch(model, method, **SETTINGS[method])
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
        with torch.no_grad():
            model(images_for(model))
        cubistmerge.unpatch(model)


# --------------------------------------------------------------------- the model contracts


@pytest.mark.parametrize("method", list(SETTINGS))
def test_forward_contracts(model_key, method):
    model = make_model(model_key)
    x = images_for(model)
    H, W = grid_of(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        ref_features = model.forward_features(x)
        ref_logits = model(x)
        cubistmerge.patch(model, method, **SETTINGS[method])
        features = model.forward_features(x)
        assert features.shape == ref_features.shape == (2, p + H * W, model.embed_dim)
        logits = model.forward_head(features)
        assert logits.shape == ref_logits.shape
        # forward() pools the merged tokens, as the methods' own code does (a mean over merged tokens, not
        # over recovered positions); pooling the class token or a max gives the same either way.
        merged = copy.deepcopy(model)
        cubistmerge.patch(merged, method, recover_output=False, **SETTINGS[method])
        tokens = merged.forward_features(x)
        assert tokens.shape[1] < features.shape[1]
        assert torch.allclose(model(x), model.forward_head(tokens), atol=1e-6)
        if model.global_pool == "token":
            assert torch.allclose(model(x), logits, atol=1e-6)
        else:
            assert not torch.allclose(model(x), logits, atol=1e-6)
        assert model.forward_head(features, pre_logits=True).shape[-1] == model.num_features

        final, intermediates = model.forward_intermediates(x, indices=[0, 2, 3])
        assert final.shape == features.shape
        assert [t.shape for t in intermediates] == [(2, model.embed_dim, H, W)] * 3
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True, norm=True)
        assert [t.shape for t in nlc] == [(2, H * W, model.embed_dim)] * 2
        as_dict = model.forward_intermediates(x, indices=1, output_dict=True, return_prefix_tokens=True)
        assert as_dict["image_features"].shape == features.shape
        if p:
            assert as_dict["image_intermediates_prefix"][0].shape == (2, p, model.embed_dim)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert early[0].shape == (2, model.embed_dim, H, W)


def test_intermediates_after_reduction_are_recovered_grids():
    """A reduced block's output, recovered, is constant over every merged group and differs from unmerged."""
    model = make_model("vit_tiny_patch16_224")
    x = images_for(model)
    with torch.no_grad():
        _, plain = model.forward_intermediates(x, indices=[0, 3])
        cubistmerge.patch(model, "cubist", r=2, loc=1, trace_source=True)
        _, merged = model.forward_intermediates(x, indices=[0, 3])
    source = model.cubistmerge_source  # (B, 1 + H*W) slot of each original token
    assert torch.allclose(merged[0], plain[0], atol=1e-6)  # block 0 runs before the reduction
    H, W = grid_of(model)
    flat = merged[1].permute(0, 2, 3, 1).reshape(2, H * W, -1)
    for b in range(2):
        groups = source[b, 1:] - 1
        for g in groups.unique():
            members = flat[b, groups == g]
            assert torch.equal(members, members[:1].expand_as(members))
    assert len(source[0, 1:].unique()) == (H - 2) * (W - 2)


def test_recover_output_false_returns_merged_tokens():
    model = make_model("vit_tiny_patch16_224")
    x = images_for(model)
    H, W = grid_of(model)
    cubistmerge.patch(model, "cubist", r=(1, 2), loc=1, recover_output=False)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1 + (H - 1) * (W - 2), model.embed_dim)
        assert model(x).shape == (2, model.num_classes)
    cubistmerge.patch(model, "tome", r=3, recover_output=False)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1 + H * W - 3 * len(model.blocks), model.embed_dim)


# --------------------------------------------------------------------- how many tokens each block sees


def _tokens_per_block(model, x) -> list[int]:
    seen = []
    handles = [blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1])) for blk in model.blocks]
    handles += [blk.attn.register_forward_pre_hook(lambda _m, args: seen.append(-args[0].shape[1]))
                for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_cubist_reduces_the_grid_at_each_stage():
    model = make_model("vit_tiny_patch16_224", img_size=128, depth=5)  # 8x8 grid
    x = images_for(model)
    cubistmerge.patch(model, "cubist", stages=[(1, 1, 2), (3, 0.25, 0.25)])
    seen = [n for n in _tokens_per_block(model, x) if n > 0]
    # block 0: 8x8; blocks 1-2: 7x6; blocks 3-4: 7x6 minus round(0.25*7)=2 rows, round(0.25*6)=2 cols -> 5x4
    assert seen == [1 + 64, 1 + 42, 1 + 42, 1 + 20, 1 + 20]


def test_tome_merges_r_tokens_between_attention_and_mlp():
    model = make_model("deit_tiny_distilled_patch16_224")
    x = images_for(model)
    cubistmerge.patch(model, "tome", r=[4, 5, 0, 2])
    seen = _tokens_per_block(model, x)
    attn_inputs = [-n for n in seen if n < 0]
    assert attn_inputs == [38, 34, 29, 29]


# --------------------------------------------------------------------- fused attention, proportional attention


def test_fused_attention_and_prop_attn_mask(monkeypatch):
    model = make_model("vit_tiny_patch16_224")
    assert all(blk.attn.fused_attn for blk in model.blocks)
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((k.shape[2], attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = images_for(model)
    cubistmerge.patch(model, "tome", r=4, trace_source=True)
    with torch.no_grad():
        model(x)
    assert [n for n, _ in calls] == [37, 33, 29, 25]
    assert calls[0][1] is None  # nothing merged yet: no bias
    for n, mask in calls[1:]:
        assert mask.is_floating_point() and mask.shape == (2, 1, 1, n)
    # The mask is log(size): the sizes are whole numbers that add up to the 37 original tokens.
    for _, mask in calls[1:]:
        sizes = mask.exp().flatten(1)
        assert torch.allclose(sizes, sizes.round(), atol=1e-4) and (sizes >= 1 - 1e-6).all()
        assert torch.allclose(sizes.sum(-1), torch.tensor([37.0, 37.0]))
    assert (calls[1][1] > 0).sum() > 0

    calls.clear()
    cubistmerge.patch(model, "tome", r=4, prop_attn=False)
    with torch.no_grad():
        model(x)
    assert all(mask is None for _, mask in calls)

    calls.clear()
    cubistmerge.patch(model, "cubist", r=1)
    with torch.no_grad():
        model(x)
    assert [n for n, _ in calls] == [37, 26, 26, 26] and all(mask is None for _, mask in calls)


# --------------------------------------------------------------------- prefix tokens, batch independence


@pytest.mark.parametrize("method", list(SETTINGS))
def test_prefix_tokens_are_never_merged(model_key, method):
    model = make_model(model_key)
    x = images_for(model)
    p = model.num_prefix_tokens
    cubistmerge.patch(model, method, **SETTINGS[method], trace_source=True)
    with torch.no_grad():
        model(x)
    source = model.cubistmerge_source
    assert source.shape == (2, p + grid_of(model)[0] * grid_of(model)[1])
    assert torch.equal(source[:, :p], torch.arange(p).expand(2, p))
    assert (source[:, p:] >= p).all()
    assert len(source[0].unique()) < source.shape[1]


@pytest.mark.parametrize("method", list(SETTINGS))
def test_images_in_a_batch_merge_independently(model_key, method):
    model = make_model(model_key)
    x = images_for(model, batch=3)
    cubistmerge.patch(model, method, **SETTINGS[method])
    with torch.no_grad():
        together = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i : i + 1]) for i in range(3)])
    assert (together - alone).abs().max() <= 1e-5


# --------------------------------------------------------------------- attention masks


@pytest.mark.parametrize("method", list(SETTINGS))
def test_attention_mask_keeps_working_after_merging(method):
    """Prefix tokens that may only attend each other must not see the image, reduction or not."""
    model = make_model("deit_tiny_distilled_patch16_224")
    H, W = grid_of(model)
    n = 2 + H * W
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:2, :2] = True
    mask[2:, 2:] = True
    a, b = images_for(model, seed=1), images_for(model, seed=2)
    cubistmerge.patch(model, method, **SETTINGS[method])
    with torch.no_grad():
        prefix_a = model.forward_features(a, attn_mask=mask)[:, :2]
        prefix_b = model.forward_features(b, attn_mask=mask)[:, :2]
        assert torch.allclose(prefix_a, prefix_b, atol=1e-5)
        unmasked_a = model.forward_features(a)[:, :2]
        assert not torch.allclose(prefix_a, unmasked_a, atol=1e-3)
        # An all-True mask changes nothing.
        full = torch.ones(n, n, dtype=torch.bool)
        assert torch.allclose(model.forward_features(a, attn_mask=full), model.forward_features(a), atol=1e-5)


def test_attention_mask_equals_unpatched_without_reduction():
    model = make_model("vit_tiny_patch16_224")
    n = 1 + 36
    mask = torch.randn(2, 1, n, n)
    x = images_for(model)
    with torch.no_grad():
        expected = model.forward_features(x, attn_mask=mask)
        cubistmerge.patch(model, "tome", r=0)
        assert (model.forward_features(x, attn_mask=mask) - expected).abs().max() <= 1e-5
        cubistmerge.patch(model, "cubist", r=0)
        assert (model.forward_features(x, attn_mask=mask) - expected).abs().max() <= 1e-5


def test_bad_attention_mask_shape():
    model = cubistmerge.patch(make_model("vit_tiny_patch16_224"), "cubist", r=1)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        model(images_for(model), attn_mask=torch.ones(5, 5, dtype=torch.bool))


# --------------------------------------------------------------------- dtypes, training, gradients


# Smooth merges (means): max-magnitude selections flip where two members' magnitudes are within rounding of
# each other, which on random weights moves the output by up to ~40x the unmerged model's own bf16 error.
PRECISION_SETTINGS = {"cubist": dict(SETTINGS["cubist"], representation="mean"), "tome": SETTINGS["tome"]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", list(PRECISION_SETTINGS))
def test_dtypes(method, dtype):
    """In bf16 / fp16 the merged model is as close to itself in float32 as the unmerged model is to itself.

    The float32 run replays the low-precision run's matching (a flipped near tie is not an arithmetic error).
    Measured ratio (merged error / unmerged error): at most 1.2 over the families' tests; bound 2.
    """
    model = make_model("vit_small_patch14_reg4_dinov2")
    merged = cubistmerge.patch(copy.deepcopy(model), method, **PRECISION_SETTINGS[method])
    unmerged_error, merged_error = low_precision_errors(model, merged, images_for(model), dtype, choices=CHOICES)
    assert merged_error <= 2 * unmerged_error


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_training_gradients_reach_parameters(method, checkpointing):
    model = make_model("vit_small_patch14_reg4_dinov2", drop_path_rate=0.2, attn_drop_rate=0.1)
    model.set_grad_checkpointing(checkpointing)
    cubistmerge.patch(model, method, **SETTINGS[method])
    model.train()
    x = images_for(model)
    model(x).logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # reg_token and cls_token are used; every weight must receive a gradient.
    assert missing == []
    assert model.blocks[-1].ls2.gamma.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_inputs_not_modified():
    model = cubistmerge.patch(make_model("vit_tiny_patch16_224"), "cubist", r=1)
    x = images_for(model)
    before, version = x.clone(), x._version
    with torch.no_grad():
        model(x)
    assert torch.equal(x, before) and x._version == version


# --------------------------------------------------------------------- state and re-patching


def test_patch_twice_and_new_settings():
    model = make_model("vit_tiny_patch16_224")
    x = images_for(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        cubistmerge.patch(model, "cubist", r=1)
        cubistmerge.patch(model, "cubist", r=2, loc=2)
        cubistmerge.patch(reference, "cubist", r=2, loc=2)
        assert torch.equal(model(x), reference(x))
        cubistmerge.patch(model, "tome", r=3)
        cubistmerge.patch(reference, "tome", r=3)
        assert torch.equal(model(x), reference(x))
    cubistmerge.unpatch(model)
    assert type(model) is VisionTransformer


def test_state_does_not_leak_between_calls():
    model = make_model("vit_tiny_patch16_224", dynamic_img_size=True)
    cubistmerge.patch(model, "cubist", r=1, loc=1, trace_source=True)
    small, large = torch.randn(1, 3, 96, 96), torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        first = model.forward_features(small)
        assert model.forward_features(large).shape == (1, 1 + 8 * 10, model.embed_dim)
        assert model.cubistmerge_source.shape == (1, 81)
        assert torch.equal(model.forward_features(small), first)
        assert model(large).shape == (1, model.num_classes)
        _, inter = model.forward_intermediates(large, indices=1)
        assert inter[0].shape == (1, model.embed_dim, 8, 10)
    assert not any(torch.is_tensor(v) for k, v in vars(model).items() if k != "cubistmerge_source")


def test_tome_on_dynamic_sizes():
    model = make_model("vit_tiny_patch16_224", dynamic_img_size=True)
    cubistmerge.patch(model, "tome", r=8)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 17, model.embed_dim)
        assert model.forward_features(torch.randn(2, 3, 96, 128)).shape == (2, 49, model.embed_dim)


# --------------------------------------------------------------------- errors


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="Supported families: timm VisionTransformer"):
        cubistmerge.patch(torch.nn.Linear(3, 3), "cubist")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1))
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        cubistmerge.patch(swin, "cubist")
    with pytest.raises(ValueError, match="not patched"):
        cubistmerge.unpatch(make_model("vit_tiny_patch16_224"))


@pytest.mark.parametrize("method,options,message", [
    ("cubist", dict(r=4), "at most 3 per column"),  # 6x6 grid
    ("cubist", dict(r=(1, 1), loc=4), r"loc must be a block index in \[0, 3\]"),
    ("cubist", dict(r=-1), ">= 0"),
    ("cubist", dict(r=0.7), r"\[0, 0.5\]"),
    ("cubist", dict(r="2"), "int number of tokens or a float fraction"),
    ("cubist", dict(stages=[(2, 1, 1), (1, 1, 1)]), "strictly increasing"),
    ("cubist", dict(stages=[(1, 2, 2), (2, 3, 3)]), "at most 2 per column"),
    ("cubist", dict(r=1, stages=[(1, 1, 1)]), "not both"),
    ("cubist", dict(representation="median"), "representation must be one of"),
    ("cubist", dict(metric="dot"), "metric must be one of"),
    ("tome", dict(r=-2), "must not be negative"),
    ("tome", dict(r=[1, 2, 3, 4, 5]), "has 5 entries but the model has 4 blocks"),
    ("tome", dict(r=(4, 2.0)), r"inflection must be in \[-1, 1\]"),
    ("merge", dict(), "method must be one of"),
])
def test_bad_options(method, options, message):
    model = make_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=message):
        cubistmerge.patch(model, method, **options)
    assert type(model) is VisionTransformer  # a refused patch leaves the model alone


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(TypeError, match="Options of method=.tome. for this model: r, prop_attn"):
        cubistmerge.patch(make_model("vit_tiny_patch16_224"), "tome", loc=1)


def test_grid_too_small_at_run_time():
    model = cubistmerge.patch(make_model("vit_tiny_patch16_224", dynamic_img_size=True), "cubist", r=3)
    with pytest.raises(ValueError, match="0 to 2 tokens"):
        model(torch.randn(1, 3, 80, 80))  # 5x5 grid: at most 2 per row


def test_patch_dropout_is_refused_by_cubist_in_training():
    model = make_model("vit_tiny_patch16_224", patch_drop_rate=0.5)
    cubistmerge.patch(model, "cubist", r=1).train()
    with pytest.raises(RuntimeError, match="patch dropout"):
        model(images_for(model))
    model.eval()
    with torch.no_grad():
        assert model(images_for(model)).shape == (2, model.num_classes)
