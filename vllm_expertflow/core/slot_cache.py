"""Device tier: a fixed number of expert slots per MoE layer, filled on demand.

The cache is lossless: before the expert kernel runs, every expert the step's tokens
were routed to is resident, and ``topk_ids`` are rewritten to slot ids so the kernel
runs on the slot buffers as if the layer had only ``num_slots`` experts. A step whose
tokens need more distinct experts than there are slots runs in several passes over
consecutive token chunks; each row's result does not depend on the other rows of the
batch, so the output equals the one-pass output exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vllm_expertflow.core.expert_store import ExpertStore
from vllm_expertflow.core.policies import ReplacementPolicy
from vllm_expertflow.core.slot_map import LayerCacheStats, SlotMap

# expert_kernel(hidden_states [T, H], slot_weights, topk_weights [T, K], slot_ids [T, K] int32) -> [T, H]
ExpertKernel = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertSlotCache:
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
        self.slots = [
            torch.empty((num_slots, *w.shape[1:]), dtype=w.dtype, device=self.device) for w in store.weights
        ]
        # expert id -> slot id (-1: not resident). Kept on the host and mirrored to the device
        # once per pass, so a pass costs one small copy rather than one per load.
        self._slot_table_host = torch.full((store.num_experts,), -1, dtype=torch.int32)
        self._slot_table = self._slot_table_host.to(self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def stats(self) -> LayerCacheStats:
        return self.map.stats

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots)

    def ensure_resident(self, experts: Sequence[int]) -> None:
        """Make every expert in ``experts`` resident, evicting only experts outside it."""
        loads, evicted = self.map.admit(experts)
        if not loads:
            return
        for expert in evicted:
            self._slot_table_host[expert] = -1
        for expert, slot in loads:
            self._slot_table_host[expert] = slot
        stream = self._copy_stream
        if stream is None:
            for expert, slot in loads:
                for slot_buffer, source in zip(self.slots, self.store.expert(expert), strict=True):
                    slot_buffer[slot].copy_(source)
            return
        compute_stream = torch.cuda.current_stream(self.device)
        # A slot about to be overwritten may still be read by kernels queued on the compute stream.
        stream.wait_stream(compute_stream)
        with torch.cuda.stream(stream):
            for expert, slot in loads:
                for slot_buffer, source in zip(self.slots, self.store.expert(expert), strict=True):
                    slot_buffer[slot].copy_(source, non_blocking=True)
        compute_stream.wait_stream(stream)
        self._slot_table.copy_(self._slot_table_host, non_blocking=True)

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
    ) -> torch.Tensor:
        """Run the layer's experts losslessly on the slot buffers.

        hidden_states: [num_tokens, hidden]; topk_weights: [num_tokens, top_k] float;
        topk_ids: [num_tokens, top_k] int, global expert ids.
        """
        self.map.stats.steps += 1
        needed = torch.unique(topk_ids).tolist()
        if len(needed) <= self.num_slots:
            return self._run_pass(hidden_states, topk_weights, topk_ids, needed, expert_kernel)
        outputs = []
        for start, end in plan_token_chunks(topk_ids.tolist(), self.num_slots):
            chunk_ids = topk_ids[start:end]
            outputs.append(
                self._run_pass(
                    hidden_states[start:end],
                    topk_weights[start:end],
                    chunk_ids,
                    torch.unique(chunk_ids).tolist(),
                    expert_kernel,
                )
            )
        return torch.cat(outputs, dim=0)

    def _run_pass(self, hidden_states, topk_weights, topk_ids, needed, expert_kernel) -> torch.Tensor:
        self.map.stats.passes += 1
        self.ensure_resident(needed)
        return expert_kernel(hidden_states, self.slots, topk_weights, self.slot_ids(topk_ids))


def plan_token_chunks(topk_rows: Sequence[Sequence[int]], capacity: int) -> list[tuple[int, int]]:
    """Split tokens into consecutive ``[start, end)`` chunks whose expert union fits ``capacity``.

    Greedy: each chunk grows until the next token would overflow it, which gives the
    fewest chunks among splits into consecutive runs.
    """
    chunks = []
    start = 0
    union: set[int] = set()
    for index, row in enumerate(topk_rows):
        row_experts = set(row)
        if len(row_experts) > capacity:
            raise ValueError(f"token {index} needs {len(row_experts)} experts but capacity is {capacity}")
        if len(union | row_experts) > capacity:
            chunks.append((start, index))
            start, union = index, set()
        union |= row_experts
    if start < len(topk_rows):
        chunks.append((start, len(topk_rows)))
    return chunks
