"""Patching Hugging Face transformers (5.x) ViTs: ``ViTModel``, ``DeiTModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel``, and any model holding one of them as a direct child (``ViTForImageClassification``,
``DeiTForImageClassificationWithTeacher``, ``Dinov2ForImageClassification``, ...: the backbone inside is patched,
as a ``Sam`` is patched through its image encoder). ``DINOv3ViTModel`` (RoPE) is :mod:`.hf_dinov3`, which runs
on the same forward defined here.

The backbone's class is swapped for a subclass that overrides only ``forward``. It calls the model's own
embeddings, layers, final LayerNorm and pooler; the attention runs through the model's own attention modules,
so ``config._attn_implementation`` (``"eager"``, ``"sdpa"``, ...) is respected. CubistMerge and Expedite call
whole layers (gradient checkpointing of the layers included); ToMe splits every layer between its attention and
its MLP (the same residual, LayerScale and drop-path modules, in the same order) and reads the keys from the
attention's ``k_proj``; its proportional attention is an additive ``attention_mask`` of log(size), which the
``eager`` and ``sdpa`` attention functions take (other implementations are refused for ToMe with ``prop_attn``).

What the patched forward returns:

- the model's own output type (``BaseModelOutputWithPooling``; a tuple with ``return_dict=False``).
- ``last_hidden_state``: with ``recover_output=True`` (the default) the usual (B, prefix + H*W, C) layout:
  every patch position holds its merged token (Expedite: the reconstruction, before the final LayerNorm, as in
  the timm patch); with ``recover_output=False`` the merged tokens (B, prefix + N', C). Prefix tokens (CLS,
  distillation, registers) are never merged and stay first.
- ``pooler_output``: as the model computes it from ``last_hidden_state`` (ViT/DeiT pooler on the CLS token,
  DINOv2: the normed CLS token). The CLS token is never merged, so it does not depend on ``recover_output``.
  A head on top reads ``last_hidden_state`` as it is: with ``recover_output=True``
  ``Dinov2ForImageClassification``'s mean over patch tokens is a mean over the recovered positions (each merged
  token weighted by its size), where timm's patched ``forward`` pools the merged tokens.
- ``hidden_states`` (``output_hidden_states=True``, or indices selecting some of them as transformers 5 allows):
  the embedding output and every layer's output (before the final LayerNorm, as unpatched), in the *same layout
  as ``last_hidden_state``*: recovered to (B, prefix + H*W, C) per layer with ``recover_output=True`` (Expedite:
  reconstructed), the merged length each layer actually produced with ``recover_output=False``.
- ``attentions``: refused. ``output_attentions=True`` (argument or config) raises ValueError on a patched
  model: after a merge the attention is between merged tokens, and no per-patch map in the original layout can
  be given without inventing it.

``attention_mask`` (transformers' optional padding mask) is refused when not None: image inputs have no
padding, and a mask would have to follow the merges. ``bool_masked_pos`` (mask tokens) and, for ViT/DeiT,
``interpolate_pos_encoding=True`` (any image size; the grid is read from the input) work as unpatched.
Nothing is stored on the model between forwards (only with ``trace_source``: the last forward's token map is
left on the backbone as ``cubistmerge_source``). cubistmerge does not import transformers: without it in
``sys.modules`` no model can come from it, and :func:`why_unsupported` says so (or that it is not installed).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..merge.expedite import Reconstruct
from ._after_attention import merge_after_attention
from ._swap import ORIGINAL_CLASS_ATTR, options_of, patched_family, restore_class, swap_class
from ._tokens import store_source
from .options import CubistOptions, ExpediteOptions, ToMeOptions
from .state import MergeState
from .timm_vit import cubist_reduce_at, expedite_reduce, reconstruct_tokens

FAMILY = "Hugging Face ViT/DeiT/DINOv2 (transformers ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel)"
SUPPORTED_METHODS = ("cubist", "tome", "expedite")

# Attention functions that take an additive float attention_mask (ToMe's proportional attention).
_ADDITIVE_MASK_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class ModelSpec:
    """What the patched forward needs to know about one transformers backbone class."""

    model: str  # class name of the backbone, e.g. "ViTModel"
    module: str  # transformers.models.<module>.modeling_<module>
    layer: str  # class name of its layers
    layers: tuple[str, ...]  # attribute path from the backbone to the ModuleList of layers
    norm: str  # attribute of the final LayerNorm
    forward_params: tuple[str, ...]  # the upstream forward's parameters this override reproduces
    # Layer attributes a split (ToMe) forward uses: their absence means another layout (e.g. transformers 4).
    layer_parts: tuple[str, ...]
    registers: bool = False  # prefix = CLS (+ distillation) + config.num_register_tokens
    distillation: bool = False

    def num_prefix(self, config: Any) -> int:
        return 1 + int(self.distillation) + (int(getattr(config, "num_register_tokens", 0)) if self.registers else 0)


_VIT_PARTS = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
_DINO_PARTS = ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")
_VIT_PARAMS = ("self", "pixel_values", "bool_masked_pos", "interpolate_pos_encoding", "attention_mask", "kwargs")
_DINO_PARAMS = ("self", "pixel_values", "bool_masked_pos", "attention_mask", "kwargs")

SPECS = (
    ModelSpec("ViTModel", "vit", "ViTLayer", ("layers",), "layernorm", _VIT_PARAMS, _VIT_PARTS),
    ModelSpec("DeiTModel", "deit", "DeiTLayer", ("layers",), "layernorm", _VIT_PARAMS, _VIT_PARTS, distillation=True),
    ModelSpec("Dinov2Model", "dinov2", "Dinov2Layer", ("encoder", "layer"), "layernorm", _DINO_PARAMS, _DINO_PARTS),
    ModelSpec(
        "Dinov2WithRegistersModel",
        "dinov2_with_registers",
        "Dinov2WithRegistersLayer",
        ("encoder", "layer"),
        "layernorm",
        _DINO_PARAMS,
        _DINO_PARTS,
        registers=True,
    ),
)


# --------------------------------------------------------------------------- finding the backbone


def transformers_missing() -> str | None:
    """Why no transformers model can be at hand (None if transformers is imported)."""
    if "transformers" in sys.modules:
        return None
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return "the transformers package is not installed (pip install 'cubistmerge[hf]')"
    return "it is not a Hugging Face transformers model (transformers is not even imported)"


def model_class(spec: ModelSpec, name: str | None = None) -> type | None:
    """The transformers class ``name`` (default: the backbone) of ``spec``'s modeling module, None if absent."""
    try:
        module = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
    except ImportError:
        return None
    return getattr(module, name or spec.model, None)


