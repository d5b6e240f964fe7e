"""Replacement policies: which resident expert a layer's slot cache evicts.

A policy sees only expert ids, never tensors, so the live cache and the trace-replay
simulator can share one implementation. One instance serves one MoE layer; the layer's
``SlotMap.admit`` calls ``on_hit`` / ``on_load`` / ``on_evict`` / ``choose_victim``.
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any


class ReplacementPolicy:
    """Interface every policy implements; one instance per MoE layer."""

    name: str = ""

    def on_pass_begin(self, pass_index: int) -> None:
        """The layer's ``pass_index``-th admission (one kernel pass, counted from 0) is about to start.

        Only offline policies need it; the default ignores it. A step whose experts
        exceed the slots runs several passes, each its own index.
        """

    def on_hit(self, expert: int) -> None:
        """A resident expert was needed again."""

    def on_load(self, expert: int) -> None:
        """An expert was copied into a slot."""

    def on_evict(self, expert: int) -> None:
        """An expert left its slot."""

    def choose_victim(self, resident: Iterable[int], protected: Collection[int]) -> int:
        """Pick the resident expert to evict; never one in ``protected`` (the current step's needs)."""
        raise NotImplementedError


def _no_victim(protected: Collection[int]) -> RuntimeError:
    return RuntimeError(f"no evictable expert: all resident experts are protected ({sorted(protected)})")


class LRUPolicy(ReplacementPolicy):
    name = "lru"

    def __init__(self) -> None:
        # Oldest use first; the order is all LRU needs.
        self._recency: OrderedDict[int, None] = OrderedDict()

    def on_hit(self, expert: int) -> None:
        self._recency.move_to_end(expert)

    def on_load(self, expert: int) -> None:
        self._recency[expert] = None

    def on_evict(self, expert: int) -> None:
        del self._recency[expert]

    def choose_victim(self, resident: Iterable[int], protected: Collection[int]) -> int:
        for expert in self._recency:
            if expert not in protected:
                return expert
        raise _no_victim(protected)


class _ScoredPolicy(ReplacementPolicy):
    """Evicts the unprotected resident expert with the lowest score; ties go to the least recently used."""

    def __init__(self) -> None:
        self._clock = 0  # counts accesses (hits + loads) of this layer
        self._last_use: dict[int, int] = {}

    def _score(self, expert: int) -> float:
        raise NotImplementedError

    def _touch(self, expert: int) -> None:
        self._clock += 1
        self._last_use[expert] = self._clock

    def on_hit(self, expert: int) -> None:
        self._touch(expert)

    def on_load(self, expert: int) -> None:
        self._touch(expert)

    def choose_victim(self, resident: Iterable[int], protected: Collection[int]) -> int:
        candidates = [e for e in resident if e not in protected]
        if not candidates:
            raise _no_victim(protected)
        return min(candidates, key=lambda e: (self._score(e), self._last_use.get(e, 0), e))


class LFUPolicy(_ScoredPolicy):
    """Least frequently used: the count of every access since start, kept across evictions.

    Keeping counts of evicted experts lets a popular expert win its slot back at once;
    the cost is that old popularity never fades (see ``lfru``).
    """

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[int, int] = {}

    def _touch(self, expert: int) -> None:
        super()._touch(expert)
        self._count[expert] = self._count.get(expert, 0) + 1

    def _score(self, expert: int) -> float:
        return self._count.get(expert, 0)


class LFRUPolicy(_ScoredPolicy):
    """Frequency and recency together; ties go to the least recently used.

    ``score="decayed"`` (default): each access adds 1 to the expert's score and every
    score halves each ``half_life`` accesses of the layer; a small half-life behaves like
    LRU, an infinite one like LFU. ``score="freq_over_age"``: vLLM PR #37190's LFRU as its
    documentation describes it, an entry scores ``freq / age`` with ``freq`` its accesses
    since it was loaded (forgotten on eviction) and ``age`` the layer's accesses since its
    last one, plus 1 (#37190 counts time in calls of its cache; here the clock is accesses).
    """

    name = "lfru"
    SCORES = ("decayed", "freq_over_age")

    def __init__(self, half_life: float = 256.0, score: str = "decayed") -> None:
        if not half_life > 0:
            raise ValueError(f"lfru half_life must be a positive number of accesses, got {half_life}")
        if score not in self.SCORES:
            raise ValueError(f"lfru score {score!r} is unknown; valid: {list(self.SCORES)}")
        super().__init__()
        self.half_life = float(half_life)
        self.score = score
        # Scores are stored as of their last update and decayed lazily when compared.
        self._score_at: dict[int, tuple[float, int]] = {}
        self._freq: dict[int, int] = {}  # freq_over_age: accesses since the expert was loaded

    def _decayed(self, expert: int) -> float:
        score, at = self._score_at.get(expert, (0.0, self._clock))
        return score * 2.0 ** (-(self._clock - at) / self.half_life)

    def _touch(self, expert: int) -> None:
        super()._touch(expert)
        self._score_at[expert] = (self._decayed(expert) + 1.0, self._clock)
        self._freq[expert] = self._freq.get(expert, 0) + 1

    def on_evict(self, expert: int) -> None:
        self._freq.pop(expert, None)

    def _score(self, expert: int) -> float:
        if self.score == "freq_over_age":
            return self._freq.get(expert, 0) / (self._clock - self._last_use.get(expert, 0) + 1)
        return self._decayed(expert)


class StaticPolicy(_ScoredPolicy):
    """Pins the experts that were most frequent in a warm-up; the other slots churn by LRU.

    Call :meth:`warm_up` with the warm-up's per-expert counts. The victim is the
    unprotected resident expert with the lowest warm-up count, so once the top
    ``num_slots - 1`` experts are loaded they stay, and the remaining slots serve the
    rest least-recently-used. Before a warm-up every count is 0 and the policy is LRU.
    """

    name = "static"

    def __init__(self, counts: Sequence[int] | Mapping[int, int] | None = None) -> None:
        super().__init__()
        self._warm_counts: dict[int, int] = {}
        if counts is not None:
            self.warm_up(counts)

    def warm_up(self, counts: Sequence[int] | Mapping[int, int]) -> None:
        """Set the ranking: ``counts[e]`` is how often expert ``e`` was needed in the warm-up."""
        items = counts.items() if isinstance(counts, Mapping) else enumerate(counts)
        warm = {int(e): int(c) for e, c in items}
        negative = {e: c for e, c in warm.items() if c < 0}
        if negative:
            raise ValueError(f"warm-up counts must be >= 0, got {negative}")
        self._warm_counts = warm

    def _score(self, expert: int) -> float:
        return self._warm_counts.get(expert, 0)


class BeladyPolicy(ReplacementPolicy):
    """Offline optimum: evict the resident expert whose next use is farthest in the future.

    ``future[i]`` is the set of experts the layer's ``i``-th pass needs at once; the
    driver calls ``on_pass_begin(i)`` before that pass's admission. Belady's MIN rule
    carries over to passes that need a set of experts at once (the pass's own experts
    are protected, and they are the nearest next uses anyway), so for one layer and a
    fixed sequence of passes this gives the fewest loads of any demand-loading policy:
    it is the lower bound the online policies are measured against. It is a bound for
    the per-layer budget only; it does not choose how steps are split into passes, nor
    how a global budget is shared across layers.
    """

    name = "belady"

    def __init__(self, future: Sequence[Collection[int]]) -> None:
        self._future = [frozenset(int(e) for e in needed) for needed in future]
        self._uses: dict[int, list[int]] = {}
        for index, needed in enumerate(self._future):
            for expert in needed:
                self._uses.setdefault(expert, []).append(index)
        self._pass = -1

    def on_pass_begin(self, pass_index: int) -> None:
        if not 0 <= pass_index < len(self._future):
            raise ValueError(f"pass index {pass_index} outside the known future of {len(self._future)} passes")
        self._pass = pass_index

    def next_use(self, expert: int) -> float:
        """Index of the first pass after the current one that needs ``expert``; ``inf`` if none."""
        uses = self._uses.get(expert, [])
        at = bisect.bisect_right(uses, self._pass)
        return uses[at] if at < len(uses) else math.inf

    def choose_victim(self, resident: Iterable[int], protected: Collection[int]) -> int:
        if self._pass < 0:
            raise RuntimeError("belady needs on_pass_begin(pass_index) before each admission; none was called")
        if not set(protected) <= self._future[self._pass]:
            # The driver replays a different sequence than the one this policy was built on.
            raise RuntimeError(
                f"pass {self._pass} needs {sorted(protected)} but belady's future says {sorted(self._future[self._pass])}"
            )
        candidates = [e for e in resident if e not in protected]
        if not candidates:
            raise _no_victim(protected)
        return max(candidates, key=lambda e: (self.next_use(e), -e))


POLICIES: dict[str, type[ReplacementPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, LFRUPolicy, StaticPolicy, BeladyPolicy)
}


def make_policy(name: str, **kwargs: Any) -> ReplacementPolicy:
    """Build the policy called ``name``; ``kwargs`` go to its constructor (``belady`` needs ``future``)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown replacement policy {name!r}; valid policies are {sorted(POLICIES)}") from None
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        takes = list(signature.parameters) or "no arguments"
        raise ValueError(f"bad arguments {sorted(kwargs)} for policy {name!r} ({e}); it takes {takes}") from None
    return cls(**kwargs)
