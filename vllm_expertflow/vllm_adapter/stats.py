"""Cache statistics: per-engine groups of layer caches, their summary, and how they leave the worker.

A group is the offload state of one engine's worker: created when the worker starts loading
its model (``building_model``), kept on that worker object, and released with it; a
process that builds several engines keeps no state of the earlier ones.

Offline, ``get_expert_cache_stats(llm)`` asks the workers over ``collective_rpc``. For
``/metrics``, each worker's snapshot thread writes its counters to a JSON file in a
directory the front end chose (``VLLM_EXPERTFLOW_STATS_DIR``, inherited by the engine
processes it spawns), and a Prometheus collector in the front end reads them at scrape
time: the counters never cross the engine's own message path, which has no field for them.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from vllm_expertflow.config import ExpertOffloadConfig
from vllm_expertflow.core import ExpertSlotCache
from vllm_expertflow.core.expert_pool import ExpertPool, PooledLayerCache
from vllm_expertflow.core.grouping import ExpertSignature
from vllm_expertflow.core.predictors import LookaheadPredictor, RoutingPathPredictor
from vllm_expertflow.vllm_adapter.routing import RoutingRecorder
from vllm_expertflow.vllm_adapter.vllm_api import hooks_summary, init_logger, worker_additional_config

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log config applies

STATS_DIR_ENV = "VLLM_EXPERTFLOW_STATS_DIR"
# loads count every copy into a slot; demand loads are loads - prefetch_loads (= misses when exact).
TOTAL_KEYS = ("hits", "misses", "loads", "bytes_loaded", "evictions", "steps", "passes", "prefetch_loads",
              "prefetch_hits")
SNAPSHOT_INTERVAL_S = 0.2


class ExpertCacheGroup:
    """The offloaded MoE layers of one engine's worker, and the config they run under."""

    def __init__(self, offload: ExpertOffloadConfig) -> None:
        self.offload = offload
        self.layer_names: list[str] = []
        self.caches: dict[str, ExpertSlotCache | PooledLayerCache] = {}
        self.top_k = 0
        self.recorder: RoutingRecorder | None = None
        self.trace_dir = offload.trace_dir
        self.scheduler_wants_signatures = False
        self.pool: ExpertPool | None = None  # policy expertflow: one slot pool for every layer
        self.prefetch = offload.prefetch
        self.lookahead: LookaheadPredictor | None = None  # prefetch lookahead, set once the model is loaded
        self.predictor: RoutingPathPredictor | None = None  # prefetch predictor, set once the model is loaded
        self.step_tokens: int | None = None  # tokens of the running engine step (None outside one)
        # For the scheduler's prompt predictions: (token_experts [vocab, L, K], num_experts), sent once.
        self.prompt_table: tuple[np.ndarray, int] | None = None
        self.prompt_table_sent = False
        self._writer: _SnapshotWriter | None = None
        self._size_checked = False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        if self.recorder is not None:
            self.recorder.close()

    def check_planned_size(self, bytes_per_expert: int) -> None:
        """Warn once if the loaded experts are larger than the front end planned the cache_gb budget with."""
        budget_gb, slots = self.offload.cache_gb, self.offload.slots_per_layer
        if budget_gb is None or self._size_checked:
            return
        self._size_checked = True
        used = slots * bytes_per_expert * self.num_layers
        if used > budget_gb * 1024**3:
            logger.warning(
                "expert slots take %d bytes (%d slots x %d MoE layers x %d bytes per loaded expert), above "
                "cache_gb=%s: the kernel pads experts more than startup.bytes_per_expert assumed",
                used, slots, self.num_layers, bytes_per_expert, budget_gb,
            )

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def add_layer(self, name: str) -> None:
        if name not in self.layer_names:
            self.layer_names.append(name)

    def add_cache(self, name: str, cache: ExpertSlotCache | PooledLayerCache, *, top_k: int) -> None:
        self.caches[name] = cache
        self.top_k = top_k
        if len(self.caches) == self.num_layers:
            logger.info("%s", self.summary_line())
            # Always: every step's composition (tokens, distinct experts per layer) is a statistic.
            if self.recorder is None:
                self.recorder = RoutingRecorder(
                    self.layer_names, cache.store.num_experts, top_k, self.trace_dir, cache.store.bytes_per_expert
                )
            stats_dir = os.environ.get(STATS_DIR_ENV)
            if stats_dir and self._writer is None:
                self._writer = _SnapshotWriter(self, stats_dir)

    def summary_line(self) -> str:
        first = next(iter(self.caches.values()))
        num_experts = first.store.num_experts
        per_expert = first.store.bytes_per_expert
        # Pooled layers share one set of buffers: count each buffer once.
        with_offload = sum({id(c.slots[0]): c.device_bytes for c in self.caches.values()}.values())
        without = sum(c.store.num_experts * c.store.bytes_per_expert for c in self.caches.values())
        slots = sorted({c.num_slots for c in self.caches.values()})
        pooled = " (one pool shared by all layers)" if self.pool is not None else ""
        return (
            f"expert offload: {self.num_layers} MoE layers, {num_experts} experts per layer (top_k {self.top_k}), "
            f"{per_expert} bytes per expert, {'/'.join(map(str, slots))} slots per layer{pooled}, "
            f"device bytes for experts {with_offload} with offload vs {without} without "
            f"({with_offload / max(without, 1):.1%}); policy {first.policy_name}, prefetch {self.prefetch}; "
            f"{hooks_summary()}"
        )

    def memory(self) -> dict[str, int]:
        """Expert bytes per tier: the device's slot buffers, the host stores, and the budget the slots were sized by.

        A shared pool's buffers and a store's tensors are counted once. ``budget_bytes`` is
        ``cache_gb`` when the user gave it, else the slots asked for (cache_slots x MoE layers).
        """
        device = {s.data_ptr(): s.numel() * s.element_size() for c in self.caches.values() for s in c.slots}
        host = {w.data_ptr(): w.numel() * w.element_size() for c in self.caches.values() for w in c.store.weights}
        all_experts = sum(c.store.num_experts * c.store.bytes_per_expert for c in self.caches.values())
        if self.offload.cache_gb is not None:
            budget = int(self.offload.cache_gb * 1024**3)
        else:
            budget = sum(self.offload.slots_per_layer * c.store.bytes_per_expert for c in self.caches.values())
        return {"device_expert_bytes": sum(device.values()), "host_expert_bytes": sum(host.values()),
                "all_expert_bytes": all_experts, "budget_bytes": budget}

    def resident_signature(self) -> ExpertSignature | None:
        """The experts resident in every layer's slots now, in layer order; None before the caches exist."""
        if len(self.caches) != self.num_layers or not self.caches:
            return None
        first = next(iter(self.caches.values()))
        mask = np.zeros((self.num_layers, first.store.num_experts), dtype=np.bool_)
        for index, name in enumerate(self.layer_names):
            mask[index, list(self.caches[name].resident_experts())] = True
        return ExpertSignature.from_mask(mask)

    def stats(self) -> dict[str, Any]:
        layers = []
        for name in self.layer_names:
            cache = self.caches.get(name)
            if cache is None:
                continue
            layers.append({"layer": name, "slots": cache.num_slots, **cache.stats.as_dict()})
        totals = {key: sum(layer[key] for layer in layers) for key in TOTAL_KEYS}
        needed = totals["hits"] + totals["misses"]
        totals["hit_rate"] = totals["hits"] / needed if needed else 0.0
        return {**totals, "layers": layers, "memory": self.memory()}


