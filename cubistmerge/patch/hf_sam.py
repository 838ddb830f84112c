"""Patching Hugging Face transformers' SAM (``SamModel``, ``SamVisionModel`` or a bare ``SamVisionEncoder``).

Patching a ``SamModel`` or ``SamVisionModel`` patches its ``vision_encoder``,
so ``SamProcessor`` + ``SamModel`` run unchanged: the encoder recovers the full
grid before its neck, and the prompt encoder and mask decoder never see a
merged token. See :mod:`cubistmerge.patch._sam_common` for the two window
designs of CubistMerge (option ``windows``), how Expedite clusters windows and
how ToMe merges around the MLP inside windows; the layers run through their own
``forward`` except where the window size was reduced (or ToMe merges around the
MLP), where :func:`layer_forward_with_window` runs the same steps.

Outputs stay transformers' output objects with the usual shapes
(``last_hidden_state``: the neck's (B, C_out, H, W); ``return_dict=False``
gives the tuple). ``output_hidden_states`` (True, or indices as transformers
takes them) gives what it gives unpatched, the embeddings and the output of
every layer as (B, H, W, C), each recovered to the full grid (a merged token
copied to every position it stands for; Expedite: reconstructed); the hidden
states are not the merged grids the layers saw. ``output_attentions`` is
refused while patched: the attention maps of merged windows are not the
model's. Gradient checkpointing (``gradient_checkpointing_enable``) checkpoints
the layers that run unchanged as transformers does, and the layers run here in
their place whenever any layer asks for it.

transformers is optional (extra ``hf``): nothing of it is imported here before
a model of its SAM module is patched, and a model can only be one once that
module is loaded.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ._sam_common import SamBlockRunner, SamMergeOptions, TokenFunction, check_sam_options, recover_grid, run_blocks
from ._swap import options_of, patched_family, restore_class, swap_class
from ._tokens import store_grid_source
from .options import CubistOptions, ExpediteOptions, ToMeOptions

FAMILY = "transformers SamVisionEncoder (or a SamModel / SamVisionModel)"
FAMILY_OPTIONS = {"cubist": ("windows",)}
SUPPORTED_METHODS = ("cubist", "tome", "expedite")

_SAM_MODULE = "transformers.models.sam.modeling_sam"
_CAPTURE_MODULE = "transformers.utils.output_capturing"
_LAYER_PARAMS = ("self", "hidden_states")
_ATTENTION_PARAMS = ("self", "hidden_states", "output_attentions")


def _sam_module():
    """transformers' SAM module if it is loaded (a model cannot be one of its classes otherwise), else None."""
    return sys.modules.get(_SAM_MODULE)


def _encoder(model: nn.Module) -> nn.Module:
    sam = _sam_module()
    if sam is not None and isinstance(model, sam.SamModel | sam.SamVisionModel):
        return model.vision_encoder
    return model


def why_unsupported(model: nn.Module) -> str | None:
    sam = _sam_module()
    if sam is None:
        return "transformers' SAM (transformers.models.sam) is not installed or not loaded"
    encoder = _encoder(model)
    if type(encoder) is not sam.SamVisionEncoder:
        return f"{type(model).__name__} is none of transformers' SamModel, SamVisionModel, SamVisionEncoder"
    others = sorted({type(layer).__name__ for layer in encoder.layers if type(layer) is not sam.SamVisionLayer})
    if others:
        return f"its layers are {others}, not transformers' SamVisionLayer"
    attention_classes = tuple(sam.SAM_VISION_ATTENTION_CLASSES.values())
    others = sorted(
        {type(layer.attn).__name__ for layer in encoder.layers if type(layer.attn) not in attention_classes}
    )
    if others:
        return f"its attention modules are {others}, not transformers' SAM vision attention (eager or sdpa)"
    for cls, expected in [(sam.SamVisionLayer, _LAYER_PARAMS)] + [(c, _ATTENTION_PARAMS) for c in attention_classes]:
        unknown = set(inspect.signature(cls.forward).parameters) - set(expected)
        if unknown:
            return f"this transformers version's {cls.__name__}.forward has parameters {sorted(unknown)} not known here"
    capture = _capture_module()
    if capture is None or not hasattr(capture, "_active_collector"):
        return "this transformers version does not capture outputs through transformers.utils.output_capturing"
    return None


def _capture_module():
    try:
        import transformers.utils.output_capturing as capture
    except ImportError:
        return None
    return capture


def is_patched(model: nn.Module) -> bool:
    return patched_family(_encoder(model)) == FAMILY


def num_blocks(model: nn.Module) -> int:
    return len(_encoder(model).layers)


