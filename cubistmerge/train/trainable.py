"""Which parameters a distillation trains.

By default (``after_reduction``) the modules that run before the first
reduction stay frozen. They do receive a gradient (through the merged tokens)
and ``trainable="all"`` trains them too; they are frozen by default because
the backward pass then stops at the reduction (cheaper) and the part of the
student that computes exactly what the teacher computes stays the teacher's.
The boundary is found by running both models once on a probe batch and
comparing the inputs every parameter-owning module receives, which works the
same for every family and method (a reduction at block ``loc``, ToMe's
per-block schedule, SAM windows, TinyViT stages) without knowing how each
patches.

timm caches some attention biases in eval mode (``attention_bias_cache`` of
TinyViT's and LeViT's attention): a bias expanded once from its parameter
table and then reused. Under training in eval mode that cache is wrong three
ways: filled under ``no_grad`` it never trains the table, filled with a graph
it breaks the second backward, and after an optimizer step it holds the old
values. :func:`clear_attention_bias_caches` empties it; distillation calls it
before every student forward and after training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

TRAINABLE = ("after_reduction", "all", "norms_biases")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)


def clear_attention_bias_caches(model: nn.Module) -> int:
    """Empty every ``attention_bias_cache`` dict below ``model`` (timm TinyViT, LeViT, ...); the number emptied."""
    emptied = 0
    for module in model.modules():
        cache = getattr(module, "attention_bias_cache", None)
        if isinstance(cache, dict) and cache:
            cache.clear()
            emptied += 1
    return emptied


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
    return None


def _visit_inputs(
    model: nn.Module, run: Callable[[nn.Module], object], visit: Callable[[str, torch.Tensor], None]
) -> None:
    """Call ``visit(name, first tensor argument)`` on every call of every module that owns parameters."""
    handles = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue

        def hook(_module: nn.Module, args: tuple, *, _name: str = name) -> None:
            tensor = _first_tensor(args)
            if tensor is not None:
                visit(_name, tensor.detach())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape:
        return False
    scale = y.float().abs().max().clamp_min(1e-12)
    return bool(((x.float() - y.float()).abs().max() / scale) <= 1e-5)


def diverging_modules(student: nn.Module, teacher: nn.Module, run: Callable[[nn.Module], object]) -> list[str]:
    """Names of the parameter-owning modules whose inputs differ between student and teacher on one probe run.

    ``run(model)`` runs the model on the probe batch (the task's output). Module names are those of
    ``student.named_modules()``: patching keeps every module in its place. Only the teacher's inputs are
    kept; the student's are compared as they come.
    """
    teacher_inputs: dict[str, list[torch.Tensor]] = {}
    _visit_inputs(teacher, run, lambda name, x: teacher_inputs.setdefault(name, []).append(x.clone()))
    calls: dict[str, int] = {}  # student calls per module, in the order modules are first called
    differs: set[str] = set()

    def compare(name: str, x: torch.Tensor) -> None:
        count = calls.get(name, 0)
        calls[name] = count + 1
        expected = teacher_inputs.get(name, [])
        if count >= len(expected) or not _same(x, expected[count]):
            differs.add(name)

    _visit_inputs(student, run, compare)
    return [name for name, count in calls.items() if name in differs or count != len(teacher_inputs.get(name, []))]


def _parameters_of_called_modules(model: nn.Module, run: Callable[[nn.Module], object]) -> list[str]:
    """The parameters of every module that runs when the compared output is computed (a SAM's image encoder,
    not its mask decoder, for the image embeddings), and the parameters held directly by the modules around them
    (a ViT's position table and class token, read by a ``forward_features`` called as a method)."""
    called: set[str] = set()
    _visit_inputs(model, run, lambda name, _: called.add(name))
    around = {".".join(name.split(".")[:end]) for name in called for end in range(len(name.split(".")))}
    return [name for name, _ in model.named_parameters() if name.rpartition(".")[0] in called | around]


def _enclosing_block(name: str, containers: set[str]) -> str | None:
    """The innermost ancestor (or the module itself) that is an element of a ModuleList / Sequential, or None.

    That is the block a module belongs to (``blocks.3`` for ``blocks.3.attn.qkv``; ``stages.1.blocks.0`` for
    TinyViT's ``stages.1.blocks.0.mlp.fc1``).
    """
    parts = name.split(".")
    block = None
    for end in range(1, len(parts) + 1):
        if ".".join(parts[: end - 1]) in containers and parts[end - 1].isdigit():
            block = ".".join(parts[:end])
    return block


def select_trainable(
    student: nn.Module, teacher: nn.Module, run: Callable[[nn.Module], object], trainable: str = "after_reduction"
) -> list[str]:
    """Parameter names of ``student`` to train; see the module docstring.

    ``after_reduction``: every parameter of the blocks from the first one whose inputs differ, and of every
    later module whose inputs differ (necks, heads). ``norms_biases``: the normalisation weights and biases and
    every other bias among those. ``all``: every parameter of every module the compared output is computed with.

    Raises:
        ValueError: unknown ``trainable``, or the setting changes nothing (no module sees a different input).
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    names = [name for name, _ in student.named_parameters()]
    if trainable == "all":
        return _parameters_of_called_modules(student, run)
    diverging = diverging_modules(student, teacher, run)
    if not diverging:
        raise ValueError(
            "the student's setting changes no module's input on the probe images: nothing to distil "
            "(is the reduction zero?). Use trainable='all' to fine-tune anyway"
        )
    containers = {name for name, module in student.named_modules() if isinstance(module, nn.ModuleList | nn.Sequential)}
    prefixes = set()
    for name in diverging:
        block = _enclosing_block(name, containers)
        prefixes.add(block if block is not None else name)
    modules = dict(student.named_modules())

    def owner(param_name: str) -> str:
        return param_name.rpartition(".")[0]

    def after(param_name: str) -> bool:
        own = owner(param_name)
        for prefix in prefixes:
            if own == prefix or (prefix and own.startswith(prefix + ".")):
                return True
        return False

    chosen = [name for name in names if after(name)]
    if trainable == "norms_biases":
        chosen = [
            name
            for name in chosen
            if name.endswith("bias")
            or isinstance(modules.get(owner(name)), _NORMS)
            or "norm" in owner(name).split(".")[-1]
        ]
    return chosen
