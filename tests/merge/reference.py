"""Slow, loop-by-loop reference implementations of the merging SPEC.

Everything here works on plain Python lists of floats and is written from the
specification only; nothing is imported from ``cubistmerge``. The tests turn
tensors into lists (``tolist()``), call these functions and compare.

Conventions: a token is a list of C floats, a sequence is a list of tokens,
an index map is a list of ints (the output slot of every input token).
"""

from __future__ import annotations

import math

EPS = 1e-12
NEG_INF = float("-inf")
REPRESENTATIONS = ("maxmag", "maxmag_vector", "mean")
METRICS = ("cosine", "l2")


# ----------------------------------------------------------------------------
# Small vector helpers
# ----------------------------------------------------------------------------


def dot(a: list[float], b: list[float]) -> float:
    total = 0.0
    for u, v in zip(a, b, strict=True):
        total += u * v
    return total


def norm(a: list[float]) -> float:
    return math.sqrt(dot(a, a))


def cosine(a: list[float], b: list[float]) -> float:
    return dot(a, b) / max(norm(a) * norm(b), EPS)


def neg_l2(a: list[float], b: list[float]) -> float:
    diff = [u - v for u, v in zip(a, b, strict=True)]
    return -norm(diff)


def similarity(a: list[float], b: list[float], metric: str) -> float:
    if metric == "cosine":
        return cosine(a, b)
    if metric == "l2":
        return neg_l2(a, b)
    raise ValueError(f"unknown metric {metric!r}")


# ----------------------------------------------------------------------------
# Group values
# ----------------------------------------------------------------------------


def group_value(
    members: list[list[float]], sizes: list[float], representation: str
) -> list[float]:
    """Merged value of one group; ``members`` are listed in sequence order."""
    channels = len(members[0])
    if representation == "maxmag":
        out = []
        for c in range(channels):
            best = members[0][c]
            for token in members[1:]:
                v = token[c]
                if abs(v) > abs(best) or (abs(v) == abs(best) and v > best):
                    best = v
            out.append(best)
        return out
    if representation == "maxmag_vector":
        best_token = members[0]
        best_norm = norm(members[0])
        for token in members[1:]:
            n = norm(token)
            if n > best_norm:  # strict: ties keep the earlier (lower) position
                best_token, best_norm = token, n
        return list(best_token)
    if representation == "mean":
        total_size = sum(sizes)
        return [sum(s * token[c] for token, s in zip(members, sizes, strict=True)) / total_size
                for c in range(channels)]
    raise ValueError(f"unknown representation {representation!r}")


def reduce_groups(
    tokens: list[list[float]],
    index: list[int],
    num_out: int,
    representation: str,
    sizes: list[float] | None = None,
) -> tuple[list[list[float]], list[float]]:
    """Merge the tokens of every slot; returns (values, summed sizes)."""
    if sizes is None:
        sizes = [1.0] * len(tokens)
    member_ids: list[list[int]] = [[] for _ in range(num_out)]
    for t, slot in enumerate(index):
        member_ids[slot].append(t)
    values = []
    out_sizes = []
    for ids in member_ids:
        assert ids, "every output slot needs a member"
        values.append(group_value([tokens[t] for t in ids], [sizes[t] for t in ids], representation))
        out_sizes.append(sum(sizes[t] for t in ids))
    return values, out_sizes


def unmerge(values: list[list[float]], index: list[int]) -> list[list[float]]:
    return [list(values[slot]) for slot in index]


def compose(first: list[int], second: list[int]) -> list[int]:
    return [second[slot] for slot in first]


def slots_from_targets(targets: list[int], removed: set[int]) -> list[int]:
    """Index map when token t joins survivor ``targets[t]`` and ``removed`` vanish."""
    slot_of_survivor = {}
    next_slot = 0
    for t in range(len(targets)):
        if t not in removed:
            slot_of_survivor[t] = next_slot
            next_slot += 1
    return [slot_of_survivor[targets[t]] for t in range(len(targets))]


# ----------------------------------------------------------------------------
# CubistMerge
# ----------------------------------------------------------------------------


def cubist_pass(
    tokens: list[list[float]],
    r: int,
    representation: str = "maxmag",
    metric: str = "cosine",
    sizes: list[float] | None = None,
) -> tuple[list[list[float]], list[int], list[float]]:
    """One 1D pass over a sequence; returns (merged tokens, index map, merged sizes)."""
    n = len(tokens)
    if not 0 <= r <= n // 2:
        raise ValueError(f"r must be 0 to {n // 2}, got {r}")
    scores = [similarity(tokens[i], tokens[i + 1], metric) for i in range(n - 1)]

    candidates = []  # (score, position, destination)
    for k in range(1, n, 2):
        left = scores[k - 1]
        right = scores[k] if k < n - 1 else NEG_INF
        if right > left:
            candidates.append((right, k, k + 1))
        else:
            candidates.append((left, k, k - 1))
    # Python's sort is stable: equal scores keep ascending position order.
    candidates.sort(key=lambda cand: -cand[0])

    targets = list(range(n))
    removed = set()
    for _, k, dest in candidates[:r]:
        targets[k] = dest
        removed.add(k)
    index = slots_from_targets(targets, removed)
    merged, merged_sizes = reduce_groups(tokens, index, n - r, representation, sizes)
    return merged, index, merged_sizes


