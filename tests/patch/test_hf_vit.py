"""cubistmerge.patch on Hugging Face transformers ViTs: ViT, DeiT, DINOv2 (+ registers), DINOv3 (RoPE), heads."""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import timm
import torch

transformers = pytest.importorskip("transformers")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (  # noqa: E402
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import cubistmerge  # noqa: E402
from cubistmerge.merge.cubist import cubist_merge  # noqa: E402
from cubistmerge.patch import UnsupportedModelError, hf_dinov3, hf_vit  # noqa: E402

IMAGE = 48  # 6 x 6 patches of 8 pixels
PATCH = 8
GRID = (IMAGE // PATCH, IMAGE // PATCH)
COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE, patch_size=PATCH)

# key -> (model class, config, prefix tokens, methods)
MODELS = {
    "vit": (ViTModel, lambda: ViTConfig(**COMMON, intermediate_size=64, layer_norm_eps=1e-6), 1),
    "deit": (DeiTModel, lambda: DeiTConfig(**COMMON, intermediate_size=64), 2),
    "dinov2": (Dinov2Model, lambda: Dinov2Config(**COMMON, mlp_ratio=2, layerscale_value=0.1, layer_norm_eps=1e-6), 1),
    "dinov2_reg": (
        Dinov2WithRegistersModel,
        lambda: Dinov2WithRegistersConfig(**COMMON, mlp_ratio=2, layerscale_value=0.1, num_register_tokens=2),
        3,
    ),
    "dinov3": (
        DINOv3ViTModel,
        lambda: DINOv3ViTConfig(**COMMON, intermediate_size=64, layerscale_value=0.1, num_register_tokens=2),
        3,
    ),
}
SETTINGS = {
    "cubist": dict(r=2, loc=1),
    "tome": dict(r=4),
    "expedite": dict(r=2, loc=1),
}
NO_REDUCTION = {"cubist": dict(r=0), "tome": dict(r=0), "expedite": dict(r=0)}


def methods_of(key: str) -> list[str]:
    return ["cubist", "tome"] if key == "dinov3" else ["cubist", "tome", "expedite"]


ALL_CASES = [(key, method) for key in MODELS for method in methods_of(key)]


def make_model(key: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    cls, config_fn, _ = MODELS[key]
    config = config_fn()
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=attn)
    with torch.no_grad():  # weights large enough that merges matter (HF initialises with std 0.02)
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
    return model.to(dtype).eval()


def images(batch: int = 2, seed: int = 1, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prefix_of(key: str) -> int:
    return MODELS[key][2]


def layers_of(model) -> torch.nn.ModuleList:
    if isinstance(model, ViTModel | DeiTModel):
        return model.layers
    if isinstance(model, DINOv3ViTModel):
        return model.model.layer
    return model.encoder.layer


def run(model, x, **kwargs) -> torch.Tensor:
    return model(x, **kwargs).last_hidden_state


# --------------------------------------------------------------------- identity, unpatch, no state


@pytest.mark.parametrize("key,method", ALL_CASES)
def test_no_reduction_equals_unpatched(key, method):
    model = make_model(key)
    x = images()
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
        cubistmerge.patch(model, method, **NO_REDUCTION[method])
        out = model(x, output_hidden_states=True)
    assert type(out) is type(expected)
    assert (out.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-5
    assert (out.pooler_output - expected.pooler_output).abs().max() <= 1e-5
    assert len(out.hidden_states) == len(expected.hidden_states) == len(layers_of(model)) + 1
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("key", list(MODELS))
def test_unpatch_restores_class_and_outputs(key):
    model = make_model(key)
    original_class = type(model)
    before = set(vars(model))
    x = images()
    with torch.no_grad():
        expected = run(model, x)
        for method in methods_of(key):
            cubistmerge.patch(model, method, **SETTINGS[method])
            assert type(model) is not original_class and isinstance(model, original_class)
            merged = run(model, x)
            assert merged.shape == expected.shape
            assert (merged - expected).abs().max() > 1e-3, "a reduction that changes nothing is suspicious"
            assert set(vars(model)) - before == {
                "_cubistmerge_original_class",
                "_cubistmerge_options",
                "_cubistmerge_family",
            }, "nothing but the settings may stay on the model after a forward"
            cubistmerge.unpatch(model)
            assert type(model) is original_class
            assert set(vars(model)) == before
            assert torch.equal(run(model, x), expected)


# --------------------------------------------------------------------- exact references


def reference_cubist(model, key: str, x: torch.Tensor, r: int, loc: int) -> torch.Tensor:
    """CubistMerge by hand from the model's own modules: embed, layers, one cubist_merge before layer ``loc``,
    final norm, merged tokens copied back to their patches."""
    p = prefix_of(key)
    H, W = GRID
    if key == "dinov3":
        hidden = model.embeddings(x)
        rope = model.rope_embeddings(x)
        norm = model.norm
    else:
        hidden = model.embeddings(x)
        norm = model.layernorm
    recover = None
    for i, layer in enumerate(layers_of(model)):
        if i == loc:
            B, _, C = hidden.shape
            merged, recover = cubist_merge(hidden[:, p:].reshape(B, H, W, C), r, r)
            Hm, Wm = recover.merged_grid
            hidden = torch.cat([hidden[:, :p], merged.reshape(B, Hm * Wm, C)], dim=1)
            if key == "dinov3":  # the model's own RoPE for an image of the reduced grid
                rope = model.rope_embeddings(torch.zeros(1, 3, Hm * PATCH, Wm * PATCH))
        if key == "dinov3":
            hidden = layer(hidden, None, position_embeddings=rope)
        else:
            hidden = layer(hidden, None)
    out = norm(hidden)
    B, _, C = out.shape
    patches = recover(out[:, p:].reshape(B, *recover.merged_grid, C)).reshape(B, H * W, C)
    return torch.cat([out[:, :p], patches], dim=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("key", list(MODELS))
def test_cubist_equals_hand_built_reduced_forward(key, attn):
    model = make_model(key, attn)
    x = images()
    with torch.no_grad():
        expected = reference_cubist(model, key, x, r=2, loc=1)
        cubistmerge.patch(model, "cubist", r=2, loc=1)
        out = model(x)
    assert (out.last_hidden_state - expected).abs().max() <= 1e-5
    if key in ("vit", "deit"):
        assert (out.pooler_output - model.pooler(expected)).abs().max() <= 1e-5
    else:
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])


def timm_twin(model) -> VisionTransformer:
    """The timm VisionTransformer with the same weights as a tiny HF ViTModel / Dinov2Model."""
    config = model.config
    dinov2 = isinstance(model, Dinov2Model)
    twin = VisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=(config.mlp_ratio if dinov2 else config.intermediate_size / config.hidden_size),
        qkv_bias=True,
        num_classes=0,
        init_values=config.layerscale_value if dinov2 else None,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=config.layer_norm_eps),
    )
    emb = model.embeddings
    state = {
        "cls_token": emb.cls_token.detach(),
        "pos_embed": emb.position_embeddings.detach(),
        "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
        "norm.weight": model.layernorm.weight,
        "norm.bias": model.layernorm.bias,
    }
    for i, layer in enumerate(layers_of(model)):
        attn = layer.attention
        b = f"blocks.{i}."
        state[b + "attn.qkv.weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        state[b + "attn.qkv.bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = attn.o_proj.weight, attn.o_proj.bias
        norm1, norm2 = (layer.norm1, layer.norm2) if dinov2 else (layer.layernorm_before, layer.layernorm_after)
        state[b + "norm1.weight"], state[b + "norm1.bias"] = norm1.weight, norm1.bias
        state[b + "norm2.weight"], state[b + "norm2.bias"] = norm2.weight, norm2.bias
        for fc in ("fc1", "fc2"):
            state[b + f"mlp.{fc}.weight"] = getattr(layer.mlp, fc).weight
            state[b + f"mlp.{fc}.bias"] = getattr(layer.mlp, fc).bias
        if dinov2:
            state[b + "ls1.gamma"], state[b + "ls2.gamma"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
    twin.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return twin.eval()


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.parametrize("key", ["vit", "dinov2"])
def test_equals_timm_vit_with_the_same_weights(key, method):
    model = make_model(key)
    twin = timm_twin(model)
    x = images()
    with torch.no_grad():
        assert (run(model, x) - twin.forward_features(x)).abs().max() <= 1e-5
        cubistmerge.patch(model, method, **SETTINGS[method])
        cubistmerge.patch(twin, method, **SETTINGS[method])
        expected = twin.forward_features(x)
        out = run(model, x)
    assert (out - expected).abs().max() <= 1e-5
    assert (out - run(cubistmerge.unpatch(model), x)).abs().max() > 1e-3


def eva_twin(model: DINOv3ViTModel):
    """timm's Eva DINOv3 (``vit_small_patch16_dinov3_qkvb`` layout, tiny) with the weights of a tiny HF DINOv3."""
    config = model.config
    twin = timm.create_model(
        "vit_small_patch16_dinov3_qkvb",
        pretrained=False,
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        num_reg_tokens=config.num_register_tokens,
        init_values=config.layerscale_value,
        num_classes=0,
    )
    emb = model.embeddings
    state = {
        "cls_token": emb.cls_token,
        "reg_token": emb.register_tokens,
        "patch_embed.proj.weight": emb.patch_embeddings.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.bias,
        "norm.weight": model.norm.weight,
        "norm.bias": model.norm.bias,
    }
    for i, layer in enumerate(layers_of(model)):
        attn, b = layer.attention, f"blocks.{i}."
        assert attn.k_proj.bias is None  # timm's fused qkv has q and v biases only
        state[b + "attn.qkv.weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        state[b + "attn.q_bias"], state[b + "attn.v_bias"] = attn.q_proj.bias, attn.v_proj.bias
        state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = attn.o_proj.weight, attn.o_proj.bias
        state[b + "gamma_1"], state[b + "gamma_2"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
        for norm in ("norm1", "norm2"):
            state[b + f"{norm}.weight"], state[b + f"{norm}.bias"] = (
                getattr(layer, norm).weight,
                getattr(layer, norm).bias,
            )
        state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"] = layer.mlp.up_proj.weight, layer.mlp.up_proj.bias
        state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"] = layer.mlp.down_proj.weight, layer.mlp.down_proj.bias
    twin.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return twin.eval()


@pytest.mark.parametrize(
    "method,options",
    [
        ("cubist", dict(r=2, loc=1)),
        ("cubist", dict(r=2, loc=1, rope="tokens")),
        ("cubist", dict(stages=[(1, 1, 1), (2, 1, 2)], rope="tokens")),
        ("tome", dict(r=4)),
    ],
)
def test_dinov3_equals_timm_eva_with_the_same_weights(method, options):
    """The whole RoPE handling (grid and per-token positions, ToMe's positions) against the timm Eva patch."""
    model = make_model("dinov3")
    twin = eva_twin(model)
    x = images()
    with torch.no_grad():
        assert (run(model, x) - twin.forward_features(x)).abs().max() <= 1e-5
        cubistmerge.patch(model, method, **options)
        cubistmerge.patch(twin, method, **options)
        out = run(model, x)
        assert (out - twin.forward_features(x)).abs().max() <= 1e-5
        assert (out - run(cubistmerge.unpatch(model), x)).abs().max() > 1e-3


# --------------------------------------------------------------------- outputs


@pytest.mark.parametrize("key,method", ALL_CASES)
def test_batch_images_merge_independently(key, method):
    model = cubistmerge.patch(make_model(key), method, **SETTINGS[method])
    x = images()
    with torch.no_grad():
        together = model(x)
        for b in range(2):
            alone = model(x[b : b + 1])
            assert (together.last_hidden_state[b] - alone.last_hidden_state[0]).abs().max() <= 1e-5
            assert (together.pooler_output[b] - alone.pooler_output[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("key,method", ALL_CASES)
def test_eager_equals_sdpa_when_patched(key, method):
    x = images()
    outputs = []
    for attn in ("eager", "sdpa"):
        model = cubistmerge.patch(make_model(key, attn), method, **SETTINGS[method])
        assert model.config._attn_implementation == attn
        with torch.no_grad():
            outputs.append(run(model, x))
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["cubist", "tome", "expedite"])
def test_hidden_states_follow_the_last_hidden_state_layout(method):
    key = "dinov2_reg"
    model = make_model(key)
    p, n = prefix_of(key), GRID[0] * GRID[1]
    x = images()
    with torch.no_grad():
        cubistmerge.patch(model, method, **SETTINGS[method])
        out = model(x, output_hidden_states=True)
        assert [tuple(h.shape) for h in out.hidden_states] == [(2, p + n, 32)] * 4
        # The last hidden state before the final norm (Expedite: reconstructed, as before the norm).
        assert (model.layernorm(out.hidden_states[-1]) - out.last_hidden_state).abs().max() <= 1e-5
        # Selecting hidden states by index, as transformers 5 allows.
        selected = model(x, output_hidden_states=[-1])
        assert selected.hidden_states[:-1] == (None,) * 3
        assert torch.equal(selected.hidden_states[-1], out.hidden_states[-1])
        # recover_output=False: every layer's output at the length it produced.
        cubistmerge.patch(model, method, **SETTINGS[method], recover_output=False)
        merged = model(x, output_hidden_states=True)
        lengths = [h.shape[1] for h in merged.hidden_states]
        if method == "tome":
            assert lengths == [p + n, p + n - 4, p + n - 8, p + n - 12]
        else:
            assert lengths == [p + n, p + n, p + 16, p + 16]
        assert merged.last_hidden_state.shape[1] == lengths[-1]
        assert torch.equal(merged.pooler_output, merged.last_hidden_state[:, 0])
        assert torch.equal(merged.pooler_output, out.pooler_output)
        # return_dict=False gives the tuple the model gives.
        as_tuple = model(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(x).last_hidden_state)


def test_classification_heads_patch_their_backbone():
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**COMMON, intermediate_size=64, num_labels=5)).eval()
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(**COMMON, intermediate_size=64, num_labels=5)).eval()
    dinov2 = Dinov2ForImageClassification(Dinov2Config(**COMMON, mlp_ratio=2, num_labels=5)).eval()
    x = images()
    for model, backbone in ((vit, "vit"), (deit, "deit"), (dinov2, "dinov2")):
        original = type(getattr(model, backbone))
        with torch.no_grad():
            expected = model(x).logits
            for method in ("cubist", "tome", "expedite"):
                assert cubistmerge.patch(model, method, **SETTINGS[method]) is model
                assert type(model).__name__.startswith(("ViTFor", "DeiTFor", "Dinov2For")), "the head keeps its class"
                assert type(getattr(model, backbone)) is not original
                logits = model(x).logits
                assert logits.shape == expected.shape and (logits - expected).abs().max() > 1e-5
                cubistmerge.unpatch(model)
                assert type(getattr(model, backbone)) is original
                assert torch.equal(model(x).logits, expected)


def test_interpolate_pos_encoding_on_other_image_sizes():
    model = make_model("vit")
    x = images(size=64)  # 8 x 8 grid on a model configured for 6 x 6
    with torch.no_grad():
        expected = run(model, x, interpolate_pos_encoding=True)
        cubistmerge.patch(model, "cubist", r=0)
        assert (run(model, x, interpolate_pos_encoding=True) - expected).abs().max() <= 1e-5
        for method in SETTINGS:
            cubistmerge.patch(model, method, **SETTINGS[method])
            assert run(model, x, interpolate_pos_encoding=True).shape == (2, 1 + 64, 32)
        with pytest.raises(ValueError, match="doesn't match model"):
            run(model, x)


# --------------------------------------------------------------------- DINOv3 RoPE


def test_dinov3_grid_rope_is_the_models_own_rope_for_the_reduced_grid():
    model = make_model("dinov3")
    for grid in ((6, 6), (4, 5), (3, 3)):
        expected = model.rope_embeddings(torch.zeros(1, 3, grid[0] * PATCH, grid[1] * PATCH))
        ours = hf_dinov3.grid_rope(model.rope_embeddings, grid, torch.device("cpu"), torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))


def test_dinov3_rope_modes_and_tome_positions():
    model = make_model("dinov3")
    x = images()
    with torch.no_grad():
        grid = run(cubistmerge.patch(model, "cubist", r=2, loc=1), x)
        tokens = run(cubistmerge.patch(model, "cubist", r=2, loc=1, rope="tokens"), x)
        assert model._cubistmerge_options.rope == "tokens"
        assert (grid - tokens).abs().max() > 1e-5
        cubistmerge.patch(model, "tome", r=4)
        assert model._cubistmerge_options.rope == "tokens"
    # Per-token positions at the original patches are the model's own RoPE.
    p = prefix_of("dinov3")
    groups = torch.arange(p + 36).expand(2, -1)
    coords = hf_dinov3.member_mean_coordinates(groups, p, GRID, 36)
    cos, sin = hf_dinov3.dinov3_rope(
        model.rope_embeddings, hf_dinov3.normalised_coordinates(coords, GRID), torch.float32
    )
    own_cos, own_sin = model.rope_embeddings(x)
    assert torch.allclose(cos[0], own_cos, atol=1e-6) and torch.allclose(sin[1], own_sin, atol=1e-6)


def test_dinov3_training_rope_augmentation_is_shared_by_merged_tokens():
    """In training DINOv3 moves its RoPE coordinates by a random affine map per forward (default: rescale).
    The patched model draws the same map under the same seed, and uses it for the merged positions too."""
    model = make_model("dinov3", pos_embed_shift=0.1, pos_embed_jitter=1.5).train()
    assert model.config.pos_embed_rescale is not None
    x = images()
    torch.manual_seed(7)
    expected = run(model, x)
    torch.manual_seed(8)
    assert (run(model, x) - expected).abs().max() > 1e-4, "the augmentation must matter for this test"
    cubistmerge.patch(model, "cubist", r=0)
    torch.manual_seed(7)
    assert (run(model, x) - expected).abs().max() <= 1e-5
    # A merge under the augmentation: the merged grid's coordinates are moved by the same map as the input grid's.
    cubistmerge.patch(model, "cubist", r=2, loc=1)
    frame = hf_dinov3.normalised_coordinates(hf_dinov3.regular_grid_coordinates(GRID, GRID), GRID)
    seen = []
    original = hf_dinov3.dinov3_rope

    def spy(rope, frame, dtype):
        seen.append(frame)
        return original(rope, frame, dtype)

    hf_dinov3.dinov3_rope = spy
    try:
        torch.manual_seed(7)
        run(model, x).sum().backward()
    finally:
        hf_dinov3.dinov3_rope = original
    grid_frame, merged_frame = seen
    reduced = hf_dinov3.normalised_coordinates(hf_dinov3.regular_grid_coordinates((4, 4), (4, 4)), (4, 4))
    scale = (grid_frame[-1] - grid_frame[0]) / (frame[-1] - frame[0])
    offset = grid_frame[0] - frame[0] * scale
    assert torch.allclose(merged_frame, reduced * scale + offset, atol=1e-6)
    assert not torch.allclose(scale, torch.ones(2))


# --------------------------------------------------------------------- dtypes, training


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("key,method", [("dinov2_reg", m) for m in SETTINGS] + [("dinov3", "cubist")])
def test_dtypes(key, method, dtype):
    model = cubistmerge.patch(make_model(key, dtype=dtype), method, **SETTINGS[method])
    with torch.no_grad():
        out = model(images().to(dtype))
    assert out.last_hidden_state.dtype == dtype and out.pooler_output.dtype == dtype
    assert torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("key,method", [("dinov2", m) for m in SETTINGS] + [("dinov3", "tome"), ("vit", "tome")])
def test_training_gradients_reach_parameters(key, method, checkpointing):
    dropout = dict(hidden_dropout_prob=0.1) if key == "vit" else dict(drop_path_rate=0.2)
    model = make_model(key, **dropout)
    if checkpointing:
        model.activation_checkpointing_enable()
    cubistmerge.patch(model, method, **SETTINGS[method])
    model.train()
    out = model(images())
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    # The mask token is for masked-image pretraining only; every other parameter must get a gradient.
    missing = [
        name
        for name, p in model.named_parameters()
        if not name.endswith("mask_token") and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert missing == []
    assert all(p.grad.abs().sum() > 0 for p in layers_of(model)[-1].parameters())


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make_model("dinov2")
        if checkpointing:
            model.activation_checkpointing_enable()
        cubistmerge.patch(model, "tome", r=4).train()
        model(images()).last_hidden_state.sum().backward()
        grads.append(layers_of(model)[0].attention.k_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_inputs_not_modified():
    x = images()
    copy_of_x = x.clone()
    for key in ("vit", "dinov3"):
        model = cubistmerge.patch(make_model(key), "cubist", r=1)
        with torch.no_grad():
            model(x)
        assert torch.equal(x, copy_of_x)


def test_trace_source_is_left_on_the_backbone_and_removed_by_unpatch():
    model = cubistmerge.patch(make_model("vit"), "cubist", r=2, loc=1, trace_source=True)
    with torch.no_grad():
        model(images())
    assert model.cubistmerge_source.shape == (2, 37)
    cubistmerge.unpatch(model)
    assert not hasattr(model, "cubistmerge_source")


# --------------------------------------------------------------------- errors


def test_bad_inputs_and_unsupported_outputs():
    model = cubistmerge.patch(make_model("vit"), "cubist", r=1)
    x = images()
    with pytest.raises(ValueError, match="output_attentions is not available"):
        model(x, output_attentions=True)
    eager = cubistmerge.patch(make_model("vit", "eager"), "cubist", r=1)
    eager.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions is not available"):
        eager(x)
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        model(x, attention_mask=torch.ones(2, 37))
    with pytest.raises(ValueError, match="pixel_values is required"):
        model()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(x[0])
    with pytest.raises(ValueError, match="doesn't match model"):
        model(images(size=56))


def test_bad_options():
    model = make_model("vit")
    with pytest.raises(UnsupportedModelError, match="prop_attn for CubistMerge runs on timm ViTs only"):
        cubistmerge.patch(model, "cubist", r=1, prop_attn=True)
    with pytest.raises(ValueError, match="one reduction removes at most 3"):
        cubistmerge.patch(model, "cubist", r=4)
    with pytest.raises(TypeError, match="Options of method='cubist' for this model"):
        cubistmerge.patch(model, "cubist", rope="grid")
    with pytest.raises(UnsupportedModelError, match="not available for Hugging Face ViT"):
        cubistmerge.patch(model, "pitome")
    dinov3 = make_model("dinov3")
    with pytest.raises(UnsupportedModelError, match="not available for Hugging Face DINOv3"):
        cubistmerge.patch(dinov3, "expedite", r=1)
    with pytest.raises(ValueError, match="rope must be one of"):
        cubistmerge.patch(dinov3, "cubist", r=1, rope="nearest")
    assert type(model) is ViTModel and type(dinov3) is DINOv3ViTModel


def test_tome_prop_attn_needs_an_additive_mask_attention():
    model = cubistmerge.patch(make_model("vit", "eager"), "tome", r=4)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="proportional attention needs an additive attention mask"):
        model(images())


def test_other_models_and_missing_transformers(monkeypatch):
    timm_model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    assert "not a transformers" in hf_vit.why_unsupported(timm_model)
    assert "not a transformers" in hf_dinov3.why_unsupported(make_model("vit"))
    assert hf_vit.why_unsupported(make_model("dinov3")) is not None
    assert hf_vit.why_unsupported(torch.nn.Sequential(make_model("vit"), make_model("deit"))) is not None
    monkeypatch.delitem(sys.modules, "transformers")
    monkeypatch.setattr(hf_vit.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in hf_vit.why_unsupported(torch.nn.Linear(2, 2))
    assert "not installed" in hf_dinov3.why_unsupported(torch.nn.Linear(2, 2))


def test_patch_twice_replaces_settings():
    model = make_model("dinov2")
    x = images()
    with torch.no_grad():
        cubistmerge.patch(model, "tome", r=4)
        tome = run(model, x)
        cubistmerge.patch(model, "cubist", r=2, loc=1)
        cubist = run(model, x)
        assert not torch.equal(tome, cubist)
        cubistmerge.patch(model, "tome", r=4)
        assert torch.equal(run(model, x), tome)
    cubistmerge.unpatch(model)
    assert type(model) is Dinov2Model


def test_mask_tokens_work_as_unpatched():
    model = make_model("dinov2")
    x = images()
    masked = torch.zeros(2, 36, dtype=torch.bool)
    masked[:, ::5] = True
    with torch.no_grad():
        expected = run(model, x, bool_masked_pos=masked)
        cubistmerge.patch(model, "cubist", r=0)
        assert (run(model, x, bool_masked_pos=masked) - expected).abs().max() <= 1e-5
        cubistmerge.patch(model, "tome", r=4)
        assert (run(model, x, bool_masked_pos=masked) - run(model, x)).abs().max() > 1e-3


def test_a_patched_model_can_be_deep_copied():
    model = cubistmerge.patch(make_model("vit"), "tome", r=4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(run(twin, images()), run(model, images()))
    cubistmerge.unpatch(twin)
    assert type(twin) is ViTModel and type(model) is not ViTModel
