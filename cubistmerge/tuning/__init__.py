"""Pick the merge setting for a speed target on the user's own model, device and unlabelled images.

    result = cubistmerge.tune(model, "my_images/", target_speedup=1.3)
    cubistmerge.patch(<merged part of model>, **result.setting_dict())

See :func:`tune` (the search and its budget) and :mod:`cubistmerge.tuning.fidelity` (the label-free measures).
"""

from .fidelity import embedding_fidelity, fidelity, logit_fidelity, map_fidelity
from .search import Candidate, TuneError, TuneResult, candidate_settings, tune

__all__ = [
    "Candidate",
    "TuneError",
    "TuneResult",
    "candidate_settings",
    "embedding_fidelity",
    "fidelity",
    "logit_fidelity",
    "map_fidelity",
    "tune",
]
