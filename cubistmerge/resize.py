"""The free baseline: the unmerged model at a lower input resolution.

Every user can simply feed a model smaller images. A merging method is worth
adopting only if it beats that at the same cost, so sweeps, evaluations and
plots carry this baseline beside the merging methods (``resize size=196`` or
``resize flop_ratio=1.34`` as a setting).

:func:`at_resolution` returns a module that takes the usual full-resolution
input, resizes it (bilinear, antialiased, as an image library would) to the
smaller size, runs a copy of the model there, and brings the output back to
the full-resolution layout so that whatever consumes it runs unchanged:

- spatial outputs (B, C, h, w), e.g. a SAM encoder's image embedding, are
  resized bilinearly to the grid the full input gives (64 x 64 for SAM at
  1024). For SAM that is what a user would do to save encoder time: the prompt
  encoder and mask decoder keep working in the 1024 frame, only the embedding
  is coarser. (Downscaling the image inside the usual 1024 pipeline would pad
  it back to 1024 and save nothing.)
- token outputs of timm ViTs (``forward_features``: prefix tokens, then the
  patch grid) have their patch grid resized bilinearly to the full grid; the
  prefix tokens pass through. Classifier outputs (``forward``) need nothing.

The copy is adapted to the smaller input with the model's own means: timm
ViT and Eva models get ``set_input_size`` (the position embedding resampled
once, as ``timm.create_model(..., img_size=...)`` does; Eva's RoPE follows the
grid); window-attention encoders (timm samvit, TinyViT / MobileSAM) take
other sizes as they are. Other models are refused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AtResolution", "at_resolution", "input_stride", "size_for_flop_ratio"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, bool):
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if isinstance(size, int):
        return size, size
    whole = all(isinstance(s, int) and not isinstance(s, bool) for s in size) if isinstance(size, Sequence) else False
    if whole and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be an int or (height, width), got {size!r}")


def _kind(model: nn.Module) -> str:
    """ "tokens" (timm ViT / Eva), "spatial" (window-attention encoders with a map output), or raise."""
    from timm.models.eva import Eva
    from timm.models.tiny_vit import TinyVit
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if isinstance(model, VisionTransformer | Eva):
        return "tokens"
    if isinstance(model, VisionTransformerSAM | TinyVit):
        return "spatial"
    raise ValueError(
        f"the resize baseline runs on timm VisionTransformer / Eva (classifiers and dense backbones) and on "
        f"timm samvit / TinyViT (MobileSAM) encoders; {type(model).__name__} is none of them"
    )


def input_stride(model: nn.Module) -> int:
    """Input pixels per output cell: a smaller input must be a multiple of this (patch size; 16 for SAM)."""
    kind = _kind(model)
    if kind == "tokens" or hasattr(model, "patch_embed") and hasattr(model.patch_embed, "patch_size"):
        patch = model.patch_embed.patch_size
        return int(patch[0] if isinstance(patch, tuple | list) else patch)
    # TinyViT: a stride-4 stem, then every stage that downsamples halves the grid.
    strides = [info["reduction"] for info in getattr(model, "feature_info", [])]
    return int(strides[-1]) if strides else 32


class AtResolution(nn.Module):
    """``model`` run at ``size`` instead of the full resolution; output in the full-resolution layout.

    ``forward`` (and for timm ViTs ``forward_features``) takes full-resolution
    images; ``model`` is this module's own copy, already adapted to ``size``.
    """

    def __init__(self, model: nn.Module, size: tuple[int, int], full_size: tuple[int, int], kind: str) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.full_size = full_size
        self.kind = kind
        self.stride = input_stride(model)
        if kind == "tokens":
            self.num_prefix_tokens = int(model.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"size={self.size}, full_size={self.full_size}"

    def _small(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.full_size:
            raise ValueError(
                f"this resize baseline takes (B, C, {self.full_size[0]}, {self.full_size[1]}) images (the model's "
                f"full resolution) and runs them at {self.size}; got shape {tuple(images.shape)}"
            )
        with torch.profiler.record_function("cubistmerge::resize_input"):
            return F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)

    def _full_grid(self) -> tuple[int, int]:
        return self.full_size[0] // self.stride, self.full_size[1] // self.stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(self._small(images))
        if self.kind == "spatial" and out.dim() == 4:
            with torch.profiler.record_function("cubistmerge::resize_output"):
                return F.interpolate(out, size=self._full_grid(), mode="bilinear", align_corners=False)
        return out

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm ViTs: (B, prefix + H*W, C) tokens at the full grid (the small grid's, resized bilinearly)."""
        if self.kind != "tokens":
            raise AttributeError(f"forward_features of the resize baseline exists for timm ViTs, not {self.kind}")
        tokens = self.model.forward_features(self._small(images))
        p = self.num_prefix_tokens
        B, _, C = tokens.shape
        h, w = self.size[0] // self.stride, self.size[1] // self.stride
        with torch.profiler.record_function("cubistmerge::resize_output"):
            grid = tokens[:, p:].transpose(1, 2).reshape(B, C, h, w)
            grid = F.interpolate(grid, size=self._full_grid(), mode="bilinear", align_corners=False)
            return torch.cat([tokens[:, :p], grid.flatten(2).transpose(1, 2)], dim=1)


