"""cubistmerge.patch(model, "expedite"): the Expedite baseline on plain timm ViTs and SAM encoders.

Exactness: Expedite's soft k-means moves the centres even when the grid keeps
its size, so "no reduction" is defined as r resolving to 0, where nothing is
clustered and the model runs exactly as unpatched (tested below); the exact
properties of the clustering itself at full size are in tests/merge/test_expedite.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.predictor import SamPredictor
from timm.models.vision_transformer import VisionTransformer

import cubistmerge
from cubistmerge.merge import expedite_cluster
from cubistmerge.patch import UnsupportedModelError

from .._precision import low_precision_errors

# --------------------------------------------------------------------------- plain ViTs

VITS = {
    "vit_tiny_patch16_224": dict(img_size=96, depth=4),  # 6x6 grid, CLS
    "deit_tiny_distilled_patch16_224": dict(img_size=96, depth=4),  # CLS + distillation token
    "vit_small_patch14_reg4_dinov2": dict(img_size=98, depth=4, embed_dim=64, num_heads=2, init_values=0.1),
    "vit_tiny_patch16_224:gap": dict(img_size=112, depth=4, class_token=False, global_pool="avg", init_values=0.1),
}


def make_vit(key: str = "vit_tiny_patch16_224", **overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return timm.create_model(key.split(":")[0], pretrained=False, **{**VITS[key], **overrides}).eval()


def images_for(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(VITS))
def vit_key(request) -> str:
    return request.param


def test_vit_no_reduction_equals_unpatched(vit_key):
    model = make_vit(vit_key)
    x = images_for(model)
    with torch.no_grad():
        expected, expected_features = model(x), model.forward_features(x)
        cubistmerge.patch(model, "expedite", r=0, loc=1)
        assert torch.equal(model(x), expected)
        assert torch.equal(model.forward_features(x), expected_features)


def test_vit_shapes_equal_unpatched_and_unpatch_restores(vit_key):
    model = make_vit(vit_key)
    original = type(model)
    x = images_for(model)
    H, W = model.patch_embed.grid_size
    p = model.num_prefix_tokens
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected, features = model(x), model.forward_features(x)
        cubistmerge.patch(model, "expedite", r=2, loc=1)
        assert type(model) is not original and isinstance(model, original)
        out, patched_features = model(x), model.forward_features(x)
        assert out.shape == expected.shape and patched_features.shape == features.shape == (
            2,
            p + H * W,
            model.embed_dim,
        )
        assert torch.isfinite(out).all() and (out - expected).abs().max() > 1e-4
        final, inter = model.forward_intermediates(x, indices=[0, 3])
        assert final.shape == features.shape and [t.shape for t in inter] == [(2, model.embed_dim, H, W)] * 2
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True, norm=True)
        assert nlc[0].shape == (2, H * W, model.embed_dim)
        cubistmerge.unpatch(model)
    assert type(model) is original and not any(k.startswith("_cubistmerge") for k in vars(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def _tokens_per_block(model, x) -> list[int]:
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1])) for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_vit_later_blocks_run_on_the_clustered_grid():
    model = make_vit(img_size=128, depth=5)  # 8x8 grid
    x = images_for(model)
    cubistmerge.patch(model, "expedite", r=(1, 3), loc=2)
    assert _tokens_per_block(model, x) == [65, 65, 1 + 7 * 5, 1 + 7 * 5, 1 + 7 * 5]
    cubistmerge.patch(model, "expedite", r=0.25, loc=0)  # round(0.25 * 8) = 2 per side
    assert _tokens_per_block(model, x) == [1 + 36] * 5
    cubistmerge.patch(model, "expedite", r=7)  # one token left
    assert _tokens_per_block(model, x)[1:] == [2] * 4


def test_vit_clustered_tokens_are_expedite_of_the_block_input_and_prefix_passes_through():
    model = make_vit("deit_tiny_distilled_patch16_224")
    x = images_for(model)
    captured = []
    hook = model.blocks[2].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(x)  # unpatched: the input of block 2
        cubistmerge.patch(model, "expedite", r=2, loc=2, iterations=3, k=5)
        model(x)
    hook.remove()
    plain, clustered = captured
    expected, _ = expedite_cluster(plain[:, 2:].reshape(2, 6, 6, -1), (4, 4), iterations=3, k=5)
    assert torch.equal(clustered[:, :2], plain[:, :2])
    assert torch.allclose(clustered[:, 2:], expected.reshape(2, 16, -1), atol=1e-6)


def test_vit_reconstruction_runs_before_the_final_norm():
    """forward_features = norm(prefix + reconstruct(patches of the last block's output))."""
    model = make_vit()
    x = images_for(model)
    outputs, inputs = [], []
    hooks = [
        model.blocks[-1].register_forward_hook(lambda _m, _a, out: outputs.append(out)),
        model.blocks[1].register_forward_pre_hook(lambda _m, args: inputs.append(args[0])),
    ]
    cubistmerge.patch(model, "expedite", r=2, loc=1, normalise="l2")
    with torch.no_grad():
        features = model.forward_features(x)
    for h in hooks:
        h.remove()
    # Rebuild the clustering on block 1's input to get the same reconstruction.
    unpatched = make_vit()
    captured = []
    hook = unpatched.blocks[1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        unpatched(x)
    hook.remove()
    _, reconstruct = expedite_cluster(captured[0][:, 1:].reshape(2, 6, 6, -1), (4, 4), normalise="l2")
    last = outputs[0]
    rebuilt = torch.cat([last[:, :1], reconstruct(last[:, 1:].reshape(2, 4, 4, -1)).reshape(2, 36, -1)], dim=1)
    assert torch.allclose(features, model.norm(rebuilt), atol=1e-5)


def test_vit_recover_output_false_returns_clustered_tokens():
    model = make_vit()
    x = images_for(model)
    cubistmerge.patch(model, "expedite", r=(1, 2), loc=1, recover_output=False)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1 + 5 * 4, model.embed_dim)
        assert model(x).shape == (2, model.num_classes)


def test_vit_batch_independence_dtypes_and_gradients():
    model = make_vit("vit_small_patch14_reg4_dinov2", drop_path_rate=0.1)
    x = images_for(model, batch=3)
    cubistmerge.patch(model, "expedite", r=2, loc=1)
    with torch.no_grad():
        together = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i : i + 1]) for i in range(3)])
        assert (together - alone).abs().max() <= 1e-4
    # bf16: as close to float32 as the unmerged model is (measured ratio 0.79).
    unmerged = make_vit("vit_small_patch14_reg4_dinov2", drop_path_rate=0.1).eval()
    errors = low_precision_errors(unmerged, model, x, torch.bfloat16)
    assert errors[1] <= 2 * errors[0]
    model.float().train()
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert missing == []


