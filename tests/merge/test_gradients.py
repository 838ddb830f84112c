"""Gradients through the merges: the values carry them, the matching stays discrete (float64).

Distillation trains a student through its token reductions, so every pure merge
must be a differentiable function of the token values once the matching (which
tokens merge, and where to) is fixed, and the matching itself must be integer
and carry no gradient. The tests below check, for every merge in
``cubistmerge.merge``:

1. ``torch.autograd.gradcheck`` of the merge with its matching computed once
   and held fixed (where the matching is recomputed inside, e.g.
   :func:`cubist_merge`, every call asserts it did not change, so the check is
   of the merge alone). Maxmag selects per channel, which is differentiable
   only away from ties: its inputs have magnitudes (or vector norms) at least
   0.1 apart, so gradcheck's 1e-6 steps never change the selection.
2. Where the gradient goes, against hand numbers: to the member of largest
   magnitude only (with derivative +1 whatever its sign) for maxmag, to the
   largest-norm member for maxmag_vector, and with weights size_i / sum(size)
   for the mean.
3. That gradients do not stop at a merge: every parameter of a tiny model
   around each reduction receives one, and every contributing input does.
4. That the matching is discrete: integer index maps without a graph, no
   gradient into a separate metric, and the gradient of a whole reduction is
   that of its fixed-matching merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cubistmerge.merge import (
    METRICS,
    REPRESENTATIONS,
    Reconstruct,
    cubist_merge,
    expedite_cluster,
    match_bipartite,
    match_neighbours,
    merge_groups,
    merge_matched,
    merge_neighbours,
    merge_sequences,
    merge_weighted,
    neighbour_similarity,
    neighbourhood_mask,
    reconstruction_weights,
    soft_assignment,
    unmerge_groups,
)
from cubistmerge.merge.groups import slots_after_removal
from cubistmerge.merge.pitome import PiToMeMatch, match_pitome, merge_pitome
from cubistmerge.merge.tofu import MLERP_NORMS, merge_tofu, mlerp

# Tiny float64 problems: one intra-op thread (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
# Tighter than gradcheck's defaults (atol 1e-5, rtol 1e-3): in float64 these merges are (piecewise) linear or
# smooth, so central differences with eps = 1e-6 agree with the analytic Jacobian to ~1e-9.
GRADCHECK = {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-5}
WITH_SIZE = pytest.mark.parametrize("with_size", [False, True], ids=["no_size", "size"])
REPRESENTATION = pytest.mark.parametrize("representation", REPRESENTATIONS)


# ----------------------------------------------------------------------------- inputs


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def separated_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Magnitudes 0.5, 0.6, 0.7, ... in random places with random signs.

    No two entries tie in magnitude (gaps >= 0.1), so maxmag's choice in any
    group is the same for every point gradcheck evaluates.
    """
    generator = _generator(seed)
    count = math.prod(shape)
    magnitudes = 0.5 + 0.1 * torch.randperm(count, generator=generator).to(F64)
    signs = torch.randint(0, 2, (count,), generator=generator).to(F64) * 2 - 1
    return (magnitudes * signs).reshape(shape)


