"""cubistmerge.patch on timm's Eva family: DINOv3 (storage tokens, normalised RoPE) and EVA-02 (index RoPE)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import RotaryEmbeddingCat, RotaryEmbeddingDinoV3
from timm.models.eva import Eva

import cubistmerge
from cubistmerge.merge import cubist as cubist_module
from cubistmerge.merge.tome import match_bipartite, merge_matched
from cubistmerge.patch import UnsupportedModelError, _after_attention, timm_eva
from cubistmerge.patch._tokens import patch_grid
from cubistmerge.patch.state import MergeState

from .._precision import low_precision_errors

# Small variants of real timm configs: same classes, prefix tokens and RoPE, a few blocks and
# small images so the suite stays fast on 2 CPU cores.
MODELS = {
    # CLS + 4 storage tokens, DINOv3 RoPE (normalised, half layout), LayerScale made large enough to
    # matter, dynamic image size: 6x6 grid.
    "vit_small_patch16_dinov3": dict(img_size=96, depth=4, embed_dim=64, num_heads=2, init_values=0.1),
    # CLS, index RoPE rescaled to ref_feat_shape (16, 16) and cached for the fixed grid, SwiGLU: 6x6 grid.
    "eva02_tiny_patch14_224": dict(img_size=84, depth=4, embed_dim=64, num_heads=2),
}
# Further members of the family, used where their differences matter.
VARIANTS = {
    # AttentionRope, xy-ordered RoPE with grid offset 1, pre-norm, attention pooling.
    "vit_pe_core_tiny_patch16_384": dict(img_size=80, depth=3, embed_dim=64, num_heads=2),
    "eva02_tiny_patch14_224:postnorm": dict(img_size=84, depth=3, embed_dim=64, num_heads=2, use_post_norm=True),
    "eva02_tiny_patch14_224:norope": dict(img_size=84, depth=3, embed_dim=64, num_heads=2, use_rot_pos_emb=False),
    "eva02_tiny_patch14_224:dynamic": dict(img_size=84, depth=3, embed_dim=64, num_heads=2, dynamic_img_size=True),
}

SETTINGS = {
    "cubist": dict(r=(1, 2), loc=1),
    "tokens": dict(r=(1, 2), loc=1, rope="tokens"),
    "tome": dict(r=3),
}


def method_of(setting: str) -> str:
    return "tome" if setting == "tome" else "cubist"


def make_model(key: str, **overrides) -> Eva:
    name = key.split(":")[0]
    torch.manual_seed(0)
    config = {**MODELS, **VARIANTS}[key]
    return timm.create_model(name, pretrained=False, **{**config, **overrides}).eval()


def position_sensitive(model: Eva, scale: float = 6.0) -> Eva:
    """Scale the query and key projections: random init attention is nearly uniform, so positions barely count."""
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.weight.shape[0] // 3
            block.attn.qkv.weight[: 2 * dim] *= scale
    return model


def images_for(model: Eva, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


def grid_of(model: Eva) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


def patch_with(model: Eva, setting: str, **extra) -> Eva:
    return cubistmerge.patch(model, method_of(setting), **SETTINGS[setting], **extra)


def own_rope(model: Eva, images: torch.Tensor) -> torch.Tensor:
    """The embedding the model itself computes for ``images`` (what every block gets without merging)."""
    with torch.no_grad():
        return model._pos_embed(model.patch_embed(images))[1]


def out_dim(model: Eva) -> int:
    return model.num_classes or model.num_features  # DINOv3 configs have no classifier


def ropes_given_to_blocks(model: Eva, images: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(tokens, rope) the attention of every block receives in one forward."""
    seen = []
    handles = [
        blk.attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args[0].shape[1], kwargs["rope"])),
                                           with_kwargs=True)
        for blk in model.blocks
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture(params=list(MODELS))
def model_key(request) -> str:
    return request.param


# --------------------------------------------------------------------- equality without reduction


@pytest.mark.parametrize("key", [*MODELS, *VARIANTS])
@pytest.mark.parametrize("method,options", [("cubist", dict(r=0)), ("cubist", dict(stages=[(0, 0, 0)])),
                                            ("cubist", dict(r=0, rope="tokens")), ("tome", dict(r=0))])