def test_vit_dynamic_sizes_and_inputs_not_modified():
    model = make_vit(dynamic_img_size=True)
    cubistmerge.patch(model, "expedite", r=0.25, loc=1)
    small, large = torch.randn(1, 3, 96, 96), torch.randn(1, 3, 128, 160)
    before = large.clone()
    with torch.no_grad():
        first = model.forward_features(small)
        assert model.forward_features(large).shape == (1, 1 + 8 * 10, model.embed_dim)
        assert torch.equal(model.forward_features(small), first)
        _, inter = model.forward_intermediates(large, indices=2)
    assert inter[0].shape == (1, model.embed_dim, 8, 10)
    assert torch.equal(large, before)


def test_vit_refusals():
    model = make_vit(patch_drop_rate=0.5)
    cubistmerge.patch(model, "expedite", r=1).train()
    with pytest.raises(RuntimeError, match="Expedite needs every patch"):
        model(images_for(model))
    model = cubistmerge.patch(make_vit(), "expedite", r=1)
    with pytest.raises(ValueError, match="attn_mask cannot be combined with Expedite"):
        model(images_for(model), attn_mask=torch.ones(37, 37, dtype=torch.bool))
    model = cubistmerge.patch(make_vit(dynamic_img_size=True), "expedite", r=5)
    with pytest.raises(ValueError, match="at least one token per side"):
        model(torch.randn(1, 3, 80, 80))  # 5x5 grid


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(r=6), "at most 5 per column"),  # 6x6 grid
        (dict(r=1.0), r"\[0, 1\)"),
        (dict(r=-1), ">= 0"),
        (dict(r=(1, 2, 3)), r"\(r_h, r_w\)"),
        (dict(loc=4), r"loc must be a block index in \[0, 3\]"),
        (dict(neighbourhood=4), "neighbourhood must be odd"),
        (dict(iterations=-1), "iterations must be an int >= 0"),
        (dict(k=0), "k must be an int >= 1"),
        (dict(temperature=0), "temperature must be a finite number > 0"),
        (dict(normalise="max"), "normalise must be one of"),
    ],
)
def test_vit_bad_options(options, message):
    model = make_vit()
    with pytest.raises(ValueError, match=message):
        cubistmerge.patch(model, "expedite", **options)
    assert type(model) is VisionTransformer


