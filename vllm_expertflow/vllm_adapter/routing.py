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
import collections
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
# {image identifier: ExpertSignature} of the images whose every token ran in the step: the scheduler
# predicts a later request with the same picture from them.
IMAGE_SIGNATURES_ATTR = "expertflow_image_signatures"
# (token_experts [vocab, L, K], num_experts), once: each token's experts as the routers score its embedding.
PROMPT_TABLE_ATTR = "expertflow_prompt_table"
# Set by the scheduler on its SchedulerOutput: how the step's composition compares with FCFS (a dict).
COMPOSITION_ATTR = "expertflow_composition"


STEP_RECORDS_KEPT = 1_000_000


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
        # Per engine step: tokens, requests, distinct experts per layer, and how the scheduler composed it.
        self.step_records: collections.deque[dict] = collections.deque(maxlen=STEP_RECORDS_KEPT)
        # (request_ids [T], positions [T], topk_ids [T, L, K]) of the last step, None if it recorded nothing.
        self.last_step: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.last_image_signatures: dict[str, ExpertSignature] = {}
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

    def end_step(
        self, scheduler_output: Any, req_ids_in_order: list[str],
        image_spans: dict[str, list[tuple[str, int, int]]] | None = None,
    ) -> dict[str, ExpertSignature] | None:
        """Finish the step; returns each scheduled request's signature, or None if nothing ran.

        ``image_spans``: ``request -> [(identifier, offset, length)]`` of its images; the images
        whose every position ran in this step get their own signature (``last_image_signatures``).
        """
        self.last_image_signatures = {}
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
        self._record_step(scheduler_output, topk, per_token_counts)
        if image_spans:
            self.last_image_signatures = self._image_signatures(order, per_token_counts, positions, topk, image_spans)
        if self.writer is not None:
            self.writer.record_step(self.step_id, request_ids, positions, topk)
        self.step_id += 1
        return signatures

    def _record_step(self, scheduler_output: Any, topk: np.ndarray, per_token_counts: list[int]) -> None:
        used = np.zeros((topk.shape[1], self.num_experts), dtype=np.bool_)
        layer = np.broadcast_to(np.arange(topk.shape[1])[None, :, None], topk.shape)
        valid = topk >= 0
        used[layer[valid], topk[valid]] = True
        composition = getattr(scheduler_output, COMPOSITION_ATTR, None) or {}
        self.step_records.append({
            "step": self.step_id,
            "tokens": int(topk.shape[0]),
            "requests": len(per_token_counts),
            "prefill_requests": sum(1 for n in per_token_counts if n > 1),
            "distinct_experts": used.sum(axis=1).tolist(),  # per MoE layer
            "changed": bool(composition.get("changed", False)),
            "held": int(composition.get("held", 0)),
            "fcfs_fallback": bool(composition.get("fcfs_fallback", False)),
        })

    def _image_signatures(self, order, per_token_counts, positions, topk, image_spans) -> dict[str, ExpertSignature]:
        found = {}
        start = 0
        for request_id, count in zip(order, per_token_counts, strict=True):
            rows = slice(start, start + count)
            start += count
            for identifier, offset, length in image_spans.get(request_id, ()):
                inside = (positions[rows] >= offset) & (positions[rows] < offset + length)
                if int(inside.sum()) == length:  # only whole images: a chunk boundary would halve one
                    found[identifier] = ExpertSignature.from_topk_ids(topk[rows][inside], self.num_experts)
        return found

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