def test_no_reduction_equals_unpatched(key, method, options):
    model = make_model(key)
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
        for setting in SETTINGS:
            patch_with(model, setting)
            assert type(model) is not original_class and isinstance(model, original_class)
            assert (model(x) - expected).abs().max() > 1e-4, "a reduction that changes nothing is suspicious"
            cubistmerge.unpatch(model)
            assert type(model) is original_class
            assert not any(k.startswith("_cubistmerge") for k in vars(model))
            assert torch.equal(model(x), expected)


def test_state_dict_unchanged(model_key):
    model = make_model(model_key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for setting in SETTINGS:
        patch_with(model, setting)
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
        with torch.no_grad():
            model(images_for(model))
        cubistmerge.unpatch(model)


# --------------------------------------------------------------------- RoPE of merged tokens


@pytest.mark.parametrize("key", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224",
                                 "eva02_tiny_patch14_224:dynamic", "vit_pe_core_tiny_patch16_384"])
def test_rope_at_the_original_positions_is_the_models_own(key):
    """The closed-form evaluation used for merged tokens reproduces the model's embedding on its own grid."""
    model = make_model(key)
    sizes = [tuple(model.patch_embed.img_size)]
    if model.dynamic_img_size:
        patch = model.patch_embed.patch_size[0]
        sizes.append((4 * patch, 7 * patch))  # a non-square grid of another size
    for size in sizes:
        x = torch.randn(1, 3, *size)
        grid = patch_grid(model, x)
        coords = timm_eva.patch_coordinates(grid)
        ours = timm_eva.rope_embedding(model.rope, timm_eva.rope_coordinates(model.rope, coords, grid))
        assert ours.shape == own_rope(model, x).shape
        assert (ours - own_rope(model, x)).abs().max() <= 1e-6


@pytest.mark.parametrize("rope", [
    RotaryEmbeddingDinoV3(32, temperature=100.0, normalize_coords="max", grid_offset=0.25, grid_indexing="xy"),
    RotaryEmbeddingDinoV3(32, temperature=100.0, normalize_coords="min", rotate_half=False),
    RotaryEmbeddingCat(32, in_pixels=False, grid_offset=1.0, grid_indexing="xy", rotate_half=True),
    RotaryEmbeddingCat(32, in_pixels=False, ref_feat_shape=(7, 9)),
], ids=["dinov3-max-xy-offset", "dinov3-min-interleaved", "cat-xy-offset-half", "cat-ref"])
def test_rope_settings_are_reproduced(rope):
    for grid in [(5, 8), (6, 6)]:
        ours = timm_eva.rope_embedding(rope, timm_eva.rope_coordinates(rope, timm_eva.patch_coordinates(grid), grid))
        assert (ours - rope.get_embed(shape=list(grid))).abs().max() <= 1e-6


@pytest.mark.parametrize("grid,reduced", [((6, 6), (5, 4)), ((14, 14), (13, 13)), ((32, 20), (29, 18))])
def test_grid_rope_is_the_models_rope_for_the_reduced_grid(grid, reduced):
    """DINOv3: the "grid" RoPE of an H' x W' reduction is what the model computes for an H' x W' image."""
    model = make_model("vit_small_patch16_dinov3")
    coords = timm_eva.regular_grid_coordinates(grid, reduced)
    ours = timm_eva.rope_embedding(model.rope, timm_eva.rope_coordinates(model.rope, coords, grid))
    image = torch.randn(1, 3, reduced[0] * 16, reduced[1] * 16)
    assert (ours - own_rope(model, image)).abs().max() <= 1e-5


def test_grid_rope_reaches_the_blocks_after_the_reduction():
    model = make_model("vit_small_patch16_dinov3", depth=4)
    x = images_for(model)
    patch_with(model, "cubist")  # 6x6 -> 5x4 at block 1
    seen = ropes_given_to_blocks(model, x)
    assert [n for n, _ in seen] == [5 + 36, 5 + 20, 5 + 20, 5 + 20]
    assert torch.equal(seen[0][1], own_rope(model, x))
    reduced_image = torch.randn(1, 3, 5 * 16, 4 * 16)
    for _, rope in seen[1:]:
        assert rope.shape == (20, model.blocks[0].attn.head_dim * 2)  # one embedding for the batch
        assert (rope - own_rope(model, reduced_image)).abs().max() <= 1e-5