# The group of the model a worker is loading now; layers built outside a load (none do) run plain.
_group_being_built: contextvars.ContextVar[ExpertCacheGroup | None] = contextvars.ContextVar(
    "expertflow_group_being_built", default=None
)
_WORKER_GROUP_ATTR = "_expertflow_group"


@contextlib.contextmanager
def building_model(worker: Any) -> Iterator[None]:
    """Around a worker's ``load_model``: the offloaded layers built inside join one new group, kept on the worker."""
    offload = ExpertOffloadConfig.from_serialized(worker_additional_config(worker))
    group = ExpertCacheGroup(offload) if offload.enabled and offload.slots_per_layer else None
    token = _group_being_built.set(group)
    try:
        yield
    finally:
        _group_being_built.reset(token)
    if group is not None and group.caches:
        worker.__dict__[_WORKER_GROUP_ATTR] = group


def release_worker_group(worker: Any) -> None:
    """At the worker's shutdown: stop the group's snapshot thread and write its trace; the layers go with the model."""
    group = getattr(worker, "__dict__", {}).pop(_WORKER_GROUP_ATTR, None)
    if group is not None:
        group.close()


def group_being_built() -> ExpertCacheGroup | None:
    return _group_being_built.get()


def group_of_worker(worker: Any) -> ExpertCacheGroup | None:
    return getattr(worker, "__dict__", {}).get(_WORKER_GROUP_ATTR)


