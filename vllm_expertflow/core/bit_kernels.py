"""Compiled loops over packed expert bit rows, for the grouper's per-step search.

The search re-scores every running request against a growing expert union a few times per
step. As numpy calls that is dozens of array passes, each paying call overhead on a few
hundred small rows (about 1 ms at 256 requests); as compiled loops with a hardware popcount
it is tens of microseconds. numba ships with vLLM (it pins it), so this adds no dependency
to a vLLM install, and ``cache=True`` keeps the compilation to a machine's first use.

Rows are ``uint64`` words in ``grouping``'s bit layout; only popcounts of whole rows
matter, so where a bit sits does not. Row indices and their order carry the caller's
tie-breaking rank: a lower row wins every tie, exactly as the numpy code it replaced.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _popcount64(typingctx, word):  # noqa: ARG001 - numba's intrinsic signature
    """LLVM's ctpop: one instruction where the CPU has one (numba exposes no popcount of its own)."""
    signature = types.uint64(types.uint64)

    def codegen(context, builder, sig, args):  # noqa: ARG001
        ctpop = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(ctpop, args)

    return signature, codegen


@njit(cache=True, nogil=True)
def count_outside(words, rows, mask):
    """``[len(rows)] int64``: bits of ``words[row]`` not in ``mask``, per row."""
    counts = np.empty(len(rows), dtype=np.int64)
    for i in range(len(rows)):
        row = rows[i]
        total = 0
        for c in range(words.shape[1]):
            total += _popcount64(words[row, c] & ~mask[c])
        counts[i] = total
    return counts


@njit(cache=True, nogil=True)
def or_rows_into(union, words, rows):
    """``union |= words[row]`` for every row, in place (no gathered copy)."""
    for row in rows:
        for c in range(words.shape[1]):
            union[c] |= words[row, c]


@njit(cache=True, nogil=True)
def fill_rounds(load, order, pool, minimum, growth):
    """Grow ``order`` from ``pool`` to ``minimum`` rows, cheapest (fewest new loads) first, in rounds.

    Each round re-scores the pool against the union of the rows picked so far and takes the
    cheapest ``min(missing, max(1, (growth - 1) * picked, rows adding nothing))`` of them.
    Returns ``(picked, rest)``: the rows added in pick order, and the pool left, cheapest first.
    """
    n = load.shape[0]
    union = np.zeros(load.shape[1], dtype=np.uint64)
    or_rows_into(union, load, order)
    count = len(order)
    picked = np.empty(max(minimum - count, 0), dtype=np.int64)
    num_picked = 0
    while count < minimum:
        new = count_outside(load, pool, union)
        # Unique keys: fewest new experts, then the lower row.
        ranked = np.argsort(new * n + pool)
        take = min(minimum - count, max(1, (growth - 1) * count, int(np.sum(new == 0))))
        for j in range(take):
            picked[num_picked] = pool[ranked[j]]
            num_picked += 1
        or_rows_into(union, load, picked[num_picked - take : num_picked])
        pool = pool[ranked[take:]]
        count += take
    return picked, pool


@njit(cache=True, nogil=True)
def _union_size(words, rows):
    union = np.zeros(words.shape[1], dtype=np.uint64)
    or_rows_into(union, words, rows)
    total = 0
    for c in range(words.shape[1]):
        total += _popcount64(union[c])
    return total


@njit(cache=True, nogil=True)
def swap_rounds(load, order, pool, fixed, rounds):
    """Swap chosen rows that alone bring many loads for left-out ``pool`` rows bringing fewer.

    A chosen row's own loads are those no other chosen row has; a pool row's cost is what it
    adds to the chosen union. Pairs go most-own (ties: the higher row leaves first) against
    cheapest (ties: the lower row joins first) while own > cost; a round is kept only if the
    union really shrank, and the first round that changes nothing ends the search. The first
    ``fixed`` rows of ``order`` never leave; a joining row takes its partner's position.
    Returns ``(order, pool, swapped)`` (copies when swapped).
    """
    n, width = load.shape
    movable = len(order) - fixed
    if movable == 0 or len(pool) == 0:
        return order, pool, False
    order = order.copy()
    pool = pool.copy()
    swapped = False
    seen = np.zeros(width, dtype=np.uint64)
    shared = np.zeros(width, dtype=np.uint64)
    for _ in range(rounds):
        seen[:] = 0
        shared[:] = 0
        for row in order:
            for c in range(width):
                shared[c] |= load[row, c] & seen[c]
                seen[c] |= load[row, c]
        own = count_outside(load, order[fixed:], shared)
        cost = count_outside(load, pool, seen)
        leave = np.argsort(own * n + order[fixed:])[::-1]
        join = np.argsort(cost * n + pool)
        pairs = min(len(leave), len(join))
        # own falls and cost rises along the two orders, so the gains are non-increasing.
        swaps = 0
        for j in range(pairs):
            if own[leave[j]] > cost[join[j]]:
                swaps += 1
        if swaps == 0:
            break
        union_size = 0
        for c in range(width):
            union_size += _popcount64(seen[c])
        trial = order.copy()
        for j in range(swaps):
            trial[fixed + leave[j]] = pool[join[j]]
        if _union_size(load, trial) >= union_size:
            break  # the pairwise estimate ignored overlaps and was wrong: keep what we have
        for j in range(swaps):
            pool[join[j]] = order[fixed + leave[j]]
        order = trial
        swapped = True
    return order, pool, swapped



