"""Patching Hugging Face transformers (5.x) ``DINOv3ViTModel`` (RoPE, register tokens, LayerScale).

The forward, its outputs (``last_hidden_state`` recovered by default, ``hidden_states`` in the same layout,
``output_attentions`` refused) and the layer handling are those of :mod:`.hf_vit`; this module adds RoPE.

``DINOv3ViTModel`` computes one rotary embedding (cos, sin) per forward for the patch grid, with patch centres
normalised to [-1, 1] per axis; prefix tokens (CLS and registers) are never rotated. Until the first merge the
layers get exactly that embedding. After a merge the layers get an embedding for the merged tokens, from the
model's own frequencies (``rope_embeddings.inv_freq``) and the same formula, as the timm Eva patch
(:mod:`.timm_eva`) does:

- CubistMerge, ``rope="grid"`` (default): the RoPE of the regular H' x W' grid over the same image extent,
  which for DINOv3's per-axis normalisation is exactly the model's own embedding for an H' x W' grid. One
  (N', head_dim) embedding for the whole batch.
- CubistMerge, ``rope="tokens"``: every merged token at the mean (row, column) of the original patches it
  stands for, per image: (B, 1, N', head_dim), which the attention broadcasts over heads.
- ToMe: always per token (member means after every merge), so ToMe never runs with positions that do not
  belong to its tokens. ToMe's matching metric is the keys before RoPE (the ``k_proj`` output).

Expedite is not offered: its clustered tokens are weighted means of many patches with no position of their
own. In training, DINOv3's RoPE coordinate augmentation (``pos_embed_shift`` / ``jitter`` / ``rescale``; the
config's default rescales) is one random affine map of the coordinates per forward; the patched forward draws
it once (with transformers' own function, so the draws match the unpatched model's under the same seed) and
applies it to the input grid and to every merged position, so merged tokens keep their place under it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ._swap import patched_family, restore_class, swap_class
from .hf_vit import (
    HFMergeOptions,
    ModelSpec,
    RopeTracker,
    backbone_unsupported,
    check_grid,
    find_backbone,
    layer_list,
    merging_forward,
    model_class,
)
from .options import CubistOptions, ToMeOptions
from .state import MergeState
from .timm_eva import member_mean_coordinates, regular_grid_coordinates

FAMILY = "Hugging Face DINOv3 (transformers DINOv3ViTModel)"
SUPPORTED_METHODS = ("cubist", "tome")
ROPE_MODES = ("grid", "tokens")
DEFAULT_ROPE_MODE = "grid"
FAMILY_OPTIONS = {"cubist": ("rope",)}

SPECS = (
    ModelSpec(
        "DINOv3ViTModel",
        "dinov3_vit",
        "DINOv3ViTLayer",
        ("model", "layer"),
        "norm",
        ("self", "pixel_values", "bool_masked_pos", "kwargs"),
        ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2"),
        registers=True,
    ),
)


def why_unsupported(model: nn.Module) -> str | None:
    reason = backbone_unsupported(model, SPECS, "DINOv3ViTModel")
    if reason is not None:
        return reason
    backbone, spec = find_backbone(model, SPECS)
    rope_cls = model_class(spec, "DINOv3ViTRopePositionEmbedding")
    if type(backbone.rope_embeddings) is not rope_cls or not hasattr(backbone.rope_embeddings, "inv_freq"):
        name = type(backbone.rope_embeddings).__name__
        return f"its RoPE is {name}, not transformers' DINOv3ViTRopePositionEmbedding"
    return None


def is_patched(model: nn.Module) -> bool:
    found = find_backbone(model, SPECS)
    return found is not None and patched_family(found[0]) == FAMILY


def num_blocks(model: nn.Module) -> int:
    backbone, spec = find_backbone(model, SPECS)
    return len(layer_list(backbone, spec))


def patch(model: nn.Module, options: CubistOptions | ToMeOptions, rope: str = DEFAULT_ROPE_MODE) -> nn.Module:
    backbone, spec = find_backbone(model, SPECS)
    if isinstance(options, ToMeOptions):
        rope = "tokens"
    elif rope not in ROPE_MODES:
        raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
    check_grid(options, backbone)
    swap_class(backbone, _MergingDINOv3ViTModel, HFMergeOptions(options, spec, rope), FAMILY)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    backbone, _ = find_backbone(model, SPECS)
    restore_class(backbone)
    return model


# --------------------------------------------------------------------------- RoPE for merged tokens


def normalised_coordinates(coords: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch-index (row, column) positions on an H x W grid -> DINOv3's coordinates: cell centres in [-1, 1]."""
    sizes = coords.new_tensor([float(grid[0]), float(grid[1])])
    return 2.0 * ((coords + 0.5) / sizes) - 1.0