def worker_cache_stats(worker: Any) -> dict[str, Any] | None:
    """Installed as ``WorkerBase.expertflow_cache_stats``; runs in the worker process."""
    group = group_of_worker(worker)
    return group.stats() if group is not None else None


def worker_step_records(worker: Any) -> list[dict[str, Any]] | None:
    """Installed as ``WorkerBase.expertflow_step_records``: one dict per engine step (``RoutingRecorder``)."""
    group = group_of_worker(worker)
    if group is None or group.recorder is None:
        return None
    return list(group.recorder.step_records)


def get_step_records(llm: Any) -> list[dict[str, Any]]:
    """Per engine step of an offline ``vllm.LLM`` with offload on: ``tokens``, ``requests``,
    ``prefill_requests``, ``distinct_experts`` (per MoE layer), and how the scheduler composed it:
    ``changed`` (not what FCFS would have run), ``held`` (running requests left out),
    ``fcfs_fallback`` (left as FCFS because a prefill alone overflows the slots).

    Every tensor-parallel rank sees the same steps; the first rank's records are returned.
    """
    per_worker = llm.collective_rpc("expertflow_step_records")
    records = next((r for r in per_worker if r is not None), None)
    if records is None:
        raise RuntimeError("this LLM has no expert cache, so no step records: enable expert offload")
    return records


def summarize_step_records(records: list[dict[str, Any]], slots: int | None = None) -> dict[str, Any]:
    """Totals for a table row: steps, changed and fallback fractions, mean tokens and distinct experts per layer.

    ``slots``: per layer; then also the share of steps whose mean distinct experts per layer exceeds them.
    """
    steps = len(records)
    if not steps:
        return {"steps": 0}
    distinct = np.array([np.mean(r["distinct_experts"]) for r in records])
    summary = {
        "steps": steps,
        "changed_steps": sum(r["changed"] for r in records),
        "changed_fraction": sum(r["changed"] for r in records) / steps,
        "fcfs_fallback_steps": sum(r["fcfs_fallback"] for r in records),
        "tokens_per_step": float(np.mean([r["tokens"] for r in records])),
        "distinct_experts_per_layer": float(distinct.mean()),
        "steps_with_prefill": sum(r["prefill_requests"] > 0 for r in records),
    }
    if slots is not None:
        summary["steps_over_slots"] = int((distinct > slots).sum())
    return summary


def worker_flush_trace(worker: Any) -> bool:
    """Installed as ``WorkerBase.expertflow_flush_trace``: write buffered routing steps to disk."""
    group = group_of_worker(worker)
    if group is None or group.recorder is None or group.recorder.writer is None:
        return False
    group.recorder.close()
    return True