def original_type(module: nn.Module) -> type:
    return getattr(module, ORIGINAL_CLASS_ATTR, type(module))


def spec_of(module: nn.Module, specs: tuple[ModelSpec, ...]) -> ModelSpec | None:
    """The spec whose backbone class ``module`` is (exactly, patched or not)."""
    cls = original_type(module)
    for spec in specs:
        if cls.__name__ == spec.model and model_class(spec) is cls:
            return spec
    return None


def find_backbone(model: nn.Module, specs: tuple[ModelSpec, ...]) -> tuple[nn.Module, ModelSpec] | None:
    """``model`` itself if it is a backbone of ``specs``, else its one direct child that is; None otherwise."""
    if "transformers" not in sys.modules:
        return None
    spec = spec_of(model, specs)
    if spec is not None:
        return model, spec
    found = [(child, s) for child in model.children() if (s := spec_of(child, specs)) is not None]
    return found[0] if len(found) == 1 else None


def backbone_unsupported(model: nn.Module, specs: tuple[ModelSpec, ...], names: str) -> str | None:
    """None if ``model`` is (or directly holds) a supported backbone of ``specs``, else the reason."""
    missing = transformers_missing()
    if missing is not None:
        return missing
    found = find_backbone(model, specs)
    if found is None:
        return f"{type(model).__name__} is not a transformers {names} and holds none of them as a direct child"
    backbone, spec = found
    layer_cls = model_class(spec, spec.layer)
    layers = layer_list(backbone, spec)
    others = sorted({type(layer).__name__ for layer in layers if type(layer) is not layer_cls})
    if others:
        return f"its layers are {others}, not transformers' {spec.layer}"
    for layer in layers:
        absent = [part for part in spec.layer_parts if not hasattr(layer, part)]
        if absent:
            return (
                f"its {spec.layer} has no {absent}: a transformers version with another layer layout "
                "(cubistmerge supports transformers >= 5)"
            )
        if not hasattr(layer.attention, "k_proj"):
            name = type(layer.attention).__name__
            return f"its attention ({name}) has no k_proj (cubistmerge needs transformers >= 5)"
    found_params = tuple(inspect.signature(original_type(backbone).forward).parameters)
    unknown = set(found_params) - set(spec.forward_params)
    if unknown:
        return (
            f"this transformers version's {spec.model}.forward has parameters {sorted(unknown)} "
            "that cubistmerge does not know"
        )
    return None