def test_grid_rope_for_index_ropes_keeps_the_extent():
    """EVA-02 (index coordinates rescaled to a reference grid): the reduced grid keeps the input's centre and
    extent, with spacing H / H' input rows; the model's own grid for an H' x W' image has the same spacing
    but starts at row 0, i.e. it differs by a constant shift (which RoPE sees only between patch and prefix)."""
    model = make_model("eva02_tiny_patch14_224:dynamic")
    grid, reduced = (6, 6), (5, 4)
    ours = timm_eva.rope_coordinates(model.rope, timm_eva.regular_grid_coordinates(grid, reduced), grid)
    original = timm_eva.rope_coordinates(model.rope, timm_eva.patch_coordinates(grid), grid)
    assert torch.allclose(ours.mean(0), original.mean(0), atol=1e-5)  # same centre
    spacing = ours.reshape(5, 4, 2)[1, 1] - ours.reshape(5, 4, 2)[0, 0]
    assert torch.allclose(spacing, torch.tensor([16 / 5, 16 / 4]), atol=1e-5)  # ref 16 over 5 rows, 4 columns
    original_spacing = torch.tensor([16 / 6, 16 / 6])
    # The cells' outer edges are the input grid's outer edges.
    assert torch.allclose(ours.amin(0) - spacing / 2, original.amin(0) - original_spacing / 2, atol=1e-5)
    assert torch.allclose(ours.amax(0) + spacing / 2, original.amax(0) + original_spacing / 2, atol=1e-5)
    own = timm_eva.rope_coordinates(model.rope, timm_eva.patch_coordinates(reduced), reduced)
    shift = ours - own
    assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5) and shift.abs().max() > 0.1


