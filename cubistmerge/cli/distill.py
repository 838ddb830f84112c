"""``cubistmerge distill sam|dense|imagenet``: thin over :func:`cubistmerge.train.distill`."""

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
    _existing_file,
    _HelpFormatter,
    _non_negative_int,
    _output_path,
    _positive_int,
    _set_threads,
    add_model_arguments,
    load_task_model,
)

DESCRIPTION = """\
Win back the quality merging costs: train a merged copy of the model (the student, patched with --setting) to
reproduce the unmerged model (the teacher, frozen) on a folder of unlabelled images. The loss is taken on what
the downstream uses: SAM's image embeddings (MSE), ImgFocus's saliency logits (MSE), a classifier's logits (KL).
By default only the blocks from the first reduction on train (earlier ones see identical inputs). The
checkpoint holds the model's own state_dict keys and the setting: evaluate it with
'cubistmerge sweep TASK --setting "SETTING checkpoint=CKPT"' beside the same setting without it."""

EPILOG = """\
examples:
  cubistmerge distill dense --setting "cubist r=2 loc=1" --epochs 2 --cache scratch/focus-targets --out focus.pt
  cubistmerge sweep dense --setting "cubist r=2 loc=1" --setting "cubist r=2 loc=1 checkpoint=focus.pt"
  cubistmerge distill sam --setting "cubist r=2 loc=2 metric=l2" --epochs 1 --cache scratch/sam-targets --out sam.pt
  cubistmerge distill imagenet --model deit_small_patch16_224 --pretrained --setting "tome r=8" --out deit.pt
  torchrun --nproc_per_node 2 -m cubistmerge distill dense --setting "cubist r=2 loc=1" --out focus.pt
The default images are the assets' imagenet-sample-images (never the COCO subset: it is the test set)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="distill_target", metavar="<model>", title="models")
    targets.required = True
    for name, help_line in TASK_MODELS.items():
        target = targets.add_parser(
            name, help=help_line, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
        )
        _add_target_arguments(target, name)


def _add_target_arguments(parser: argparse.ArgumentParser, target: str) -> None:
    add_model_arguments(parser, target, "folder of training images")
    method = parser.add_argument_group("the student")
    method.add_argument(
        "--setting",
        required=True,
        metavar="'METHOD key=value ...'",
        help="the merge setting to distil, e.g. 'cubist r=2 loc=2 metric=l2', 'tome r=8', 'expedite r=2 loc=3'",
    )
    method.add_argument(
        "--trainable",
        choices=("after_reduction", "all", "norms_biases"),
        default="after_reduction",
        help="which parameters train (default: %(default)s)",
    )
    if target == "imagenet":
        method.add_argument("--temperature", type=float, default=1.0, help="KL temperature (default: %(default)s)")
        method.add_argument(
            "--ce-weight",
            type=float,
            default=0.0,
            help="cross-entropy weight beside the KL; needs labelled --images (one sub-folder per class, or a "
            "'file, index' labels.txt) (default: %(default)s)",
        )
    if target == "sam":
        method.add_argument(
            "--exclude-padding",
            action="store_true",
            help="embedding MSE over the cells covering the image only, not SAM's zero padding",
        )
        method.add_argument(
            "--decoder-weight",
            type=float,
            default=0.0,
            help="add this times the frozen mask decoder's mask-logit + IoU MSE for label-free prompts "
            "(default: %(default)s, off)",
        )
        method.add_argument(
            "--prompt-grid",
            type=_positive_int,
            default=4,
            metavar="N",
            help="the decoder loss's prompts: an N x N grid of points and the teacher's mask boxes for them "
            "(default: %(default)s)",
        )
    if target == "dense":
        method.add_argument(
            "--dense-target",
            choices=("logits", "saliency", "features"),
            default="logits",
            help="what the loss compares (default: %(default)s)",
        )

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=float, default=1.0, help="passes over the images (default: %(default)s)")
    training.add_argument(
        "--lr", type=float, default=None, help="peak AdamW learning rate (default: per task, sam 1e-4, else 1e-6)"
    )
    training.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    training.add_argument(
        "--warmup", type=float, default=0.05, help="fraction of the steps warming up (default: %(default)s)"
    )
    training.add_argument(
        "--batch-size", type=_positive_int, default=4, metavar="N", help="images per forward (default: %(default)s)"
    )
    training.add_argument(
        "--accumulate", type=_positive_int, default=1, metavar="N", help="forwards per step (default: %(default)s)"
    )
    training.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip, 0: off (default: 1.0)")
    training.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    training.add_argument("--augment", action="store_true", help="random horizontal flips")
    training.add_argument(
        "--workers", type=_non_negative_int, default=0, metavar="N", help="DataLoader processes (default: 0)"
    )
    training.add_argument("--cache", default=None, metavar="DIR", help="keep the teacher's outputs here (float16)")
    training.add_argument(
        "--prefix-cache-gb",
        type=float,
        default=8.0,
        metavar="GB",
        help="memory for the frozen part's outputs, computed once per image; 0: off (default: %(default)s)",
    )
    training.add_argument("--max-steps", type=_positive_int, default=None, metavar="N", help="stop after N steps")
    setup = parser.add_argument_group("setup")
    _add_device_arguments(setup)

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=_output_path, default=None, metavar="CKPT", help="checkpoint to write")
    output.add_argument(
        "--save-every", type=_non_negative_int, default=0, metavar="STEPS", help="also every N steps (0: at the end)"
    )
    output.add_argument("--resume", type=_existing_file, default=None, metavar="CKPT", help="continue this run")
    output.add_argument("--json", type=_output_path, default=None, metavar="PATH", help="write the loss history")
    output.add_argument("--no-progress", action="store_true", help="no progress bar or messages on stderr")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    import torch

    from ..assets import display_path
    from ..eval.distributed import is_main_process
    from ..train import CheckpointError, DistillConfigError, distill

    _set_threads(args)
    progress = not args.no_progress

    def log(message: str) -> None:
        if progress and is_main_process():
            print(f"[cubistmerge distill] {message}", file=sys.stderr, flush=True)

    images = _asset_default(args.images, parser, "--images", "imagenet-sample-images")
    model = load_task_model(args.distill_target, args, parser)
    log(f"student: {args.setting!r}; images: {display_path(images)}")
    try:
        result = distill(
            model,
            images,
            args.setting,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup=args.warmup,
            batch_size=args.batch_size,
            accumulate=args.accumulate,
            clip_grad=args.clip_grad or None,
            dtype=args.dtype,
            device=args.device,
            trainable=args.trainable,
            seed=args.seed,
            augment=args.augment,
            workers=args.workers,
            max_images=args.max_images,
            cache=args.cache,
            prefix_cache_gb=args.prefix_cache_gb,
            out=args.out,
            resume=args.resume,
            save_every=args.save_every,
            temperature=getattr(args, "temperature", 1.0),
            ce_weight=getattr(args, "ce_weight", 0.0),
            exclude_padding=getattr(args, "exclude_padding", False),
            decoder_weight=getattr(args, "decoder_weight", 0.0),
            prompt_grid=getattr(args, "prompt_grid", 4),
            dense_target=getattr(args, "dense_target", "logits"),
            progress=progress,
            max_steps=args.max_steps,
        )
    except (DistillConfigError, CheckpointError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"cubistmerge distill: error: {error}", file=sys.stderr)
        return 2
    if not is_main_process():
        return 0
    print(result.summary())
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    if args.json is not None:
        payload = {
            "command": shlex.join(["cubistmerge", *argv]),
            "setting": result.config.setting,
            "task": result.task,
            "config": vars(result.config),
            "recipe": result.recipe,
            "fingerprint": result.fingerprint,
            "images": display_path(images),
            "images_seen": result.images_seen,
            "wall_s": result.wall_s,
            "threads": torch.get_num_threads(),
            "trainable": result.trainable,
            "skipped_images": result.skipped_images,
            "frozen_prefix": result.frozen_prefix,
            "history": result.history,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    return 0
