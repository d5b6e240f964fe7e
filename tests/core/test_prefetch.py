"""Prefetch into the per-layer slot cache, and the global expert pool against the simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.test_simulate import make_trace
from tests.core.test_slot_cache import make_store, reference_moe, slot_kernel
from vllm_expertflow.core import ExpertSlotCache, ExpertStore, LRUPolicy
from vllm_expertflow.core.expert_pool import ExpertPool
from vllm_expertflow.core.predictors import DemandForecast, multi_hot
from vllm_expertflow.core.simulate import simulate


def test_prefetched_experts_count_apart_and_hit_once_needed():
    store = make_store()
    cache = ExpertSlotCache(store, 3, LRUPolicy())
    assert cache.prefetch([4, 5]) == 2
    stats = cache.stats
    assert (stats.prefetch_loads, stats.loads, stats.hits, stats.misses) == (2, 2, 0, 0)
    x, w = torch.randn(2, 4), torch.rand(2, 2)
    ids = torch.tensor([[4, 1], [5, 4]])
    out = cache.run(x, w, ids, slot_kernel)
    torch.testing.assert_close(out, reference_moe(store, x, w, ids), rtol=0, atol=0)
    # 4 and 5 were prefetched and needed: hits and prefetch hits; 1 was a demand load
    assert (stats.hits, stats.misses, stats.prefetch_hits, stats.loads) == (2, 1, 2, 3)
    cache.run(x, w, ids, slot_kernel)
    assert stats.prefetch_hits == 2  # a prefetch hits once, later uses are plain hits
    assert stats.loads - stats.prefetch_loads == stats.misses  # demand loads are the misses


def test_prefetch_respects_protected_and_its_own_experts_and_the_slot_count():
    store = make_store()
    cache = ExpertSlotCache(store, 3, LRUPolicy())
    cache.ensure_resident([0, 1, 2])
    # 0 and 1 belong to a running pass: only 2 may go, so only one of 5, 6, 7 comes in
    assert cache.prefetch([5, 6, 7, 3], protected=[0, 1]) == 1
    assert set(cache.map.resident()) == {0, 1, 5}
    # more wanted experts than slots: only the first num_slots are considered, none evicts another
    assert cache.prefetch([6, 7, 3, 4, 0]) == 3
    assert set(cache.map.resident()) == {6, 7, 3}
    assert cache.stats.prefetch_hits == 0


def test_wasted_prefetch_is_corrected_by_the_run_and_never_counted_as_a_hit():
    store = make_store()
    cache = ExpertSlotCache(store, 2, LRUPolicy())
    cache.prefetch([6, 7])  # wrong prediction
    x, w = torch.randn(1, 4), torch.rand(1, 2)
    ids = torch.tensor([[0, 1]])
    out = cache.run(x, w, ids, slot_kernel)
    torch.testing.assert_close(out, reference_moe(store, x, w, ids), rtol=0, atol=0)
    stats = cache.stats
    assert (stats.prefetch_loads, stats.prefetch_hits, stats.misses, stats.evictions) == (2, 0, 2, 2)
    cache.prefetch([6])  # evicts an expert the last run used; the next run loads it back
    cache.run(x, w, ids, slot_kernel)
    assert stats.misses == 3 and stats.prefetch_hits == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), num_slots=st.integers(2, 8))
def test_random_prefetches_never_change_outputs(seed, num_slots):
    rng = np.random.default_rng(seed)
    store = make_store()
    cache = ExpertSlotCache(store, num_slots, LRUPolicy())
    for _ in range(8):
        cache.prefetch(rng.permutation(8)[: rng.integers(0, 9)].tolist())
        tokens = int(rng.integers(1, 6))
        ids = torch.tensor(np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)]))
        x, w = torch.randn(tokens, 4), torch.rand(tokens, 2)
        torch.testing.assert_close(cache.run(x, w, ids, slot_kernel), reference_moe(store, x, w, ids), rtol=0, atol=0)
        for expert, slot in cache.map.resident().items():
            for slot_buffer, source in zip(cache.slots, store.expert(expert), strict=True):
                assert torch.equal(slot_buffer[slot], source)
    stats = cache.stats
    assert stats.prefetch_hits <= stats.prefetch_loads
    assert stats.loads == stats.misses + stats.prefetch_loads


# --- the global pool --------------------------------------------------------------------------


def make_pool(num_layers: int, num_experts: int, slots_per_layer: int, top_k: int, **options):
    stores = [make_store(num_experts, seed=layer) for layer in range(num_layers)]
    pool = ExpertPool(stores[0], num_layers, slots_per_layer, top_k, **options)
    return pool, stores, [pool.add_layer(layer, store) for layer, store in enumerate(stores)]


def usage_forecast(trace) -> DemandForecast:
    """The live pool's forecast without a predictor: the previous step's per-layer usage (zeros first)."""
    used = [multi_hot(step, trace.num_experts).max(axis=0) for step in trace.iter_steps()]
    demand = np.stack([np.zeros_like(used[0])] + used[:-1]).astype(np.float64)
    return DemandForecast("usage", demand)


@pytest.mark.parametrize("seed, slots_per_layer, max_tokens", [(0, 2, 4), (1, 3, 6), (2, 5, 3), (3, 2, 1)])
def test_live_pool_loads_equal_the_simulators_and_outputs_are_exact(seed, slots_per_layer, max_tokens):
    num_layers, num_experts, top_k = 3, 8, 2
    trace = make_trace(seed, num_steps=25, max_tokens=max_tokens, num_experts=num_experts, top_k=top_k)
    pool, stores, layers = make_pool(num_layers, num_experts, slots_per_layer, top_k)
    for step_ids in trace.iter_steps():
        pool.begin_step()
        for layer, cache in enumerate(layers):
            ids = torch.from_numpy(step_ids[:, layer, :].astype(np.int64))
            x, w = torch.randn(len(ids), 4), torch.rand(len(ids), top_k)
            out = cache.run(x, w, ids, slot_kernel)
            torch.testing.assert_close(out, reference_moe(stores[layer], x, w, ids), rtol=0, atol=0)
        # every resident key's pool slot holds that layer's expert
        for (layer, expert), slot in pool._slot_of.items():
            for slot_buffer, source in zip(pool.slots, stores[layer].expert(expert), strict=True):
                assert torch.equal(slot_buffer[slot], source)
        assert len(pool._slot_of) <= pool.num_slots == slots_per_layer * num_layers
    replay = simulate(
        trace,
        "expertflow",
        slots_per_layer,
        budget_mode="global",
        predictor=usage_forecast(trace),
        policy_kwargs={"prefetch": False},
    )
    live = [s.as_dict() for s in pool.stats]
    for ours, simulated in zip(live, replay.per_layer, strict=True):
        for key in ("hits", "misses", "loads", "evictions", "passes", "steps", "prefetch_loads"):
            assert ours[key] == simulated[key], key
    assert sum(s["loads"] for s in live) > 0


def test_pool_with_forecast_prefetch_matches_the_simulator_too():
    trace = make_trace(5, num_steps=20, max_tokens=2, num_experts=8, top_k=2)
    forecast = DemandForecast(
        "perfect", np.stack([multi_hot(step, 8).max(axis=0) for step in trace.iter_steps()]).astype(np.float64)
    )
    pool, stores, layers = make_pool(3, 8, 3, 2, prefetch=True)
    for index, step_ids in enumerate(trace.iter_steps()):
        pool.begin_step(forecast.demand[index])
        for layer, cache in enumerate(layers):
            ids = torch.from_numpy(step_ids[:, layer, :].astype(np.int64))
            x, w = torch.randn(len(ids), 4), torch.rand(len(ids), 2)
            torch.testing.assert_close(
                cache.run(x, w, ids, slot_kernel), reference_moe(stores[layer], x, w, ids), rtol=0, atol=0
            )
    replay = simulate(trace, "expertflow", 3, budget_mode="global", predictor=forecast)
    assert replay.prefetch_loads > 0
    assert sum(s.prefetch_loads for s in pool.stats) == replay.prefetch_loads
    assert sum(s.prefetch_hits for s in pool.stats) == replay.prefetch_hits
    assert sum(s.loads for s in pool.stats) == replay.loads


def test_pool_mid_step_prefetch_protects_the_running_layer_and_stays_exact():
    pool, stores, layers = make_pool(2, 8, 3, 2)  # 6 slots; a pass may hold 6 - 2 (layer 1's floor)
    ids0 = torch.tensor([[0, 1], [2, 3]])
    x, w = torch.randn(2, 4), torch.rand(2, 2)
    pool.begin_step()
    out = layers[0].run(x, w, ids0, slot_kernel)
    # layer 0 holds 4 slots; a lookahead prefetch for layer 1 gets the 2 free ones and may not evict
    # the running layer's experts for the third
    protected = [(0, e) for e in range(4)]
    assert layers[1].prefetch([5, 6, 7], protected=protected, demand=np.ones(8)) == 2
    assert pool.policy.resident(0) == {0, 1, 2, 3}
    torch.testing.assert_close(out, reference_moe(stores[0], x, w, ids0), rtol=0, atol=0)
    ids1 = torch.tensor([[5, 7]])
    out = layers[1].run(x[:1], w[:1], ids1, slot_kernel)  # 7 was mispredicted away: loaded on demand
    torch.testing.assert_close(out, reference_moe(stores[1], x[:1], w[:1], ids1), rtol=0, atol=0)
    assert (pool.stats[1].prefetch_loads, pool.stats[1].prefetch_hits, pool.stats[1].misses) == (2, 1, 1)


def test_pool_rejects_layers_of_another_shape():
    pool, _, _ = make_pool(2, 8, 2, 2)
    other = ExpertStore([torch.zeros(8, 6, 5), torch.zeros(8, 4, 3)])
    with pytest.raises(ValueError, match="same expert weight shapes"):
        pool.add_layer(1, other)
    with pytest.raises(ValueError, match=r"layer index 2 out of range 0\.\.1"):
        pool.add_layer(2, make_store())
