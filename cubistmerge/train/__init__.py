"""Win back the quality merging costs: label-free self-distillation of a merged model from its unmerged self.

    from cubistmerge.train import distill
    result = distill(model, "my_images/", "cubist r=2 loc=2", epochs=1, out="student.pt")

See :func:`distill`; :func:`load_student` rebuilds a student from its checkpoint.
"""

from .checkpoint import CheckpointError, load_student, read_checkpoint
from .data import ImageFolder, find_images
from .distill import (
    DistillConfig,
    DistillConfigError,
    DistillResult,
    UntrainedParameterError,
    distill,
    distill_recipe,
    recipe_fingerprint,
)
from .tasks import DistillTask, make_task

__all__ = [
    "CheckpointError",
    "DistillConfig",
    "DistillConfigError",
    "DistillResult",
    "DistillTask",
    "ImageFolder",
    "UntrainedParameterError",
    "distill",
    "distill_recipe",
    "find_images",
    "load_student",
    "make_task",
    "read_checkpoint",
    "recipe_fingerprint",
]
