"""``cubistmerge bench``: throughput with and without token merging, thin over :func:`cubistmerge.bench.benchmark`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ._options import (
    DEFAULT_METHODS,
    DEFAULT_MODEL,
    _add_method_flags,
    _add_weights_arguments,
    _cubist_options,
    _device,
    _expedite_options,
    _non_negative_int,
    _output_path,
    _positive_int,
    _reject_unselected_flags,
    _report,
    _tome_options,
)

BENCH_DESCRIPTION = """\
Measure inference throughput (images/s) of a timm model without token merging (the baseline) and
with each requested merge method. All copies share the same weights and run in one process,
interleaved round robin after warm-up, so they see the same machine conditions.

The table reports, per variant: images/s (median, quartiles, extremes over the timed runs), the
speed-up over the baseline (ratio of medians), GFLOPs per image, the FLOP ratio (baseline FLOPs /
variant FLOPs), the efficiency (speed-up / FLOP ratio; 1.0 means wall-clock time shrank as much as
the FLOPs did) and the merge time (share of one profiled forward pass spent merging tokens).

Weights are random unless --checkpoint or --pretrained is given: throughput does not depend on them
(accuracy is not measured here)."""

BENCH_EPILOG = """\
examples:
  cubistmerge bench                                   # deit_small, CubistMerge r=1 at block 1 vs ToMe r=8
  cubistmerge bench --model deit_base_patch16_224 --method cubist --cubist-r 2,2 --runs 15
  cubistmerge bench --method cubist --cubist-stages 1:1:1,6:1:1 --method tome --tome-r 8,-0.5
  cubistmerge bench --method none --runs 20           # A/A control: the speed-up should be ~1
  cubistmerge bench --device cuda --dtype bfloat16 --batch-size 64 --json bench.json --markdown bench.md