def cubist_merge_image(
    grid: list[list[list[float]]],
    r_h: int,
    r_w: int,
    representation: str = "maxmag",
    metric: str = "cosine",
) -> tuple[list[list[list[float]]], list[int]]:
    """CubistMerge of one (H, W, C) image; returns (merged H' x W' x C, flat recover index)."""
    height, width = len(grid), len(grid[0])
    if not 0 <= r_h <= height // 2 or not 0 <= r_w <= width // 2:
        raise ValueError("r out of range")
    merged_width = width - r_w
    merged_height = height - r_h

    # Width pass, row by row.
    row_tokens, row_index, row_sizes = [], [], []
    for h in range(height):
        tokens, index, sizes = cubist_pass(grid[h], r_w, representation, metric)
        row_tokens.append(tokens)
        row_index.append(index)
        row_sizes.append(sizes)

    # Height pass, column by column of the width-pass result.
    column_tokens, column_index = [], []
    for w in range(merged_width):
        sequence = [row_tokens[h][w] for h in range(height)]
        sizes = [row_sizes[h][w] for h in range(height)]
        tokens, index, _ = cubist_pass(sequence, r_h, representation, metric, sizes)
        column_tokens.append(tokens)
        column_index.append(index)

    merged = [[column_tokens[w][h] for w in range(merged_width)] for h in range(merged_height)]
    flat = []
    for h in range(height):
        for w in range(width):
            w_slot = row_index[h][w]
            h_slot = column_index[w_slot][h]
            flat.append(h_slot * merged_width + w_slot)
    return merged, flat


def cubist_merge_batch(batch, r_h, r_w, representation="maxmag", metric="cosine"):
    """Lists for a whole batch: (merged per image, recover index per image)."""
    results = [cubist_merge_image(image, r_h, r_w, representation, metric) for image in batch]
    return [m for m, _ in results], [i for _, i in results]


# ----------------------------------------------------------------------------
# ToMe
# ----------------------------------------------------------------------------


def bipartite_matching(
    tokens: list[list[float]], r: int, num_protected: int = 0, order: str = "official"
) -> list[int]:
    """ToMe bipartite soft matching of one sequence; returns the index map (output slot of every token).

    ``order="official"``, as the authors' code computes it: A = positions 0, 2,
    4, ... and B = 1, 3, 5, ... of the whole sequence; a protected A token
    never merges, a protected B token never receives. Every A token picks its
    most similar B token, the r best-scoring A tokens merge. The output is
    [protected tokens] + [A tokens that did not merge: by position if there
    are protected tokens, else best score first] + [the other B tokens].

    ``order="spatial"``: A and B alternate from the first unprotected token,
    and survivors keep their order.
    """
    n = len(tokens)
    p = num_protected
    if not 0 <= r <= (n - p) // 2:
        raise ValueError(f"r must be 0 to {(n - p) // 2}, got {r}")
    if r == 0:  # the authors' code does nothing at all then: no re-ordering either
        return list(range(n))
    start = 0 if order == "official" else p
    set_a = list(range(start, n, 2))
    set_b = list(range(start + 1, n, 2))

    candidates = []  # (best score, a position, chosen b position)
    for a in set_a:
        best_score, best_b = NEG_INF, None
        if a >= p:
            for b in set_b:  # ascending: strict '>' keeps the lowest b on ties
                if b < p:
                    continue
                score = cosine(tokens[a], tokens[b])
                if best_b is None or score > best_score:
                    best_score, best_b = score, b
        candidates.append((best_score, a, best_b))
    candidates.sort(key=lambda cand: -cand[0])  # stable: lower a first on ties
    chosen, rest = candidates[:r], candidates[r:]

    if order == "spatial":
        targets = list(range(n))
        removed = set()
        for _, a, b in chosen:
            targets[a] = b
            removed.add(a)
        return slots_from_targets(targets, removed)

    kept_a = [a for _, a, _ in rest]
    if p:
        kept_a.sort()
    sequence = list(range(p)) + [a for a in kept_a if a >= p] + [b for b in set_b if b >= p]
    slot = {position: i for i, position in enumerate(sequence)}
    for _, a, b in chosen:
        slot[a] = slot[b]
    return [slot[t] for t in range(n)]


def weighted_mean(
    tokens: list[list[float]], index: list[int], num_out: int, sizes: list[float] | None = None
) -> tuple[list[list[float]], list[float]]:
    return reduce_groups(tokens, index, num_out, "mean", sizes)


