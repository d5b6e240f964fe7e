"""Paired comparisons of two runs over the same items: bootstrap CI of the accuracy difference, McNemar's test.

Both runs answered the same questions, so the comparisons are paired: resampling items (not runs) keeps
each item's two outcomes together, which is what makes a difference of one or two questions measurable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)``: the paired difference and its 95% percentile-bootstrap interval.

    ``a`` and ``b`` are per-item scores of the same items in the same order (0/1 or VQA soft scores).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need the same 1-d shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no items to compare")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # In chunks, so 1000 items x 2000 resamples never holds a 2M-entry index matrix per comparison at once.
    for start in range(0, resamples, 250):
        stop = min(resamples, start + 250)
        means[start:stop] = diff[rng.integers(0, diff.size, size=(stop - start, diff.size))].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def mcnemar_exact_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """McNemar's exact two-sided p-value: a binomial test of the discordant pairs (1.0 when there are none)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same shape, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def excludes_zero(low: float | None, high: float | None) -> bool:
    """Whether an interval shows an effect (both ends on one side of zero)."""
    return low is not None and high is not None and (low > 0 or high < 0)
