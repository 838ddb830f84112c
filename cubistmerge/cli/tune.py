"""``cubistmerge tune sam|dense|imagenet``: thin over :func:`cubistmerge.tune`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

from ._options import (
    TASK_MODELS,
    _add_device_arguments,
    _asset_default,
    _HelpFormatter,
    _output_path,
    _positive_int,
    _set_threads,
    add_model_arguments,
    load_task_model,
)

DESCRIPTION = """\
The best merge setting for a speed target, on this model, this device and unlabelled images: enumerate the
settings each method supports, drop those whose FLOP ratio cannot reach the target, rank the rest by fidelity
to the unmerged model on a few calibration images (successive halving: the better half goes on to twice the
images), time the finalists interleaved against the unmerged model, and pick the best fidelity that meets the
measured target (or say that none does). Writes the setting file that 'cubistmerge.patch(model, setting=FILE)'
and every command's --setting-file read."""

EPILOG = """\
examples:
  cubistmerge tune dense --target 1.3 --out setting.json --plot tune.png
  cubistmerge tune sam --target 1.2 --images my_photos/ --method cubist --out sam_setting.json
  cubistmerge tune imagenet --model deit_small_patch16_224 --pretrained --target 1.5 --method cubist tome
  cubistmerge eval dense --setting-file setting.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="tune_target", metavar="<model>", title="models")
    targets.required = True
    for name, help_line in TASK_MODELS.items():
        target = targets.add_parser(
            name, help=help_line, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
        )
        add_model_arguments(target, name, "folder of calibration images")
        search = target.add_argument_group("the search")
        search.add_argument(
            "--target", type=float, required=True, metavar="X", help="measured speed-up to reach, e.g. 1.3"
        )
        search.add_argument(
            "--method",
            dest="methods",
            action="extend",
            nargs="+",
            choices=("cubist", "tome", "expedite", "pitome", "tofu"),
            default=None,
            help="methods to search (default: cubist tome)",
        )
        search.add_argument(
            "--setting", action="append", default=None, metavar="'METHOD key=value ...'",
            help="search these settings instead of the methods' grids (repeat it)",
        )  # fmt: skip
        search.add_argument("--calibration-images", type=_positive_int, default=16, metavar="N", help="(default 16)")
        search.add_argument("--first-rung", type=_positive_int, default=4, metavar="N", help="(default 4)")
        search.add_argument("--finalists", type=_positive_int, default=4, metavar="N", help="(default 4)")
        search.add_argument("--flop-slack", type=float, default=0.85, help="(default 0.85)")
        search.add_argument("--runs", type=_positive_int, default=5, metavar="N", help="timed rounds (default 5)")
        search.add_argument("--warmup", type=int, default=1, metavar="N", help="(default 1)")
        setup = target.add_argument_group("setup")
        setup.add_argument(
            "--batch-size", type=_positive_int, default=4, metavar="N", help="timed batch (default: %(default)s)"
        )
        _add_device_arguments(setup)
        output = target.add_argument_group("output")
        output.add_argument("--out", type=_output_path, default=None, metavar="FILE", help="the setting file")
        output.add_argument("--json", type=_output_path, default=None, metavar="PATH", help="the whole search")
        output.add_argument("--markdown", type=_output_path, default=None, metavar="PATH", help="its table")
        output.add_argument("--plot", type=_output_path, default=None, metavar="PNG", help="fidelity vs speed")
        output.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:

    from ..tuning import TuneError, tune

    _set_threads(args)
    if args.setting and args.methods:
        parser.error("--setting lists the settings to search; drop --method")
    images = _asset_default(args.images, parser, "--images", "imagenet-sample-images")
    model = load_task_model(args.tune_target, args, parser)
    try:
        result = tune(
            model,
            images,
            args.target,
            methods=tuple(args.methods or ("cubist", "tome")),
            settings=args.setting,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            calibration_images=min(args.calibration_images, args.max_images or args.calibration_images),
            first_rung=args.first_rung,
            finalists=args.finalists,
            flop_slack=args.flop_slack,
            runs=args.runs,
            warmup=args.warmup,
            progress=not args.no_progress,
        )
    except (TuneError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"cubistmerge tune: error: {error}", file=sys.stderr)
        return 2
    print(result.to_markdown(), end="")
    print(f"setting: {json.dumps(result.setting_dict())}")
    if args.out:
        result.save_setting(args.out)
        print(f"wrote {args.out}")
    if args.json:
        payload = {"command": shlex.join(["cubistmerge", *argv]), **result.to_dict()}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(result.to_markdown())
    if args.plot:
        result.plot(args.plot)
    return 0  # a target no setting meets is an answer too: the table and message say so
