"""A bound for low-precision outputs derived from the model itself, instead of "finite" or a loose cosine.

A merged model run in bfloat16 / float16 should be about as far from itself in float32 as the unmerged
model is from itself: merging adds a few roundings (means, gathers) and may flip a near tie in the
matching, but must not turn low precision into a different model. The factor is measured (see the
tests that use it), not guessed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn


def relative_error(low: torch.Tensor, full: torch.Tensor) -> float:
    """max |low - full| / max |full|, in float32."""
    full = full.float()
    return float((low.float() - full).abs().max() / full.abs().max().clamp_min(1e-12))


def low_precision_errors(
    unmerged: nn.Module,
    merged: nn.Module,
    x: torch.Tensor,
    dtype: torch.dtype,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda model, inputs: model(inputs),
    choices: tuple[tuple[object, str], ...] = (),
) -> tuple[float, float]:
    """(unmerged model's error in ``dtype`` against itself in float32, the merged model's); checks the dtype.

    ``choices``: (module, function name) of the merged model's matching functions; the float32 run then
    makes the low-precision run's choices (see :func:`same_choices`), so only arithmetic is compared.
    """
    errors = []
    with torch.no_grad():
        low = forward(copy.deepcopy(unmerged).to(dtype), x.to(dtype))
        assert low.dtype == dtype
        errors.append(relative_error(low, forward(copy.deepcopy(unmerged).float(), x.float())))
        with contextlib.ExitStack() as stack:
            replays = [stack.enter_context(same_choices(module, name)) for module, name in choices]
            low = forward(copy.deepcopy(merged).to(dtype), x.to(dtype))
            assert low.dtype == dtype
            for replay in replays:
                stack.enter_context(replay())
            full = forward(copy.deepcopy(merged).float(), x.float())
        errors.append(relative_error(low, full))
    return errors[0], errors[1]


@contextlib.contextmanager
def same_choices(module, name: str) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Record the results of ``module.name`` (a matching function) in one run, replay them in another.

    Use: ``with same_choices(mod, "match_neighbours") as replay:`` run the low-precision model (its
    choices are recorded), then ``with replay():`` run the float32 model, which makes the very same
    choices. The two runs then differ by arithmetic only, not by a near tie that low precision flipped.
    """
    original = getattr(module, name)
    recorded: list = []

    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        recorded.append(result)
        return result

    @contextlib.contextmanager
    def replay():
        queue = list(recorded)

        def give(*args, **kwargs):
            fresh = original(*args, **kwargs)  # same shapes and types, then the recorded choice
            result = queue.pop(0)
            assert type(result) is type(fresh)
            return result

        setattr(module, name, give)
        try:
            yield
        finally:
            setattr(module, name, record)
        assert not queue, "the replayed run made fewer choices than the recorded one"

    setattr(module, name, record)
    try:
        yield replay
    finally:
        setattr(module, name, original)