def layer_list(backbone: nn.Module, spec: ModelSpec) -> nn.ModuleList:
    layers = backbone
    for name in spec.layers:
        layers = getattr(layers, name)
    return layers


def why_unsupported(model: nn.Module) -> str | None:
    """None if this family can patch ``model``, else the reason."""
    return backbone_unsupported(model, SPECS, "ViTModel, DeiTModel, Dinov2Model or Dinov2WithRegistersModel")


def is_patched(model: nn.Module) -> bool:
    found = find_backbone(model, SPECS)
    return found is not None and patched_family(found[0]) == FAMILY


def num_blocks(model: nn.Module) -> int:
    backbone, spec = find_backbone(model, SPECS)
    return len(layer_list(backbone, spec))


@dataclass(frozen=True)
class HFMergeOptions:
    """The method's settings, the backbone's spec and (RoPE models) where merged tokens are placed."""

    method: CubistOptions | ToMeOptions | ExpediteOptions
    spec: ModelSpec
    rope: str | None = None

    @property
    def recover_output(self) -> bool:
        return self.method.recover_output


def config_grid(backbone: nn.Module) -> tuple[int, int]:
    """(H, W) of the patch grid of the configured image size."""
    config = backbone.config
    size = config.image_size
    patch = config.patch_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return height // patch_h, width // patch_w


def check_grid(options: object, backbone: nn.Module) -> None:
    """Raise if a grid method's reduction cannot run on the configured image size's grid."""
    if isinstance(options, CubistOptions | ExpediteOptions):
        options.check_grid(config_grid(backbone))


def patch(model: nn.Module, options: CubistOptions | ToMeOptions | ExpediteOptions) -> nn.Module:
    backbone, spec = find_backbone(model, SPECS)
    check_grid(options, backbone)
    mixin = _MergingViTModel if "interpolate_pos_encoding" in spec.forward_params else _MergingDinov2Model
    swap_class(backbone, mixin, HFMergeOptions(options, spec), FAMILY)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    backbone, _ = find_backbone(model, SPECS)
    restore_class(backbone)
    return model


# --------------------------------------------------------------------------- forward


