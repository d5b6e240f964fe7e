"""The grouper's compiled search loops against plain numpy statements of the same rules."""

import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_expertflow.core import bit_kernels


def random_rows(seed: int, rows: int, width: int, density: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.random((rows, width * 64)) < density
    return np.packbits(bits, axis=-1, bitorder="little").view("<u8").astype(np.uint64)


def popcount(words: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


def fill_reference(load, order, pool, minimum, growth):
    union = np.bitwise_or.reduce(load[order], axis=0) if len(order) else np.zeros(load.shape[1], np.uint64)
    picked, count = [], len(order)
    while count < minimum:
        new = popcount(load[pool] & ~union)
        ranked = sorted(range(len(pool)), key=lambda i: (new[i], pool[i]))
        take = min(minimum - count, max(1, (growth - 1) * count, int((new == 0).sum())))
        for i in ranked[:take]:
            picked.append(pool[i])
            union |= load[pool[i]]
        pool = pool[ranked[take:]]
        count += take
    return np.array(picked, dtype=np.int64), pool


def swap_reference(load, order, pool, fixed, rounds):
    n = len(load)
    order, pool, swapped = order.copy(), pool.copy(), False
    for _ in range(rounds):
        chosen = load[order]
        seen = np.bitwise_or.accumulate(chosen, axis=0)
        shared = np.bitwise_or.reduce(chosen[1:] & seen[:-1], axis=0)
        own = popcount(chosen[fixed:] & ~shared)
        cost = popcount(load[pool] & ~seen[-1])
        leave = np.argsort(own * n + order[fixed:])[::-1]
        join = np.argsort(cost * n + pool)
        pairs = min(len(leave), len(join))
        swaps = int(np.count_nonzero(own[leave[:pairs]] > cost[join[:pairs]]))
        if swaps == 0:
            break
        trial = order.copy()
        trial[fixed + leave[:swaps]] = pool[join[:swaps]]
        if popcount(np.bitwise_or.reduce(load[trial], axis=0)) >= popcount(seen[-1]):
            break
        pool[join[:swaps]] = order[fixed + leave[:swaps]]
        order, swapped = trial, True
    return order, pool, swapped


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 40), width=st.integers(1, 4), density=st.floats(0.0, 0.5))
def test_count_outside_is_the_popcount_of_the_rows_outside_the_mask(seed, rows, width, density):
    words = random_rows(seed, rows + 1, width, density)
    picked = np.random.default_rng(seed).permutation(rows)[: max(1, rows // 2)].astype(np.int64)
    mask = words[-1]
    assert bit_kernels.count_outside(words, picked, mask).tolist() == popcount(words[picked] & ~mask).tolist()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(2, 60),
    width=st.integers(1, 3),
    density=st.sampled_from([0.0, 0.002, 0.01, 0.1, 0.3]),  # sparse rows: many add nothing
    growth=st.sampled_from([2, 8]),
)
def test_fill_rounds_follow_the_cheapest_first_rule(seed, rows, width, density, growth):
    load = random_rows(seed, rows, width, density)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows).astype(np.int64)
    seeds = int(rng.integers(1, rows))
    order, pool = perm[:seeds], np.sort(perm[seeds:])
    minimum = int(rng.integers(seeds, rows + 1))
    picked, rest = bit_kernels.fill_rounds(load, order, pool, minimum, growth)
    expected_picked, expected_rest = fill_reference(load, order, pool, minimum, growth)
    assert picked.tolist() == expected_picked.tolist()
    assert rest.tolist() == expected_rest.tolist()
    assert len(order) + len(picked) == max(minimum, len(order))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(2, 60), width=st.integers(1, 3), clusters=st.integers(1, 4))
def test_swap_rounds_match_the_reference_and_never_grow_the_union(seed, rows, width, clusters):
    rng = np.random.default_rng(seed)
    # Clustered rows, so that swaps happen.
    centres = random_rows(seed, clusters, width, 0.2)
    load = centres[rng.integers(0, clusters, rows)] | random_rows(seed + 1, rows, width, 0.03)
    perm = rng.permutation(rows).astype(np.int64)
    chosen = int(rng.integers(1, rows))
    order, pool = perm[:chosen], perm[chosen:]
    fixed = int(rng.integers(0, chosen + 1))
    got = bit_kernels.swap_rounds(load, order, pool, fixed, 2)
    expected = swap_reference(load, order, pool, fixed, 2)
    assert got[0].tolist() == expected[0].tolist() and got[1].tolist() == expected[1].tolist()
    assert got[2] == expected[2]
    new_order, new_pool, swapped = got
    assert new_order[:fixed].tolist() == order[:fixed].tolist()
    assert sorted([*new_order.tolist(), *new_pool.tolist()]) == list(range(rows))
    before = popcount(np.bitwise_or.reduce(load[order], axis=0))
    after = popcount(np.bitwise_or.reduce(load[new_order], axis=0))
    assert after < before if swapped else after == before


def test_swaps_trade_a_lone_row_for_one_that_shares():
    # Rows 0-2 share experts 0-3; row 3 has its own 4-7; row 4 (left out) shares with 0-2.
    masks = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2], [4, 5, 6, 7], [1, 2, 3]]
    bits = np.zeros((5, 64), dtype=bool)
    for row, experts in enumerate(masks):
        bits[row, experts] = True
    load = np.packbits(bits, axis=-1, bitorder="little").view("<u8").astype(np.uint64)
    order, pool, swapped = bit_kernels.swap_rounds(load, np.arange(4), np.array([4]), 1, 2)
    assert swapped and order.tolist() == [0, 1, 2, 4] and pool.tolist() == [3]


def test_the_grouper_compiles_everything_when_it_starts():
    # A kernel compiled on a step's first search would stall that step for a second: the
    # grouper's warm-up must cover the array types select really passes (e.g. read-only stacks).
    code = """
import subprocess
import sys

import numpy as np
from vllm_expertflow.core import bit_kernels
from vllm_expertflow.core.grouping import ExpertAwareGrouper, ExpertSignature, GroupingConfig, RequestView
grouper = ExpertAwareGrouper(GroupingConfig(capacity=6, max_skip_steps=2, min_fraction=0.3))
kernels = [getattr(bit_kernels, name) for name in dir(bit_kernels) if hasattr(getattr(bit_kernels, name), "signatures")]
before = {kernel.__name__: len(kernel.signatures) for kernel in kernels}
rng = np.random.default_rng(0)
for step in range(30):
    topk = rng.integers(0, 4, (40, 3, 2)) + 4 * (np.arange(40) % 3)[:, None, None]
    signatures = ExpertSignature.from_batch_topk_ids(topk, [1] * 40, 16)
    masks = step % 2 == 0
    views = [RequestView(f"r{i}", i % 2, float(i), s.to_mask() if masks else s) for i, s in enumerate(signatures)]
    grouper.select(views, step, resident=None if step % 3 else grouper.last_union)
print({kernel.__name__: len(kernel.signatures) for kernel in kernels} == before, before)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("True"), proc.stdout