def test_tokens_rope_is_per_image_at_the_member_means():
    model = make_model("vit_small_patch16_dinov3")
    x = images_for(model, batch=3)
    patch_with(model, "tokens", trace_source=True)
    seen = ropes_given_to_blocks(model, x)
    source = model.cubistmerge_source
    p, (H, W) = model.num_prefix_tokens, grid_of(model)
    head_dim = model.blocks[0].attn.head_dim
    for _, rope in seen[1:]:
        assert rope.shape == (3, 1, 20, 2 * head_dim)
        assert not torch.equal(rope[0], rope[1])  # the images merged differently
        for b in range(3):
            expected = torch.empty(20, 2)
            for slot in range(20):
                members = (source[b, p:] - p == slot).nonzero().flatten()
                expected[slot] = torch.stack([members // W, members % W], dim=-1).float().mean(0)
            want = timm_eva.rope_embedding(model.rope, timm_eva.rope_coordinates(model.rope, expected, (H, W)))
            assert (rope[b, 0] - want).abs().max() <= 1e-5


@pytest.mark.parametrize("key", list(MODELS))
def test_rope_modes_differ(key):
    """Each mode is checked exactly against a hand-built forward in test_timm_eva_reference.py."""
    model = position_sensitive(make_model(key))
    x = images_for(model)
    with torch.no_grad():
        out = {}
        for mode in ("grid", "tokens"):
            cubistmerge.patch(model, "cubist", r=(1, 2), loc=1, rope=mode)
            out[mode] = model.forward_features(x)
    assert (out["grid"] - out["tokens"]).abs().max() > 1e-3  # well above rounding


def test_tome_positions_are_the_size_weighted_means():
    """Every block after a ToMe merge gets RoPE at the size-weighted mean position of each merged token."""
    model = make_model("eva02_tiny_patch14_224")
    x = images_for(model)
    cubistmerge.patch(model, "tome", r=[3, 0, 4, 0], trace_source=True)
    seen = ropes_given_to_blocks(model, x)
    source = model.cubistmerge_source
    (H, W), p = grid_of(model), model.num_prefix_tokens
    assert [n for n, _ in seen] == [37, 34, 34, 30]
    assert torch.equal(seen[0][1], own_rope(model, x))
    final = seen[3][1]
    assert final.shape == (2, 1, 29, 2 * model.blocks[0].attn.head_dim)
    for b in range(2):
        slots = source[b, p:] - p
        for slot in range(29):
            members = (slots == slot).nonzero().flatten()
            mean = torch.stack([members // W, members % W], dim=-1).float().mean(0, keepdim=True)
            want = timm_eva.rope_embedding(model.rope, timm_eva.rope_coordinates(model.rope, mean, (H, W)))
            assert (final[b, 0, slot] - want[0]).abs().max() <= 1e-5


def test_member_means_equal_chained_size_weighted_merges():
    """The mean over original members equals ToMe's own size-weighted averaging of positions, merge after merge."""
    generator = torch.Generator().manual_seed(0)
    B, p, grid = 2, 2, (5, 6)
    coords = timm_eva.patch_coordinates(grid)
    tokens = torch.cat([torch.zeros(B, p, 2), coords.expand(B, -1, 2)], dim=1)  # positions carried as tokens
    state = MergeState(num_prefix=p, num_original=p + 30, grid=None)
    size = None
    for r in (6, 5, 3):
        metric = torch.randn(B, tokens.shape[1], 8, generator=generator)
        match = match_bipartite(metric, r, num_protected=p)
        tokens, size = merge_matched(tokens, match, size)
        state = state.merged(match.index, tokens.shape[1], grid=None, size=size)
    means = timm_eva.member_mean_coordinates(state.groups, p, grid, tokens.shape[1] - p)
    assert torch.allclose(means, tokens[:, p:], atol=1e-5)


# --------------------------------------------------------------------- the model contracts


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_forward_contracts(model_key, setting):
    model = make_model(model_key)
    x = images_for(model)
    H, W = grid_of(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        ref_features = model.forward_features(x)
        ref_logits = model(x)
        patch_with(model, setting)
        features = model.forward_features(x)
        assert features.shape == ref_features.shape == (2, p + H * W, model.embed_dim)
        logits = model.forward_head(features)
        assert logits.shape == ref_logits.shape
        # forward() pools the merged tokens, as the methods' own code does (see test_timm_vit).
        tokens = patch_with(copy.deepcopy(model), setting, recover_output=False).forward_features(x)
        assert tokens.shape[1] < features.shape[1]
        assert torch.allclose(model(x), model.forward_head(tokens), atol=1e-6)
        if model.global_pool == "token":
            assert torch.allclose(model(x), logits, atol=1e-6)
        else:
            assert not torch.allclose(model(x), logits, atol=1e-6)
        assert model.forward_head(features, pre_logits=True).shape[-1] == model.num_features

        final, intermediates = model.forward_intermediates(x, indices=[0, 2, 3])
        assert final.shape == features.shape
        assert torch.allclose(final, features, atol=1e-6)
        assert [t.shape for t in intermediates] == [(2, model.embed_dim, H, W)] * 3
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True, norm=True)
        assert [t.shape for t in nlc] == [(2, H * W, model.embed_dim)] * 2
        with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        assert with_prefix[0][0].shape == (2, model.embed_dim, H, W) and with_prefix[0][1].shape == (2, p, 64)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert early[0].shape == (2, model.embed_dim, H, W)


@pytest.mark.parametrize("key", ["vit_pe_core_tiny_patch16_384", "eva02_tiny_patch14_224:postnorm",
                                 "eva02_tiny_patch14_224:norope"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_other_family_members(key, setting):
    """AttentionRope with xy RoPE and attention pooling, post-norm blocks, and an Eva without RoPE."""
    model = make_model(key)
    x = images_for(model)
    with torch.no_grad():
        expected = model(x)
        patch_with(model, setting)
        out = model(x)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    # Values: exact against a hand-built forward in test_timm_eva_reference.py (FAMILY_MEMBERS).


def test_intermediates_after_reduction_are_recovered_grids():
    """A reduced block's output, recovered, is constant over every merged group and differs from unmerged."""
    model = make_model("vit_small_patch16_dinov3")
    x = images_for(model)
    p = model.num_prefix_tokens
    with torch.no_grad():
        _, plain = model.forward_intermediates(x, indices=[0, 3])
        cubistmerge.patch(model, "cubist", r=2, loc=1, trace_source=True)
        _, merged = model.forward_intermediates(x, indices=[0, 3])
    source = model.cubistmerge_source
    assert torch.allclose(merged[0], plain[0], atol=1e-6)  # block 0 runs before the reduction
    H, W = grid_of(model)
    flat = merged[1].permute(0, 2, 3, 1).reshape(2, H * W, -1)
    assert not torch.allclose(merged[1], plain[1], atol=1e-3)
    for b in range(2):
        groups = source[b, p:] - p
        for g in groups.unique():
            members = flat[b, groups == g]
            assert torch.equal(members, members[:1].expand_as(members))
    assert len(source[0, p:].unique()) == (H - 2) * (W - 2)


def test_recover_output_false_returns_merged_tokens():
    model = make_model("vit_small_patch16_dinov3")
    x = images_for(model)
    H, W = grid_of(model)
    cubistmerge.patch(model, "cubist", r=(1, 2), loc=1, recover_output=False)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 5 + (H - 1) * (W - 2), model.embed_dim)
        assert model(x).shape == (2, out_dim(model))
    cubistmerge.patch(model, "tome", r=3, recover_output=False)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 5 + H * W - 3 * len(model.blocks), model.embed_dim)


def test_cubist_stages_and_fractions():
    model = make_model("vit_small_patch16_dinov3", img_size=128, depth=5)  # 8x8 grid
    cubistmerge.patch(model, "cubist", stages=[(1, 1, 2), (3, 0.25, 0.25)])
    seen = ropes_given_to_blocks(model, images_for(model))
    # block 0: 8x8; blocks 1-2: 7x6; blocks 3-4: 7x6 minus round(0.25*7)=2 rows, round(0.25*6)=2 cols -> 5x4
    assert [n for n, _ in seen] == [5 + 64, 5 + 42, 5 + 42, 5 + 20, 5 + 20]
    assert (seen[3][1] - own_rope(model, torch.randn(1, 3, 5 * 16, 4 * 16))).abs().max() <= 1e-5


# --------------------------------------------------------------------- prefix tokens, batch independence


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_prefix_tokens_are_never_merged_nor_rotated(model_key, setting):
    model = make_model(model_key)
    x = images_for(model)
    p = model.num_prefix_tokens
    assert all(blk.attn.num_prefix_tokens == p for blk in model.blocks)  # the attention skips them for RoPE
    patch_with(model, setting, trace_source=True)
    seen = ropes_given_to_blocks(model, x)
    for tokens, rope in seen:
        assert rope.shape[-2] == tokens - p  # one rotation per patch token, none for the prefix
    source = model.cubistmerge_source
    assert source.shape == (2, p + grid_of(model)[0] * grid_of(model)[1])
    assert torch.equal(source[:, :p], torch.arange(p).expand(2, p))
    assert (source[:, p:] >= p).all()
    assert len(source[0].unique()) < source.shape[1]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_images_in_a_batch_merge_independently(model_key, setting):
    model = make_model(model_key)
    x = images_for(model, batch=3)
    patch_with(model, setting)
    with torch.no_grad():
        together = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i : i + 1]) for i in range(3)])
    assert (together - alone).abs().max() <= 1e-5