def test_unknown_options_name_the_allowed_ones():
    with pytest.raises(TypeError, match="Options of method='expedite' for this model: r, loc, neighbourhood"):
        cubistmerge.patch(make_vit(), "expedite", trace_source=True)
    with pytest.raises(TypeError, match="Options of method='expedite'"):
        cubistmerge.patch(make_sam_encoder("timm"), "expedite", windows="grid")


def test_unsupported_families_say_which_support_expedite():
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=84, depth=2, embed_dim=64, num_heads=2)
    tiny_vit = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=10, depths=(1, 1, 1, 1))
    for model in (eva, tiny_vit):
        original = type(model)
        with pytest.raises(UnsupportedModelError, match="method='expedite' is not available for timm") as error:
            cubistmerge.patch(model, "expedite", r=1)
        assert "Families that support 'expedite': timm VisionTransformer" in str(error.value)
        assert "VisionTransformerSAM" in str(error.value) and "segment_anything ImageEncoderViT" in str(error.value)
        assert type(model) is original
    cubistmerge.patch(eva, "cubist", r=1)  # the family itself still works
    with pytest.raises(UnsupportedModelError, match="not available"):
        cubistmerge.patch(eva, "expedite", r=1)  # re-patching a patched Eva is refused too
    assert type(eva).__name__.startswith("Merging")


# --------------------------------------------------------------------------- SAM encoders

IMG = 256  # 16x16 grid, 7x7 windows: 7 + 7 + 2
KINDS = ["timm", "segment_anything"]


