"""Expert-aware step composition for vLLM's continuous batching.

``--enable-expert-offload`` installs these schedulers (``startup.py``). Each step, the
running requests are offered to ``ExpertAwareGrouper``, which picks those whose experts
overlap (so the step's working set fits the slots) while guaranteeing that no request
sits out more than ``max_skip_steps`` consecutive steps and that priorities hold. The
rest are hidden from vLLM's own ``schedule()`` for that step and put back afterwards,
keeping their KV blocks and state. Expert signatures come back from the workers on each
``ModelRunnerOutput`` (``routing.py``).

Prefills: a request that has not run is predicted from its prompt before its first step
(``PromptRoutingPredictor``: every MoE layer's router on its text tokens' embeddings, plus
the experts earlier requests with the same image used for that image). Waiting requests are
admitted by affinity to the step's experts, for that step only (the line keeps its FCFS order);
the head of the line, and anyone overtaken ``max_skip_steps`` admissions in a row, go first.
A step whose FCFS composition holds a prefill that alone overflows the slots in most layers
is left as FCFS would run it: its passes touch most experts whatever shares the step.
Each step's composition (changed versus FCFS, held requests, FCFS fallback) rides on the
``SchedulerOutput`` to the workers, which record it with the step's tokens and distinct
experts (``vllm_expertflow.get_step_records``).
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

import numpy as np

from vllm_expertflow.config import ExpertOffloadConfig
from vllm_expertflow.core.grouping import ExpertAwareGrouper, ExpertSignature, GroupingConfig, RequestView
from vllm_expertflow.core.predictors import PromptRoutingPredictor, signature_precision_recall
from vllm_expertflow.vllm_adapter.routing import (
    COMPOSITION_ATTR,
    IMAGE_SIGNATURES_ATTR,
    PROMPT_TABLE_ATTR,
    RESIDENT_ATTR,
    SIGNATURES_ATTR,
)
from vllm_expertflow.vllm_adapter.vllm_api import (
    AsyncScheduler,
    Scheduler,
    init_logger,
    inprocess_scheduler,
    moe_model_shape,
    prompt_image_spans,
    public_hooks,
    reorder_waiting,
    schedule_with_running_selected,
    shield_kernel_rebinding_from_llvmlite,
    step_output_data,
)

logger = init_logger(f"vllm.{__name__}")

PREFIX_TOKENS = 16  # prompt tokens that key the fallback signature guess for new requests
IMAGES_REMEMBERED = 16_384  # image signatures kept for predicting later requests with the same picture


class ExpertAwareSchedulingMixin:
    """Wraps ``schedule`` and ``update_from_output`` of a vLLM scheduler class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        offload = ExpertOffloadConfig.from_serialized(self.vllm_config.additional_config)
        # With every expert resident there are no loads to save: keep vLLM's own composition.
        self.grouping_on = offload.groups_requests(moe_model_shape(self.vllm_config).num_experts)
        self._grouper: ExpertAwareGrouper | None = None
        if self.grouping_on:
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
        # Predicting requests that have not run: the workers send each token's experts once, and the
        # experts of every whole image they ran (keyed by vLLM's image hash, most recent last).
        self._prompt_predictor: PromptRoutingPredictor | None = None
        self._image_signatures: collections.OrderedDict[str, ExpertSignature] = collections.OrderedDict()
        self._text_predicted: dict[str, ExpertSignature] = {}  # per request not yet run: its text tokens' experts
        self._predicted: dict[str, ExpertSignature] = {}  # complete predictions (text and every image known)
        self._admitted_prediction: dict[str, ExpertSignature] = {}  # scored against its first step
        self._step = 0
        self._fallback_now = False  # this step is left as FCFS (select_running then keeps everyone)
        self._held_this_step, self._chosen_union = 0, None
        # Seconds spent choosing each step's requests; the benchmark reads them.
        self.grouping_seconds: collections.deque[float] = collections.deque(maxlen=100_000)
        self.held_per_step: collections.deque[int] = collections.deque(maxlen=100_000)
        self.cache_aware_steps = 0  # grouped steps that knew the slots' contents
        self.changed_steps = 0  # steps composed otherwise than FCFS would have
        self.fcfs_fallback_steps = 0  # steps left as FCFS: a prefill alone overflows the slots
        # (precision, recall) of each new request's predicted experts against its first step's.
        self.prediction_scores: collections.deque[tuple[float, float]] = collections.deque(maxlen=100_000)
        # Experts predicted and then used, summed over scored requests: their ratio sizes a prediction.
        self._predicted_total = 0
        self._used_total = 0

    def schedule(self, *args: Any, **kwargs: Any):
        if not self.grouping_on:
            return super().schedule(*args, **kwargs)
        waiting = list(self.waiting)
        waiting_views = [self._view(request) for request in waiting]
        running_views = [self._view(request) for request in self.running]
        self._fallback_now = self._prefill_overflows_alone(running_views, waiting_views)
        if self._fallback_now:
            # Its passes touch most experts whatever shares the step: run what FCFS would.
            self.fcfs_fallback_steps += 1
            self._grouper.everyone_ran([view.request_id for view in running_views])
            output = super().schedule(*args, **kwargs)
            self._after_schedule(output, waiting, waiting_views, held=0, fallback=True)
            return output
        self._held_this_step, self._chosen_union = 0, None
        if public_hooks()["select_running"] or len(self.running) < 2:
            # vLLM calls select_running itself, after admission is ordered: rank by the slots' contents.
            self._order_waiting_by_affinity(waiting, waiting_views, None)
            output = super().schedule(*args, **kwargs)
        else:
            chosen = self._choose_running(self.running)
            self._order_waiting_by_affinity(waiting, waiting_views, self._chosen_union)
            output = schedule_with_running_selected(self, chosen, functools.partial(super().schedule, *args, **kwargs))
        self._after_schedule(output, waiting, waiting_views, held=self._held_this_step, fallback=False)
        return output

    def select_running(self, running: list) -> list:
        """vLLM's hook (patches/vllm): the running requests this step schedules; the rest are held."""
        if not (self.grouping_on and public_hooks()["select_running"]) or len(running) < 2 or self._fallback_now:
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
        self._held_this_step = len(running) - len(chosen)
        self.held_per_step.append(self._held_this_step)
        self._chosen_union = self._grouper.last_union
        return [by_id[request_id] for request_id in chosen]

    def scheduling_stats(self) -> dict[str, Any]:
        """What the grouper did so far: per grouped step, its time and the requests it held back; the steps
        it composed otherwise than FCFS or left as FCFS; each new request's prediction (precision, recall)."""
        return {
            "grouping_on": self.grouping_on,
            "grouping_seconds": list(self.grouping_seconds),
            "held_per_step": list(self.held_per_step),
            "cache_aware_steps": self.cache_aware_steps,
            "changed_steps": self.changed_steps,
            "fcfs_fallback_steps": self.fcfs_fallback_steps,
            "prediction_scores": list(self.prediction_scores),
        }

    def _prefill_overflows_alone(self, running_views: list[RequestView], waiting_views: list[RequestView]) -> bool:
        """Whether FCFS's step holds a prefill whose own (known or predicted) experts overflow the slots:
        a running request's prefill chunk, or the head of the waiting line if a place is free."""
        if any(self._grouper.overflows_alone(view.signature) for view in running_views if view.num_tokens > 1):
            return True
        if not waiting_views or len(running_views) >= self.max_num_running_reqs:
            return False
        head = waiting_views[0]
        # A prediction's size, corrected by how many of the predicted experts requests went on to use.
        scale = self._used_total / self._predicted_total if self._predicted_total else 1.0
        return self._grouper.overflows_alone(head.signature, 1.0 if head.request_id in self._signatures else scale)

    def _order_waiting_by_affinity(self, waiting: list, views: list[RequestView],
                                   chosen_union: ExpertSignature | None) -> None:
        """For this step only, admit waiting requests by affinity to the step's experts (chosen requests and
        slots' contents); the head of the line, and anyone passed over ``max_skip_steps`` times, first."""
        union = self._resident if chosen_union is None else _union(chosen_union, self._resident)
        if len(waiting) < 2 or union is None or all(view.signature is None for view in views):
            return  # nothing to rank by: keep vLLM's order
        by_id = {request.request_id: request for request in waiting}
        order = self._grouper.admission_order(views, union)
        reorder_waiting(self, [by_id[request_id] for request_id in order])

    def _after_schedule(self, output, waiting: list, waiting_views: list[RequestView], *, held: int,
                        fallback: bool) -> None:
        """Put the waiting line back in FCFS order, count who was passed over, and mark the step's composition."""
        still_waiting = {request.request_id for request in self.waiting}
        admitted = [request.request_id for request in waiting if request.request_id not in still_waiting]
        if len(self.waiting) > 1:
            # Requests vLLM put back in the line during schedule() (preempted) keep the front, as vLLM left them.
            rank = {request.request_id: i for i, request in enumerate(waiting)}
            current = list(self.waiting)
            reorder_waiting(self, sorted(current, key=lambda r: rank.get(r.request_id, -1)))
        self._grouper.note_admission(waiting_views, admitted)
        fcfs_admitted = {request.request_id for request in waiting[: len(admitted)]}
        changed = held > 0 or set(admitted) != fcfs_admitted
        self.changed_steps += changed
        setattr(output, COMPOSITION_ATTR, {"changed": changed, "held": held, "fcfs_fallback": fallback})
        views = {view.request_id: view for view in waiting_views}
        for request_id in admitted:
            signature = views[request_id].signature
            if signature is not None and request_id not in self._signatures:
                self._admitted_prediction[request_id] = signature

    def update_from_output(self, scheduler_output, model_runner_output):
        resident = step_output_data(model_runner_output, RESIDENT_ATTR)
        if resident is not None:
            self._resident = resident
        table = step_output_data(model_runner_output, PROMPT_TABLE_ATTR)
        if table is not None:
            self._prompt_predictor = PromptRoutingPredictor(*table)
            self._predicted.clear()  # made without it
            self._text_predicted.clear()
        for identifier, signature in (step_output_data(model_runner_output, IMAGE_SIGNATURES_ATTR) or {}).items():
            self._image_signatures[identifier] = signature
            self._image_signatures.move_to_end(identifier)
            if len(self._image_signatures) > IMAGES_REMEMBERED:
                self._image_signatures.popitem(last=False)
        signatures = step_output_data(model_runner_output, SIGNATURES_ATTR)
        if signatures:
            self._signatures.update(signatures)
            for request_id, signature in signatures.items():
                request = self.requests.get(request_id)
                if request is not None and request.num_output_tokens == 0:
                    self._prefix_signatures[_prefix_key(request)] = signature
                predicted = self._admitted_prediction.pop(request_id, None)
                if predicted is not None:
                    self.prediction_scores.append(signature_precision_recall(predicted, signature))
                    self._predicted_total += int(predicted.layer_counts().sum())
                    self._used_total += int(signature.layer_counts().sum())
                self._predicted.pop(request_id, None)
                self._text_predicted.pop(request_id, None)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request_id in scheduler_output.finished_req_ids:
            self._forget(request_id)
        if len(self._signatures) > 2 * max(len(self.requests), 64):
            for request_id in [r for r in self._signatures if r not in self.requests]:
                self._forget(request_id)
        return outputs

    def _forget(self, request_id: str) -> None:
        self._signatures.pop(request_id, None)
        self._predicted.pop(request_id, None)
        self._text_predicted.pop(request_id, None)
        self._admitted_prediction.pop(request_id, None)
        if self._grouper is not None:
            self._grouper.forget(request_id)

    def _view(self, request) -> RequestView:
        signature = self._signatures.get(request.request_id)
        if signature is None:
            signature = self._predict(request)
        return RequestView(
            request_id=request.request_id,
            priority=request.priority,
            arrival_time=request.arrival_time,
            signature=signature,
            num_tokens=max(1, request.num_tokens - request.num_computed_tokens),
        )

    def _predict(self, request) -> ExpertSignature | None:
        """A request that has not run: its text tokens' experts plus those of its images seen before.

        Without the workers' token table or any known image, the last request with the same
        prompt prefix lends its signature (None if there is none).
        """
        known = self._predicted.get(request.request_id)
        if known is not None:
            return known
        spans = prompt_image_spans(request)
        parts, complete = [], True
        text = self._text_predicted.get(request.request_id)
        if text is None and self._prompt_predictor is not None and request.prompt_token_ids is not None:
            is_text = np.ones(len(request.prompt_token_ids), dtype=bool)
            for _, offset, length in spans:
                is_text[offset : offset + length] = False  # placeholders: the picture is not in the token id
            text = self._prompt_predictor.predict(np.asarray(request.prompt_token_ids)[is_text])
            self._text_predicted[request.request_id] = text  # a waiting request is predicted every step
        if text is not None:
            parts.append(text)
        else:
            complete = False
        for identifier, _, _ in spans:
            image = self._image_signatures.get(identifier)
            complete &= image is not None
            if image is not None:
                parts.append(image)
        if not parts:
            return self._prefix_signatures.get(_prefix_key(request))
        signature = functools.reduce(_union, parts)
        if complete:
            self._predicted[request.request_id] = signature
        return signature


def _union(a: ExpertSignature, b: ExpertSignature | None) -> ExpertSignature:
    return a if b is None else ExpertSignature(a.words | b.words, a.num_experts)


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
