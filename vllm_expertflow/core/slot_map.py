"""Which expert sits in which slot: the bookkeeping of one layer's cache, without tensors.

The live cache (``slot_cache.ExpertSlotCache``) and the trace-replay simulator both
drive this class, so a policy behaves the same in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from vllm_expertflow.core.policies import ReplacementPolicy


@dataclasses.dataclass
class LayerCacheStats:
    # hits/misses count distinct experts a pass needed, resident or not: a miss is a demand load. Lossy
    # steps count each distinct expert of the step once (core/miss_policies.py), loaded or not.
    hits: int = 0
    misses: int = 0
    # Every copy into a slot, demand and prefetch alike (so bytes_loaded is all link traffic);
    # demand loads are loads - prefetch_loads.
    loads: int = 0
    bytes_loaded: int = 0
    evictions: int = 0
    steps: int = 0  # forward calls of the layer
    passes: int = 0  # kernel runs; above steps when a step's experts exceeded the slots
    prefetch_loads: int = 0  # experts copied in ahead of use (a prediction), counted in loads too
    prefetch_hits: int = 0  # prefetched experts a pass needed before they were evicted

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class SlotMap:
    """Expert-to-slot assignment of one layer under a replacement policy."""

    def __init__(self, num_experts: int, num_slots: int, policy: ReplacementPolicy, bytes_per_expert: int = 0) -> None:
        if not 1 <= num_slots <= num_experts:
            raise ValueError(f"num_slots must be in 1..{num_experts} (the expert count), got {num_slots}")
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.policy = policy
        self.bytes_per_expert = bytes_per_expert
        self.stats = LayerCacheStats()
        self._slot_of: dict[int, int] = {}
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._unused_prefetch: set[int] = set()  # prefetched, not yet needed by a pass

    def slot_of(self, expert: int) -> int | None:
        return self._slot_of.get(expert)

    def resident(self) -> dict[int, int]:
        """expert id -> slot id of every resident expert."""
        return dict(self._slot_of)

    def admit(self, experts: Sequence[int], *, count_demand: bool = True) -> tuple[list[tuple[int, int]], list[int]]:
        """Make every expert in ``experts`` resident, evicting only experts outside it.

        ``count_demand=False`` leaves hits and misses alone (the caller counted this demand).
        Returns ``(loads, evicted)``: ``loads`` lists ``(expert, slot)`` pairs whose weights
        the caller must copy in; ``evicted`` the experts that lost their slot.
        """
        needed = list(dict.fromkeys(int(e) for e in experts))
        if len(needed) > self.num_slots:
            raise ValueError(f"{len(needed)} distinct experts needed at once but the cache has {self.num_slots} slots")
        # Check everything before changing anything: a bad request must leave the cache as it was.
        for expert in needed:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert id {expert} out of range 0..{self.num_experts - 1}")
        missing = []
        for expert in needed:
            if expert in self._slot_of:
                self.stats.hits += count_demand
                self.policy.on_hit(expert)
                if expert in self._unused_prefetch:
                    self._unused_prefetch.discard(expert)
                    self.stats.prefetch_hits += 1
            else:
                self.stats.misses += count_demand
                missing.append(expert)
        loads: list[tuple[int, int]] = []
        evicted: list[int] = []
        protected = set(needed)
        for expert in missing:
            loads.append((expert, self._load(expert, protected, evicted)))
        return loads, evicted

    def prefetch(self, experts: Sequence[int], protected: Collection[int] = ()) -> tuple[list[tuple[int, int]], list[int]]:
        """Load ``experts`` ahead of use, most wanted first; returns ``(loads, evicted)`` as :meth:`admit`.

        At most ``num_slots`` of them are considered (the rest could only evict the first
        ones). A prefetch never evicts another expert of ``experts`` nor one in ``protected``
        (the experts of a pass that is running); it stops when nothing else is evictable.
        Already resident experts are left alone: a prediction is not a use, so the policy
        sees no hit. Prefetched experts count in ``loads`` and ``prefetch_loads``, not in
        hits or misses; one that a later pass needs before its eviction is a ``prefetch_hit``.
        """
        wanted = list(dict.fromkeys(int(e) for e in experts))[: self.num_slots]
        for expert in wanted:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert id {expert} out of range 0..{self.num_experts - 1}")
        keep = set(wanted) | {int(e) for e in protected}
        loads: list[tuple[int, int]] = []
        evicted: list[int] = []
        for expert in wanted:
            if expert in self._slot_of:
                continue
            if not self._free_slots and all(e in keep for e in self._slot_of):
                break
            loads.append((expert, self._load(expert, keep, evicted)))
            self.stats.prefetch_loads += 1
            self._unused_prefetch.add(expert)
        return loads, evicted

    def _load(self, expert: int, protected: Collection[int], evicted: list[int]) -> int:
        """Give ``expert`` a slot (a free one, else the policy's victim outside ``protected``); returns the slot."""
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = self.policy.choose_victim(self._slot_of.keys(), protected)
            slot = self._slot_of.pop(victim)
            self.policy.on_evict(victim)
            self._unused_prefetch.discard(victim)
            self.stats.evictions += 1
            evicted.append(victim)
        self._slot_of[expert] = slot
        self.policy.on_load(expert)
        self.stats.loads += 1
        self.stats.bytes_loaded += self.bytes_per_expert
        return slot
