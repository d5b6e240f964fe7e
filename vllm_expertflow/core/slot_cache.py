"""Device tier: a fixed number of expert slots per MoE layer, filled on demand.

The cache is lossless: before the expert kernel runs, every expert the step's tokens
were routed to is resident, and ``topk_ids`` are rewritten to slot ids so the kernel
runs on the slot buffers as if the layer had only ``num_slots`` experts. A step whose
tokens need more distinct experts than there are slots runs in several passes, each over
a subset of the tokens whose experts fit (``plan_passes``); each row's result does not
depend on the other rows of the batch, so the output equals the one-pass output exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vllm_expertflow.core.expert_store import ExpertStore
from vllm_expertflow.core.miss_policies import LossyRunMixin
from vllm_expertflow.core.policies import ReplacementPolicy
from vllm_expertflow.core.slot_map import LayerCacheStats, SlotMap

# expert_kernel(hidden_states [T, H], slot_weights, topk_weights [T, K], slot_ids [T, K] int32) -> [T, H]
ExpertKernel = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertSlotCache(LossyRunMixin):
    """The slot buffers of one MoE layer and the map of which expert each holds."""

    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        policy: ReplacementPolicy,
        device: torch.device | str = "cpu",
    ) -> None:
        self.store = store
        self.map = SlotMap(store.num_experts, num_slots, policy, store.bytes_per_expert)
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.slots = [torch.zeros((num_slots, *w.shape[1:]), dtype=w.dtype, device=self.device) for w in store.weights]
        # expert id -> slot id (-1: not resident). Kept on the host and mirrored to the device
        # once per pass, so a pass costs one small copy rather than one per load.
        self._slot_table_host = torch.full((store.num_experts,), -1, dtype=torch.int32)
        self._slot_table = self._slot_table_host.to(self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copies_done: torch.cuda.Event | None = None  # the latest copies' event, not yet waited on
        self._table_stale = False  # the device slot table lags the host one

    @property
    def policy_name(self) -> str:
        return self.map.policy.name

    @property
    def stats(self) -> LayerCacheStats:
        return self.map.stats

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots)

    def ensure_resident(self, experts: Sequence[int], *, count_demand: bool = True) -> None:
        """Make every expert in ``experts`` resident, evicting only experts outside it.

        ``count_demand=False``: the experts' hits and misses were counted already (lossy steps count
        their demand once, before running). On return the compute stream is ordered after every copy into this layer's slots,
        prefetches included, and the device slot table is current.
        """
        loads, evicted = self.map.admit(experts, count_demand=count_demand)
        self._issue(loads, evicted)
        self._order_compute()

    def prefetch(self, experts: Sequence[int], protected: Sequence[int] = ()) -> int:
        """Start loading ``experts`` (most wanted first) for a later pass; returns how many are copied.

        Never evicts one of ``experts`` or of ``protected`` (see ``SlotMap.prefetch``). On
        CUDA the copies run on the copy stream and nothing waits for them now: the compute
        stream waits on their event only when this layer next runs (``ensure_resident``),
        so the copies overlap whatever runs in between. A wrong prediction costs only the
        copy: ``run`` still loads whatever its tokens need.
        """
        loads, evicted = self.map.prefetch(experts, protected)
        self._issue(loads, evicted)
        return len(loads)

    def _issue(self, loads: list[tuple[int, int]], evicted: list[int]) -> None:
        """Update the slot table and start the copies of ``loads``."""
        for expert in evicted:
            self._slot_table_host[expert] = -1
        for expert, slot in loads:
            self._slot_table_host[expert] = slot
        if not loads:
            return
        stream = self._copy_stream
        if stream is None:
            for expert, slot in loads:
                for slot_buffer, source in zip(self.slots, self.store.expert(expert), strict=True):
                    slot_buffer[slot].copy_(source)
            return
        # A slot about to be overwritten may still be read by kernels queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for expert, slot in loads:
                for slot_buffer, source in zip(self.slots, self.store.expert(expert), strict=True):
                    slot_buffer[slot].copy_(source, non_blocking=True)
            # The copy stream is in order, so the latest event covers every earlier copy.
            self._copies_done = torch.cuda.Event()
            self._copies_done.record(stream)
        self._table_stale = True

    def _order_compute(self) -> None:
        """Make the compute stream wait for outstanding copies and refresh the device slot table."""
        if self._copy_stream is None:
            return
        if self._copies_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copies_done)
            self._copies_done = None
        if self._table_stale:
            # A pinned snapshot, so the copy is asynchronous; from a pageable tensor it would block
            # the host until the compute stream, copies included, caught up. The host allocator
            # keeps the snapshot until its copy is done.
            self._slot_table.copy_(self._slot_table_host.pin_memory(), non_blocking=True)
            self._table_stale = False

    def slot_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``topk_ids: [num_tokens, top_k]`` global expert ids -> same shape, int32 slot ids.

        Callers must have made the experts resident; a non-resident id maps to -1.
        """
        table = self._slot_table if self._copy_stream is not None else self._slot_table_host
        return table[topk_ids.long()]

    def run(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_kernel: ExpertKernel,
        host_topk_ids: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Run the layer's experts losslessly on the slot buffers.

        hidden_states: [num_tokens, hidden]; topk_weights: [num_tokens, top_k] float;
        topk_ids: [num_tokens, top_k] int, global expert ids. ``host_topk_ids``: the same
        ids already on the host, when the caller read them back anyway (each read-back waits
        for the device).
        """
        self.map.stats.steps += 1
        return self._run_exact(hidden_states, topk_weights, topk_ids, expert_kernel, host_topk_ids)

    @property
    def pass_capacity(self) -> int:
        """The most distinct experts one pass may need."""
        return self.num_slots

    def resident_mask(self) -> torch.Tensor:
        """[num_experts] bool on the host: which experts are in the slots now."""
        return self._slot_table_host >= 0

    def _load_for_next_steps(self, experts: Sequence[int]) -> None:
        self.ensure_resident(experts, count_demand=False)

    def _run_exact(self, hidden_states, topk_weights, topk_ids, expert_kernel, host_topk_ids=None, *,
                   count_demand: bool = True) -> torch.Tensor:
        rows = topk_ids.cpu().numpy() if host_topk_ids is None else host_topk_ids
        needed = np.unique(rows).tolist()
        if len(needed) <= self.num_slots:
            return self._run_pass(hidden_states, topk_weights, topk_ids, needed, expert_kernel, count_demand)
        passes = plan_passes(rows, self.num_slots)
        experts = [np.unique(rows[index]).tolist() for index in passes]

        def run_pass(pass_index, hidden, weights, ids):
            return self._run_pass(hidden, weights, ids, experts[pass_index], expert_kernel, count_demand)

        return run_in_passes(hidden_states, topk_weights, topk_ids, passes, run_pass)

    def resident_experts(self) -> list[int]:
        """Expert ids in the slots now (the scheduler's cache-aware grouping reads them)."""
        return list(self.map.resident())

    def _run_pass(self, hidden_states, topk_weights, topk_ids, needed, expert_kernel, count_demand=True) -> torch.Tensor:
        self.map.stats.passes += 1
        self.ensure_resident(needed, count_demand=count_demand)
        return expert_kernel(hidden_states, self.slots, topk_weights, self.slot_ids(topk_ids))


def run_in_passes(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    passes: Sequence[np.ndarray],
    run_pass: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run ``run_pass(pass_index, hidden, weights, ids)`` on each pass's rows and scatter the results back."""
    output = None
    for pass_index, rows in enumerate(passes):
        index = torch.from_numpy(rows).to(topk_ids.device)
        pass_output = run_pass(
            pass_index,
            hidden_states.index_select(0, index),
            topk_weights.index_select(0, index),
            topk_ids.index_select(0, index),
        )
        if output is None:
            output = pass_output.new_empty((hidden_states.shape[0], *pass_output.shape[1:]))
        output.index_copy_(0, index, pass_output)
    return output


def plan_passes(topk_rows: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Split a step's tokens into passes whose expert union fits ``capacity`` slots.

    topk_rows: ``[num_tokens, top_k]`` expert ids. Returns each pass's row indices
    (ascending). Any split is exact, because a row's result does not depend on the other
    rows; this one keeps passes few and loads low by grouping tokens that use the same
    experts: tokens are grouped by expert set, the groups sorted lexicographically (so
    neighbours share experts), and packed greedily. It depends on the rows alone, so the
    trace simulator plans exactly as the live cache does.
    """
    rows = np.asarray(topk_rows)
    if rows.ndim != 2:
        raise ValueError(f"topk_rows must be [num_tokens, top_k], got shape {rows.shape}")
    if rows.shape[0] == 0:
        return []
    keys = np.sort(rows, axis=1)
    groups, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    passes: list[list[int]] = []
    union: set[int] = set()
    for group_index, group in enumerate(groups.tolist()):
        experts = set(group)
        if len(experts) > capacity:
            raise ValueError(f"a token needs {len(experts)} experts but capacity is {capacity}")
        if not passes or len(union | experts) > capacity:
            passes.append([])
            union = set()
        passes[-1].append(group_index)
        union |= experts
    pass_of_group = np.empty(len(groups), dtype=np.int64)
    for pass_index, members in enumerate(passes):
        pass_of_group[members] = pass_index
    pass_of_row = pass_of_group[inverse]
    return [np.flatnonzero(pass_of_row == p) for p in range(len(passes))]
