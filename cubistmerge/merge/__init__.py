"""Pure token-merging algorithms: tensors in, tensors out, no nn.Module knowledge."""

from .cubist import (
    METRICS,
    NeighbourMatch,
    Recover,
    cubist_merge,
    match_neighbours,
    merge_neighbours,
    merge_sequences,
    neighbour_similarity,
)
from .expedite import (
    NORMALISATIONS,
    Reconstruct,
    WindowReconstruct,
    expedite_cluster,
    expedite_cluster_windows,
    neighbourhood_mask,
    reconstruction_weights,
    soft_assignment,
)
from .groups import REPRESENTATIONS, compose_groups, merge_groups, unmerge_groups
from .tome import (
    BipartiteMatch,
    bipartite_soft_matching,
    match_bipartite,
    max_tome_r,
    merge_matched,
    merge_weighted,
    tome_schedule,
)

__all__ = [
    "METRICS",
    "NORMALISATIONS",
    "NeighbourMatch",
    "REPRESENTATIONS",
    "Reconstruct",
    "Recover",
    "WindowReconstruct",
    "BipartiteMatch",
    "bipartite_soft_matching",
    "match_bipartite",
    "merge_matched",
    "compose_groups",
    "cubist_merge",
    "expedite_cluster",
    "expedite_cluster_windows",
    "match_neighbours",
    "max_tome_r",
    "merge_groups",
    "merge_neighbours",
    "merge_sequences",
    "merge_weighted",
    "neighbourhood_mask",
    "neighbour_similarity",
    "reconstruction_weights",
    "soft_assignment",
    "tome_schedule",
    "unmerge_groups",
]