@njit(cache=True, nogil=True)
def layer_counts(union, num_layers):
    """``[num_layers] int64``: bits set per layer of a flat ``[num_layers * W]`` row."""
    words_per_layer = len(union) // num_layers
    counts = np.zeros(num_layers, dtype=np.int64)
    for layer in range(num_layers):
        for w in range(layer * words_per_layer, (layer + 1) * words_per_layer):
            counts[layer] += _popcount64(union[w])
    return counts


@njit(cache=True, nogil=True)
def _fits(row_words, union, limit, num_layers):
    """Whether every layer of ``row_words | union`` holds at most ``limit[layer]`` experts."""
    words_per_layer = len(union) // num_layers
    for layer in range(num_layers):
        size = 0
        for w in range(layer * words_per_layer, (layer + 1) * words_per_layer):
            size += _popcount64(row_words[w] | union[w])
        if size > limit[layer]:
            return False
    return True


@njit(cache=True, nogil=True)
def extend_rounds(flat, load, union, rows, num_layers, capacity, max_rounds):
    """Add ``rows`` (one priority level, in rank order) while the union fits ``capacity`` per layer.

    Each round: if every layer is full, only rows adding no expert join, and the extension
    ends unless all of them did; otherwise the rows that fit alone (a layer already past its
    slots may not grow) are ranked by new loads (``load`` outside the union; ties: the lower
    row), and the longest prefix whose joint union fits joins. Ends after ``max_rounds``
    rounds or when nothing fits.
    Returns ``(added, rounds, stop)``: rows added in pick order, rounds used, and whether the
    extension must end here (True) or the next level may start (False: this one is exhausted).
    """
    n = flat.shape[0]
    union = union.copy()
    added = np.empty(len(rows), dtype=np.int64)
    num_added = 0
    left = rows.copy()
    rounds = 0
    while len(left):
        if rounds == max_rounds:
            return added[:num_added], rounds, True
        rounds += 1
        used = layer_counts(union, num_layers)
        if np.all(used >= capacity):
            # Full everywhere (the usual case): only requests that add no expert fit.
            # Resident experts do not count here: a layer past its slots runs another pass.
            everyone_fits = True
            outside = count_outside(flat, left, union)
            for i in range(len(left)):
                if outside[i] == 0:
                    row = left[i]
                    added[num_added] = row
                    num_added += 1
                else:
                    everyone_fits = False
            return added[:num_added], rounds, not everyone_fits
        limit = np.maximum(used, capacity)
        fitting = np.zeros(len(left), dtype=np.bool_)
        for i in range(len(left)):
            fitting[i] = _fits(flat[left[i]], union, limit, num_layers)
        candidates = left[fitting]
        if len(candidates) == 0:
            return added[:num_added], rounds, True
        candidates = candidates[np.argsort(count_outside(load, candidates, union) * n + candidates)]
        # Longest prefix, cheapest first, whose joint union still fits.
        joint = union.copy()
        take = 0
        for row in candidates:
            if not _fits(flat[row], joint, limit, num_layers):
                break
            joint |= flat[row]
            take += 1
        for j in range(take):
            added[num_added] = candidates[j]
            num_added += 1
        union = joint
        # Next round re-scores what is left against the grown union.
        joined = np.zeros(n, dtype=np.bool_)
        joined[candidates[:take]] = True
        left = left[~joined[left]]
    return added[:num_added], rounds, False


def compile_all() -> None:
    """Compile every kernel for the argument types the grouper passes (from numba's disk cache when warm).

    Stacked signatures are often a read-only view of joined bytes, and numba compiles read-only
    arrays separately, so the kernels that take them are warmed up both ways.
    """
    words = np.zeros((2, 1), dtype=np.uint64)
    frozen = words.copy()
    frozen.flags.writeable = False
    rows = np.arange(2, dtype=np.int64)
    count_outside(words, rows, words[0])
    fill_rounds(words, rows[:1], rows[1:], 2, 2)
    swap_rounds(words, rows[:1], rows[1:], 0, 1)
    layer_counts(words[0], 1)
    for flat in (words, frozen):
        extend_rounds(flat, words, words[0], rows, 1, 1, 1)
        or_rows_into(words[0].copy(), flat, rows)