# --------------------------------------------------------------------- attention: fused, masks


def test_fused_attention_stays_in_use(monkeypatch):
    model = make_model("vit_small_patch16_dinov3")
    assert all(blk.attn.fused_attn for blk in model.blocks)
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((k.shape[2], attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = images_for(model)
    cubistmerge.patch(model, "tome", r=4)
    with torch.no_grad():
        model(x)
    assert [n for n, _ in calls] == [41, 37, 33, 29]
    assert calls[0][1] is None
    assert all(mask.shape == (2, 1, 1, n) for n, mask in calls[1:])  # proportional attention: log(size)
    calls.clear()
    cubistmerge.patch(model, "cubist", r=1, rope="tokens")
    with torch.no_grad():
        model(x)
    assert [n for n, _ in calls] == [41, 30, 30, 30] and all(mask is None for _, mask in calls)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_attention_mask_keeps_working_after_merging(setting):
    """Prefix tokens that may only attend each other must not see the image, reduction or not."""
    model = make_model("vit_small_patch16_dinov3")
    p, (H, W) = model.num_prefix_tokens, grid_of(model)
    n = p + H * W
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:p, :p] = True
    mask[p:, p:] = True
    a, b = images_for(model, seed=1), images_for(model, seed=2)
    patch_with(model, setting)
    with torch.no_grad():
        prefix_a = model.forward_features(a, attn_mask=mask)[:, :p]
        prefix_b = model.forward_features(b, attn_mask=mask)[:, :p]
        assert torch.allclose(prefix_a, prefix_b, atol=1e-5)
        assert not torch.allclose(prefix_a, model.forward_features(a)[:, :p], atol=1e-3)
        full = torch.ones(n, n, dtype=torch.bool)
        assert torch.allclose(model.forward_features(a, attn_mask=full), model.forward_features(a), atol=1e-5)


def test_attention_mask_equals_unpatched_without_reduction():
    model = make_model("eva02_tiny_patch14_224")
    mask = torch.randn(2, 1, 37, 37)
    x = images_for(model)
    with torch.no_grad():
        expected = model.forward_features(x, attn_mask=mask)
        cubistmerge.patch(model, "tome", r=0)
        assert (model.forward_features(x, attn_mask=mask) - expected).abs().max() <= 1e-5
        cubistmerge.patch(model, "cubist", r=0)
        assert (model.forward_features(x, attn_mask=mask) - expected).abs().max() <= 1e-5


# --------------------------------------------------------------------- dtypes, training, gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dtypes(model_key, setting, dtype):
    """In bf16 / fp16 the merged model is as close to itself in float32 as the unmerged model is to itself.

    CubistMerge with mean merges (max-magnitude selections flip near ties of magnitudes, see test_timm_vit);
    the float32 run replays the low-precision run's matching. Measured ratio at most 1.2; bound 2.
    """
    model = make_model(model_key)
    extra = {"representation": "mean"} if method_of(setting) == "cubist" else {}
    merged = patch_with(copy.deepcopy(model), setting, **extra)
    choices = ((cubist_module, "match_neighbours"), (_after_attention, "match_bipartite"))
    unmerged_error, merged_error = low_precision_errors(model, merged, images_for(model), dtype, choices=choices)
    assert merged_error <= 2 * unmerged_error


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_gradients_reach_parameters(model_key, setting, checkpointing):
    model = make_model(model_key, drop_path_rate=0.2, attn_drop_rate=0.1)
    model.set_grad_checkpointing(checkpointing)
    patch_with(model, setting)
    model.train()
    x = images_for(model)
    model(x).logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    if model.reg_token is not None:
        assert model.reg_token.grad.abs().sum() > 0


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make_model("vit_small_patch16_dinov3")
        model.set_grad_checkpointing(checkpointing)
        cubistmerge.patch(model, "tome", r=3)
        model(images_for(model)).sum().backward()
        grads.append(model.blocks[1].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_inputs_not_modified():
    model = patch_with(make_model("vit_small_patch16_dinov3"), "tokens")
    x = images_for(model)
    before, version = x.clone(), x._version
    with torch.no_grad():
        model(x)
    assert torch.equal(x, before) and x._version == version


# --------------------------------------------------------------------- state, re-patching, image sizes


def test_patch_twice_and_new_settings():
    model = make_model("vit_small_patch16_dinov3")
    x = images_for(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        cubistmerge.patch(model, "cubist", r=1, rope="tokens")
        cubistmerge.patch(model, "cubist", r=2, loc=2)
        cubistmerge.patch(reference, "cubist", r=2, loc=2)
        assert model._cubistmerge_options.rope == "grid"
        assert torch.equal(model(x), reference(x))
        cubistmerge.patch(model, "tome", r=3)
        cubistmerge.patch(reference, "tome", r=3)
        assert torch.equal(model(x), reference(x))
    cubistmerge.unpatch(model)
    assert type(model) is Eva


@pytest.mark.parametrize("key", ["vit_small_patch16_dinov3", "eva02_tiny_patch14_224:dynamic"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dynamic_image_sizes_and_state_does_not_leak(key, setting):
    model = make_model(key)
    patch = model.patch_embed.patch_size[0]
    patch_with(model, setting, trace_source=True)
    p = model.num_prefix_tokens
    small, large = torch.randn(1, 3, 6 * patch, 6 * patch), torch.randn(1, 3, 8 * patch, 10 * patch)
    with torch.no_grad():
        first = model.forward_features(small)
        assert model.forward_features(large).shape == (1, p + 8 * 10, model.embed_dim)
        assert model.cubistmerge_source.shape == (1, p + 80)
        assert torch.equal(model.forward_features(small), first)
        assert model(large).shape == (1, out_dim(model))
        _, inter = model.forward_intermediates(large, indices=1)
        assert inter[0].shape == (1, model.embed_dim, 8, 10)
    assert not any(torch.is_tensor(v) for k, v in vars(model).items() if k != "cubistmerge_source")


def test_grid_rope_follows_the_image_size():
    model = make_model("vit_small_patch16_dinov3")
    patch_with(model, "cubist")  # r=(1, 2)
    large = torch.randn(1, 3, 8 * 16, 10 * 16)
    seen = ropes_given_to_blocks(model, large)
    assert (seen[1][1] - own_rope(model, torch.randn(1, 3, 7 * 16, 8 * 16))).abs().max() <= 1e-5


# --------------------------------------------------------------------- errors


def test_unsupported_eva_variants_get_a_clear_error():
    mixed = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, img_size=64, depth=2)
    with pytest.raises(UnsupportedModelError, match="mixed RoPE"):
        cubistmerge.patch(mixed, "cubist")
    with pytest.raises(UnsupportedModelError, match="Supported families: .*timm Eva"):
        cubistmerge.patch(torch.nn.Linear(3, 3), "cubist")


@pytest.mark.parametrize("method,options,error,message", [
    ("cubist", dict(rope="pixels"), ValueError, "rope must be one of"),
    ("cubist", dict(r=4), ValueError, "at most 3 per column"),  # 6x6 grid
    ("cubist", dict(r=(1, 1), loc=4), ValueError, r"loc must be a block index in \[0, 3\]"),
    ("tome", dict(rope="tokens"), TypeError, "Options of method=.tome. for this model: r, prop_attn"),
    ("cubist", dict(ropes="grid"), TypeError, "Options of method=.cubist. for this model: .*, rope"),
])
def test_bad_options(method, options, error, message):
    model = make_model("vit_small_patch16_dinov3")
    with pytest.raises(error, match=message):
        cubistmerge.patch(model, method, **options)
    assert type(model) is Eva  # a refused patch leaves the model alone


def test_grid_too_small_at_run_time():
    model = patch_with(make_model("vit_small_patch16_dinov3"), "cubist")
    cubistmerge.patch(model, "cubist", r=3)
    with pytest.raises(ValueError, match="0 to 2 tokens"):
        model(torch.randn(1, 3, 80, 80))  # 5x5 grid: at most 2 per row


@pytest.mark.parametrize("setting", ["cubist", "tome"])
def test_patch_dropout_is_refused_in_training(setting):
    model = make_model("vit_small_patch16_dinov3", patch_drop_rate=0.5)
    patch_with(model, setting).train()
    with pytest.raises(RuntimeError, match="patch dropout"):
        model(images_for(model))
    model.eval()
    with torch.no_grad():
        assert model(images_for(model)).shape == (2, out_dim(model))


def test_tome_without_rope_runs_with_patch_dropout():
    model = make_model("eva02_tiny_patch14_224:norope", patch_drop_rate=0.5)
    cubistmerge.patch(model, "tome", r=2).train()
    assert model(images_for(model)).shape == (2, out_dim(model))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_rope_coordinate_augmentation_is_refused_in_training(setting):
    model = make_model("vit_small_patch16_dinov3", rope_rescale_coords=2.0)
    patch_with(model, setting).train()
    with pytest.raises(RuntimeError, match="coordinate augmentations"):
        model(images_for(model))
    model.eval()  # no augmentation in eval: fine
    with torch.no_grad():
        assert model(images_for(model)).shape == (2, out_dim(model))
