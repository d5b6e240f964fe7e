"""Expert-aware step composition for vLLM's continuous batching.

``--enable-expert-offload`` installs these schedulers (``startup.py``). Each step, the
running requests are offered to ``ExpertAwareGrouper``, which picks those whose experts
overlap (so the step's working set fits the slots) while guaranteeing that no request
sits out more than ``max_skip_steps`` consecutive steps and that priorities hold. The
rest are hidden from vLLM's own ``schedule()`` for that step and put back afterwards,
keeping their KV blocks and state. Expert signatures come back from the workers on each
``ModelRunnerOutput`` (``routing.py``); a new request borrows the signature of the last
request that started with the same prompt prefix, else it is neutral.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

from vllm_expertflow.config import ExpertOffloadConfig
from vllm_expertflow.core.grouping import ExpertAwareGrouper, ExpertSignature, GroupingConfig, RequestView
from vllm_expertflow.vllm_adapter.routing import RESIDENT_ATTR, SIGNATURES_ATTR
from vllm_expertflow.vllm_adapter.vllm_api import (
    AsyncScheduler,
    Scheduler,
    init_logger,
    inprocess_scheduler,
    moe_model_shape,
    public_hooks,
    reorder_waiting,
    schedule_with_running_selected,
    shield_kernel_rebinding_from_llvmlite,
    step_output_data,
)

logger = init_logger(f"vllm.{__name__}")

PREFIX_TOKENS = 16  # prompt tokens that key the signature guess for new requests


class ExpertAwareSchedulingMixin:
    """Wraps ``schedule`` and ``update_from_output`` of a vLLM scheduler class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        offload = ExpertOffloadConfig.from_serialized(self.vllm_config.additional_config)
        # With every expert resident there are no loads to save: keep vLLM's own composition.
        self._grouping_on = offload.groups_requests(moe_model_shape(self.vllm_config).num_experts)
        self._grouper: ExpertAwareGrouper | None = None
        if self._grouping_on:
            shield_kernel_rebinding_from_llvmlite()  # the grouper compiles its search with numba
            self._grouper = ExpertAwareGrouper(
                GroupingConfig(
                    capacity=offload.slots_per_layer,
                    max_skip_steps=offload.max_skip_steps,
                    min_fraction=offload.min_run_fraction,
                    max_overflow_ratio=offload.max_overflow_ratio,
                )
            )
        self._signatures: dict[str, ExpertSignature] = {}
        self._prefix_signatures: dict[tuple[int, ...], ExpertSignature] = {}
        self._resident: ExpertSignature | None = None  # the slots' contents after the last step
        self._step = 0
        # Seconds spent choosing each step's requests; the benchmark reads them.
        self.grouping_seconds: collections.deque[float] = collections.deque(maxlen=100_000)
        self.held_per_step: collections.deque[int] = collections.deque(maxlen=100_000)
        self.cache_aware_steps = 0  # grouped steps that knew the slots' contents

    def schedule(self, *args: Any, **kwargs: Any):
        if not self._grouping_on:
            return super().schedule(*args, **kwargs)
        self._order_waiting_by_affinity()
        if public_hooks()["select_running"] or len(self.running) < 2:
            return super().schedule(*args, **kwargs)  # vLLM calls select_running itself
        chosen = self._choose_running(self.running)
        return schedule_with_running_selected(self, chosen, functools.partial(super().schedule, *args, **kwargs))

    def select_running(self, running: list) -> list:
        """vLLM's hook (patches/vllm): the running requests this step schedules; the rest are held."""
        if not (self._grouping_on and public_hooks()["select_running"]) or len(running) < 2:
            return running
        chosen = self._choose_running(running)
        return running if len(chosen) == len(running) else chosen

    def _choose_running(self, running: list) -> list:
        start = time.perf_counter()
        views = [self._view(request) for request in running]
        chosen = self._grouper.select(views, self._step, resident=self._resident)
        self.cache_aware_steps += self._resident is not None
        self._step += 1
        by_id = {request.request_id: request for request in running}
        self.grouping_seconds.append(time.perf_counter() - start)
        self.held_per_step.append(len(running) - len(chosen))
        return [by_id[request_id] for request_id in chosen]

    def scheduling_stats(self) -> dict[str, Any]:
        """What the grouper did so far: per grouped step, its time and the requests it held back."""
        return {
            "grouping_on": self._grouping_on,
            "grouping_seconds": list(self.grouping_seconds),
            "held_per_step": list(self.held_per_step),
            "cache_aware_steps": self.cache_aware_steps,
        }

    def _order_waiting_by_affinity(self) -> None:
        """Admit waiting requests by expert affinity to the slots' contents (head of line stays first)."""
        if len(self.waiting) < 2 or self._resident is None:
            return
        waiting = list(self.waiting)
        views = [self._view(request) for request in waiting]
        if all(view.signature is None for view in views):
            return  # nothing to rank by: keep vLLM's order
        by_id = {request.request_id: request for request in waiting}
        order = self._grouper.admission_order(views, self._resident)
        reorder_waiting(self, [by_id[request_id] for request_id in order])

    def update_from_output(self, scheduler_output, model_runner_output):
        resident = step_output_data(model_runner_output, RESIDENT_ATTR)
        if resident is not None:
            self._resident = resident
        signatures = step_output_data(model_runner_output, SIGNATURES_ATTR)
        if signatures:
            self._signatures.update(signatures)
            for request_id, signature in signatures.items():
                request = self.requests.get(request_id)
                if request is not None and request.num_output_tokens == 0:
                    self._prefix_signatures[_prefix_key(request)] = signature
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request_id in scheduler_output.finished_req_ids:
            self._forget(request_id)
        if len(self._signatures) > 2 * max(len(self.requests), 64):
            for request_id in [r for r in self._signatures if r not in self.requests]:
                self._forget(request_id)
        return outputs

    def _forget(self, request_id: str) -> None:
        self._signatures.pop(request_id, None)
        if self._grouper is not None:
            self._grouper.forget(request_id)

    def _view(self, request) -> RequestView:
        signature = self._signatures.get(request.request_id)
        if signature is None:
            signature = self._prefix_signatures.get(_prefix_key(request))
        return RequestView(
            request_id=request.request_id,
            priority=request.priority,
            arrival_time=request.arrival_time,
            signature=signature,
            num_tokens=max(1, request.num_tokens - request.num_computed_tokens),
        )


def get_scheduling_stats(llm) -> dict[str, Any] | None:
    """The expert-aware scheduler's stats of an offline LLM whose engine core runs in this process.

    None when vLLM's own scheduler runs (offload off, or a user --scheduler-cls); raises when
    the engine core runs in another process (set ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
    """
    scheduler = inprocess_scheduler(llm)
    if scheduler is None:
        raise RuntimeError(
            "the scheduler's stats are read in process: create the LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )
    return scheduler.scheduling_stats() if isinstance(scheduler, ExpertAwareSchedulingMixin) else None


def _prefix_key(request) -> tuple[int, ...]:
    return tuple(request.prompt_token_ids[:PREFIX_TOKENS] if request.prompt_token_ids is not None else ())


class ExpertAwareScheduler(ExpertAwareSchedulingMixin, Scheduler):
    """vLLM's synchronous scheduler (the CPU backend's) with expert-aware step composition."""


class AsyncExpertAwareScheduler(ExpertAwareSchedulingMixin, AsyncScheduler):
    """vLLM's asynchronous scheduler (the GPU default) with expert-aware step composition."""


SCHEDULER_CLASSES = {
    False: f"{__name__}.ExpertAwareScheduler",
    True: f"{__name__}.AsyncExpertAwareScheduler",
}
