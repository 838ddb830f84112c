"""Run the frozen part of a student once per image instead of once per step.

With the default trainable set the modules before the first trained block do not train: every epoch they
compute, for each image, exactly what they computed the epoch before. On MobileSAM at ``loc=2`` that part (the
conv stem, the first stage and the next stage's downsample at 1024 px) is about half of a training step. A
:class:`FrozenPrefix` keeps the output of the last frozen module before the first trained block per image and,
on later forwards of the same image, that module returns it while the frozen modules before it return
placeholders of their output's shape (the code between them, such as adding a position table, still runs on the
placeholders but its result is not used). The code after the kept module runs as usual: a reduction computed
between two blocks (a ViT's at ``loc``) sees the real tokens.

Nothing here knows a family: the boundary block and the skippable modules are found by running the student once
with hooks. Whether skipping is exact is then checked on the probe batch (the student's output with and without
the skip); a model whose frozen part leaves state that later code reads, or that feeds later code past the
boundary block, fails that check and runs without the cache (the reason is recorded).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .trainable import _enclosing_block, _first_tensor, _same

__all__ = ["FrozenPrefix", "find_frozen_prefix"]


class _Captured(Exception):
    """Raised by the kept module's hook to stop a forward once its output is known."""


@dataclass
class _Placeholder:
    """A skipped module's stand-in: zeros of the module's output shape for the batch it is given."""

    shape: tuple[int, ...]  # without the batch dimension
    dtype: torch.dtype

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        reference = _first_tensor(args)
        if reference is None:
            reference = _first_tensor(tuple(kwargs.values()))
        return torch.zeros((reference.shape[0], *self.shape), dtype=self.dtype, device=reference.device)


@dataclass
class FrozenPrefix:
    """The boundary block of a student and the frozen modules called before it; see the module docstring.

    Attributes:
        boundary: name of the first block with a trained parameter.
        kept: name of the last skipped module to return before it: its output is what is kept.
        skipped: names of the modules that do not run while skipping (``kept`` included).
        store: kept outputs by key (an image and its flip), at most ``max_bytes`` in all.
    """

    model: nn.Module
    boundary: str
    kept: str
    placeholders: dict[str, _Placeholder]
    max_bytes: int
    store: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    stored_bytes: int = 0

    @property
    def skipped(self) -> list[str]:
        return list(self.placeholders)

    def capture(self, run: Callable[[], object]) -> torch.Tensor:
        """The kept module's output when ``run()`` runs the model; the forward stops there (no grad)."""
        kept: list[torch.Tensor] = []

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            kept.append(output.detach())
            raise _Captured

        handle = self.model.get_submodule(self.kept).register_forward_hook(hook)
        try:
            with torch.no_grad():
                run()
        except _Captured:
            pass
        finally:
            handle.remove()
        if not kept:
            raise RuntimeError(f"the forward never reached {self.kept}")
        return kept[0]

    @contextmanager
    def skipping(self, outputs: torch.Tensor) -> Iterator[None]:
        """Within: the kept module returns ``outputs`` (from :meth:`capture`), the other skipped modules zeros."""
        modules = {name: self.model.get_submodule(name) for name in self.placeholders}
        before = {name: module.__dict__.get("forward") for name, module in modules.items()}
        for name, module in modules.items():
            module.forward = (lambda *_args, **_kwargs: outputs) if name == self.kept else self.placeholders[name]
        try:
            yield
        finally:
            for name, module in modules.items():
                if before[name] is None:
                    del module.forward
                else:
                    module.forward = before[name]

    def get(self, keys: Sequence[Hashable]) -> torch.Tensor | None:
        """The kept outputs of a batch stacked, or None unless every key is kept."""
        if not all(key in self.store for key in keys):
            return None
        return torch.stack([self.store[key] for key in keys])

    def put(self, keys: Sequence[Hashable], outputs: torch.Tensor) -> None:
        """Keep each item's output while the store has room (a full store keeps what it has)."""
        for key, item in zip(keys, outputs, strict=True):
            size = item.numel() * item.element_size()
            if key not in self.store and self.stored_bytes + size <= self.max_bytes:
                self.store[key] = item.clone()
                self.stored_bytes += size


