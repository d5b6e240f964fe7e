"""Replacement policies: which resident expert a layer's slot cache evicts.

A policy sees only expert ids, never tensors, so the live cache and the trace-replay
simulator can share one implementation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable


class ReplacementPolicy:
    """Interface every policy implements; one instance per MoE layer."""

    name: str = ""

    def on_hit(self, expert: int) -> None:
        """A resident expert was needed again."""

    def on_load(self, expert: int) -> None:
        """An expert was copied into a slot."""

    def on_evict(self, expert: int) -> None:
        """An expert left its slot."""

    def choose_victim(self, resident: Iterable[int], protected: Collection[int]) -> int:
        """Pick the resident expert to evict; never one in ``protected`` (the current step's needs)."""
        raise NotImplementedError


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
        raise RuntimeError(f"no evictable expert: all resident experts are protected ({sorted(protected)})")


POLICIES: dict[str, type[ReplacementPolicy]] = {cls.name: cls for cls in (LRUPolicy,)}


def make_policy(name: str) -> ReplacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown replacement policy {name!r}; valid policies are {sorted(POLICIES)}") from None