def separated_norms(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Tokens (last dimension) of random direction whose L2 norms are 0.5, 0.6, ... in random order.

    maxmag_vector's winner and MLERP's largest norm then survive gradcheck's steps.
    """
    generator = _generator(seed)
    directions = torch.randn(shape, generator=generator, dtype=F64)
    directions = directions / torch.linalg.vector_norm(directions, dim=-1, keepdim=True)
    count = math.prod(shape[:-1])
    norms = 0.5 + 0.1 * torch.randperm(count, generator=generator).to(F64)
    return directions * norms.reshape(*shape[:-1], 1)


def tokens_for(representation: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Inputs on which ``representation`` is differentiable with margin (the mean is everywhere)."""
    if representation == "maxmag":
        return separated_values(shape, seed)
    if representation == "maxmag_vector":
        return separated_norms(shape, seed)
    return torch.randn(shape, generator=_generator(seed), dtype=F64)


def positive_sizes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Non-integer sizes in [0.5, 2.5): a learned or rescaled size need not count whole tokens."""
    return 0.5 + 2.0 * torch.rand(shape, generator=_generator(seed), dtype=F64)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# A real CubistMerge grouping: a 5x6 grid reduced to 3x4 gives groups of one to six tokens (up to 5 seen here).
GRID = (2, 5, 6)
R_H, R_W = 2, 2


def grouping(kind: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(index, num_out) of a real matching of the (B, H * W, C) tokens ``x``: ``"cubist"`` or ``"tome"``."""
    B, H, W = GRID
    if kind == "cubist":
        _, recover = cubist_merge(x.detach().reshape(B, H, W, -1), R_H, R_W)
        return recover.index, math.prod(recover.merged_grid)
    match = match_bipartite(x.detach(), 10, num_protected=1)
    return match.index, match.survivors.shape[1]


def gradcheck(function: Callable[..., object], *inputs: torch.Tensor) -> None:
    assert torch.autograd.gradcheck(function, tuple(leaf(t) for t in inputs), **GRADCHECK)


# ----------------------------------------------------------------------------- 1. gradcheck, matching fixed


@REPRESENTATION
@WITH_SIZE
@pytest.mark.parametrize("kind", ["cubist", "tome"])
def test_merge_groups_gradcheck(representation: str, with_size: bool, kind: str) -> None:
    """merge_groups is differentiable in the values (and, for sizes given, in the sizes) for a fixed index map."""
    B, H, W = GRID
    x = tokens_for(representation, (B, H * W, 3), seed=1)
    index, num_out = grouping(kind, x)
    if with_size:
        gradcheck(lambda v, s: merge_groups(v, index, num_out, representation, s), x, positive_sizes((B, H * W), 2))
    else:
        gradcheck(lambda v: merge_groups(v, index, num_out, representation)[0], x)


def test_unmerge_groups_gradcheck() -> None:
    """Unmerging is a gather: every merged token's gradient is the sum over its group's positions."""
    B, H, W = GRID
    index, num_out = grouping("cubist", torch.randn(B, H * W, 3, generator=_generator(3), dtype=F64))
    gradcheck(lambda y: unmerge_groups(y, index), torch.randn(B, num_out, 3, generator=_generator(4), dtype=F64))


@REPRESENTATION
@WITH_SIZE
@pytest.mark.parametrize("r", [1, 3])
def test_merge_neighbours_gradcheck(representation: str, with_size: bool, r: int) -> None:
    """One CubistMerge pass with the neighbour matching of the starting point held fixed."""
    x = tokens_for(representation, (4, 6, 3), seed=5)
    match = match_neighbours(neighbour_similarity(x), r)
    index = slots_after_removal(match.target, match.removed)
    if with_size:
        gradcheck(lambda v, s: merge_neighbours(v, match, index, representation, s), x, positive_sizes((4, 6), 6))
    else:
        ones = torch.ones(4, 6, dtype=F64)
        gradcheck(lambda v: merge_neighbours(v, match, index, representation, ones)[0], x)


@REPRESENTATION
@WITH_SIZE
@pytest.mark.parametrize("metric", METRICS)
def test_merge_sequences_gradcheck(representation: str, with_size: bool, metric: str) -> None:
    """merge_sequences matches inside; every evaluation asserts the matching is the starting point's."""
    x = tokens_for(representation, (4, 6, 3), seed=7)
    _, fixed, _ = merge_sequences(x, 2, representation=representation, metric=metric)

    def merge(v: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        merged, index, merged_size = merge_sequences(v, 2, representation=representation, metric=metric, size=s)
        assert torch.equal(index, fixed), "a gradcheck step changed the matching: the inputs are too close to a tie"
        return (merged, merged_size) if s is not None else (merged,)

    if with_size:
        gradcheck(merge, x, positive_sizes((4, 6), 8))
    else:
        gradcheck(merge, x)


@REPRESENTATION
@pytest.mark.parametrize(("r_h", "r_w"), [(2, 2), (1, 3)])
def test_cubist_merge_gradcheck(representation: str, r_h: int, r_w: int) -> None:
    """Both passes of a full reduction, the Recover index asserted unchanged at every evaluation."""
    B, H, W = GRID
    x = tokens_for(representation, (B, H, W, 3), seed=9)
    _, recover = cubist_merge(x, r_h, r_w, representation=representation)

    def merge(v: torch.Tensor) -> torch.Tensor:
        merged, again = cubist_merge(v, r_h, r_w, representation=representation)
        assert torch.equal(again.index, recover.index), "a gradcheck step changed the matching"
        return merged

    gradcheck(merge, x)


@WITH_SIZE
@pytest.mark.parametrize("order", ["official", "spatial"])
@pytest.mark.parametrize("protected", [0, 1])
def test_merge_matched_gradcheck(with_size: bool, order: str, protected: int) -> None:
    """ToMe's merge of a fixed bipartite match (the correction form) in the values and sizes."""
    x = torch.randn(2, 16, 3, generator=_generator(10), dtype=F64)
    match = match_bipartite(x, 6, num_protected=protected, order=order)
    if with_size:
        gradcheck(lambda v, s: merge_matched(v, match, s), x, positive_sizes((2, 16), 11))
    else:
        gradcheck(lambda v: merge_matched(v, match)[0], x)


@WITH_SIZE
def test_merge_weighted_gradcheck(with_size: bool) -> None:
    x = torch.randn(2, 16, 3, generator=_generator(12), dtype=F64)
    match = match_bipartite(x, 6, num_protected=1)
    if with_size:
        gradcheck(lambda v, s: merge_weighted(v, match.index, 10, s), x, positive_sizes((2, 16), 13))
    else:
        gradcheck(lambda v: merge_weighted(v, match.index, 10)[0], x)


@WITH_SIZE
@pytest.mark.parametrize("bsm", [True, False], ids=["bsm", "pitome"])
def test_merge_pitome_gradcheck(with_size: bool, bsm: bool) -> None:
    x = torch.randn(2, 13, 3, generator=_generator(14), dtype=F64)
    match = match_pitome(x, 4, margin=0.5, bsm=bsm, num_protected=1)
    if with_size:
        gradcheck(lambda v, s: merge_pitome(v, match, s), x, positive_sizes((2, 13), 15))
    else:
        gradcheck(lambda v: merge_pitome(v, match)[0], x)


@pytest.mark.parametrize("norm", MLERP_NORMS)
def test_mlerp_gradcheck(norm: str) -> None:
    """MLERP of one group, whose members' norms differ clearly (the largest norm is a max)."""
    gradcheck(lambda members: mlerp(members, norm=norm), separated_norms((4, 3), 16))


@pytest.mark.parametrize(
    ("mode", "norm"), [("prune", "mean"), ("mlerp", "mean"), ("mlerp", "destination")], ids=["prune", "mlerp", "dest"]
)
def test_merge_tofu_gradcheck(mode: str, norm: str) -> None:
    x = separated_norms((2, 12, 3), 17)
    match = match_bipartite(x, 5)
    gradcheck(lambda v: merge_tofu(v, match, mode, mlerp_norm=norm), x)


def test_soft_assignment_gradcheck() -> None:
    """Expedite's soft k-means assignment is smooth in tokens and centres, masked centres included (exact 0)."""
    tokens = torch.randn(2, 36, 3, generator=_generator(18), dtype=F64)
    centres = torch.randn(2, 9, 3, generator=_generator(19), dtype=F64)
    allowed = neighbourhood_mask((6, 6), (3, 3), 3)
    assert not allowed.all()  # some centres are out of reach, so the mask is exercised
    gradcheck(lambda t, c: soft_assignment(t, c, allowed, temperature=0.5), tokens, centres)


@pytest.mark.parametrize("normalise", ["sum", "l2"])
def test_reconstruction_weights_gradcheck(normalise: str) -> None:
    """The k nearest centres are a discrete choice: held fixed (asserted), the weights are smooth."""
    tokens = torch.randn(2, 16, 3, generator=_generator(20), dtype=F64)
    centres = torch.randn(2, 9, 3, generator=_generator(21), dtype=F64)
    kept = reconstruction_weights(tokens, centres, k=3, temperature=0.5, normalise=normalise) != 0

    def weights(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = reconstruction_weights(t, c, k=3, temperature=0.5, normalise=normalise)
        assert torch.equal(out != 0, kept), "a gradcheck step changed the k nearest centres"
        return out

    gradcheck(weights, tokens, centres)


def test_reconstruct_gradcheck() -> None:
    """Reconstruction is linear in the clustered tokens and in the weights."""
    weights = torch.rand(2, 16, 4, generator=_generator(22), dtype=F64)
    y = torch.randn(2, 2, 2, 3, generator=_generator(23), dtype=F64)
    gradcheck(lambda w, v: Reconstruct(w, (4, 4), (2, 2))(v), weights, y)


def test_expedite_cluster_without_iterations_gradcheck() -> None:
    """Pooled centres and reconstruction weights, the k nearest centres asserted unchanged."""
    x = torch.randn(2, 6, 6, 3, generator=_generator(24), dtype=F64)
    settings = {"iterations": 0, "k": 4, "temperature": 0.5}
    kept = expedite_cluster(x, 3, **settings)[1].weights != 0

    def cluster(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centres, reconstruct = expedite_cluster(v, 3, **settings)
        assert torch.equal(reconstruct.weights != 0, kept), "a gradcheck step changed the k nearest centres"
        return centres, reconstruct.weights

    gradcheck(cluster, x)


def _centres_with_fixed_assignments(tokens: torch.Tensor, assignments: list[torch.Tensor]) -> torch.Tensor:
    """Expedite's centres with every round's soft assignment given: pooled, then assignment-weighted means."""
    B, N, C = tokens.shape
    side = math.isqrt(N)
    cells = math.isqrt(assignments[0].shape[-1])
    grid = tokens.reshape(B, side, side, C).permute(0, 3, 1, 2)
    centres = F.adaptive_avg_pool2d(grid, cells).permute(0, 2, 3, 1).reshape(B, cells * cells, C)
    for assignment in assignments:
        centres = assignment.transpose(1, 2) @ tokens / assignment.sum(dim=1).unsqueeze(-1)
    return centres


def test_expedite_cluster_gradient_is_that_of_its_fixed_assignment() -> None:
    """expedite_cluster treats the soft assignment as a constant (its docstring; the authors' code does too).

    So its gradient is that of the weighted means with every round's assignment
    fixed: that function is gradchecked, equals the clustering's forward, and
    has the clustering's vector-Jacobian product.
    """
    x = torch.randn(2, 6, 6, 3, generator=_generator(25), dtype=F64)
    tokens = x.reshape(2, 36, 3)
    allowed = neighbourhood_mask((6, 6), (3, 3), 3)
    assignments = []
    with torch.no_grad():
        centres = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), 3).permute(0, 2, 3, 1).reshape(2, 9, 3)
        for _ in range(3):
            assignments.append(soft_assignment(tokens, centres, allowed, temperature=0.5))
            centres = _centres_with_fixed_assignments(tokens, assignments)

    v = leaf(x)
    clustered, _ = expedite_cluster(v, 3, neighbourhood=3, iterations=3, temperature=0.5)
    torch.testing.assert_close(clustered.reshape(2, 9, 3), centres, rtol=0, atol=1e-12)
    cotangent = torch.randn(2, 3, 3, 3, generator=_generator(26), dtype=F64)
    (expected,) = torch.autograd.grad(clustered, v, cotangent)

    w = leaf(tokens)
    (fixed,) = torch.autograd.grad(_centres_with_fixed_assignments(w, assignments), w, cotangent.reshape(2, 9, 3))
    torch.testing.assert_close(expected.reshape(2, 36, 3), fixed, rtol=0, atol=1e-12)
    gradcheck(lambda t: _centres_with_fixed_assignments(t, assignments), tokens)


# ----------------------------------------------------------------------------- 2. where the gradient goes

# Five tokens of three channels; tokens 1, 2, 3 form one group, 0 and 4 stay alone (index [0, 1, 1, 1, 2]).
HAND_X = torch.tensor(
    [[[0.7, 0.4, -0.3], [0.5, -2.0, 0.1], [-1.5, 1.0, -0.6], [1.2, 0.3, 0.9], [-0.2, 0.9, 0.5]]], dtype=F64
)
HAND_INDEX = torch.tensor([[0, 1, 1, 1, 2]])
HAND_SIZE = torch.tensor([[1.0, 2.0, 3.0, 1.0, 4.0]], dtype=F64)
# maxmag of the group: channel 0 from token 2 (-1.5, while the group's maximum is 1.2), channel 1 from token 1
# (-2.0, the maximum being 1.0), channel 2 from token 3 (+0.9).
HAND_MAXMAG = [[0.7, 0.4, -0.3], [-1.5, -2.0, 0.9], [-0.2, 0.9, 0.5]]
HAND_MAXMAG_SOURCE = [[0, 0, 0], [2, 1, 3], [4, 4, 4]]
# maxmag_vector: token 1 has the largest norm in the group (sqrt 4.26 > sqrt 3.61 > sqrt 2.34).
HAND_VECTOR_SOURCE = [0, 1, 4]
# Size-weighted mean of the group: sizes 2, 3, 1 of 6, i.e. weights 1/3, 1/2, 1/6.
HAND_MEAN = [[0.7, 0.4, -0.3], [-2.3 / 6, -0.7 / 6, -0.7 / 6], [-0.2, 0.9, 0.5]]
HAND_WEIGHT = [1.0, 1 / 3, 1 / 2, 1 / 6, 1.0]


def _hand_neighbour_match():
    """The neighbour matching of the hand grouping: token 1 goes right (0.9 > 0.1), token 3 left (0.8 > 0.2)."""
    match = match_neighbours(torch.tensor([[0.1, 0.9, 0.8, 0.2]], dtype=F64), 2)
    index = slots_after_removal(match.target, match.removed)
    assert torch.equal(index, HAND_INDEX)
    return match, index


def _hand_bipartite_match():
    """ToMe (spatial order, token 0 protected): A = 1, 3 both match B = 2 (cosine 1 and 0.999 against 0)."""
    metric = torch.tensor([[[0.3, 0.2], [1.0, 0.0], [1.0, 0.0], [1.0, 0.05], [0.0, 1.0]]], dtype=F64)
    match = match_bipartite(metric, 2, num_protected=1, order="spatial")
    assert torch.equal(match.index, HAND_INDEX)
    return match


HAND_PITOME_MATCH = PiToMeMatch(HAND_INDEX, torch.tensor([[0, 2, 4]]), torch.tensor([[1, 3]]), torch.tensor([[2, 2]]))


def _hand_merge(implementation: str, representation: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The merge of the hand grouping by ``implementation``: f(x, size) -> (merged, merged size)."""
    if implementation == "merge_groups":
        return lambda x, size: merge_groups(x, HAND_INDEX, 3, representation, size)
    if implementation == "merge_neighbours":
        match, index = _hand_neighbour_match()
        return lambda x, size: merge_neighbours(x, match, index, representation, size)
    assert representation == "mean"
    if implementation == "merge_weighted":
        return lambda x, size: merge_weighted(x, HAND_INDEX, 3, size)
    if implementation == "merge_matched":
        match = _hand_bipartite_match()
        return lambda x, size: merge_matched(x, match, size)
    return lambda x, size: merge_pitome(x, HAND_PITOME_MATCH, size)


@pytest.mark.parametrize("implementation", ["merge_groups", "merge_neighbours"])
def test_maxmag_jacobian_selects_the_largest_magnitude_with_derivative_one(implementation: str) -> None:
    """d merged[slot, c] / d x[t, c'] is 1 for the member t of largest |x[t, c]| and c' = c, else 0.

    The chosen values of the group are negative in two channels: their
    derivative is +1 (the value is copied, not its magnitude).
    """
    merge = _hand_merge(implementation, "maxmag")
    merged, _ = merge(HAND_X, torch.ones(1, 5, dtype=F64))
    assert merged[0].tolist() == HAND_MAXMAG
    jacobian = torch.autograd.functional.jacobian(lambda v: merge(v, torch.ones(1, 5, dtype=F64))[0], HAND_X)
    expected = torch.zeros(1, 3, 3, 1, 5, 3, dtype=F64)
    for slot, sources in enumerate(HAND_MAXMAG_SOURCE):
        for channel, token in enumerate(sources):
            expected[0, slot, channel, 0, token, channel] = 1.0
    assert torch.equal(jacobian, expected)


@pytest.mark.parametrize("implementation", ["merge_groups", "merge_neighbours"])
def test_maxmag_vector_jacobian_copies_the_largest_norm_member(implementation: str) -> None:
    merge = _hand_merge(implementation, "maxmag_vector")
    merged, _ = merge(HAND_X, torch.ones(1, 5, dtype=F64))
    assert torch.equal(merged[0], HAND_X[0, HAND_VECTOR_SOURCE])
    jacobian = torch.autograd.functional.jacobian(lambda v: merge(v, torch.ones(1, 5, dtype=F64))[0], HAND_X)
    expected = torch.zeros(1, 3, 3, 1, 5, 3, dtype=F64)
    for slot, token in enumerate(HAND_VECTOR_SOURCE):
        expected[0, slot, :, 0, token, :] = torch.eye(3, dtype=F64)
    assert torch.equal(jacobian, expected)


@pytest.mark.parametrize(
    "implementation", ["merge_groups", "merge_neighbours", "merge_weighted", "merge_matched", "merge_pitome"]
)
def test_mean_gradient_is_size_share(implementation: str) -> None:
    """Every mean merge gives member i the weight size_i / sum(size) of its group: 1/3, 1/2, 1/6 here.

    The size gradient of the group's channel c is (x_i,c - mean_c) / sum(size):
    a size changes the merged value by pulling it towards its token.
    """
    merge = _hand_merge(implementation, "mean")
    x, size = leaf(HAND_X), leaf(HAND_SIZE)
    merged, merged_size = merge(x, size)
    torch.testing.assert_close(merged[0], torch.tensor(HAND_MEAN, dtype=F64), rtol=0, atol=1e-15)
    assert merged_size.tolist() == [[1.0, 6.0, 4.0]]
    x_grad, size_grad = torch.autograd.grad(merged.sum(), (x, size))
    expected = torch.tensor(HAND_WEIGHT, dtype=F64).reshape(1, 5, 1).expand(1, 5, 3)
    torch.testing.assert_close(x_grad, expected, rtol=0, atol=1e-15)
    # Singletons: merged = x whatever the size, so no size gradient; group members: sum_c (x_i,c - mean_c) / 6.
    group_mean = torch.tensor(HAND_MEAN[1], dtype=F64)
    members = [(HAND_X[0, t] - group_mean).sum() / 6 for t in (1, 2, 3)]
    expected_size = torch.stack([torch.zeros((), dtype=F64), *members, torch.zeros((), dtype=F64)]).unsqueeze(0)
    torch.testing.assert_close(size_grad, expected_size, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["cubist", "tome"])
def test_maxmag_gradient_reaches_the_largest_magnitude_of_every_group(kind: str) -> None:
    """On real groupings, d(sum of merged)/dx is 1 exactly at each group's per-channel argmax of |x| (a loop)."""
    B, H, W = GRID
    x = leaf(separated_values((B, H * W, 3), 27))
    index, num_out = grouping(kind, x)
    merged, _ = merge_groups(x, index, num_out, "maxmag")
    (grad,) = torch.autograd.grad(merged.sum(), x)
    expected = torch.zeros_like(grad)
    for b in range(B):
        for slot in range(num_out):
            members = (index[b] == slot).nonzero().flatten()
            for c in range(3):
                best = members[x[b, members, c].abs().argmax()]
                expected[b, best, c] = 1.0
                assert merged[b, slot, c] == x[b, best, c]  # the signed value, not its magnitude
    assert torch.equal(grad, expected)


# ----------------------------------------------------------------------------- 3. gradients do not stop at a merge


class Reduction(NamedTuple):
    """A token reduction of a (B, H, W, C) grid for the tests below."""

    representation: str  # what the inputs must avoid ties for
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
    # run(x) -> merged (B, N', C), x's layout rebuilt from it (or None), and the (B, H, W, C) bool mask
    # of the inputs the merged values depend on


def _everything(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape, dtype=torch.bool)


def _cubist(representation: str) -> Reduction:
    def run(x: torch.Tensor):
        merged, recover = cubist_merge(x, 2, 3, representation=representation)
        copies = recover(merged.detach()) == x.detach()  # where each merged value came from
        contributing = {
            "maxmag": copies,
            "maxmag_vector": copies.all(dim=-1, keepdim=True).expand_as(x),
            "mean": _everything(x),
        }[representation]
        return merged.flatten(1, 2), recover(merged), contributing

    return Reduction(representation, run)


def _tome(x: torch.Tensor):
    flat = x.flatten(1, 2)
    merged, _ = merge_matched(flat, match_bipartite(flat, 12, num_protected=1))
    return merged, None, _everything(x)


def _pitome(x: torch.Tensor):
    flat = x.flatten(1, 2)
    merged, _ = merge_pitome(flat, match_pitome(flat, 8, margin=0.5, bsm=True))
    return merged, None, _everything(x)


def _tofu(mode: str) -> Reduction:
    def run(x: torch.Tensor):
        flat = x.flatten(1, 2)
        match = match_bipartite(flat, 12)
        merged = merge_tofu(flat, match, mode)
        if mode == "mlerp":
            return merged, None, _everything(x)
        kept = torch.zeros(flat.shape, dtype=torch.bool).scatter(
            1, match.survivors.unsqueeze(-1).expand(*match.survivors.shape, flat.shape[-1]), True
        )
        return merged, None, kept.reshape(x.shape)

    return Reduction("maxmag_vector", run)


def _expedite(x: torch.Tensor):
    centres, reconstruct = expedite_cluster(x, 3)
    return centres.flatten(1, 2), reconstruct(centres), _everything(x)


REDUCTIONS = {
    **{f"cubist_{representation}": _cubist(representation) for representation in REPRESENTATIONS},
    "tome": Reduction("mean", _tome),
    "pitome": Reduction("mean", _pitome),
    "tofu_mlerp": _tofu("mlerp"),
    "tofu_prune": _tofu("prune"),
    "expedite": Reduction("mean", _expedite),
}
EVERY_REDUCTION = pytest.mark.parametrize("name", list(REDUCTIONS))


@EVERY_REDUCTION
def test_merged_values_keep_the_graph_to_every_contributing_input(name: str) -> None:
    """The merged output is attached to the graph, and every input it is made from receives a gradient.

    With a random cotangent, a zero gradient on a contributing input would
    mean the merge cut it off (a detach, a no_grad, an integer round trip).
    """
    reduction = REDUCTIONS[name]
    x = leaf(tokens_for(reduction.representation, (2, 6, 6, 4), 28))
    merged, _, contributing = reduction.run(x)
    assert merged.requires_grad and merged.grad_fn is not None
    cotangent = torch.randn(merged.shape, generator=_generator(29), dtype=F64)
    (grad,) = torch.autograd.grad(merged, x, cotangent)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad != 0, contributing)


@EVERY_REDUCTION
def test_every_parameter_of_a_model_around_the_reduction_gets_a_gradient(name: str) -> None:
    """A distillation loss behind a reduction trains the layers before it (through the merged values) and after."""
    torch.manual_seed(30)
    stem, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    x = torch.randn(2, 6, 6, 3, generator=_generator(31), dtype=F64)
    merged, rebuilt, _ = REDUCTIONS[name].run(stem(x))
    student = head(merged)
    loss = (student - torch.randn(student.shape, generator=_generator(32), dtype=F64)).square().mean()
    if rebuilt is not None:  # a dense target for the tokens rebuilt on the original grid
        dense = head(rebuilt)
        loss = loss + (dense - torch.randn(dense.shape, generator=_generator(33), dtype=F64)).square().mean()
    loss.backward()
    for parameter_name, parameter in [*stem.named_parameters(), *head.named_parameters()]:
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, parameter_name


# ----------------------------------------------------------------------------- 4. the matching is discrete


def _matchings(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every index map and match field computed from tokens ``x`` (B, 6, 6, 4) that require grad."""
    flat, rows = x.flatten(1, 2), x.flatten(0, 1)
    scores = neighbour_similarity(rows)
    assert scores.requires_grad  # the similarities are differentiable; what is built on them is not
    neighbours = match_neighbours(scores, 3)
    bipartite = match_bipartite(flat, 12, num_protected=1)
    pitome = match_pitome(flat, 8, margin=0.5, bsm=False)
    _, recover = cubist_merge(x, 2, 3)
    _, sequence_index, _ = merge_sequences(rows, 3)
    found = {"cubist_merge.index": recover.index, "merge_sequences.index": sequence_index}
    found |= {f"match_neighbours.{k}": v for k, v in neighbours._asdict().items()}
    found |= {f"match_bipartite.{k}": v for k, v in bipartite._asdict().items()}
    found |= {f"match_pitome.{k}": v for k, v in pitome._asdict().items()}
    found["neighbourhood_mask"] = neighbourhood_mask((6, 6), (3, 3))
    return found


def test_matchings_are_integer_tensors_without_a_graph() -> None:
    x = leaf(torch.randn(2, 6, 6, 4, generator=_generator(34), dtype=F64))
    for name, tensor in _matchings(x).items():
        assert tensor.dtype in (torch.long, torch.bool), name
        assert not tensor.requires_grad and tensor.grad_fn is None, name


@pytest.mark.parametrize("merge", ["merge_groups", "merge_neighbours", "merge_matched", "merge_pitome"])
def test_merged_sizes_come_from_the_matching_not_the_values(merge: str) -> None:
    """Without learned sizes, the merged sizes are token counts: no graph back to the values."""
    x = leaf(torch.randn(2, 12, 3, generator=_generator(35), dtype=F64))
    if merge == "merge_groups":
        merged, merged_size = merge_groups(x, (torch.arange(12) // 2).expand(2, 12), 6)
    elif merge == "merge_neighbours":
        match = match_neighbours(neighbour_similarity(x), 4)
        ones = torch.ones(2, 12, dtype=F64)
        merged, merged_size = merge_neighbours(x, match, slots_after_removal(match.target, match.removed), "mean", ones)
    elif merge == "merge_matched":
        merged, merged_size = merge_matched(x, match_bipartite(x, 4))
    else:
        merged, merged_size = merge_pitome(x, match_pitome(x, 4, margin=0.5, bsm=True))
    assert merged.requires_grad
    assert not merged_size.requires_grad
    assert merged_size.sum(dim=1).tolist() == [12.0, 12.0]


@pytest.mark.parametrize("matcher", ["neighbours", "bipartite", "pitome"])
def test_a_separate_metric_receives_no_gradient(matcher: str) -> None:
    """Matching on a metric (ToMe's keys) and merging other values: the loss reaches the values only."""
    metric = leaf(torch.randn(2, 12, 4, generator=_generator(36), dtype=F64))
    x = leaf(torch.randn(2, 12, 3, generator=_generator(37), dtype=F64))
    if matcher == "neighbours":
        match = match_neighbours(neighbour_similarity(metric), 4)
        index = slots_after_removal(match.target, match.removed)
        merged, _ = merge_neighbours(x, match, index, "mean", torch.ones(2, 12, dtype=F64))
    elif matcher == "bipartite":
        merged, _ = merge_matched(x, match_bipartite(metric, 4))
    else:
        merged, _ = merge_pitome(x, match_pitome(metric, 4, margin=0.5, bsm=True))
    merged.square().sum().backward()
    assert metric.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


@REPRESENTATION
def test_cubist_merge_gradient_is_that_of_its_fixed_grouping(representation: str) -> None:
    """The whole reduction (matching on the same tokens it merges) has the gradient of merge_groups with its index.

    Two passes of maxmag (or of the size-weighted mean) are one maxmag (mean)
    over the composed groups, so values and vector-Jacobian products agree:
    the matching adds nothing to the gradient.
    """
    B, H, W = GRID
    x = leaf(tokens_for(representation, (B, H, W, 3), 38))
    merged, recover = cubist_merge(x, R_H, R_W, representation=representation)
    fixed, _ = merge_groups(x.flatten(1, 2), recover.index, math.prod(recover.merged_grid), representation)
    torch.testing.assert_close(merged.flatten(1, 2), fixed, rtol=0, atol=1e-12)
    cotangent = torch.randn(fixed.shape, generator=_generator(39), dtype=F64)
    (whole,) = torch.autograd.grad(merged.flatten(1, 2), x, cotangent)
    (of_fixed,) = torch.autograd.grad(fixed, x, cotangent)
    torch.testing.assert_close(whole, of_fixed, rtol=0, atol=1e-12)