def _subtree_trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def find_frozen_prefix(model: nn.Module, run: Callable[[], torch.Tensor], *, max_bytes: int) -> FrozenPrefix | str:
    """The student's frozen prefix, or the reason there is none that can be skipped exactly.

    ``model`` is the student with its trained parameters marked (``requires_grad``); ``run()`` computes the
    compared output on a probe batch. The boundary is the block (an element of a ModuleList or Sequential)
    of the first module called that holds a trained parameter; the skipped modules are the largest ones
    that return a tensor with the batch first, are called once and return before the boundary is called, and
    hold no trained parameter; the last of them to return is the kept one.
    """
    names = {module: name for name, module in model.named_modules()}
    containers = {name for name, module in model.named_modules() if isinstance(module, nn.ModuleList | nn.Sequential)}
    events: list[tuple[str, str]] = []  # ("enter" | "exit", name) in call order
    calls: dict[str, int] = {}
    batch_sizes: dict[str, int | None] = {}
    # each module's output as a placeholder would stand in for it (shapes only: the probe's activations at full
    # resolution would be kept for every module otherwise), None where no placeholder can
    stand_ins: dict[str, _Placeholder | None] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        name = names[module]
        events.append(("enter", name))
        calls[name] = calls.get(name, 0) + 1
        tensor = _first_tensor(args)
        batch_sizes[name] = tensor.shape[0] if tensor is not None and tensor.dim() else None

    def leave(module: nn.Module, _args: tuple, output: object) -> None:
        name = names[module]
        events.append(("exit", name))
        fits = isinstance(output, torch.Tensor) and output.dim() > 0 and batch_sizes[name] == output.shape[0]
        stand_ins[name] = _Placeholder(tuple(output.shape[1:]), output.dtype) if fits else None

    handles = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.no_grad():
            reference = run()
    finally:
        for handle in handles:
            handle.remove()

    def owns_trained(name: str) -> bool:
        return any(p.requires_grad for p in model.get_submodule(name).parameters(recurse=False))

    first_trained = next((name for kind, name in events if kind == "enter" and owns_trained(name)), None)
    if first_trained is None:
        return "no module with a trained parameter runs"
    # a family may run a block's parts without calling the block itself (ToMe's blocks): the block is where
    # the first trained module sits, whether or not it is called
    boundary = _enclosing_block(first_trained, containers) or first_trained
    if calls.get(boundary, 1) != 1:
        return f"the first trained block ({boundary}) runs {calls[boundary]} times per forward"
    boundary_enter = next(
        i for i, (kind, name) in enumerate(events) if kind == "enter" and (name + ".").startswith(boundary + ".")
    )
    exits = {name: i for i, (kind, name) in enumerate(events[:boundary_enter]) if kind == "exit"}  # before it

    placeholders: dict[str, _Placeholder] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if name not in calls:  # a ModuleList is never called itself; its elements may be
                visit(name, child)
                continue
            ancestor = boundary.startswith(name + ".")
            stand_in = stand_ins.get(name)
            if not ancestor and name in exits and calls[name] == 1 and not _subtree_trains(child) and stand_in:
                placeholders[name] = stand_in
            elif ancestor or name in exits:
                visit(name, child)

    visit("", model)
    if not placeholders:
        return f"no frozen module runs before the first trained block ({boundary})"
    kept = max(placeholders, key=exits.__getitem__)
    prefix = FrozenPrefix(model, boundary, kept, placeholders, max_bytes)
    with torch.no_grad():
        with prefix.skipping(prefix.capture(run)):
            skipped = run()
    if not _same(skipped, reference):
        return (
            f"the output with the modules before {boundary} skipped differs from the full forward (they leave "
            "state that later code reads, or later code reads them past that block)"
        )
    return prefix