def make_sam_encoder(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = dict(depth=4, embed_dim=96, num_heads=4, window_size=7)
    config.update(overrides)
    if kind == "timm":
        model = timm.create_model(
            "samvit_base_patch16",
            pretrained=False,
            img_size=IMG,
            global_attn_indexes=[1, 3],
            neck_chans=32,
            num_classes=0,
            **config,
        )
    else:
        model = ImageEncoderViT(img_size=IMG, use_rel_pos=True, global_attn_indexes=(1, 3), out_chans=32, **config)
    for name, p in model.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def encode(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x) if hasattr(model, "forward_features") else model(x)


@pytest.fixture
def sam_images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _attention_inputs(model, images) -> list[tuple[int, ...]]:
    seen = []
    hooks = [
        blk.attn.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[:3])))
        for blk in model.blocks
    ]
    with torch.no_grad():
        encode(model, images)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_sam_no_reduction_equals_unpatched(kind, sam_images):
    model = make_sam_encoder(kind)
    with torch.no_grad():
        expected = encode(model, sam_images)
        cubistmerge.patch(model, "expedite", r=0)
        assert torch.equal(encode(model, sam_images), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_sam_shapes_equal_unpatched_and_unpatch_restores(kind, sam_images):
    model = make_sam_encoder(kind)
    original = type(model)
    with torch.no_grad():
        expected = encode(model, sam_images)
        cubistmerge.patch(model, "expedite", r=2, loc=1)
        out = encode(model, sam_images)
        assert out.shape == expected.shape == (2, 32, 16, 16)
        assert torch.isfinite(out).all() and (out - expected).abs().max() > 1e-3
        cubistmerge.unpatch(model)
        assert type(model) is original
        assert torch.equal(encode(model, sam_images), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_sam_clusters_every_window(kind, sam_images):
    model = make_sam_encoder(kind)
    cubistmerge.patch(model, "expedite", r=2, loc=1)
    # Windows of 7 become 5; the 2-token edge windows 1 (round(2 * 5 / 7)): grid 5 + 5 + 1 = 11.
    assert _attention_inputs(model, sam_images) == [(18, 7, 7), (2, 11, 11), (18, 5, 5), (2, 11, 11)]
    cubistmerge.patch(model, "expedite", r=0.5, loc=2)  # round(3.5) = 4 fewer per window side: 3 + 3 + 1 = 7
    assert _attention_inputs(model, sam_images) == [(18, 7, 7), (2, 16, 16), (18, 3, 3), (2, 7, 7)]


@pytest.mark.parametrize("kind", KINDS)
def test_sam_without_windows_clusters_the_whole_grid(kind, sam_images):
    model = make_sam_encoder(kind, window_size=0)
    cubistmerge.patch(model, "expedite", r=(3, 5), loc=1)
    assert _attention_inputs(model, sam_images) == [(2, 16, 16), (2, 13, 11), (2, 13, 11), (2, 13, 11)]
    with torch.no_grad():
        assert encode(model, sam_images).shape == (2, 32, 16, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_sam_windows_never_mix(kind):
    """Changing the image inside one window changes, before any global block, only that window."""
    model = make_sam_encoder(kind)
    blocks = model.blocks
    cubistmerge.patch(model, "expedite", r=2, loc=0)
    for blk in blocks:
        blk.window_size = 7  # every block windowed: nothing global can carry information across windows
    a = torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[..., :112, :112] += torch.randn(1, 3, 112, 112)  # only the top-left 7x7-token window
    with torch.no_grad():
        if kind == "timm":
            grid_a = model.forward_intermediates(a, indices=[3])[1][0]
            grid_b = model.forward_intermediates(b, indices=[3])[1][0]
        else:
            grid_a, grid_b = encode(model, a), encode(model, b)
    changed = (grid_a - grid_b).abs().amax(1)[0] > 1e-5
    if kind == "timm":
        assert changed[:7, :7].all() and not changed[:, 7:].any() and not changed[7:, :].any()
    else:  # the neck's 3x3 conv spreads one token: compare away from the window's border
        assert changed[:7, :7].any() and not changed[:, 8:].any() and not changed[8:, :].any()


@pytest.mark.parametrize("kind", KINDS)
def test_sam_batch_independence_dtypes_and_gradients(kind, sam_images):
    model = make_sam_encoder(kind)
    cubistmerge.patch(model, "expedite", r=2, loc=1)
    with torch.no_grad():
        together = encode(model, sam_images)
        alone = torch.cat([encode(model, sam_images[i : i + 1]) for i in range(2)])
        assert (together - alone).abs().max() <= 1e-4
    # bf16: as close to float32 as the unmerged encoder is.
    errors = low_precision_errors(make_sam_encoder(kind), model, sam_images, torch.bfloat16, encode)
    assert errors[1] <= 2 * errors[0]
    model.float().train()
    encode(model, sam_images).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("rel_pos" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_timm_sam_intermediates_are_full_grids(sam_images):
    model = make_sam_encoder("timm")
    cubistmerge.patch(model, "expedite", r=2, loc=1)
    with torch.no_grad():
        final, inter = model.forward_intermediates(sam_images, indices=[0, 2, 3])
    assert final.shape == (2, 32, 16, 16)
    assert [t.shape for t in inter] == [(2, 96, 16, 16)] * 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "options,message",
    [
        (dict(r=7), "at most 6 per column"),  # windows of 7
        (dict(r=(1, 2)), "SAM windows are square"),
        (dict(r=1, loc=4), r"loc must be a block index in \[0, 3\]"),
    ],
)
def test_sam_bad_options(kind, options, message):
    model = make_sam_encoder(kind)
    with pytest.raises(ValueError, match=message):
        cubistmerge.patch(model, "expedite", **options)


def test_sam_predictor_works_with_expedite():
    torch.manual_seed(0)
    prompt_encoder = PromptEncoder(
        embed_dim=32, image_embedding_size=(16, 16), input_image_size=(IMG, IMG), mask_in_chans=8
    )
    decoder = MaskDecoder(
        transformer_dim=32,
        transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
        iou_head_hidden_dim=32,
    )
    sam = Sam(make_sam_encoder("segment_anything"), prompt_encoder, decoder).eval()
    image = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    box = np.array([20, 30, 180, 150])
    cubistmerge.patch(sam, "expedite", r=2, loc=1)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    assert predictor.features.shape == (1, 32, 16, 16)
    masks, _, low_res = predictor.predict(box=box, multimask_output=False)
    assert masks.shape == (1, 200, 300) and low_res.shape == (1, 64, 64)
    cubistmerge.unpatch(sam)
    assert type(sam.image_encoder) is ImageEncoderViT
