"""Token merging on Hugging Face transformers' SAM (SamModel, SamVisionModel, SamVisionEncoder).

The reference is the official segment_anything ImageEncoderViT (patched with the same setting) holding the same
weights: transformers' SAM is a port of it, so the two must agree to rounding, merging included.
"""

from __future__ import annotations

import copy
import sys
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SamVisionModel,
)
from transformers.models.sam.image_processing_sam import SamImageProcessor  # noqa: E402
from transformers.models.sam.modeling_sam import SamVisionEncoder  # noqa: E402

import cubistmerge  # noqa: E402
from cubistmerge.merge import cubist as cubist_module  # noqa: E402
from cubistmerge.patch import UnsupportedModelError, hf_sam  # noqa: E402

from .._precision import low_precision_errors  # noqa: E402

IMG, PATCH, WINDOW, DIM, HEADS, NECK = 128, 8, 7, 48, 4, 32  # 16x16 grid: 7x7 windows, the last ones 2 tokens wide
GRID = IMG // PATCH
ATTN = ["eager", "sdpa"]


def vision_config(attn: str = "sdpa") -> SamVisionConfig:
    return SamVisionConfig(
        hidden_size=DIM,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        image_size=IMG,
        patch_size=PATCH,
        window_size=WINDOW,
        global_attn_indexes=(1, 3),
        output_channels=NECK,
        num_pos_feats=NECK // 2,
        attn_implementation=attn,
    )


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Weights of a trained scale: transformers initialises SAM's vision encoder to ~1e-10 and its tables to zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if "pos" in name else 0.1
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale
            p.copy_(noise + (1.0 if "layer_norm" in name and name.endswith("weight") else 0.0))


def make_vision_model(attn: str = "sdpa") -> SamVisionModel:
    model = SamVisionModel(vision_config(attn))
    randomise(model)
    return model.eval()


def official_twin(encoder: SamVisionEncoder) -> ImageEncoderViT:
    """segment_anything's ImageEncoderViT holding the transformers encoder's weights."""
    twin = ImageEncoderViT(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=4,
        num_heads=HEADS,
        out_chans=NECK,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=WINDOW,
        global_attn_indexes=(1, 3),
    )
    renames = [
        ("neck.conv1.", "neck.0."),
        ("neck.layer_norm1.", "neck.1."),
        ("neck.conv2.", "neck.2."),
        ("neck.layer_norm2.", "neck.3."),
        ("patch_embed.projection.", "patch_embed.proj."),
        ("layers.", "blocks."),
        (".layer_norm1.", ".norm1."),
        (".layer_norm2.", ".norm2."),
    ]
    state = {}
    for name, value in encoder.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        state[name] = value
    twin.load_state_dict(state, strict=True)
    return twin.to(next(encoder.parameters()).dtype).eval()


def tiny_sam(attn: str = "sdpa") -> SamModel:
    torch.manual_seed(0)
    config = SamConfig(
        vision_config=vision_config(attn),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=NECK, image_size=IMG, patch_size=PATCH, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=NECK, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    config._attn_implementation = attn
    sam = SamModel(config)
    randomise(sam.vision_encoder)
    return sam.eval()


def images_for(batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)).to(dtype)


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).last_hidden_state


