"""Class swapping shared by every backbone family.

A patched model keeps its modules, parameters and buffers; only its class is
replaced by a subclass (the family's mixin in front of the original class),
and two plain attributes record the original class and the patch settings.
"""

from __future__ import annotations

import torch.nn as nn

ORIGINAL_CLASS_ATTR = "_cubistmerge_original_class"
OPTIONS_ATTR = "_cubistmerge_options"
FAMILY_ATTR = "_cubistmerge_family"
SOURCE_ATTR = "cubistmerge_source"

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _merging_class(mixin: type, original: type) -> type:
    # One subclass per (mixin, original class), so isinstance checks and repr keep working.
    key = (mixin, original)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Merging{original.__name__}", (mixin, original), {})
    return _CLASS_CACHE[key]


def swap_class(model: nn.Module, mixin: type, options: object, family: str) -> nn.Module:
    """Put ``mixin`` in front of the model's original class and record ``options``."""
    original = getattr(model, ORIGINAL_CLASS_ATTR, type(model))
    model.__class__ = _merging_class(mixin, original)
    setattr(model, ORIGINAL_CLASS_ATTR, original)
    setattr(model, OPTIONS_ATTR, options)
    setattr(model, FAMILY_ATTR, family)
    return model


def restore_class(model: nn.Module) -> nn.Module:
    model.__class__ = getattr(model, ORIGINAL_CLASS_ATTR)
    for attr in (ORIGINAL_CLASS_ATTR, OPTIONS_ATTR, FAMILY_ATTR, SOURCE_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def patched_family(model: nn.Module) -> str | None:
    """The family name a patched model was patched as, None if it is not patched."""
    return getattr(model, FAMILY_ATTR, None)


def options_of(model: nn.Module) -> object:
    return getattr(model, OPTIONS_ATTR)