@contextlib.contextmanager
def captured_keys(attention: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the keys (B, heads, N, head_dim) the attention computes: its ``k_proj`` output (before any RoPE)."""
    keys: list[torch.Tensor] = []
    head_dim = attention.head_dim

    def hook(_module, _inputs, output: torch.Tensor) -> None:
        keys.append(output.unflatten(-1, (-1, head_dim)).transpose(1, 2))

    handle = attention.k_proj.register_forward_hook(hook)
    try:
        yield keys
    finally:
        handle.remove()


def tome_layer_forward(
    layer: nn.Module,
    x: torch.Tensor,
    state: MergeState,
    index: int,
    options: ToMeOptions,
    layer_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, MergeState]:
    """One transformers ViT/DINOv2 layer with ToMe: attention (proportional attention as an additive mask),
    merge, MLP. The layer's own modules run in the layer's own order; ``index`` is the layer's place."""
    bias = state.attention_bias(options.prop_attn, x.dtype)
    vit_layout = hasattr(layer, "layernorm_before")
    residual = x
    hidden = layer.layernorm_before(x) if vit_layout else layer.norm1(x)
    with captured_keys(layer.attention) as keys:
        hidden, _ = layer.attention(hidden, attention_mask=bias, **layer_kwargs)
    if vit_layout:
        x = layer.dropout(hidden) + residual
    else:
        x = layer.drop_path(layer.layer_scale1(hidden)) + residual
    x, state = merge_after_attention(x, keys[-1], state, index, options)
    residual = x
    if vit_layout:
        hidden = layer.dropout(layer.mlp(layer.layernorm_after(x)))
    else:
        hidden = layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
    return hidden + residual, state


class RopeTracker:
    """The RoPE a RoPE model's layers get; ``update`` after a merge. This base class is for models without RoPE."""

    def layer_kwargs(self) -> dict[str, Any]:
        return {}

    def update(self, state: MergeState, num_tokens: int, per_token: bool) -> None:
        pass


def _output_flags(model: nn.Module, kwargs: dict[str, Any]) -> tuple[bool | int | list[int], bool]:
    """(output_hidden_states, return_dict), popped from ``kwargs`` or read from the config; refuses attentions."""
    config = model.config
    output_attentions = kwargs.pop("output_attentions", None)
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if output_attentions:
        raise ValueError(
            "output_attentions is not available on a model patched by cubistmerge: after a merge the attention "
            "runs between merged tokens, so there is no honest per-patch attention map to return. Call with "
            "output_attentions=False (and config.output_attentions=False), or cubistmerge.unpatch the model"
        )
    hidden = kwargs.pop("output_hidden_states", None)
    if hidden is None:
        hidden = getattr(config, "output_hidden_states", False)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return hidden, bool(return_dict)


def _selected_hidden_states(selection: bool | int | list[int], count: int) -> set[int] | None:
    """The indices of the hidden states to return (None: none at all), as transformers 5 resolves them."""
    if isinstance(selection, bool):
        return set(range(count)) if selection else None
    chosen = [selection] if isinstance(selection, int) else list(selection)
    return {i % count for i in chosen if -count <= i < count}


def merging_forward(
    model: nn.Module,
    pixel_values: torch.Tensor | None,
    embed: Callable[[torch.Tensor], torch.Tensor],
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
    rope_for: Callable[[torch.Tensor, tuple[int, int]], RopeTracker] | None = None,
):
    """The patched backbone forward shared by the transformers families.

    ``embed``: pixel values -> (B, prefix + H*W, C) tokens (the model's own embeddings); ``rope_for``: pixel
    values and grid -> the RoPE tracker of a RoPE model (None: no RoPE).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    settings: HFMergeOptions = options_of(model)
    spec = settings.spec
    options = settings.method
    if pixel_values is None:
        raise ValueError("pixel_values is required (B, C, H, W)")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {shape}")
    if attention_mask is not None:
        raise ValueError(
            "attention_mask is not supported on a model patched by cubistmerge (images have no padding, and a "
            "mask would have to follow the merges); pass attention_mask=None"
        )
    hidden_selection, return_dict = _output_flags(model, kwargs)
    cubist = isinstance(options, CubistOptions)
    expedite = isinstance(options, ExpediteOptions)

    x = embed(pixel_values)
    stride = _patch_stride(model)
    grid = (pixel_values.shape[-2] // stride[0], pixel_values.shape[-1] // stride[1])
    num_prefix = spec.num_prefix(model.config)
    if x.shape[1] != num_prefix + grid[0] * grid[1]:
        raise RuntimeError(
            f"the layers get {x.shape[1]} tokens, not the {num_prefix} prefix tokens and the {grid[0]}x{grid[1]} "
            "patch grid cubistmerge expects"
        )
    state = MergeState(num_prefix=num_prefix, num_original=x.shape[1], grid=grid)
    rope = rope_for(pixel_values, grid) if rope_for is not None else RopeTracker()
    per_token = settings.rope == "tokens"
    layers = layer_list(model, spec)
    if isinstance(options, ToMeOptions) and options.prop_attn and any(options.r_schedule):
        implementation = model.config._attn_implementation
        if implementation not in _ADDITIVE_MASK_ATTENTION:
            raise ValueError(
                f"ToMe's proportional attention needs an additive attention mask, which attn_implementation="
                f"{implementation!r} does not take; use 'eager' or 'sdpa', or prop_attn=False"
            )
    selected = _selected_hidden_states(hidden_selection, len(layers) + 1)
    reconstruct: Reconstruct | None = None

    def recovered(y: torch.Tensor) -> torch.Tensor:
        if not options.recover_output:
            return y
        if reconstruct is not None:
            return reconstruct_tokens(y, reconstruct, num_prefix)
        return state.recover(y)

    hidden_states: list[torch.Tensor | None] = []

    def collect(y: torch.Tensor) -> None:
        if selected is not None:
            hidden_states.append(recovered(y) if len(hidden_states) in selected else None)

    collect(x)
    for i, layer in enumerate(layers):
        if cubist or expedite:
            if cubist:
                x, state, reduced = cubist_reduce_at(x, state, i, options)
                if reduced:
                    rope.update(state, x.shape[1], per_token)
            elif i == options.loc:
                x, state, reconstruct = expedite_reduce(x, state, options)
            # The layer's own __call__ (its gradient checkpointing included).
            x = layer(x, None, **rope.layer_kwargs(), **kwargs)
        else:
            layer_kwargs = {**rope.layer_kwargs(), **kwargs}
            checkpointing = getattr(layer, "gradient_checkpointing", False) and layer.training
            if checkpointing and torch.is_grad_enabled():
                merged_x, merged_state = checkpoint(
                    tome_layer_forward, layer, x, state, i, options, layer_kwargs, use_reentrant=False
                )
            else:
                merged_x, merged_state = tome_layer_forward(layer, x, state, i, options, layer_kwargs)
            changed = merged_state is not state
            x, state = merged_x, merged_state
            if changed:  # ToMe's tokens are no grid: placed one by one
                rope.update(state, x.shape[1], True)
        collect(x)
    if options.trace_source:
        store_source(model, state, x)

    norm = getattr(model, spec.norm)
    if reconstruct is not None and options.recover_output:
        sequence_output = norm(reconstruct_tokens(x, reconstruct, num_prefix))
    else:
        sequence_output = norm(x)
        sequence_output = state.recover(sequence_output) if options.recover_output else sequence_output
    pooler = getattr(model, "pooler", None)
    if spec.model in ("ViTModel", "DeiTModel"):
        pooled_output = pooler(sequence_output) if pooler is not None else None
    else:
        pooled_output = sequence_output[:, 0, :]
    output = BaseModelOutputWithPooling(
        last_hidden_state=sequence_output,
        pooler_output=pooled_output,
        hidden_states=tuple(hidden_states) if selected is not None else None,
    )
    return output if return_dict else output.to_tuple()


def _patch_stride(model: nn.Module) -> tuple[int, int]:
    patch_embeddings = model.embeddings.patch_embeddings
    conv = getattr(patch_embeddings, "projection", patch_embeddings)
    return tuple(int(s) for s in conv.stride)


class _MergingViTModel:
    """Mixin placed in front of ``ViTModel`` / ``DeiTModel`` by :func:`patch`."""

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        def embed(pixels: torch.Tensor) -> torch.Tensor:
            # As unpatched: the pixels in the weights' dtype (a new tensor; the input is not modified).
            pixels = pixels.to(self.embeddings.patch_embeddings.projection.weight.dtype)
            return self.embeddings(
                pixels, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=bool(interpolate_pos_encoding)
            )

        return merging_forward(self, pixel_values, embed, attention_mask, kwargs)


class _MergingDinov2Model:
    """Mixin placed in front of ``Dinov2Model`` / ``Dinov2WithRegistersModel`` by :func:`patch`."""

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        def embed(pixels: torch.Tensor) -> torch.Tensor:
            return self.embeddings(pixels, bool_masked_pos=bool_masked_pos)

        return merging_forward(self, pixel_values, embed, attention_mask, kwargs)