def test_the_twin_is_the_same_encoder():
    model = make_vision_model("eager").double()
    x = images_for(dtype=torch.float64)
    with torch.no_grad():
        # not closer: transformers' eager attention takes its softmax in float32 even for float64 models
        assert (embed(model, x) - official_twin(model.vision_encoder)(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    "method,options",
    [
        ("cubist", dict(r=0, windows="window")),
        ("cubist", dict(r=0, windows="grid")),
        ("tome", dict(r=0)),
        ("expedite", dict(r=0)),
    ],
)
def test_no_reduction_equals_unpatched(attn, method, options):
    model = make_vision_model(attn)
    x = images_for()
    with torch.no_grad():
        expected = embed(model, x)
        cubistmerge.patch(model, method, **options)
        assert type(model.vision_encoder).__name__ == "MergingSamVisionEncoder"
        assert (embed(model, x) - expected).abs().max() <= 1e-5


SETTINGS = [
    ("cubist", dict(r=2, loc=2)),
    ("cubist", dict(r=2, loc=1, windows="grid")),
    ("cubist", dict(stages=[(1, 1, 1), (3, 1, 1)], windows="window")),
    ("cubist", dict(r=0.2, loc=0, windows="grid", representation="mean", metric="l2")),
    ("tome", dict(r=8)),
    ("expedite", dict(r=2, loc=2)),
]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("method,options", SETTINGS)
def test_equals_the_patched_official_encoder(attn, method, options):
    model = make_vision_model(attn).double()
    twin = official_twin(model.vision_encoder)
    x = images_for(dtype=torch.float64)
    with torch.no_grad():
        unmerged = embed(model, x)
        cubistmerge.patch(model, method, **options)
        cubistmerge.patch(twin, method, **options)
        out = embed(model, x)
        assert out.shape == (2, NECK, GRID, GRID)
        assert (out - twin(x)).abs().max() <= 1e-5
        assert (out - unmerged).abs().max() > 1e-2  # the setting changes the output


@pytest.mark.parametrize("windows", ["window", "grid"])
def test_equals_the_official_encoder_in_float32(windows):
    model = make_vision_model()
    twin = official_twin(model.vision_encoder)
    x = images_for()
    with torch.no_grad():
        cubistmerge.patch(model, "cubist", r=2, loc=1, windows=windows)
        cubistmerge.patch(twin, "cubist", r=2, loc=1, windows=windows)
        assert (embed(model, x) - twin(x)).abs().max() <= 1e-5


def _attention_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    seen = []
    hooks = [
        layer.attn.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(tuple(kw["hidden_states"].shape[:3])), with_kwargs=True
        )
        for layer in model.vision_encoder.layers
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_window_sizes_follow_the_mode():
    model = make_vision_model()
    x = images_for()
    assert _attention_inputs(model, x) == [(18, 7, 7), (2, 16, 16), (18, 7, 7), (2, 16, 16)]
    cubistmerge.patch(model, "cubist", r=2, loc=2, windows="window")
    # 7x7 windows -> 5x5 (the 2-wide edge windows -> 1): an 11x11 grid in the same 3x3 windows
    assert _attention_inputs(model, x) == [(18, 7, 7), (2, 16, 16), (18, 5, 5), (2, 11, 11)]
    cubistmerge.patch(model, "cubist", r=2, loc=2, windows="grid")
    assert _attention_inputs(model, x) == [(18, 7, 7), (2, 16, 16), (8, 7, 7), (2, 14, 14)]


@pytest.mark.parametrize("attn", ATTN)
def test_hidden_states_are_recovered_full_grids(attn):
    model = make_vision_model(attn)
    x = images_for()
    with torch.no_grad():
        expected = model(x, output_hidden_states=True).hidden_states
        cubistmerge.patch(model, "cubist", r=2, loc=2, trace_source=True)
        out = model(x, output_hidden_states=True)
        source = model.vision_encoder.cubistmerge_source
        states = out.hidden_states
        assert len(states) == 5 and all(s.shape == (2, GRID, GRID, DIM) for s in states)
        for before, after in zip(expected[:3], states[:3], strict=True):  # embeddings and layers before loc
            assert torch.equal(before, after)
        assert (states[4] - expected[4]).abs().max() > 1e-2
        # Every position holds its merged token: positions merged together hold the same vector.
        for state in states[3:]:
            flat = state.reshape(2, GRID * GRID, DIM)
            for b in range(2):
                for token in source[b].unique():
                    group = flat[b, source[b] == token]
                    assert torch.equal(group, group[:1].expand_as(group))
        assert (model.vision_encoder.neck(states[4]) - out.last_hidden_state).abs().max() <= 1e-6
        selected = model(x, output_hidden_states=[0, -1]).hidden_states
        assert [s is None for s in selected] == [False, True, True, True, False]
        assert torch.equal(selected[4], states[4])
        as_tuple = model(x, output_hidden_states=True, return_dict=False)
        assert len(as_tuple) == 2 and torch.equal(as_tuple[0], out.last_hidden_state)
        assert torch.equal(model(x, return_dict=False)[0], out.last_hidden_state)


def test_tome_hidden_states_and_attention_see_the_full_grid():
    model = make_vision_model()
    x = images_for()
    cubistmerge.patch(model, "tome", r=[0, 10, 10, 24])
    assert _attention_inputs(model, x) == [(18, 7, 7), (2, 16, 16), (18, 7, 7), (2, 16, 16)]
    with torch.no_grad():
        states = model(x, output_hidden_states=True).hidden_states
    assert [s.shape for s in states] == [(2, GRID, GRID, DIM)] * 5


def test_output_attentions_is_refused_while_patched_and_capture_works_after_unpatch():
    # The refused call installs transformers' capture hooks while the encoder is patched; they must be the ones the
    # unpatched encoder needs (meaningful in a process where no HF SAM encoder was patched before).
    sam = tiny_sam("eager")
    x = images_for(1)
    boxes = torch.tensor([[[10.0, 20.0, 100.0, 90.0]]])
    cubistmerge.patch(sam, "cubist", r=1, loc=1)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        sam(pixel_values=x, input_boxes=boxes, output_attentions=True)
    cubistmerge.unpatch(sam)
    with torch.no_grad():
        out = sam(pixel_values=x, input_boxes=boxes, output_attentions=True, output_hidden_states=True)
    assert len(out.vision_attentions) == 4 and len(out.vision_hidden_states) == 5
    assert len(out.mask_decoder_attentions) > 0


def test_sam_processor_and_model_with_box_prompts():
    sam = tiny_sam()
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": IMG}, pad_size={"height": IMG, "width": IMG}))
    image = (np.random.default_rng(0).random((100, 150, 3)) * 255).astype(np.uint8)
    inputs = processor(images=image, input_boxes=[[[10, 20, 120, 90]]], return_tensors="pt")
    with torch.no_grad():
        expected = sam(**inputs)
        assert cubistmerge.patch(sam, "cubist", r=2, loc=1) is sam
        assert type(sam) is SamModel and type(sam.vision_encoder).__name__ == "MergingSamVisionEncoder"
        out = sam(**inputs, multimask_output=False)
        assert out.pred_masks.shape == (1, 1, 1, 4 * GRID, 4 * GRID) and out.iou_scores.shape == (1, 1, 1)
        out = sam(**inputs)
        assert out.pred_masks.shape == expected.pred_masks.shape == (1, 1, 3, 4 * GRID, 4 * GRID)
        assert (out.pred_masks - expected.pred_masks).abs().max() > 1e-5
        states = sam(**inputs, output_hidden_states=True).vision_hidden_states
        assert [s.shape for s in states] == [(1, GRID, GRID, DIM)] * 5
        masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
        assert masks[0].shape == (1, 3, 100, 150)
        embeddings = sam.get_image_embeddings(inputs["pixel_values"])
        assert embeddings.shape == (1, NECK, GRID, GRID)
        cubistmerge.unpatch(sam)
        assert (sam.get_image_embeddings(inputs["pixel_values"]) - embeddings).abs().max() > 1e-2
        assert type(sam.vision_encoder) is SamVisionEncoder
        assert torch.equal(sam(**inputs).pred_masks, expected.pred_masks)


@pytest.mark.parametrize("windows", ["window", "grid"])
def test_sam_model_masks_come_from_the_merged_embeddings(windows):
    sam = tiny_sam().double()
    twin = cubistmerge.patch(official_twin(sam.vision_encoder), "cubist", r=2, loc=1, windows=windows)
    x = images_for(2, torch.float64)
    boxes = torch.tensor([[[10.0, 20.0, 100.0, 90.0]], [[0.0, 0.0, 60.0, 127.0]]], dtype=torch.float64)
    cubistmerge.patch(sam, "cubist", r=2, loc=1, windows=windows)
    with torch.no_grad():
        out = sam(pixel_values=x, input_boxes=boxes)
        cubistmerge.unpatch(sam)
        expected = sam(image_embeddings=twin(x), input_boxes=boxes)
    assert out.pred_masks.shape == (2, 1, 3, 4 * GRID, 4 * GRID)
    assert (out.pred_masks - expected.pred_masks).abs().max() <= 1e-5
    assert (out.iou_scores - expected.iou_scores).abs().max() <= 1e-5


@pytest.mark.parametrize("target", ["encoder", "vision_model", "sam"])
def test_patch_and_unpatch_leave_the_model_as_it_was(target):
    sam = tiny_sam()
    model = {"encoder": sam.vision_encoder, "vision_model": make_vision_model(), "sam": sam}[target]
    encoder = model if target == "encoder" else model.vision_encoder
    x = images_for()
    before = set(encoder.__dict__)
    with torch.no_grad():
        expected = encoder(x).last_hidden_state
        assert cubistmerge.patch(model, "cubist", r=2, loc=2) is model
        assert type(model).__name__ == ("MergingSamVisionEncoder" if target == "encoder" else type(model).__name__)
        state = set(encoder.__dict__)
        x_before = x.clone()
        encoder(x)
        assert set(encoder.__dict__) == state  # nothing left on the model by a forward
        assert torch.equal(x, x_before)  # input not modified
        cubistmerge.unpatch(model)
        assert type(encoder) is SamVisionEncoder
        assert set(encoder.__dict__) == before
        assert torch.equal(encoder(x).last_hidden_state, expected)
    with pytest.raises(ValueError, match="not patched"):
        cubistmerge.unpatch(model)


def test_batch_independence_dtypes_and_gradients():
    model = make_vision_model()
    x = images_for()
    cubistmerge.patch(model, "cubist", r=(1, 1), loc=1)
    with torch.no_grad():
        together = embed(model, x)
        alone = torch.cat([embed(model, x[i : i + 1]) for i in range(2)])
        assert (together - alone).abs().max() <= 1e-5
        assert embed(copy.deepcopy(model).double(), x.double()).dtype == torch.float64
    # bf16: about as close to float32 as the unmerged encoder is (mean: max-magnitude picks flip near ties)
    merged = cubistmerge.patch(make_vision_model(), "cubist", r=(1, 1), loc=1, representation="mean")
    choices = ((cubist_module, "match_neighbours"),)
    errors = low_precision_errors(make_vision_model(), merged, x, torch.bfloat16, embed, choices=choices)
    assert errors[1] <= 2 * errors[0]
    model.train()
    embed(model, x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("layers.3.attn.rel_pos" in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("method,options", [("cubist", dict(r=2, loc=1)), ("tome", dict(r=[0, 8, 8, 8]))])
def test_activation_checkpointing_gives_the_same_gradients(method, options):
    x = images_for(1, torch.float64)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = cubistmerge.patch(make_vision_model().double().train(), method, **options)
        if checkpointing:
            model.activation_checkpointing_enable()
        layers = model.vision_encoder.layers
        counts = [0, 0]
        hooks = [
            layers[i].layer_norm1.register_forward_hook(lambda *_a, j=j, c=counts: c.__setitem__(j, c[j] + 1))
            for j, i in enumerate((0, 3))
        ]
        embed(model, x).square().mean().backward()
        for hook in hooks:
            hook.remove()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(counts)
    # Layer 0 runs its own forward (transformers checkpoints it), layer 3 runs in cubistmerge's place: both are
    # recomputed in backward (their first norm, that is; torch stops recomputing once it has what it needs).
    assert calls == [[1, 1], [2, 2]]
    for name, grad in grads[0].items():
        assert (grad - grads[1][name]).abs().max() <= 1e-10, name


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(windows="tiles"), ValueError, "windows must be one of"),
        (dict(r=4, windows="window"), ValueError, "at most 3"),  # windows of 7
        (dict(r=9, windows="grid"), ValueError, "at most 8"),  # grid of 16
        (dict(prop_attn=True), UnsupportedModelError, "prop_attn"),
        (dict(window_size=3), TypeError, "Options of method='cubist' for this model"),
    ],
)
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        cubistmerge.patch(make_vision_model(), "cubist", **options)