def layer_forward_with_window(
    layer: nn.Module, x: torch.Tensor, window_size: int, mlp: TokenFunction | None = None
) -> torch.Tensor:
    """transformers' SamVisionLayer on a (B, H, W, C) grid with ``window_size`` instead of the layer's own.

    ``mlp`` replaces how the normed grid goes through the layer's MLP (ToMe
    merges tokens around it); by default the MLP runs on every token.
    """
    H, W = x.shape[1], x.shape[2]
    shortcut = x
    y = layer.layer_norm1(x)
    if window_size > 0:
        y, padding_shape = layer.window_partition(y, window_size)
    y = layer.attn(hidden_states=y)[0]
    if window_size > 0:
        y = layer.window_unpartition(y, window_size, padding_shape, (H, W))
    x = shortcut + y
    normed = layer.layer_norm2(x)
    return x + (layer.mlp(normed) if mlp is None else mlp(normed, layer.mlp))


def keys_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """transformers' SAM attention: its qkv output (B', h, w, 3 * dim) -> keys averaged over heads (B', h * w, d)."""
    B, heads = qkv.shape[0], attn.num_attention_heads
    return qkv.reshape(B, -1, 3, heads, qkv.shape[-1] // (3 * heads))[:, :, 1].mean(dim=2)


RUNNER = SamBlockRunner(
    window_size_of=lambda layer: layer.window_size,
    forward_with_window=layer_forward_with_window,
    keys_from_qkv=keys_from_qkv,
    checkpoints_itself=True,
)


def patch(
    model: nn.Module, options: CubistOptions | ToMeOptions | ExpediteOptions, windows: str = "window"
) -> nn.Module:
    encoder = _encoder(model)
    sam_options = SamMergeOptions(options, windows)
    embed = encoder.patch_embed
    grid = (embed.image_size[0] // embed.patch_size[0], embed.image_size[1] // embed.patch_size[1])
    window = max((layer.window_size for layer in encoder.layers), default=0)
    check_sam_options(sam_options, grid, window)
    if not options.recover_output and encoder is not model and isinstance(model, _sam_module().SamModel):
        raise ValueError(
            "recover_output=False leaves the image embeddings on the merged grid, which SamModel's prompt encoder and "
            "mask decoder cannot use; patch model.vision_encoder for merged embeddings"
        )
    swap_class(encoder, _MergingSamVisionEncoder, sam_options, FAMILY)
    # transformers looks up what a model records by its class's name; the swapped class records what the original
    # does, so hooks a surrounding SamModel installs while it is patched are the ones it would install anyway.
    _capture_module()._CAN_RECORD_REGISTRY[encoder] = encoder._can_record_outputs
    return model


def unpatch(model: nn.Module) -> nn.Module:
    restore_class(_encoder(model))
    return model


@contextlib.contextmanager
def _no_output_capture() -> Iterator[None]:
    """Keep transformers' output-capturing hooks quiet inside the encoder, as its own ``capture_outputs`` does.

    The hidden states are gathered here instead (recovered to the full grid), so hooks a surrounding model
    installed on the layers must not record the merged grids.
    """
    collector = _capture_module()._active_collector
    token = collector.set({})
    try:
        yield
    finally:
        collector.reset(token)


def _hidden_state_indices(selection: Any, num_layers: int) -> set[int] | None:
    """Which of the num_layers + 1 hidden states ``output_hidden_states`` asks for; None for none."""
    if not selection:  # as transformers: False, None, 0 or [] ask for none
        return None
    count = num_layers + 1
    if selection is True:
        return set(range(count))
    wanted = [selection] if isinstance(selection, int) else list(selection)
    return {i % count for i in wanted if -count <= i < count}


class _MergingSamVisionEncoder:
    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs: Any):
        from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

        return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            raise ValueError(
                "output_attentions is not available while cubistmerge patches this SAM encoder: the attention maps "
                "of merged windows are not the model's. Unpatch it (cubistmerge.unpatch) to get them."
            )
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        hidden = kwargs.get("output_hidden_states", getattr(self.config, "output_hidden_states", False))
        wanted = _hidden_state_indices(hidden, len(self.layers))
        options: SamMergeOptions = options_of(self)
        checkpointing = (
            self.training
            and torch.is_grad_enabled()
            and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers)
        )
        with _no_output_capture():
            x = self.patch_embed(pixel_values)
            if self.pos_embed is not None:
                x = x + self.pos_embed
            grid = x
            take = None if wanted is None else {i - 1 for i in wanted if i > 0}
            x, intermediates, recover = run_blocks(
                self.layers, x, options, RUNNER, take_indices=take, checkpointing=checkpointing
            )
            if options.method.trace_source:
                store_grid_source(self, recover, grid)
            if options.recover_output:
                x = recover_grid(x, recover)
            out = self.neck(x)
        hidden_states = None
        if wanted is not None:
            layer_outputs = dict(zip(sorted(take), intermediates, strict=True))
            states = [grid] + [layer_outputs.get(i) for i in range(len(self.layers))]
            hidden_states = tuple(state if i in wanted else None for i, state in enumerate(states))
        output = SamVisionEncoderOutput(last_hidden_state=out, hidden_states=hidden_states)
        return output if return_dict else output.to_tuple()
