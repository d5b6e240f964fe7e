"""Trace replay: the loads a cache policy would make on a recorded routing trace.

Each layer's steps are replayed through ``SlotMap``, the bookkeeping the live cache
uses, so a policy's loads here are the loads it makes in ``ExpertSlotCache``. As in
the live cache, a layer needs the union of a step's experts resident at once, and a
step whose union exceeds the slots runs in passes over token subsets
(``plan_passes``).

Budget modes:

- ``per-layer``: every layer owns ``capacity`` slots and its own policy instance.
- ``global``: one pool of ``capacity * num_layers`` slots over ``(layer, expert)``
  keys, never taking a layer below ``top_k`` resident experts. ``lru`` evicts the least
  recently used key across layers, ``belady`` the key needed farthest ahead in the
  interleaved (layer, pass) sequence, ``expertflow`` by predicted demand.

Policy ``expertflow`` is ExpertFlow's expert cache engine (``ExpertFlowCache`` in
``core/expertflow_policy.py``, the same object the live ``ExpertPool`` runs): it reads a
routing predictor, prefetches and, in global mode, moves slots across layers.

Timing model: a prefetch is issued one step ahead (while the previous step computes) and
is assumed to arrive before its layer runs, so it never stalls; only demand misses stall
(``projected_stall_s = demand_misses * bytes_per_expert / link bandwidth``). ``loads``
counts both (``demand_misses + prefetch_loads``) and ``bytes_loaded`` all link traffic. A
wasted prefetch costs bandwidth and may evict a key that is needed later, which then
shows up as a demand miss. The assumption is optimistic when a step's compute is shorter
than its prefetches' transfer; ``bytes_loaded`` shows how much the link must carry.

Belady's loads are a lower bound on any policy's *loads* at the same capacity and budget
mode (prefetching moves loads earlier, it cannot make fewer). ``expertflow``'s demand
misses can fall below Belady's loads: what it prefetched correctly is not a miss.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from vllm_expertflow.core.expertflow_policy import (
    BUDGET_MODES,
    EXPERTFLOW_OPTIONS,
    ExpertFlowCache,
)
from vllm_expertflow.core.policies import POLICIES, BeladyPolicy, StaticPolicy, make_policy
from vllm_expertflow.core.predictors import DemandForecast, StepPredictor, make_predictor
from vllm_expertflow.core.slot_cache import plan_passes
from vllm_expertflow.core.slot_map import LayerCacheStats, SlotMap
from vllm_expertflow.core.trace import RoutingTrace, read_trace

# The predictive cache engine; not a ReplacementPolicy (it prefetches and can span layers).
EXPERTFLOW = "expertflow"
SIM_POLICIES = (*sorted(POLICIES), EXPERTFLOW)
GLOBAL_POLICIES = ("lru", "belady", EXPERTFLOW)
# A PCIe 4.0 x16 link's sustained host-to-device rate, in GB/s.
DEFAULT_LINK_GBPS = 25.0


@dataclasses.dataclass
class SimulationResult:
    policy: str
    budget_mode: str
    eviction: str  # what actually chose victims, e.g. "global LRU over (layer, expert) keys"
    capacity: int  # slots per layer (the average share in global mode)
    total_slots: int
    num_layers: int
    num_experts: int
    top_k: int
    num_steps: int
    num_tokens: int
    passes: int  # admissions over all layers; above steps * layers when steps were split
    hits: int  # distinct experts a pass needed that were resident
    demand_misses: int  # distinct experts a pass needed that were not resident: loads that stall
    prefetch_loads: int  # experts copied in ahead of use (expertflow only; 0 for demand loading)
    prefetch_hits: int  # prefetched experts that a pass needed before they were evicted
    loads: int  # experts copied in: demand_misses + prefetch_loads
    evictions: int
    hit_rate: float  # hits / (hits + demand_misses)
    bytes_per_expert: int | None  # None: unknown, so bytes and stall are not projected
    bytes_loaded: int | None  # all loads' bytes: the link's traffic
    link_gbps: float  # GB/s (1e9 bytes per second)
    # Demand misses' bytes / link bandwidth: a demand load stalls its layer, a prefetch is
    # assumed to overlap compute (see the module docstring).
    projected_stall_s: float | None
    per_layer: list[dict[str, Any]]
    predictor: str | None = None  # expertflow's routing predictor

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def simulate(
    trace: RoutingTrace | str | os.PathLike[str],
    policy: str,
    capacity: int,
    *,
    budget_mode: str = "per-layer",
    bytes_per_expert: int | None = None,
    link_gbps: float = DEFAULT_LINK_GBPS,
    policy_kwargs: Mapping[str, Any] | None = None,
    warmup_steps: int | None = None,
    predictor: str | StepPredictor | DemandForecast | None = None,
) -> SimulationResult:
    """Replay ``trace`` under ``policy`` with ``capacity`` slots per layer.

    bytes_per_expert: defaults to the trace's own metadata, if it has one.
    policy_kwargs: constructor arguments of the policy (e.g. ``half_life`` for lfru); for
    ``expertflow`` the options in ``EXPERTFLOW_OPTIONS`` (see ``ExpertFlowCache``).
    warmup_steps: for ``static``, the leading steps whose expert counts rank the experts;
    ``None`` uses the whole trace (an in-sample, optimistic ranking). All steps are replayed.
    predictor: for ``expertflow`` only: ``"history"`` (default), ``"frequency"``, the path
    of a saved ``RoutingPathPredictor``, a predictor object, or a ``DemandForecast`` of this
    trace (to replay many capacities without predicting again). A predictor's per-request
    state is reset first; a named predictor learns online from the steps it has seen.
    """
    if not isinstance(trace, RoutingTrace):
        trace = read_trace(trace)
    _validate(trace, policy, capacity, budget_mode, link_gbps, warmup_steps)
    if predictor is not None and policy != EXPERTFLOW:
        raise ValueError(f"a predictor is only used by policy {EXPERTFLOW!r}, got one with policy {policy!r}")
    if bytes_per_expert is None:
        bytes_per_expert = trace.bytes_per_expert
    if bytes_per_expert is not None and bytes_per_expert < 0:
        raise ValueError(f"bytes_per_expert must be >= 0, got {bytes_per_expert}")
    num_layers = trace.num_layers
    predictor_name = None
    if policy == EXPERTFLOW:
        if isinstance(predictor, DemandForecast):
            forecast = predictor
            expected = (trace.num_steps, trace.num_layers, trace.num_experts)
            if forecast.demand.shape != expected:
                raise ValueError(f"demand forecast has shape {forecast.demand.shape}, this trace needs {expected}")
        else:
            forecast = DemandForecast.of(
                make_predictor(predictor if predictor is not None else "history", trace), trace
            )
        predictor_name = forecast.predictor
        cache = ExpertFlowCache(
            trace.num_experts,
            num_layers,
            capacity,
            budget_mode=budget_mode,
            min_per_layer=trace.top_k,
            bytes_per_expert=bytes_per_expert or 0,
            **_expertflow_options(policy_kwargs),
        )
        _replay_expertflow(trace, cache, forecast.demand)
        stats = cache.stats
        eviction = f"expertflow ({predictor_name} predictor) " + (
            "per layer" if budget_mode == "per-layer" else "over (layer, expert) keys"
        )
        total_slots = cache.num_slots
    elif budget_mode == "per-layer":
        stats = [
            _replay_layer(trace, layer, policy, capacity, bytes_per_expert or 0, policy_kwargs, warmup_steps)
            for layer in range(num_layers)
        ]
        eviction = f"{policy} per layer"
        total_slots = capacity * num_layers
    else:
        if policy_kwargs:
            raise ValueError(
                f"global budget mode takes no policy arguments for {policy!r}, got {sorted(policy_kwargs)}"
            )
        pool_args = (trace.num_experts, num_layers, capacity * num_layers, trace.top_k, bytes_per_expert or 0)
        if policy == "belady":
            pool: _GlobalLRU = _GlobalBelady(*pool_args, future=global_passes(trace, pool_args[2], trace.top_k))
        else:
            pool = _GlobalLRU(*pool_args)
        for step_ids in trace.iter_steps():
            for layer in range(num_layers):
                pool.stats[layer].steps += 1
                for needed in _step_passes(step_ids[:, layer, :], pool.max_pass_experts(layer)):
                    pool.admit(layer, needed)
        stats = pool.stats
        eviction = f"global {pool.rule} over (layer, expert) keys"
        total_slots = pool.num_slots
    hits = sum(s.hits for s in stats)
    misses = sum(s.misses for s in stats)
    loads = sum(s.loads for s in stats)
    prefetch_loads = sum(getattr(s, "prefetch_loads", 0) for s in stats)
    bytes_loaded = None if bytes_per_expert is None else sum(s.bytes_loaded for s in stats)
    return SimulationResult(
        policy=policy,
        budget_mode=budget_mode,
        eviction=eviction,
        capacity=capacity,
        total_slots=total_slots,
        num_layers=num_layers,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        num_steps=trace.num_steps,
        num_tokens=trace.num_tokens,
        passes=sum(s.passes for s in stats),
        hits=hits,
        demand_misses=misses,
        prefetch_loads=prefetch_loads,
        prefetch_hits=sum(getattr(s, "prefetch_hits", 0) for s in stats),
        loads=loads,
        evictions=sum(s.evictions for s in stats),
        hit_rate=_ratio(hits, hits + misses),
        bytes_per_expert=bytes_per_expert,
        bytes_loaded=bytes_loaded,
        link_gbps=link_gbps,
        projected_stall_s=None if bytes_per_expert is None else misses * bytes_per_expert / (link_gbps * 1e9),
        per_layer=[
            {"layer": name, **s.as_dict(), "hit_rate": _ratio(s.hits, s.hits + s.misses)}
            for name, s in zip(trace.layer_names, stats, strict=True)
        ],
        predictor=predictor_name,
    )


def layer_passes(trace: RoutingTrace, layer: int, capacity: int) -> list[list[int]]:
    """The expert sets one layer admits, pass by pass, with ``capacity`` slots (sorted ids, as the live cache)."""
    return [needed for step_ids in trace.iter_steps() for needed in _step_passes(step_ids[:, layer, :], capacity)]


def _step_passes(rows: np.ndarray, capacity: int) -> list[list[int]]:
    # rows: [step_tokens, top_k]. Mirrors ExpertSlotCache.run: one pass if the union fits, else planned passes.
    needed = np.unique(rows).tolist()
    if len(needed) <= capacity:
        return [needed]
    return [np.unique(rows[index]).tolist() for index in plan_passes(rows, capacity)]


def _replay_layer(
    trace: RoutingTrace,
    layer: int,
    policy_name: str,
    capacity: int,
    bytes_per_expert: int,
    policy_kwargs: Mapping[str, Any] | None,
    warmup_steps: int | None,
) -> LayerCacheStats:
    passes = layer_passes(trace, layer, capacity)
    kwargs = dict(policy_kwargs or {})
    if POLICIES[policy_name] is BeladyPolicy:
        kwargs.setdefault("future", passes)
    policy = make_policy(policy_name, **kwargs)
    if isinstance(policy, StaticPolicy):
        warm_end = trace.num_tokens if warmup_steps is None else _first_steps_end(trace, warmup_steps)
        policy.warm_up(np.bincount(trace.topk_ids[:warm_end, layer, :].ravel(), minlength=trace.num_experts).tolist())
    slot_map = SlotMap(trace.num_experts, capacity, policy, bytes_per_expert)
    slot_map.stats.steps = trace.num_steps
    for index, needed in enumerate(passes):
        policy.on_pass_begin(index)
        slot_map.admit(needed)
        slot_map.stats.passes += 1
    return slot_map.stats


class _GlobalLRU:
    """One slot pool over ``(layer, expert)`` keys; the least recently used key leaves first."""

    rule = "LRU"

    def __init__(self, num_experts: int, num_layers: int, num_slots: int, min_per_layer: int, bytes_per_expert: int):
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.min_per_layer = min_per_layer
        self.bytes_per_expert = bytes_per_expert
        self.stats = [LayerCacheStats() for _ in range(num_layers)]
        self._recency: OrderedDict[tuple[int, int], None] = OrderedDict()  # oldest first
        self._resident_count = [0] * num_layers

    def max_pass_experts(self, layer: int) -> int:
        # Every other layer may keep its floor of min_per_layer; the rest of the pool is this pass's.
        return min(self.num_experts, self.num_slots - (len(self.stats) - 1) * self.min_per_layer)

    def admit(self, layer: int, needed: list[int]) -> None:
        stats = self.stats[layer]
        self._begin_pass()
        stats.passes += 1
        missing = []
        for expert in needed:
            key = (layer, expert)
            if key in self._recency:
                stats.hits += 1
                self._recency.move_to_end(key)
            else:
                stats.misses += 1
                missing.append(key)
        protected = {(layer, e) for e in needed}
        for key in missing:
            if len(self._recency) >= self.num_slots:
                victim = self._victim(layer, protected)
                del self._recency[victim]
                self._resident_count[victim[0]] -= 1
                self.stats[victim[0]].evictions += 1
            self._recency[key] = None
            self._resident_count[layer] += 1
            stats.loads += 1
            stats.bytes_loaded += self.bytes_per_expert

    def _begin_pass(self) -> None:
        """Hook for offline rules that need the admission's index."""

    def _evictable(self, layer: int, protected: set[tuple[int, int]]) -> list[tuple[int, int]]:
        # Oldest first. A layer may evict its own keys below the floor, never another layer's.
        return [
            key
            for key in self._recency
            if key not in protected and (key[0] == layer or self._resident_count[key[0]] > self.min_per_layer)
        ]

    def _victim(self, layer: int, protected: set[tuple[int, int]]) -> tuple[int, int]:
        for key in self._recency:
            owner = key[0]
            if key not in protected and (owner == layer or self._resident_count[owner] > self.min_per_layer):
                return key
        raise RuntimeError(f"global pool of {self.num_slots} slots has no evictable expert for layer {layer}")


