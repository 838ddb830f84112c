"""``cubistmerge sweep TASK``: an eval target with its built-in curve settings (:func:`cubistmerge.sweep.run_sweep`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ._options import (
    _HelpFormatter,
)
from .eval import (
    _EVAL_TASKS,
    EVAL_SAM_DESCRIPTION,
    EVAL_SAM_EPILOG,
    _add_eval_sam_arguments,
    _run_eval_sam,
)

SWEEP_DESCRIPTION = """\
Run a grid of methods x settings on one task and write the speed / quality curves: a table on stdout and,
with --json / --markdown / --plot, a JSON file, a markdown table and a PNG plot (quality against measured
speed-up and against FLOP ratio, one curve per method). 'cubistmerge sweep TASK' is 'cubistmerge eval TASK'
with the task's built-in curve settings when no setting is given; every option of the eval target applies."""

SWEEP_EPILOG = """\
examples:
  cubistmerge sweep dense --json dense.json --markdown dense.md --plot dense.png
  cubistmerge sweep sam --subset coco-tiny --plot sam.png
  cubistmerge sweep imagenet --model deit_small_patch16_224 --max-images 256 --plot imagenet.png
  cubistmerge sweep dense --setting "cubist r=2 loc=1" --setting "cubist r=2 loc=1 metric=l2" --plot l2.png
"""


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="sweep_target", metavar="<task>", title="tasks")
    targets.required = True
    tasks = {
        "sam": (
            "MiniSam box prompts on COCO (mIoU)",
            EVAL_SAM_DESCRIPTION,
            EVAL_SAM_EPILOG,
            _add_eval_sam_arguments,
            _run_eval_sam,
        ),
        **_EVAL_TASKS,
    }
    for name, (help_line, description, epilog, add_arguments, run) in tasks.items():
        target = targets.add_parser(
            name, help=help_line, description=description, epilog=epilog, formatter_class=_HelpFormatter
        )
        add_arguments(target)
        target.set_defaults(eval_parser=target, eval_run=run, sweep_default=True)


def _run_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    return args.eval_run(args, args.eval_parser, argv)


# --------------------------------------------------------------------------- visualize
