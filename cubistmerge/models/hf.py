"""Hugging Face transformers models: load one by hub name or build a random-weight one from a local config.

Used by the benchmark (``cubistmerge bench --hf-model / --hf-config``, :func:`cubistmerge.bench.benchmark`) and
open to users: :func:`build_hf_model` returns the model in eval mode, :func:`hf_timed_module` the part of it that
token merging changes. transformers is the optional extra ``hf`` (``pip install 'cubistmerge[hf]'``) and is
imported lazily, on the first call that needs it: importing this module does not import transformers.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "HF_INSTALL_HINT",
    "HF_MODEL_TYPES",
    "HfModelError",
    "build_hf_model",
    "hf_config_dict",
    "hf_timed_module",
    "parse_hf_option",
]


class HfModelError(ValueError):
    """A Hugging Face model cannot be loaded or built (transformers missing, invalid config or override, ...)."""


# Transformers model types the patches know (any other type is built, but its merge variants are refused).
HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "sam", "sam_vision_model")
HF_INSTALL_HINT = "pip install 'cubistmerge[hf]'"
_HF_OFFLINE_HINT = (
    "without access to the Hugging Face hub, time a random-weight model built from a local config instead: "
    "--hf-config CONFIG.json (or a directory holding config.json, or a model type such as dinov2 with "
    "--hf-option KEY=VALUE overrides); in Python, benchmark(None, ..., hf_config=...)"
)
# Random weights below this standard deviation (transformers initialises SAM's vision encoder to ~1e-10) are
# redrawn at the config's initializer_range: activations near float32's subnormal range would time the CPU's
# slow path for subnormal numbers, not the model.
_NEGLIGIBLE_STD = 1e-6


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise HfModelError(f"Hugging Face models need the transformers package: {HF_INSTALL_HINT}") from error
    return transformers


def parse_hf_option(text: str) -> tuple[str, Any]:
    """``"hidden_size=768"`` -> ("hidden_size", 768): a config field and its value (a Python literal, else the
    text itself: ``hidden_act=gelu``); dotted keys reach sub-configs (``vision_config.image_size=512``)."""
    import ast

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise HfModelError(f"a config override is KEY=VALUE (e.g. hidden_size=768), got {text!r}")
    value = value.strip()
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _config_mapping() -> Any:
    _import_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING


def hf_config_dict(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """The config fields of ``source``: a dict, a config.json file, a directory holding one, a JSON object as
    text, or a transformers model type (``"dinov2"``, ``"sam"``, ...: transformers' defaults)."""
    if isinstance(source, dict):
        fields = copy.deepcopy(source)
    else:
        text = os.fspath(source)
        path = os.path.join(text, "config.json") if os.path.isdir(text) else text
        if text.lstrip().startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as error:
                raise HfModelError(f"the Hugging Face config is not valid JSON: {error}") from error
        elif os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    fields = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise HfModelError(f"cannot read the Hugging Face config {path}: {error}") from error
        elif os.path.isdir(text):
            raise HfModelError(f"the directory {text} holds no config.json")
        elif text in _config_mapping():
            fields = {"model_type": text}
        else:
            looks_like_path = text.endswith(".json") or os.sep in text
            raise HfModelError(
                f"no such config file: {text}"
                if looks_like_path
                else f"{text!r} is no config file, directory, JSON object or transformers model type "
                f"(e.g. {', '.join(HF_MODEL_TYPES)})"
            )
    if not isinstance(fields, dict):
        raise HfModelError(f"a Hugging Face config is a JSON object, got {type(fields).__name__}")
    model_type = fields.get("model_type")
    if model_type not in _config_mapping():
        raise HfModelError(
            f"the Hugging Face config needs a known 'model_type' (e.g. {', '.join(HF_MODEL_TYPES)}), got {model_type!r}"
        )
    return fields


def _apply_hf_options(fields: dict[str, Any], options: dict[str, Any] | Iterable[tuple[str, Any]]) -> None:
    """Set every (dotted) override in ``fields``, refusing a field the config class does not have."""
    defaults = _config_mapping()[fields["model_type"]]().to_dict()
    for key, value in dict(options).items():
        *parents, last = key.split(".")
        target, known = fields, defaults
        for part in parents:
            if not isinstance(known, dict) or not isinstance(known.get(part), dict):
                raise HfModelError(f"{fields['model_type']} config has no sub-config {part!r} (in {key!r})")
            known = known[part]
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise HfModelError(f"cannot set {key!r}: {part!r} is not a sub-config in the given config")
        if last not in known and last not in target:
            close = difflib.get_close_matches(last, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HfModelError(f"{fields['model_type']} config has no field {key!r}{hint}")
        target[last] = value


def _model_kwargs(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, keyword arguments of the model's construction: ``attn_implementation``)."""
    options = dict(options)
    kwargs = {}
    if "attn_implementation" in options:
        kwargs["attn_implementation"] = options.pop("attn_implementation")
    return options, kwargs


def _fit_sam_size(fields: dict[str, Any], img_size: int | None) -> None:
    """SAM takes only its config's image size (no position-embedding interpolation): build it for ``img_size``."""
    if img_size is None:
        return
    if fields["model_type"] == "sam":
        vision = fields.setdefault("vision_config", {})
        if isinstance(vision, dict):
            vision["image_size"] = img_size
    elif fields["model_type"] == "sam_vision_model":
        fields["image_size"] = img_size


def _redraw_negligible_weights(model: nn.Module, std: float) -> None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear | nn.Conv2d) and isinstance(weight, torch.Tensor) and weight.numel() > 1:
            if float(weight.detach().float().std()) < _NEGLIGIBLE_STD:
                with torch.no_grad():
                    weight.normal_(0.0, std)


def build_hf_model(
    name: str | None = None,
    *,
    config: str | os.PathLike[str] | dict[str, Any] | None = None,
    options: dict[str, Any] | Iterable[tuple[str, Any]] | None = None,
    img_size: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A Hugging Face transformers model in eval mode, from ``AutoModel``.

    ``name``: a hub id or a local directory, loaded with pretrained weights (``AutoModel.from_pretrained``).
    ``config``: a random-weight model (``AutoModel.from_config``) from a config.json file, a directory holding
    one, a dict or JSON text, or a model type (``"dinov2"``: transformers' defaults); for SAM the vision
    encoder is built for ``img_size`` (SAM does not interpolate its position embeddings). ``options``: config
    fields to override (``{"hidden_size": 768, "vision_config.image_size": 512}``; ``attn_implementation``
    goes to the model's construction). Give ``name`` or ``config``, not both.
    """
    if (name is None) == (config is None):
        raise HfModelError("give a Hugging Face model name or a config, exactly one of them")
    transformers = _import_transformers()
    overrides, kwargs = _model_kwargs(dict(options or {}))
    torch.manual_seed(seed)
    if config is not None:
        fields = hf_config_dict(config)
        _apply_hf_options(fields, overrides)
        _fit_sam_size(fields, img_size)
        try:
            built = _config_mapping()[fields["model_type"]].from_dict(fields)
            model = transformers.AutoModel.from_config(built, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
            raise HfModelError(f"cannot build a {fields['model_type']} model from that config: {error}") from error
        std = float(getattr(built, "initializer_range", 0.02) or 0.02)
        _redraw_negligible_weights(model, std if std >= _NEGLIGIBLE_STD else 0.02)
        return model.eval()
    try:
        loaded = transformers.AutoConfig.from_pretrained(name)
        if overrides:
            fields = loaded.to_dict()
            _apply_hf_options(fields, overrides)
            loaded = type(loaded).from_dict(fields)
        model = transformers.AutoModel.from_pretrained(name, config=loaded, **kwargs)
    except HfModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as error:
        raise HfModelError(f"cannot load the Hugging Face model {name!r}: {error}\n{_HF_OFFLINE_HINT}") from error
    return model.eval()


def hf_timed_module(model: nn.Module) -> nn.Module:
    """The part of a transformers model the benchmark times: a SAM's vision encoder (the module token merging
    changes; the prompt encoder and mask decoder run once per image either way), else the model itself."""
    if type(model).__name__ in ("SamModel", "SamVisionModel") and isinstance(
        getattr(model, "vision_encoder", None), nn.Module
    ):
        return model.vision_encoder
    return model


def _hf_config_size(module: nn.Module) -> int | None:
    size = getattr(getattr(module, "config", None), "image_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _input_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    return int(channels) if isinstance(channels, int) and channels > 0 else 3


def _transformers_version() -> str | None:
    module = sys.modules.get("transformers")
    return None if module is None else str(getattr(module, "__version__", "?"))
