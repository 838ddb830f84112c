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
Measure inference throughput (images/s) of a timm model, or of a Hugging Face transformers ViT / DeiT /
DINOv2 / DINOv3 / SAM (--hf-model, --hf-config), without token merging (the baseline) and
with each requested merge method. All copies share the same weights and run in one process,
interleaved round robin after warm-up, so they see the same machine conditions.

The table reports, per variant: images/s (median, quartiles, extremes over the timed runs), the
speed-up over the baseline (ratio of medians), GFLOPs per image, the FLOP ratio (baseline FLOPs /
variant FLOPs), the efficiency (speed-up / FLOP ratio; 1.0 means wall-clock time shrank as much as
the FLOPs did) and the merge time (share of one profiled forward pass spent merging tokens).

Weights are random unless --checkpoint, --pretrained or --hf-model is given: throughput does not depend
on them (accuracy is not measured here). A SAM's image encoder is what is timed (the part merging
changes); timm's sam2_hiera_* run at 1024 px unless --img-size says otherwise, as SAM2 does."""

BENCH_EPILOG = """\
examples:
  cubistmerge bench                                   # deit_small, CubistMerge r=1 at block 1 vs ToMe r=8
  cubistmerge bench --model deit_base_patch16_224 --method cubist --cubist-r 2,2 --runs 15
  cubistmerge bench --method cubist --cubist-stages 1:1:1,6:1:1 --method tome --tome-r 8,-0.5
  cubistmerge bench --method none --runs 20           # A/A control: the speed-up should be ~1
  cubistmerge bench --device cuda --dtype bfloat16 --batch-size 64 --json bench.json --markdown bench.md
  cubistmerge bench --model sam2_hiera_tiny --method cubist --cubist-r 2 --cubist-loc 2 --batch-size 1
  cubistmerge bench --hf-config docs/configs/dinov2-base.json --img-size 224   # random-weight DINOv2-B
  cubistmerge bench --hf-config docs/configs/sam-vit-base.json --method cubist --batch-size 1   # SAM-B encoder
  cubistmerge bench --hf-config dinov2 --hf-option hidden_size=384 --hf-option num_attention_heads=6  # DINOv2-S
  cubistmerge bench --hf-model facebook/dinov2-small  # pretrained, from the Hugging Face hub
"""


def _hf_option(text: str) -> tuple[str, Any]:
    from ..models.hf import HfModelError, parse_hf_option

    try:
        return parse_hf_option(text)
    except HfModelError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench import DTYPES

    what = parser.add_argument_group("what to measure")
    model = what.add_mutually_exclusive_group()
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help="timm model name: a ViT/DeiT, Eva, samvit, TinyViT, Hiera or sam2_hiera_* (default: %(default)s)",
    )
    model.add_argument(
        "--hf-model",
        default=None,
        metavar="NAME",
        help="a Hugging Face transformers model instead, pretrained (AutoModel.from_pretrained: hub id or local "
        "directory; needs the hub or its cache), e.g. facebook/dinov2-small",
    )
    model.add_argument(
        "--hf-config",
        default=None,
        metavar="CONFIG",
        help="a random-weight transformers model instead (AutoModel.from_config), from a config.json, a "
        "directory holding one, inline JSON, or a model type with transformers' defaults (vit, deit, dinov2, "
        "dinov2_with_registers, dinov3_vit, sam, sam_vision_model)",
    )
    what.add_argument(
        "--hf-option",
        dest="hf_options",
        action="append",
        type=_hf_option,
        default=None,
        metavar="KEY=VALUE",
        help="override a field of the --hf-model / --hf-config config (a Python literal; dotted for sub-configs: "
        "vision_config.image_size=512; attn_implementation=eager|sdpa); repeatable",
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
        help="square input resolution (default: the model's own, e.g. 224; 1024 for sam2_hiera_*; an HF model's "
        "config image_size; ViT/DeiT then get interpolate_pos_encoding, an HF SAM from --hf-config is built "
        "for it)",
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
    hf = args.hf_model is not None or args.hf_config is not None
    if args.hf_options and not hf:
        parser.error("--hf-option applies only to --hf-model or --hf-config")
    if hf and (args.checkpoint is not None or args.pretrained):
        parser.error(
            f"{'--checkpoint' if args.checkpoint is not None else '--pretrained'} applies only to timm models "
            "(--model); --hf-model loads its pretrained weights, --hf-config builds random ones"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress

    def log(message: str) -> None:
        if progress:
            print(f"[cubistmerge bench] {message}", file=sys.stderr, flush=True)

    try:
        result = benchmark(
            None if hf else args.model,
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
            hf_model=args.hf_model,
            hf_config=args.hf_config,
            hf_options=dict(args.hf_options) if args.hf_options else None,
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


def bench_command_line(model: str | None, variant: Any, **settings: Any) -> str:
    """A ``cubistmerge bench`` command measuring ``variant`` of ``model`` against its baseline.

    ``settings`` map option names to values (``batch_size=16`` -> ``--batch-size 16``); True adds
    a bare flag, None and False are left out. ``model`` None for a transformers model given by
    ``hf_model=`` / ``hf_config=`` among the settings.
    """
    args = ["cubistmerge", "bench", *(["--model", model] if model is not None else []), *variant_to_args(variant)]
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return shlex.join(args)


# --------------------------------------------------------------------------- eval