"""


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench import DTYPES

    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help="timm model name; the merge methods need a plain ViT/DeiT (default: %(default)s)",
    )
    what.add_argument(
        "--method",
        dest="methods",
        action="extend",
        nargs="+",
        choices=("none", "cubist", "tome", "expedite"),
        metavar="{none,cubist,tome,expedite}",
        default=None,
        help="merge method(s) to compare with the baseline; repeatable or several at once. 'none' adds an "
        "unpatched copy as an A/A control for timing noise (default: cubist tome)",
    )

    _add_method_flags(parser, family_flags=("windows", "rope"), expedite=True)

    setup = parser.add_argument_group("setup")
    setup.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="images per forward pass (default: %(default)s)",
    )
    setup.add_argument(
        "--img-size",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="square input resolution (default: the model's own, e.g. 224)",
    )
    setup.add_argument(
        "--device", type=_device, default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: %(default)s)"
    )
    setup.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="parameter and input precision (default: %(default)s)"
    )
    setup.add_argument(
        "--runs",
        type=_positive_int,
        default=10,
        metavar="N",
        help="timed rounds; each runs every model copy once (default: %(default)s)",
    )
    setup.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="untimed warm-up rounds before timing (default: %(default)s)",
    )
    setup.add_argument(
        "--profile-runs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="profiled forward passes per model copy for the merge time; the median is reported (default: %(default)s)",
    )
    setup.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (torch.set_num_threads; default: torch's choice)",
    )
    _add_weights_arguments(setup)
    setup.add_argument(
        "--setting-file",
        action="append",
        default=None,
        metavar="FILE",
        help="also measure the setting in this file (written by 'cubistmerge tune'); repeatable",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--json", type=_output_path, default=None, metavar="PATH", help="also write the result as JSON")
    output.add_argument(
        "--markdown", type=_output_path, default=None, metavar="PATH", help="also write the result as a markdown table"
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bar or status messages on stderr")


def _bench_variants(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Any]:
    from ..bench import Variant
    from ..patch import read_setting

    files = []
    for path in args.setting_file or ():
        try:
            files.append(Variant(*read_setting(path)))
        except (OSError, ValueError) as error:
            parser.error(f"--setting-file {path}: {error}")
    # With setting files only, the default methods stay out unless asked for.
    methods = list(dict.fromkeys(args.methods or ([] if files else DEFAULT_METHODS)))  # de-duplicated, order kept
    _reject_unselected_flags(args, parser, methods, ", which is not selected")
    variants = []
    for method in methods:
        if method == "cubist":
            variants.append(Variant("cubist", _cubist_options(args, parser)))
        elif method == "tome":
            variants.append(Variant("tome", _tome_options(args)))
        elif method == "expedite":
            variants.append(Variant("expedite", _expedite_options(args)))
        else:
            variants.append(Variant("none"))
    return variants + files


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    import torch

    from ..bench import BenchConfigError, benchmark

    variants = _bench_variants(args, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress

    def log(message: str) -> None:
        if progress:
            print(f"[cubistmerge bench] {message}", file=sys.stderr, flush=True)

    try:
        result = benchmark(
            args.model,
            variants,
            batch_size=args.batch_size,
            img_size=args.img_size,
            device=args.device,
            dtype=args.dtype,
            runs=args.runs,
            warmup=args.warmup,
            checkpoint=args.checkpoint,
            pretrained=args.pretrained,
            progress=progress,
            command=shlex.join(["cubistmerge", *argv]),
            log=log,
            profile_runs=args.profile_runs,
        )
    except BenchConfigError as error:
        parser.error(str(error))
    _report(result, args, log)
    return 0


def variant_to_args(variant: Any) -> list[str]:
    """The ``cubistmerge bench`` flags that select one :class:`~cubistmerge.bench.Variant`."""
    from ..bench import Variant

    variant = Variant.coerce(variant)
    options = dict(variant.options)

    def amount(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    args = ["--method", variant.method]
    if variant.method == "cubist":
        if "stages" in options:
            stages = options.pop("stages")
            args += ["--cubist-stages", ",".join(":".join(amount(v) for v in stage) for stage in stages)]
        r = options.pop("r", None)
        if r is not None:
            args += ["--cubist-r", ",".join(amount(v) for v in r) if isinstance(r, (tuple, list)) else amount(r)]
        loc = options.pop("loc", None)
        if loc is not None:
            args += ["--cubist-loc", str(loc)]
        for key in ("representation", "metric", "windows", "rope"):
            if key in options:
                args += [f"--{key}", str(options.pop(key))]
    elif variant.method == "tome":
        r = options.pop("r", None)
        if isinstance(r, list):
            args += ["--tome-r", "[" + ",".join(str(v) for v in r) + "]"]
        elif isinstance(r, tuple):
            args += ["--tome-r", ",".join(amount(v) for v in r)]
        elif r is not None:
            args += ["--tome-r", str(r)]
        if options.pop("prop_attn", True) is False:
            args.append("--no-prop-attn")
    elif variant.method == "expedite":
        r = options.pop("r", None)
        if r is not None:
            args += ["--expedite-r", ",".join(amount(v) for v in r) if isinstance(r, (tuple, list)) else amount(r)]
        if "loc" in options:
            args += ["--expedite-loc", str(options.pop("loc"))]
        if "temperature" in options:
            args += ["--expedite-temperature", amount(float(options.pop("temperature")))]
    if options:
        raise ValueError(f"options {sorted(options)} of {variant.name!r} have no cubistmerge bench flag")
    return args


def bench_command_line(model: str, variant: Any, **settings: Any) -> str:
    """A ``cubistmerge bench`` command measuring ``variant`` of ``model`` against its baseline.

    ``settings`` map option names to values (``batch_size=16`` -> ``--batch-size 16``); True adds
    a bare flag, None and False are left out.
    """
    args = ["cubistmerge", "bench", "--model", model, *variant_to_args(variant)]
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return shlex.join(args)


# --------------------------------------------------------------------------- eval
