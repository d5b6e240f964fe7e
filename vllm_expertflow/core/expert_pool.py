"""One device slot pool shared by every MoE layer, its residency decided by ``ExpertFlowCache``.

The live form of the simulator's ``expertflow`` policy in ``global`` budget mode (PLEC): the
same ``ExpertFlowCache`` instance decides which ``(layer, expert)`` keys are resident,
and this module only gives each key a physical slot of one buffer per weight tensor
(``[num_slots, ...]``) and copies the weights (``_PooledExpertFlowCache`` hooks
``_load`` / ``_evict``). A layer's kernel gets the whole pool as its expert weights and
slot ids into the pool, as if the layer had ``num_slots`` experts.

Drive it like the replay loop ``simulate._replay_expertflow``: :meth:`ExpertPool.begin_step`
once per engine step, then each layer's :meth:`PooledLayerCache.run` in execution order.
Replaying the same routing with the same demand forecasts therefore gives the simulator's
loads exactly (tests/core/test_expert_pool.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vllm_expertflow.core.expert_store import ExpertStore
from vllm_expertflow.core.expertflow_policy import ExpertFlowCache
from vllm_expertflow.core.miss_policies import LossyRunMixin
from vllm_expertflow.core.slot_cache import ExpertKernel, plan_passes, run_in_passes
from vllm_expertflow.core.slot_map import LayerCacheStats


class _PooledExpertFlowCache(ExpertFlowCache):
    """``ExpertFlowCache`` whose loads and evictions also move a physical slot of the pool."""

    def __init__(self, pool: ExpertPool, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pool = pool

    def _load(self, layer: int, expert: int) -> None:
        super()._load(layer, expert)
        self._pool._assign(layer, expert)

    def _evict(self, key: tuple[int, int]) -> None:
        super()._evict(key)
        self._pool._release(*key)


class ExpertPool:
    """``slots_per_layer * num_layers`` device slots shared by ``num_layers`` MoE layers.

    ``template``: one layer's store (every layer's weights must have its shapes and
    dtypes). ``prefetch``: whether :meth:`begin_step` prefetches the keys its demand
    forecast predicts (``ExpertFlowCache``'s option); ``options``: the other
    ``ExpertFlowCache`` options. No layer is taken below ``top_k`` resident experts by
    another layer, so a pass of any layer can hold ``max_pass_experts(layer)`` experts.
    """

    def __init__(
        self,
        template: ExpertStore,
        num_layers: int,
        slots_per_layer: int,
        top_k: int,
        device: torch.device | str = "cpu",
        *,
        prefetch: bool = False,
        **options,
    ) -> None:
        self.num_layers = num_layers
        self.num_experts = template.num_experts
        self.top_k = top_k
        self.device = torch.device(device)
        self._shapes = [(tuple(w.shape), w.dtype) for w in template.weights]
        self.policy = _PooledExpertFlowCache(
            self,
            template.num_experts,
            num_layers,
            slots_per_layer,
            budget_mode="global",
            min_per_layer=top_k,
            bytes_per_expert=template.bytes_per_expert,
            prefetch=prefetch,
            **options,
        )
        self.num_slots = self.policy.num_slots
        self.slots = [
            torch.zeros((self.num_slots, *w.shape[1:]), dtype=w.dtype, device=self.device) for w in template.weights
        ]
        self.stores: list[ExpertStore | None] = [None] * num_layers
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._slot_of: dict[tuple[int, int], int] = {}
        # [layer, expert] -> pool slot (-1: not resident); host copy, mirrored to the device when stale.
        self._table_host = torch.full((num_layers, self.num_experts), -1, dtype=torch.int32)
        self._table = self._table_host.to(self.device)
        self._table_stale = False
        self._pending: list[tuple[int, int, int]] = []  # (layer, expert, slot) decided, not yet copied
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copies_done: dict[int, torch.cuda.Event] = {}  # layer -> event of its latest copies
        # Which experts each layer needed this step: the next step's demand forecast when none is given.
        self._used = np.zeros((num_layers, self.num_experts), dtype=bool)

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots)

    @property
    def stats(self) -> list[LayerCacheStats]:
        return self.policy.stats

    def add_layer(self, layer: int, store: ExpertStore) -> PooledLayerCache:
        """Register MoE layer ``layer``'s host store; returns the cache the layer runs through."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer index {layer} out of range 0..{self.num_layers - 1}")
        shapes = [(tuple(w.shape), w.dtype) for w in store.weights]
        if shapes != self._shapes:
            raise ValueError(
                f"every layer sharing an expert pool needs the same expert weight shapes and dtypes; layer {layer} "
                f"has {shapes}, the pool was built for {self._shapes}"
            )
        self.stores[layer] = store
        return PooledLayerCache(self, layer, store)

    def max_pass_experts(self, layer: int) -> int:
        return self.policy.max_pass_experts(layer)

    def begin_step(self, demand: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Start an engine step with a demand forecast ``[L, E]`` (P(the step needs the key)).

        Without one, the previous step's usage is the forecast (1 for the experts each layer
        needed, 0 for the rest): routing changes slowly from step to step, and this needs no
        predictor. Returns the keys prefetched (only with ``prefetch=True``).
        """
        if demand is None:
            demand = self._used.astype(np.float64)
        self._used = np.zeros_like(self._used)
        fetched = self.policy.begin_step(demand)
        self._issue()
        return fetched

    def prefetch(
        self,
        layer: int,
        experts: Sequence[int],
        *,
        protected: Sequence[tuple[int, int]] = (),
        demand: np.ndarray | None = None,
    ) -> int:
        """Prefetch ``experts`` of ``layer`` mid-step (``ExpertFlowCache.prefetch_layer``); returns how many are copied."""
        fetched = self.policy.prefetch_layer(layer, experts, protected=protected, demand=demand)
        self._issue()
        return len(fetched)

    def admit(
        self, layer: int, needed: Sequence[int], later: Sequence[Sequence[int]] = (), *, count_demand: bool = True
    ) -> None:
        """Make ``needed`` resident for a pass of ``layer`` and order the compute stream after its copies."""
        self._used[layer, list(needed)] = True
        self.policy.admit(layer, needed, later, count_demand=count_demand)
        self._issue()
        self._order_compute(layer)

    def slot_ids(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        table = self._table if self._copy_stream is not None else self._table_host
        return table[layer][topk_ids.long()]

    def _assign(self, layer: int, expert: int) -> None:
        # ExpertFlowCache loads only when the pool has room, or right after evicting a key.
        slot = self._free.pop()
        self._slot_of[(layer, expert)] = slot
        self._table_host[layer, expert] = slot
        self._pending.append((layer, expert, slot))

    def _release(self, layer: int, expert: int) -> None:
        slot = self._slot_of.pop((layer, expert))
        self._free.append(slot)
        self._table_host[layer, expert] = -1
        self._table_stale = True

    def _issue(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._table_stale = True
        stream = self._copy_stream
        if stream is None:
            for layer, expert, slot in pending:
                for slot_buffer, source in zip(self.slots, self.stores[layer].expert(expert), strict=True):
                    slot_buffer[slot].copy_(source)
            return
        # A slot about to be overwritten may still be read by kernels queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for layer, expert, slot in pending:
                for slot_buffer, source in zip(self.slots, self.stores[layer].expert(expert), strict=True):
                    slot_buffer[slot].copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        # A layer waits for its copies only when it runs, so prefetches overlap the layers before it.
        for layer in {layer for layer, _, _ in pending}:
            self._copies_done[layer] = event

    def _order_compute(self, layer: int) -> None:
        if self._copy_stream is None:
            return
        event = self._copies_done.pop(layer, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if self._table_stale:
            self._table.copy_(self._table_host.pin_memory(), non_blocking=True)  # see ExpertSlotCache
            self._table_stale = False


class PooledLayerCache(LossyRunMixin):
    """One MoE layer's view of an ``ExpertPool``, with the interface of ``ExpertSlotCache``.

    ``num_slots`` and ``slots`` are the whole pool: the kernel sees ``num_slots`` experts.
    """

    policy_name = "expertflow (global pool)"

    def __init__(self, pool: ExpertPool, layer: int, store: ExpertStore) -> None:
        self.pool = pool
        self.layer = layer
        self.store = store

    @property
    def num_slots(self) -> int:
        return self.pool.num_slots

    @property
    def slots(self) -> list[torch.Tensor]:
        return self.pool.slots

    @property
    def device_bytes(self) -> int:
        return self.pool.device_bytes

    @property
    def stats(self) -> LayerCacheStats:
        return self.pool.stats[self.layer]

    @property
    def max_pass_experts(self) -> int:
        return self.pool.max_pass_experts(self.layer)

    def resident_experts(self) -> list[int]:
        """This layer's expert ids in the pool now."""
        return sorted(self.pool.policy.resident(self.layer))

    def prefetch(
        self, experts: Sequence[int], protected: Sequence[tuple[int, int]] = (), demand: np.ndarray | None = None
    ) -> int:
        """Prefetch ``experts`` of this layer; ``protected``: ``(layer, expert)`` keys of the running layer's pass."""
        return self.pool.prefetch(self.layer, experts, protected=protected, demand=demand)

    @property
    def pass_capacity(self) -> int:
        return self.max_pass_experts

    def resident_mask(self) -> torch.Tensor:
        """[num_experts] bool on the host: which of this layer's experts are in the pool now."""
        return self.pool._table_host[self.layer] >= 0

    def _load_for_next_steps(self, experts: Sequence[int]) -> None:
        # A forecast for the next step, not a use: the pool's prefetch weighs it against other layers' keys.
        self.pool.prefetch(self.layer, experts)

    def run(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_kernel: ExpertKernel,
        host_topk_ids: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Run the layer's experts losslessly on the pool, in passes as ``ExpertSlotCache.run``.

        Passes are planned with the layer's ``max_pass_experts`` and each admission is told
        the step's later passes, as the simulator's replay does.
        """
        self.stats.steps += 1
        return self._run_exact(hidden_states, topk_weights, topk_ids, expert_kernel, host_topk_ids)

    def _run_exact(self, hidden_states, topk_weights, topk_ids, expert_kernel, host_topk_ids=None, *,
                   count_demand: bool = True) -> torch.Tensor:
        rows = topk_ids.cpu().numpy() if host_topk_ids is None else host_topk_ids
        capacity = self.max_pass_experts
        needed = np.unique(rows).tolist()
        if len(needed) <= capacity:
            self.pool.admit(self.layer, needed, count_demand=count_demand)
            return expert_kernel(hidden_states, self.slots, topk_weights, self.pool.slot_ids(self.layer, topk_ids))
        passes = plan_passes(rows, capacity)
        experts = [np.unique(rows[index]).tolist() for index in passes]

        def run_pass(pass_index, hidden, weights, ids):
            self.pool.admit(self.layer, experts[pass_index], experts[pass_index + 1 :], count_demand=count_demand)
            return expert_kernel(hidden, self.slots, weights, self.pool.slot_ids(self.layer, ids))

        return run_in_passes(hidden_states, topk_weights, topk_ids, passes, run_pass)