def _full_size_of(model: nn.Module, kind: str) -> tuple[int, int]:
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        img_size = getattr(model, "img_size", None)
    if img_size is None:
        raise ValueError(f"cannot tell the input resolution of {type(model).__name__}; pass full_size=")
    return _pair(tuple(img_size) if isinstance(img_size, tuple | list) else int(img_size))


def at_resolution(
    model: nn.Module, size: int | Sequence[int], *, full_size: int | Sequence[int] | None = None
) -> AtResolution:
    """The resize baseline of ``model`` (not modified; the result holds an adapted copy).

    Args:
        model: a timm VisionTransformer / Eva, or a timm samvit / TinyViT encoder (MobileSAM's included).
        size: the smaller input, an int or (height, width); a multiple of :func:`input_stride`
            (the patch size; 16 for SAM encoders) and at most the full size.
        full_size: the full input resolution; by default the model's own (``patch_embed.img_size``
            or ``img_size``).
    """
    kind = _kind(model)
    small = _pair(size)
    full = _pair(full_size) if full_size is not None else _full_size_of(model, kind)
    stride = input_stride(model)
    if any(s < stride or s % stride for s in small) or small[0] > full[0] or small[1] > full[1]:
        raise ValueError(
            f"size {small} must be a multiple of the model's stride {stride} in each side, at least {stride} "
            f"and at most the full resolution {full}"
        )
    adapted = copy.deepcopy(model)
    if kind == "tokens" and not getattr(adapted, "dynamic_img_size", False):
        adapted.set_input_size(img_size=small)
    return AtResolution(adapted, small, full, kind)


def size_for_flop_ratio(
    model: nn.Module,
    flop_ratio: float,
    count: Callable[[nn.Module, torch.Tensor], int],
    example: torch.Tensor,
    *,
    full_size: int | Sequence[int] | None = None,
) -> tuple[int, int]:
    """The square input size (a multiple of the stride) whose FLOP ratio to the full size is closest to ``flop_ratio``.

    ``count(module, images)`` counts FLOPs (e.g. :func:`cubistmerge.flops.count_flops`); ``example``
    is one full-resolution input. Ties go to the larger size.
    """
    if isinstance(flop_ratio, bool) or not isinstance(flop_ratio, int | float) or not flop_ratio >= 1.0:
        raise ValueError(f"flop_ratio must be a number >= 1 (unmerged FLOPs / FLOPs), got {flop_ratio!r}")
    kind = _kind(model)
    full = _pair(full_size) if full_size is not None else _full_size_of(model, kind)
    if full[0] != full[1]:
        raise ValueError(f"flop_ratio= picks square sizes; this model's input is {full}: give size=(h, w)")
    stride = input_stride(model)
    base = count(model, example)
    best, best_gap = full, math.inf
    for side in range(full[0], stride - 1, -stride):
        ratio = base / count(at_resolution(model, side, full_size=full), example)
        gap = abs(ratio - flop_ratio)
        if gap < best_gap - 1e-12:
            best, best_gap = (side, side), gap
        if ratio > flop_ratio:
            break  # FLOPs only fall with the size: every smaller one is further away
    return best


RESIZE_OPTIONS = ("size", "flop_ratio")


def resize_from_options(model: nn.Module, options: dict, example: torch.Tensor | None = None) -> AtResolution:
    """The resize baseline for a setting's options: ``size=`` (int or (h, w)) or ``flop_ratio=``.

    ``flop_ratio`` picks the square size whose FLOP ratio is closest (see :func:`size_for_flop_ratio`);
    it needs ``example``, one full-resolution input.
    """
    unknown = sorted(set(options) - set(RESIZE_OPTIONS))
    if unknown:
        raise ValueError(f"the resize baseline takes size= or flop_ratio=, not {unknown}")
    if ("size" in options) == ("flop_ratio" in options):
        raise ValueError("the resize baseline needs exactly one of size= (pixels) or flop_ratio= (a target)")
    size = options.get("size")
    if size is None:
        if example is None:
            raise ValueError("resize flop_ratio= needs an example input to count FLOPs on")
        from .flops import count_flops

        size = size_for_flop_ratio(model, options["flop_ratio"], count_flops, example)
    return at_resolution(model, size)