class _GlobalBelady(_GlobalLRU):
    """The pool of ``_GlobalLRU`` under Belady's rule: evict the key whose next use is farthest.

    ``future[i]`` lists the keys the ``i``-th admission (over all layers, in execution
    order) needs. Without the per-layer floor this is the offline optimum for the pooled
    budget, as ``BeladyPolicy`` is for one layer; the floor can force a nearer victim, so
    with it the result is a reference point, not a proven bound.
    """

    rule = "Belady"

    def __init__(self, *args: Any, future: list[list[tuple[int, int]]]) -> None:
        super().__init__(*args)
        self._uses: dict[tuple[int, int], list[int]] = {}
        for index, keys in enumerate(future):
            for key in keys:
                self._uses.setdefault(key, []).append(index)
        self._future_len = len(future)
        self._pass = -1

    def _begin_pass(self) -> None:
        self._pass += 1
        if self._pass >= self._future_len:
            raise RuntimeError(f"admission {self._pass} is past belady's known future of {self._future_len}")

    def _next_use(self, key: tuple[int, int]) -> float:
        uses = self._uses.get(key, [])
        at = bisect.bisect_right(uses, self._pass)
        return uses[at] if at < len(uses) else math.inf

    def _victim(self, layer: int, protected: set[tuple[int, int]]) -> tuple[int, int]:
        candidates = self._evictable(layer, protected)
        if not candidates:
            raise RuntimeError(f"global pool of {self.num_slots} slots has no evictable expert for layer {layer}")
        return max(candidates, key=lambda key: (self._next_use(key), -key[0], -key[1]))


