"""ExpertFlow's Token Scheduler split: two equal groups of tokens or requests that activate few experts each.

The live scheduler does not use it (vLLM's batch is the set of running requests, which
``core/grouping.py``'s ``ExpertAwareGrouper`` chooses from); the benchmarks compare
against it. Signatures use ``core/grouping.py``'s bit layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vllm_expertflow.core.grouping import ExpertSignature, _stack_words, _total_counts


def _balanced_halves(preference: np.ndarray) -> np.ndarray:
    """Group labels (0/1) for equal halves: the rows that most prefer group 0 get it.

    ``preference[i]`` = cost in group 0 minus cost in group 1; a stable sort keeps ties by index.
    """
    labels = np.ones(len(preference), dtype=np.int8)
    labels[np.argsort(preference, kind="stable")[: len(preference) - len(preference) // 2]] = 0
    return labels


def _cost_in_group(flat: np.ndarray, labels: np.ndarray, group: int) -> np.ndarray:
    """Experts each row would add to ``group``'s union, the row itself left out: ``[n] int64``.

    For a member these are its bits no other member has, i.e. its bits outside the ones
    used at least twice: one prefix OR finds those for all members at once.
    """
    members = labels == group
    cost = np.empty(len(flat), dtype=np.int64)
    member_words = flat[members]
    if len(member_words) == 0:
        cost[:] = _total_counts(flat)
        return cost
    before = np.bitwise_or.accumulate(member_words, axis=0)
    shared = np.bitwise_or.reduce(member_words[1:] & before[:-1], axis=0)
    cost[members] = _total_counts(member_words & ~shared)
    cost[~members] = _total_counts(flat[~members] & ~before[-1])
    return cost


def hamming_two_way_split(
    signatures: Sequence[ExpertSignature | np.ndarray] | np.ndarray, max_iters: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Split tokens or requests into two equal groups that activate few distinct experts each.

    ExpertFlow's Token Scheduler: ``signatures`` are bit-vectors (bool ``[n, layers, experts]``
    or ``[n, bits]``, or a sequence of ``ExpertSignature``). Seeds are the two rows farthest
    apart in Hamming distance; rows go to the seed they are more Hamming-similar to; then a
    K-means-style loop moves each row to the group whose expert union it enlarges least
    (the objective itself: distinct experts per group, summed over layers), keeping the
    halves equal (sizes differ by at most one). Stops when the assignment repeats or after
    ``max_iters``; the best assignment seen wins. Deterministic: ties go to the lower index.

    Returns ``(first, second)``: ascending row indices of each group; ``first`` holds row 0.
    """
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    words, _ = _stack_words(signatures)
    n = len(words)
    if n < 2:
        return np.arange(n), np.arange(0)
    flat = words.reshape(n, -1)

    def hamming_to(row: int) -> np.ndarray:
        return _total_counts(flat ^ flat[row])

    # Farthest-point seeding from the busiest row: two passes walk away from a central start.
    seed_a = int(np.argmax(_total_counts(words)))
    seed_b = int(np.argmax(hamming_to(seed_a)))
    seed_a = int(np.argmax(hamming_to(seed_b)))
    labels = _balanced_halves(hamming_to(seed_a) - hamming_to(seed_b))

    def objective(lab: np.ndarray) -> int:
        unions = [np.bitwise_or.reduce(flat[lab == g], axis=0) for g in (0, 1)]
        return int(_total_counts(np.stack(unions)).sum())

    best, best_cost = labels, objective(labels)
    seen = {labels.tobytes()}
    for _ in range(max_iters):
        labels = _balanced_halves(_cost_in_group(flat, labels, 0) - _cost_in_group(flat, labels, 1))
        key = labels.tobytes()
        if key in seen:  # a fixed point or a cycle: nothing new to find
            break
        seen.add(key)
        cost = objective(labels)
        if cost < best_cost:
            best, best_cost = labels, cost
    if best[0] != 0:
        best = 1 - best
    return np.flatnonzero(best == 0), np.flatnonzero(best == 1)
