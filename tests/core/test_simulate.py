import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_expertflow.core.expert_store import ExpertStore
from vllm_expertflow.core.policies import POLICIES, LRUPolicy
from vllm_expertflow.core.simulate import _GlobalLRU, layer_passes, simulate
from vllm_expertflow.core.slot_cache import ExpertSlotCache
from vllm_expertflow.core.trace import RoutingTrace, TraceWriter
from vllm_expertflow.simulate import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_trace(
    seed: int, num_steps: int = 20, max_tokens: int = 6, num_experts: int = 8, top_k: int = 2, num_layers: int = 3
) -> RoutingTrace:
    """Random routing with skewed expert popularity, so caches see both hits and misses."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(1.0 / np.arange(1, num_experts + 1))
    popularity /= popularity.sum()
    ids, steps = [], []
    for step in range(num_steps):
        for _ in range(int(rng.integers(1, max_tokens + 1))):
            ids.append([rng.choice(num_experts, top_k, replace=False, p=popularity) for _ in range(num_layers)])
            steps.append(step)
    n = len(steps)
    return RoutingTrace(
        topk_ids=np.asarray(ids, dtype=np.int32).reshape(n, num_layers, top_k),
        step_id=np.asarray(steps, dtype=np.int32),
        request_id=np.asarray([f"r{i % 3}" for i in range(n)]),
        position=np.arange(n, dtype=np.int32),
        num_experts=num_experts,
        top_k=top_k,
        layer_names=[f"layer{i}" for i in range(num_layers)],
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_experts=st.integers(4, 10),
    top_k=st.integers(1, 3),
    capacity_extra=st.integers(0, 4),
    max_tokens=st.integers(1, 5),
)
def test_belady_loads_no_more_than_any_policy(seed, num_experts, top_k, capacity_extra, max_tokens):
    trace = make_trace(seed, num_steps=12, max_tokens=max_tokens, num_experts=num_experts, top_k=top_k)
    capacity = min(top_k + capacity_extra, num_experts)
    belady = simulate(trace, "belady", capacity).loads
    for name in POLICIES:
        assert belady <= simulate(trace, name, capacity).loads, name


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_counts_are_consistent(policy):
    trace = make_trace(1)
    result = simulate(trace, policy, capacity=3, bytes_per_expert=1000, link_gbps=2.0)
    needed = sum(len(p) for layer in range(trace.num_layers) for p in layer_passes(trace, layer, 3))
    assert result.hits + result.demand_misses == needed
    assert result.loads == result.demand_misses  # no policy here prefetches
    assert result.hit_rate == pytest.approx(result.hits / needed)
    assert result.bytes_loaded == 1000 * result.loads
    assert result.projected_stall_s == pytest.approx(result.bytes_loaded / 2e9)
    assert result.loads == sum(row["loads"] for row in result.per_layer)
    assert result.passes == sum(row["passes"] for row in result.per_layer) >= trace.num_steps * trace.num_layers
    assert result.total_slots == 3 * trace.num_layers


def test_full_capacity_loads_each_expert_once():
    trace = make_trace(2)
    result = simulate(trace, "lru", capacity=trace.num_experts)
    distinct = sum(len(np.unique(trace.topk_ids[:, layer])) for layer in range(trace.num_layers))
    assert result.loads == distinct and result.evictions == 0
    assert result.bytes_loaded is None and result.projected_stall_s is None  # no expert size known


def test_static_without_warm_up_is_lru_and_warm_up_helps_on_a_stable_mix():
    trace = make_trace(3, num_steps=40)
    assert simulate(trace, "static", 3, warmup_steps=0).loads == simulate(trace, "lru", 3).loads
    assert simulate(trace, "static", 3).loads <= simulate(trace, "static", 3, warmup_steps=0).loads


def expert_kernel(hidden_states, slot_weights, topk_weights, slot_ids):
    assert bool((slot_ids >= 0).all()), "an expert of the pass was not resident"
    return hidden_states


@pytest.mark.parametrize(("capacity", "max_tokens"), [(3, 6), (5, 2), (2, 8)])
def test_lru_simulation_matches_the_live_cache(capacity, max_tokens):
    trace = make_trace(4, num_steps=25, max_tokens=max_tokens)
    caches = []
    for _ in range(trace.num_layers):
        store = ExpertStore([torch.randn(trace.num_experts, 2, 3), torch.randn(trace.num_experts, 3)])
        caches.append(ExpertSlotCache(store, capacity, LRUPolicy()))
    for step_ids in trace.iter_steps():
        tokens = step_ids.shape[0]
        for layer, cache in enumerate(caches):
            ids = torch.from_numpy(step_ids[:, layer, :].copy())
            cache.run(torch.randn(tokens, 3), torch.ones(tokens, trace.top_k), ids, expert_kernel)

    result = simulate(trace, "lru", capacity, bytes_per_expert=caches[0].store.bytes_per_expert)
    if capacity == 2:  # top_k 2 and up to 8 tokens: steps must run in several passes
        assert result.passes > trace.num_steps * trace.num_layers
    for row, cache in zip(result.per_layer, caches, strict=True):
        live = cache.stats.as_dict()
        assert {k: row[k] for k in live} == live


def test_global_mode_with_one_layer_is_per_layer_lru():
    trace = make_trace(5, num_layers=1)
    per_layer = simulate(trace, "lru", 3)
    pooled = simulate(trace, "lru", 3, budget_mode="global")
    assert (pooled.loads, pooled.hits, pooled.passes) == (per_layer.loads, per_layer.hits, per_layer.passes)
    assert pooled.eviction == "global LRU over (layer, expert) keys"


def test_global_mode_counts_and_floor():
    trace = make_trace(6)
    result = simulate(trace, "lru", 2, budget_mode="global", bytes_per_expert=10)
    assert result.budget_mode == "global" and result.total_slots == 2 * trace.num_layers
    assert result.loads == result.demand_misses == sum(row["loads"] for row in result.per_layer)
    assert result.bytes_loaded == 10 * result.loads

    # Layer 1's expert is the oldest key, but the layer is at its floor of top_k = 1 expert.
    pool = _GlobalLRU(num_experts=8, num_layers=2, num_slots=4, min_per_layer=1, bytes_per_expert=0)
    pool.admit(1, [0])
    pool.admit(0, [0, 1, 2])
    assert pool.max_pass_experts(0) == 3
    pool.admit(0, [3, 4, 5])
    assert pool.stats[1].evictions == 0 and pool.stats[0].evictions == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "mru", "capacity": 3}, r"unknown replacement policy 'mru'; valid policies are \['belady'"),
        ({"policy": "lru", "capacity": 1}, "capacity must be in 2..8"),
        ({"policy": "lru", "capacity": 9}, "capacity must be in 2..8"),
        ({"policy": "lru", "capacity": 3, "budget_mode": "shared"}, r"valid modes are \['per-layer', 'global'\]"),
        (
            {"policy": "lfu", "capacity": 3, "budget_mode": "global"},
            r"valid policies there are \['lru', 'belady', 'expertflow'\]",
        ),
        ({"policy": "lru", "capacity": 3, "link_gbps": 0}, "positive number of GB/s"),
    ],
)
def test_bad_arguments_name_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(make_trace(7, num_steps=2), **kwargs)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "vllm_expertflow.simulate", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)


def test_cli_prints_json(tmp_path):
    trace = make_trace(8)
    with TraceWriter(tmp_path / "trace", 8, 2, trace.layer_names, tokens_per_chunk=10, bytes_per_expert=2048) as w:
        for start, end in trace.step_bounds():
            w.record_step(
                trace.step_id[start], trace.request_id[start:end], trace.position[start:end], trace.topk_ids[start:end]
            )

    done = run_cli("--trace", str(tmp_path / "trace"), "--policy", "lru", "--capacity", "3", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("policy", "capacity", "loads", "demand_misses", "hit_rate", "bytes_loaded", "projected_stall_s"):
        assert key in report
    assert report["loads"] == simulate(trace, "lru", 3).loads
    assert report["bytes_loaded"] == 2048 * report["loads"]  # expert size from the trace's metadata


def test_cli_errors_exit_non_zero_and_name_valid_values(tmp_path, capsys):
    # In-process: a subprocess per case would spend seconds importing torch.
    assert cli_main(["--trace", str(tmp_path / "nope"), "--policy", "lru", "--capacity", "3"]) == 2
    assert "trace not found" in capsys.readouterr().err
    with TraceWriter(tmp_path / "trace", 8, 2, 1) as w:
        w.record_step(0, ["a"], [0], np.array([[[0, 1]]]))
    assert cli_main(["--trace", str(tmp_path / "trace"), "--policy", "mru", "--capacity", "3", "--json"]) == 2
    captured = capsys.readouterr()
    assert "valid policies are ['belady', 'lfru', 'lfu', 'lru', 'static']" in captured.err and not captured.out
    assert cli_main(["--trace", str(tmp_path / "trace"), "--policy", "lru", "--capacity", "9"]) == 2
    assert "capacity must be in 2..8" in capsys.readouterr().err
    assert cli_main(["--trace", str(tmp_path / "trace"), "--policy", "lru", "--capacity", "2"]) == 0
    assert "hit_rate" in capsys.readouterr().out