def merge_stats(per_worker: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Sum the stats of several workers (tensor-parallel ranks hold the same layer names)."""
    per_worker = list(per_worker)
    by_layer: dict[str, dict[str, Any]] = {}
    for stats in per_worker:
        for layer in (stats or {}).get("layers", []):
            merged = by_layer.setdefault(layer["layer"], {"layer": layer["layer"], "slots": layer["slots"]})
            for key in TOTAL_KEYS:
                merged[key] = merged.get(key, 0) + layer[key]
    layers = list(by_layer.values())
    totals: dict[str, Any] = {key: sum(layer[key] for layer in layers) for key in TOTAL_KEYS}
    needed = totals["hits"] + totals["misses"]
    totals["hit_rate"] = totals["hits"] / needed if needed else 0.0
    # Each worker holds its own slots and stores (tensor-parallel ranks hold a shard each): bytes add up.
    memories = [stats["memory"] for stats in per_worker if stats and "memory" in stats]
    memory = {key: sum(m[key] for m in memories) for key in memories[0]} if memories else None
    return {**totals, "layers": layers, "memory": memory}


def get_expert_cache_stats(llm: Any) -> dict[str, Any]:
    per_worker = llm.collective_rpc("expertflow_cache_stats")
    if all(stats is None for stats in per_worker):
        raise RuntimeError(
            "this LLM has no expert cache: create it with additional_config={'expert_offload': "
            "{'enabled': True, 'cache_slots': N}} on an MoE model"
        )
    return merge_stats(per_worker)


# --- /metrics ----------------------------------------------------------------------------


def ensure_stats_dir() -> str:
    """Choose the snapshot directory in the front end, before engine processes are spawned."""
    stats_dir = os.environ.get(STATS_DIR_ENV)
    if not stats_dir:
        stats_dir = tempfile.mkdtemp(prefix="vllm-expertflow-stats-")
        os.environ[STATS_DIR_ENV] = stats_dir
        # The front end outlives the engine processes it spawned: it removes what it created.
        atexit.register(shutil.rmtree, stats_dir, ignore_errors=True)
    return stats_dir


class _SnapshotWriter:
    """Writes the group's counters to ``<dir>/<pid>-<n>.json`` off the forward path, while the group lives.

    The thread holds the group weakly: when the engine is deleted the thread ends and its
    file is removed, so neither keeps an old engine's experts or counters.
    """

    _count = 0

    def __init__(self, group: ExpertCacheGroup, stats_dir: str) -> None:
        _SnapshotWriter._count += 1
        self._path = os.path.join(stats_dir, f"{os.getpid()}-{_SnapshotWriter._count}.json")
        self._last: str | None = None
        self._stop = threading.Event()
        group_ref = weakref.ref(group)
        weakref.finalize(group, self._stop.set)
        self.thread = threading.Thread(target=self._loop, args=(group_ref,), name="expertflow-stats", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def _loop(self, group_ref: weakref.ref) -> None:
        while not self._stop.is_set():
            group = group_ref()
            if group is None:
                break
            stats = group.stats()
            del group  # the engine's state is held only while its counters are read
            self.write(stats)
            self._stop.wait(SNAPSHOT_INTERVAL_S)
        with contextlib.suppress(OSError):
            os.remove(self._path)

    def write(self, stats: dict[str, Any]) -> None:
        text = json.dumps(stats)
        if text == self._last:
            return
        tmp = f"{self._path}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self._path)
            self._last = text
        except OSError as exc:  # a vanished temp dir must not take the worker down
            logger.debug("expert cache snapshot not written: %s", exc)


def read_snapshots(stats_dir: str) -> dict[str, Any]:
    snapshots = []
    try:
        names = sorted(os.listdir(stats_dir))
    except OSError:
        names = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(stats_dir, name)) as f:
                snapshots.append(json.load(f))
        except (OSError, ValueError):
            continue  # being replaced right now; the next scrape sees it
    return merge_stats(snapshots)


class ExpertCacheCollector:
    """Prometheus collector: ``vllm_expertflow_cache_*_total`` per MoE layer."""

    METRICS = (
        ("hits", "Experts a step needed that were already resident"),
        ("misses", "Experts a step needed that had to be loaded"),
        ("loads", "Experts copied from host memory into a device slot"),
        ("bytes_loaded", "Bytes copied from host memory into device slots"),
        ("evictions", "Experts evicted from a device slot"),
        ("prefetch_loads", "Experts copied into a slot ahead of use (counted in loads too)"),
        ("prefetch_hits", "Prefetched experts a step needed before they were evicted"),
    )

    def __init__(self, stats_dir: str) -> None:
        self.stats_dir = stats_dir

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = read_snapshots(self.stats_dir)
        for key, doc in self.METRICS:
            family = CounterMetricFamily(f"vllm_expertflow_cache_{key}", doc, labels=["layer"])
            for layer in stats["layers"]:
                family.add_metric([layer["layer"]], layer[key])
            yield family


_collector_registered = False


def register_prometheus_collector(stats_dir: str) -> None:
    global _collector_registered
    if _collector_registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(ExpertCacheCollector(stats_dir))
    _collector_registered = True
