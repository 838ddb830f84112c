"""``patch`` / ``unpatch``: token merging on models users already have.

Each backbone family has its own small module with ``FAMILY`` (its name),
``why_unsupported(model)``, ``num_blocks(model)``, ``patch(model, options,
**family_options)`` and ``unpatch(model)``, and optionally ``FAMILY_OPTIONS``
(per method, the option names only that family takes) and
``SUPPORTED_METHODS`` (the methods it runs; ``("cubist", "tome")`` when
absent); this file picks the family and parses the options every family shares.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from . import hf_dinov3, hf_sam, hf_vit, segment_anything, timm_eva, timm_hiera, timm_sam, timm_tinyvit, timm_vit
from ._swap import patched_family
from .options import CubistOptions, ExpediteOptions, PiToMeOptions, ToFuOptions, ToMeOptions

METHODS = ("cubist", "tome", "expedite", "pitome", "tofu")
_BUILDERS = {
    "cubist": CubistOptions,
    "tome": ToMeOptions,
    "expedite": ExpediteOptions,
    "pitome": PiToMeOptions,
    "tofu": ToFuOptions,
}
_FAMILIES = (timm_vit, timm_sam, segment_anything, timm_eva, timm_tinyvit, hf_sam, timm_hiera, hf_vit, hf_dinov3)
_DEFAULT_FAMILY_METHODS = ("cubist", "tome")


class UnsupportedModelError(TypeError):
    """The model is not one of the families cubistmerge can patch."""


def _family_of(model: nn.Module):
    patched = _patched_as(model)
    if patched is not None:
        return patched
    reasons = []
    for family in _FAMILIES:
        reason = family.why_unsupported(model)
        if reason is None:
            return family
        reasons.append(f"{family.FAMILY}: {reason}")
    supported = "; ".join(f.FAMILY for f in _FAMILIES)
    raise UnsupportedModelError(
        f"cubistmerge cannot patch {type(model).__module__}.{type(model).__name__}. "
        f"Supported families: {supported}. Why not this one: {' | '.join(reasons)}"
    )


def read_setting(setting: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` of a setting file (JSON ``{"method": ..., option: value, ...}``, as written by
    ``cubistmerge tune``) or of a setting text (``"cubist r=2 loc=1"``).

    JSON has no tuples: a two-element list is read back as the pair it stands for where an option takes one
    (CubistMerge's / Expedite's ``r``, every entry of ``stages``); ToMe's ``r`` list stays a per-block list.
    """
    path = Path(setting)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"setting file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"setting file {path} is not JSON: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            raise ValueError(f'setting file {path} must hold an object {{"method": ..., option: value, ...}}')
        options = {k: v for k, v in data.items() if k != "method"}
        method = data["method"]
        if method in ("cubist", "expedite") and isinstance(options.get("r"), list):
            options["r"] = tuple(options["r"])
        if isinstance(options.get("stages"), list):
            options["stages"] = [tuple(stage) for stage in options["stages"]]
        return method, options
    from ..sweep import parse_setting

    variant = parse_setting(str(setting))
    return variant.method, dict(variant.options)