def global_passes(trace: RoutingTrace, num_slots: int, min_per_layer: int) -> list[list[tuple[int, int]]]:
    """The ``(layer, expert)`` sets a global pool of ``num_slots`` admits, in execution order."""
    num_layers = trace.num_layers
    max_pass = min(trace.num_experts, num_slots - (num_layers - 1) * min_per_layer)
    return [
        [(layer, expert) for expert in needed]
        for step_ids in trace.iter_steps()
        for layer in range(num_layers)
        for needed in _step_passes(step_ids[:, layer, :], max_pass)
    ]


def _replay_expertflow(trace: RoutingTrace, cache: ExpertFlowCache, demand: np.ndarray) -> None:
    # demand[i]: step i's forecast, made before step i from earlier steps only (DemandForecast).
    for index, step_ids in enumerate(trace.iter_steps()):
        cache.begin_step(demand[index])
        for layer in range(trace.num_layers):
            cache.stats[layer].steps += 1
            passes = _step_passes(step_ids[:, layer, :], cache.max_pass_experts(layer))
            for pass_index, needed in enumerate(passes):
                cache.admit(layer, needed, passes[pass_index + 1 :])


def _expertflow_options(policy_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(policy_kwargs or {})
    unknown = sorted(set(options) - set(EXPERTFLOW_OPTIONS))
    if unknown:
        raise ValueError(f"unknown expertflow option(s) {unknown}; valid options are {list(EXPERTFLOW_OPTIONS)}")
    return options


def _validate(
    trace: RoutingTrace,
    policy: str,
    capacity: int,
    budget_mode: str,
    link_gbps: float,
    warmup_steps: int | None,
) -> None:
    if budget_mode not in BUDGET_MODES:
        raise ValueError(f"unknown budget mode {budget_mode!r}; valid modes are {list(BUDGET_MODES)}")
    if policy not in SIM_POLICIES:
        raise ValueError(
            f"unknown replacement policy {policy!r}; valid policies are {sorted(POLICIES)}, and {EXPERTFLOW!r} "
            f"(predictive prefetch)"
        )
    if budget_mode == "global" and policy not in GLOBAL_POLICIES:
        raise ValueError(
            f"policy {policy!r} is not available in global budget mode yet; valid policies there are "
            f"{list(GLOBAL_POLICIES)}, or use budget mode 'per-layer' for {list(SIM_POLICIES)}"
        )
    if not trace.top_k <= capacity <= trace.num_experts:
        raise ValueError(
            f"capacity must be in {trace.top_k}..{trace.num_experts} slots per layer (top_k..num_experts of this "
            f"trace), got {capacity}"
        )
    if not link_gbps > 0:
        raise ValueError(f"link bandwidth must be a positive number of GB/s, got {link_gbps}")
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0 or None (whole trace), got {warmup_steps}")


def _first_steps_end(trace: RoutingTrace, num_steps: int) -> int:
    """Token index where the first ``num_steps`` steps end."""
    bounds = trace.step_bounds()
    if num_steps == 0:
        return 0
    return bounds[num_steps - 1][1] if num_steps <= len(bounds) else trace.num_tokens


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0
