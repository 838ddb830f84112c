"""CubistMerge on timm TinyViT (the MobileSAM encoder family)."""

from __future__ import annotations

import pytest
import timm
import torch

import cubistmerge
from cubistmerge.patch.timm_tinyvit import _attention_blocks, stretched_window_bias

IMG = 224  # conv stage on 56x56, then attention stages on 28 / 14 / 7 grids with windows 7 / 14 / 7


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=10, depths=(1, 2, 3, 1)).eval()
    for _, block in _attention_blocks(model):
        torch.nn.init.normal_(block.attn.attention_biases)  # zeros would hide bias mistakes
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_stretched_bias_of_the_same_size_is_the_original():
    model = make_model()
    attn = model.stages[2].blocks[0].attn
    assert torch.equal(stretched_window_bias(attn, 14), attn.attention_biases[:, attn.attention_bias_idxs])
    small = stretched_window_bias(attn, 12)
    assert small.shape == (attn.num_heads, 144, 144)
    # the ends of the window keep their exact offsets: corner to corner is offset (13, 13)
    corner = attn.attention_biases[:, attn.attention_bias_idxs[0, 14 * 14 - 1]]
    assert torch.allclose(small[:, 0, 143], corner)


@pytest.mark.parametrize("windows", ["window", "grid"])
def test_no_reduction_equals_unpatched(windows, images):
    model = make_model()
    with torch.no_grad():
        expected = model(images)
        cubistmerge.patch(model, "cubist", r=0, loc=3, windows=windows)
        assert (model(images) - expected).abs().max() <= 1e-5


def _attention_shapes(model, images):
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[:2])))
             for _, b in _attention_blocks(model)]
    hooks += [b.attn.qkv.register_forward_pre_hook(lambda _m, args: seen.append(("qkv", tuple(args[0].shape[:2]))))
              for _, b in _attention_blocks(model)]
    with torch.no_grad():
        out = model(images)
    for h in hooks:
        h.remove()
    return [s for s in seen if s[0] == "qkv"], out


def test_window_mode_reduces_inside_windows_and_recovers_before_downsampling(images):
    model = make_model()
    expected = model(images)
    cubistmerge.patch(model, "cubist", r=1, loc=3, windows="window")  # stage 2's second block: 14x14, window 14
    shapes, out = _attention_shapes(model, images)
    # attention blocks: stage 1 (2): 28x28 in 16 windows of 49; stage 2 (3): 14x14 = one window of 196, then
    # 13x13 after the reduction; stage 3 (1) downsamples, so it gets the recovered 14x14 -> 7x7 grid again.
    assert [s[1] for s in shapes] == [(2 * 16, 49), (2 * 16, 49), (2, 196), (2, 169), (2, 169), (2, 49)]
    assert out.shape == expected.shape and (out - expected).abs().max() > 1e-4
    seen = []
    hook = model.stages[3].downsample.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(images)
    hook.remove()
    assert seen == [(2, model.stages[2].out_dim, 14, 14)]  # the recovered full grid


def test_grid_mode_reforms_windows(images):
    model = make_model()
    cubistmerge.patch(model, "cubist", r=2, loc=3, windows="grid")
    shapes, _ = _attention_shapes(model, images)
    # 14x14 -> 12x12: one window of 14 with padding (timm pads to the window), i.e. still 196 slots
    assert [s[1] for s in shapes][2:] == [(2, 196), (2, 196), (2, 196), (2, 49)]


def test_unpatch_state_dict_gradients_and_errors(images):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cubistmerge.patch(model, "cubist", r=1, loc=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.train()
    model(images).sum().backward()
    assert model.stages[2].blocks[2].attn.attention_biases.grad.abs().sum() > 0
    cubistmerge.unpatch(model)
    assert type(model).__name__ == "TinyVit"
    with pytest.raises(ValueError, match="at most 24 there"):
        cubistmerge.patch(make_model(), "tome", r=25)
    with pytest.raises(ValueError, match="at most 3"):
        cubistmerge.patch(make_model(), "cubist", r=4, loc=0)  # windows of 7
    with pytest.raises(ValueError, match="loc must be a block index"):
        cubistmerge.patch(make_model(), "cubist", r=1, loc=6)


def test_tome_merges_around_the_mlp_only(images):
    model = make_model()
    with torch.no_grad():
        expected = model(images)
        cubistmerge.patch(model, "tome", r=0)
        assert (model(images) - expected).abs().max() <= 1e-5
    cubistmerge.patch(model, "tome", r=[0, 10, 40, 40, 40, 10])
    mlp_tokens = []
    hooks = [b.mlp.register_forward_pre_hook(lambda _m, args: mlp_tokens.append(args[0].shape[:-1].numel()))
             for _, b in _attention_blocks(model)]
    shapes, out = _attention_shapes(model, images)
    for h in hooks:
        h.remove()
    assert [s[1] for s in shapes] == [(32, 49), (32, 49), (2, 196), (2, 196), (2, 196), (2, 49)]
    # stage 1: 16 windows of 49 per image, 10 merged in each; stage 2: one window of 196, 40 merged
    assert mlp_tokens[0] == 2 * 28 * 28
    assert sum(mlp_tokens[1:-1]) == 2 * (28 * 28 - 16 * 10) + 3 * 2 * (196 - 40)
    assert out.shape == expected.shape and (out - expected).abs().max() > 1e-4


def test_window_reductions_are_checked_per_stage():
    # 7x7 windows in stage 1 (blocks 0-1) and 14x14 in stage 2 (blocks 2-4): each reduction fits its own window
    cubistmerge.patch(make_model(), "cubist", stages=[(0, 2, 2), (2, 3, 3)], windows="window")
    with pytest.raises(ValueError, match="inside 5x5 windows"):
        cubistmerge.patch(make_model(), "cubist", stages=[(0, 2, 2), (1, 3, 3)], windows="window")


def test_trace_source_maps_the_last_stage_grid(images):
    model = make_model()
    # block 3 is in the 14x14 stage: recovered before the 7x7 stage's downsampling, so the last grid is unmerged
    cubistmerge.patch(model, "cubist", r=2, loc=3, trace_source=True)
    with torch.no_grad():
        model(images)
    assert torch.equal(model.cubistmerge_source, torch.arange(49).expand(2, 49))
    cubistmerge.patch(model, "cubist", r=1, loc=5, trace_source=True)  # block 5: the 7x7 stage, one 7x7 window
    with torch.no_grad():
        model(images)
    source = model.cubistmerge_source
    assert source.shape == (2, 49)
    for b in range(2):
        assert torch.equal(torch.unique(source[b]), torch.arange(36))
