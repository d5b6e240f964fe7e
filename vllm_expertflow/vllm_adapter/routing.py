"""Per-step routing in the worker: which request each token belongs to, and its experts.

The worker's ``execute_model`` is wrapped (only once an offloaded layer exists in the
process) so a step begins and ends around the forward pass; each offloaded MoE layer
hands its ``topk_ids`` to the recorder. At the end of the step the recorder
- appends the step to the routing trace (``trace_dir``), and
- computes each request's expert signature (``ExpertSignature``, packed bits), which
  rides back to the scheduler on the step's ``ModelRunnerOutput``.
"""

from __future__ import annotations

import atexit
from typing import Any

import numpy as np
import torch

from vllm_expertflow.core import TraceWriter
from vllm_expertflow.core.grouping import ExpertSignature
from vllm_expertflow.vllm_adapter.vllm_api import step_first_positions as first_positions
from vllm_expertflow.vllm_adapter.vllm_api import step_token_counts

SIGNATURES_ATTR = "expertflow_signatures"
# The experts the slots hold after the step, per layer (ExpertSignature): what the next step gets for free.
RESIDENT_ATTR = "expertflow_resident"


class RoutingRecorder:
    def __init__(self, layer_names: list[str], num_experts: int, top_k: int, trace_dir: str | None,
                 bytes_per_expert: int | None = None) -> None:
        self.layer_names = layer_names
        self.num_experts = num_experts
        self.top_k = top_k
        self.writer = (
            TraceWriter(trace_dir, num_experts, top_k, layer_names, bytes_per_expert=bytes_per_expert,
                        tokens_per_chunk=4096)
            if trace_dir else None
        )
        if self.writer is not None:
            atexit.register(self.close)  # an engine that shuts down cleanly keeps its last steps
        self.step_id = 0
        # (request_ids [T], positions [T], topk_ids [T, L, K]) of the last step, None if it recorded nothing.
        self.last_step: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._active = False
        self._num_tokens = 0
        self._layer_ids: list[torch.Tensor | None] = [None] * len(layer_names)
        self._layer_index = {name: i for i, name in enumerate(layer_names)}

    def begin_step(self, num_scheduled_tokens: int) -> None:
        self.last_step = None
        self._active = num_scheduled_tokens > 0
        self._num_tokens = num_scheduled_tokens
        self._layer_ids = [None] * len(self.layer_names)

    def record(self, layer_name: str, topk_ids: torch.Tensor) -> None:
        """topk_ids: [num_tokens (maybe padded), top_k] global expert ids of one layer."""
        if self._active:
            self._layer_ids[self._layer_index[layer_name]] = topk_ids[: self._num_tokens].to("cpu", torch.int32)

    def end_step(self, scheduler_output: Any, req_ids_in_order: list[str]) -> dict[str, ExpertSignature] | None:
        """Finish the step; returns each scheduled request's signature, or None if nothing ran."""
        if not self._active or any(ids is None for ids in self._layer_ids):
            self._active = False
            return None
        self._active = False
        topk = torch.stack(self._layer_ids, dim=1).numpy()  # [tokens, layers, top_k]
        counts = step_token_counts(scheduler_output)
        order = [r for r in req_ids_in_order if r in counts]
        per_token_counts = [counts[r] for r in order]
        if sum(per_token_counts) != topk.shape[0]:
            return None  # a layout we do not understand (e.g. speculative tokens): record nothing
        # Packed bit signatures: small to pickle, and what the grouper works on.
        packed = ExpertSignature.from_batch_topk_ids(topk, per_token_counts, self.num_experts)
        signatures = dict(zip(order, packed, strict=True))
        starts = first_positions(scheduler_output)
        request_ids = np.repeat(np.asarray(order, dtype=np.str_), per_token_counts)
        positions = np.concatenate([
            np.arange(starts.get(r, 0), starts.get(r, 0) + n) for r, n in
            zip(order, per_token_counts, strict=True)
        ]) if order else np.zeros(0, dtype=np.int32)
        # The routing predictor (prefetch "predictor") learns from it after each step.
        self.last_step = (request_ids, positions, topk)
        if self.writer is not None:
            self.writer.record_step(self.step_id, request_ids, positions, topk)
        self.step_id += 1
        return signatures

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
