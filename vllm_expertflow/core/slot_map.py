"""Which expert sits in which slot: the bookkeeping of one layer's cache, without tensors.

The live cache (``slot_cache.ExpertSlotCache``) and the trace-replay simulator both
drive this class, so a policy behaves the same in both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vllm_expertflow.core.policies import ReplacementPolicy


@dataclasses.dataclass
class LayerCacheStats:
    # hits/misses count distinct experts a pass needed, resident or not.
    hits: int = 0
    misses: int = 0
    loads: int = 0
    bytes_loaded: int = 0
    evictions: int = 0
    steps: int = 0  # forward calls of the layer
    passes: int = 0  # kernel runs; above steps when a step's experts exceeded the slots

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

    def slot_of(self, expert: int) -> int | None:
        return self._slot_of.get(expert)

    def resident(self) -> dict[int, int]:
        """expert id -> slot id of every resident expert."""
        return dict(self._slot_of)

    def admit(self, experts: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Make every expert in ``experts`` resident, evicting only experts outside it.

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
                self.stats.hits += 1
                self.policy.on_hit(expert)
            else:
                self.stats.misses += 1
                missing.append(expert)
        loads: list[tuple[int, int]] = []
        evicted: list[int] = []
        protected = set(needed)
        for expert in missing:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                victim = self.policy.choose_victim(self._slot_of.keys(), protected)
                slot = self._slot_of.pop(victim)
                self.policy.on_evict(victim)
                self.stats.evictions += 1
                evicted.append(victim)
            self._slot_of[expert] = slot
            self.policy.on_load(expert)
            self.stats.loads += 1
            self.stats.bytes_loaded += self.bytes_per_expert
            loads.append((expert, slot))
        return loads, evicted