def patch(
    model: nn.Module, method: str = "cubist", *, setting: str | os.PathLike[str] | None = None, **options: Any
) -> nn.Module:
    """Make ``model`` merge tokens; patches in place and returns it.

    Patching an already patched model replaces its settings. ``setting=`` takes a setting file written by
    ``cubistmerge tune`` (or any JSON ``{"method": ..., option: value}``) or a setting text such as
    ``"cubist r=2 loc=1"``, instead of ``method`` and the options.

    Args:
        model: a supported model (see :class:`UnsupportedModelError` for the list).
        method: ``"cubist"`` (CubistMerge), ``"tome"`` (ToMe baseline),
            ``"expedite"`` (Expedite baseline; plain ViTs (timm, transformers) and SAM encoders only),
            ``"pitome"`` (PiToMe) or ``"tofu"`` (ToFu; both plain timm ViTs only).
        **options: for ``"cubist"``: ``r`` (int tokens per row and column, a
            ``(r_h, r_w)`` pair, or a float fraction of the grid side; default 1),
            ``loc`` (block whose input is reduced; default 1), or
            ``stages=[(loc, r_h, r_w), ...]`` for several reductions,
            ``representation`` ("maxmag", "maxmag_vector", "mean"),
            ``metric`` ("cosine", "l2"), ``prop_attn`` (default False: log(size)
            of every merged key added to the attention logits, as ToMe does; timm ViTs only).
            For ``"tome"``: ``r`` (int per block, ``(r, inflection)``, or a
            list of per-block ints; default 8), ``prop_attn`` (default True),
            ``order`` (``"official"``: the authors' token bookkeeping, default;
            ``"spatial"``: survivors keep their order).
            For ``"pitome"``: ``ratio`` (fraction of the tokens every block
            keeps, default 0.9125), ``alpha`` (1.0); margins and the layout of
            its two variants as in the authors' code.
            For ``"tofu"``: ``r`` (as ToMe), ``mlerp_from`` (first block that
            merges by MLERP instead of pruning; default L // 2 + 1),
            ``mlerp_norm`` (``"mean"``: the paper, default; ``"destination"``: OpenToMe).
            For ``"expedite"``: ``r`` (as for ``"cubist"``: the grid, or on SAM
            encoders every window, is clustered to (H - r_h, W - r_w) tokens;
            any amount leaving one token per side; default 1), ``loc``
            (default 1), ``neighbourhood`` (5), ``iterations`` (5),
            ``temperature`` (0.01, multiplies the squared distances), ``k``
            (20), ``normalise`` ("sum" or "l2" reconstruction weights); see
            :mod:`cubistmerge.merge.expedite`.
            For all: ``recover_output`` (default True: ``forward_features``
            returns every original token position, filled from its merged
            token (Expedite: reconstructed as a weighted sum of clustered
            tokens, before the final norm or the neck), so heads and dense
            users see the unmerged layout; ``model(x)`` pools the merged tokens, as
            the methods' own code does). For all but ``"expedite"``:
            ``trace_source`` (store the last forward's (B, N) token-to-merged
            index map as ``model.cubistmerge_source``).
    """
    if setting is not None:
        if options or method != "cubist":
            raise TypeError("give either setting= or a method and its options, not both")
        method, options = read_setting(setting)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    family = _family_of(model)
    if method not in _methods_of(family):
        able = "; ".join(f.FAMILY for f in _FAMILIES if method in _methods_of(f))
        raise UnsupportedModelError(
            f"method={method!r} is not available for {family.FAMILY}, which supports {_methods_of(family)}. "
            f"Families that support {method!r}: {able}"
        )
    builder = _BUILDERS[method]
    # Options only one family understands (e.g. how SAM windows are reduced) go to the family.
    family_names = getattr(family, "FAMILY_OPTIONS", {}).get(method, ())
    family_options = {name: options.pop(name) for name in list(options) if name in family_names}
    try:
        parsed = builder.build(num_blocks=family.num_blocks(model), **options)
    except TypeError as error:
        allowed = ", ".join([*_option_names(builder), *family_names])
        raise TypeError(f"{error}. Options of method={method!r} for this model: {allowed}") from None
    if getattr(parsed, "method", None) == "cubist" and parsed.prop_attn and family is not timm_vit:
        raise UnsupportedModelError(
            f"prop_attn for CubistMerge runs on timm ViTs only so far, not on {family.FAMILY}; drop prop_attn"
        )
    return family.patch(model, parsed, **family_options)


def _methods_of(family) -> tuple[str, ...]:
    return getattr(family, "SUPPORTED_METHODS", _DEFAULT_FAMILY_METHODS)


def _option_names(builder: type) -> list[str]:
    return [name for name in inspect.signature(builder.build).parameters if name not in ("cls", "num_blocks")]


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the model's original class; its parameters were never touched."""
    family = _patched_as(model)
    if family is None:
        raise ValueError("this model is not patched by cubistmerge")
    return family.unpatch(model)


def _patched_as(model: nn.Module):
    """The family module a model was patched by, or None."""
    name = patched_family(model)
    for family in _FAMILIES:
        # A family may patch a submodule (a whole Sam is patched through its image encoder).
        if family.FAMILY == name or getattr(family, "is_patched", lambda _m: False)(model):
            return family
    return None


__all__ = ["METHODS", "UnsupportedModelError", "patch", "read_setting", "unpatch"]