def test_bad_methods_and_inputs():
    model = make_vision_model()
    with pytest.raises(UnsupportedModelError, match="pitome"):
        cubistmerge.patch(model, "pitome")
    with pytest.raises(TypeError, match="windows"):
        cubistmerge.patch(model, "tome", r=2, windows="grid")
    with pytest.raises(ValueError, match="at most 24"):
        cubistmerge.patch(model, "tome", r=25)
    with pytest.raises(ValueError, match="trace_source"):
        cubistmerge.patch(model, "tome", r=2, trace_source=True)
    with pytest.raises(ValueError, match="SamModel"):
        cubistmerge.patch(tiny_sam(), "cubist", r=1, recover_output=False)
    cubistmerge.patch(model, "cubist", r=(1, 2), windows="window")
    with pytest.raises(ValueError, match="square"), torch.no_grad():
        model(images_for())
    cubistmerge.patch(model, "cubist", r=1)
    with pytest.raises(ValueError, match="pixel_values"):
        model()
    with pytest.raises(ValueError, match="Input image size"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="channel dimension"):
        model(torch.randn(1, 4, IMG, IMG))


def test_recover_output_false_gives_the_merged_grid_to_the_neck():
    model = make_vision_model()
    cubistmerge.patch(model, "cubist", r=2, loc=1, recover_output=False)
    with torch.no_grad():
        assert embed(model, images_for()).shape == (2, NECK, 11, 11)


def test_without_transformers_sam_the_family_says_why(monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers.models.sam.modeling_sam")
    assert "not installed or not loaded" in hf_sam.why_unsupported(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="transformers SamVisionEncoder"):
        cubistmerge.patch(nn.Conv2d(3, 3, 1), "cubist")


def test_other_transformers_models_are_not_taken():
    model = make_vision_model()
    model.vision_encoder.layers[0] = nn.Identity()
    assert "SamVisionLayer" in hf_sam.why_unsupported(model)