def tome_schedule(r, num_layers: int) -> list[int]:
    if isinstance(r, int):
        values = [r] * num_layers
    elif isinstance(r, tuple):
        # The authors' parse_r: the first layer is rounded down, the last mirrors it around r.
        base, inflection = r
        first = int(base * (1 - inflection))
        last = 2 * base - first
        values = [int(first + (last - first) / (num_layers - 1) * i) for i in range(num_layers)]
    else:
        if len(r) > num_layers:
            raise ValueError("schedule longer than the model")
        values = list(r) + [0] * (num_layers - len(r))
    if any(v < 0 for v in values):
        raise ValueError("negative r")
    return values


# ----------------------------------------------------------------------------
# PiToMe (the authors' code: energy order, "bsm" and "pitome" variants)
# ----------------------------------------------------------------------------


def _pitome_unit(a: list[float]) -> list[float]:
    length = max(math.sqrt(dot(a, a)), 1e-12)
    return [v / length for v in a]


def _pitome_elu(v: float, alpha: float) -> float:
    return v if v > 0 else alpha * math.expm1(v)


def pitome_energies(metric: list[list[float]], margin: float, alpha: float) -> list[float]:
    units = [_pitome_unit(m) for m in metric]
    energies = []
    for i in range(len(units)):
        total = 0.0
        for j in range(len(units)):
            total += _pitome_elu(dot(units[i], units[j]) - margin, alpha)
        energies.append(total / len(units))
    return energies


def _pitome_most_similar(token: int, candidates: list[int], units: dict[int, list[float]]) -> tuple[float, int]:
    """(best similarity, first candidate reaching it)."""
    best_score, best = float("-inf"), -1
    for candidate in candidates:
        score = dot(units[token], units[candidate])
        if score > best_score:
            best_score, best = score, candidate
    return best_score, best


def pitome_merge(
    metric: list[list[float]],
    x: list[list[float]],
    size: list[float],
    r: int,
    margin: float,
    bsm: bool,
    protected: int,
    alpha: float,
) -> tuple[list[int], list[list[float]], list[float]]:
    """One image: (index map, merged tokens, merged sizes)."""
    n = len(metric)
    if r == 0:
        return list(range(n)), [list(t) for t in x], list(size)
    patch = list(range(protected, n))
    units = {t: _pitome_unit(metric[t]) for t in patch}
    energy = dict(zip(patch, pitome_energies([metric[t] for t in patch], margin, alpha), strict=True))
    ranked = sorted(patch, key=lambda t: -energy[t])  # highest energy first; Python's sort is stable

    merge_into: dict[int, int] = {}
    if bsm:
        set_a, set_b = ranked[0::2], ranked[1::2]
        best = {a: _pitome_most_similar(a, set_b, units) for a in set_a}
        by_score = sorted(set_a, key=lambda a: -best[a][0])
        for a in by_score[:r]:
            merge_into[a] = best[a][1]
        kept = by_score[r:]
    else:
        set_a, set_b = ranked[0 : 2 * r : 2], ranked[1 : 2 * r : 2]
        for a in set_a:
            merge_into[a] = _pitome_most_similar(a, set_b, units)[1]
        kept = ranked[2 * r :]

    order = list(range(protected)) + kept + set_b
    slot = {t: k for k, t in enumerate(order)}
    for a, b in merge_into.items():
        slot[a] = slot[b]
    index = [slot[t] for t in range(n)]

    channels = len(x[0])
    totals = [[0.0] * channels for _ in order]
    sizes = [0.0 for _ in order]
    for t in range(n):
        sizes[index[t]] += size[t]
        for c in range(channels):
            totals[index[t]][c] += x[t][c] * size[t]
    merged = [[v / sizes[k] for v in totals[k]] for k in range(len(order))]
    return index, merged, sizes


# ----------------------------------------------------------------------------
# ToFu (ToMe's matching; prune early, MLERP late)
# ----------------------------------------------------------------------------


def tofu_reduce(
    tokens: list[list[float]], index: list[int], mode: str, mlerp_norm: str = "mean"
) -> list[list[float]]:
    """Reduce the groups of an authors'-order ToMe index map the ToFu way.

    In a group of several tokens the destination is its set-B member (odd
    position); the others are set-A sources. ``"prune"``: every slot holds its
    destination (or its only member) as it was. ``"mlerp"``: a group of several
    holds the mean of its members divided by the norm of that mean
    (``mlerp_norm="mean"``, the paper) or of the destination as it was
    (``"destination"``, OpenToMe), times the largest member norm.
    """
    slots = max(index) + 1
    out = []
    for slot in range(slots):
        members = [t for t in range(len(tokens)) if index[t] == slot]
        if len(members) == 1:
            out.append(list(tokens[members[0]]))
            continue
        (destination,) = [t for t in members if t % 2 == 1]
        if mode == "prune":
            out.append(list(tokens[destination]))
            continue
        channels = len(tokens[0])
        mean = [sum(tokens[t][c] for t in members) / len(members) for c in range(channels)]
        largest = max(norm(tokens[t]) for t in members)
        below = norm(mean) if mlerp_norm == "mean" else norm(tokens[destination])
        out.append([v / max(below, EPS) * largest for v in mean])
    return out
