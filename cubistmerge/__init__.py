"""cubistmerge: spatial-preserving token merging for Vision Transformers.

Two lines on a timm model::

    import cubistmerge
    cubistmerge.patch(model, method="cubist", r=1, loc=1)

``cubistmerge.distill`` wins quality back by label-free self-distillation (:mod:`cubistmerge.train`);
``cubistmerge.tune`` picks a setting for a speed target (:mod:`cubistmerge.tuning`).
"""

from .merge import (
    Recover,
    bipartite_soft_matching,
    cubist_merge,
    merge_weighted,
    tome_schedule,
    unmerge_groups,
)
from .patch import UnsupportedModelError, patch, unpatch
from .train import distill
from .tuning import tune

__version__ = "0.1.0"

__all__ = [
    "Recover",
    "UnsupportedModelError",
    "bipartite_soft_matching",
    "distill",
    "cubist_merge",
    "merge_weighted",
    "patch",
    "tome_schedule",
    "tune",
    "unmerge_groups",
    "unpatch",
    "__version__",
]