def dinov3_rope(rope: nn.Module, frame: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (..., head_dim), at DINOv3 coordinates ``frame`` (..., 2): the RoPE module's formula."""
    angles = 2 * math.pi * frame[..., None] * rope.inv_freq  # (..., 2, head_dim / 4)
    angles = angles.flatten(-2).tile(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def grid_rope(rope: nn.Module, reduced: tuple[int, int], device: torch.device, dtype: torch.dtype):
    """The model's own (cos, sin) for an H' x W' patch grid (outside training): DINOv3's centres of that grid."""
    coords = regular_grid_coordinates(reduced, reduced, device)
    return dinov3_rope(rope, normalised_coordinates(coords, reduced), dtype)


_AUGMENTATIONS = ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")


class _DinoRope(RopeTracker):
    """DINOv3's RoPE for the current tokens of one forward.

    In training the model's RoPE moves all coordinates by one random affine map per forward (shift, per-axis
    jitter, rescale). Here that map is drawn once per forward with transformers' own function (the same draws,
    in the same order, from the same generator as the unpatched model) by moving two probe points, and applied
    to the input grid and to every merged position alike.
    """

    def __init__(self, model: nn.Module, pixel_values: torch.Tensor, grid: tuple[int, int]) -> None:
        self.module = model.rope_embeddings
        self.grid = grid
        self.dtype = pixel_values.dtype
        self.device = pixel_values.device
        config = model.config
        self.affine: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.module.training and any(getattr(config, name, None) is not None for name in _AUGMENTATIONS):
            augment = model_class(SPECS[0], "augment_patches_center_coordinates")
            if augment is None:
                raise RuntimeError(
                    "this transformers version's DINOv3 has no augment_patches_center_coordinates, which cubistmerge "
                    "uses to place merged tokens under the RoPE augmentation of training; merge in eval mode"
                )
            probe = torch.tensor([[0.0, 0.0], [1.0, 1.0]], device=self.device)
            moved = augment(
                probe,
                shift=config.pos_embed_shift,
                jitter=config.pos_embed_jitter,
                rescale=config.pos_embed_rescale,
            )
            self.affine = (moved[1] - moved[0], moved[0])  # frame -> frame * scale + offset
            self.current = self._rope(self._grid_frame(grid))
        else:
            self.current = self.module(pixel_values)

    def _grid_frame(self, grid: tuple[int, int]) -> torch.Tensor:
        return normalised_coordinates(regular_grid_coordinates(grid, grid, self.device), grid)

    def _rope(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.affine is not None:
            frame = frame * self.affine[0] + self.affine[1]
        return dinov3_rope(self.module, frame, self.dtype)

    def layer_kwargs(self) -> dict[str, Any]:
        return {"position_embeddings": self.current}

    def update(self, state: MergeState, num_tokens: int, per_token: bool) -> None:
        with torch.profiler.record_function("cubistmerge::rope"):
            if per_token:
                patches = num_tokens - state.num_prefix
                coords = member_mean_coordinates(state.groups, state.num_prefix, self.grid, patches)
                cos, sin = self._rope(normalised_coordinates(coords, self.grid))
                self.current = cos.unsqueeze(1), sin.unsqueeze(1)
            else:
                # A regular H' x W' grid over the input's extent: with DINOv3's per-axis normalisation these are
                # exactly the centres of an H' x W' grid.
                self.current = self._rope(self._grid_frame(state.grid))


class _MergingDINOv3ViTModel:
    """Mixin placed in front of ``DINOv3ViTModel`` by :func:`patch`."""

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, **kwargs: Any):
        weight_dtype = self.embeddings.patch_embeddings.weight.dtype
        pixels = pixel_values.to(weight_dtype) if isinstance(pixel_values, torch.Tensor) else pixel_values

        def embed(values: torch.Tensor) -> torch.Tensor:
            return self.embeddings(values, bool_masked_pos=bool_masked_pos)

        def rope_for(values: torch.Tensor, grid: tuple[int, int]) -> RopeTracker:
            return _DinoRope(self, values, grid)

        return merging_forward(self, pixels, embed, None, kwargs, rope_for)
