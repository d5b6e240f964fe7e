"""Lossy miss policies: demand counted once, the global pool runs them too, and reroute's margin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.core.test_prefetch import make_pool
from tests.core.test_slot_cache import make_store, reference_moe, slot_kernel
from vllm_expertflow.core import ExpertSlotCache, LRUPolicy
from vllm_expertflow.core.miss_policies import reroute

MODES = ["exact", "skip", "substitute", "reroute"]


def run_step(cache, miss_policy, x, weights, ids, scores, margin=1.0):
    if miss_policy == "exact":
        return cache.run(x, weights, ids, slot_kernel)
    return cache.run_lossy(x, weights, ids, slot_kernel, miss_policy, router_scores=scores, reroute_margin=margin)


def workload(num_steps=30, num_experts=8, top_k=2, tokens=2, seed=0):
    """Steps of ``tokens`` tokens: every step's experts fit 4 slots, so an exact step is one pass."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(num_steps):
        scores = torch.from_numpy(rng.normal(size=(tokens, num_experts))).float()
        ids = torch.topk(scores, top_k, dim=1).indices
        weights = torch.softmax(torch.gather(scores, 1, ids), dim=1)
        steps.append((torch.from_numpy(rng.normal(size=(tokens, 4))).float(), weights, ids, scores))
    return steps


def demand(steps) -> int:
    return sum(len(torch.unique(ids)) for _, _, ids, _ in steps)


@pytest.mark.parametrize("miss_policy", MODES)
def test_hits_plus_misses_equal_the_demand_per_layer(miss_policy):
    steps = workload()
    cache = ExpertSlotCache(make_store(), 4, LRUPolicy())
    for x, w, ids, scores in steps:
        run_step(cache, miss_policy, x, w, ids, scores)
    assert cache.stats.hits + cache.stats.misses == demand(steps)
    assert cache.stats.steps == len(steps)
    if miss_policy == "exact":
        assert cache.stats.misses == cache.stats.loads  # every miss a demand load


@pytest.mark.parametrize("miss_policy", MODES)
def test_hits_plus_misses_equal_the_demand_in_the_global_pool(miss_policy):
    layers = 2
    steps = workload(num_steps=20, tokens=2, seed=1)  # at most 4 experts: one pass
    pool, stores, caches = make_pool(layers, 8, 3, 2)
    for x, w, ids, scores in steps:
        pool.begin_step()
        for layer, cache in enumerate(caches):
            out = run_step(cache, miss_policy, x, w, ids, scores)
            if miss_policy == "exact":
                torch.testing.assert_close(out, reference_moe(stores[layer], x, w, ids))
    for cache in caches:
        assert cache.stats.hits + cache.stats.misses == demand(steps)


def test_lossy_hit_rate_no_longer_counts_dropped_experts_twice():
    cache = ExpertSlotCache(make_store(), 2, LRUPolicy())
    cache.ensure_resident([0, 1])
    before = cache.stats.hits, cache.stats.misses
    # 0 resident (hit); 5 missing (miss, dropped); 2, 3 missing for the orphan token (misses, loaded)
    cache.run_lossy(torch.randn(2, 4), torch.full((2, 2), 0.5), torch.tensor([[0, 5], [2, 3]]), slot_kernel, "skip")
    assert (cache.stats.hits - before[0], cache.stats.misses - before[1]) == (1, 3)


@pytest.mark.parametrize("miss_policy", ["skip", "substitute"])
def test_pool_runs_skip_and_substitute_on_resident_experts(miss_policy):
    pool, stores, caches = make_pool(2, 8, 3, 2)
    pool.begin_step()
    caches[0].run(torch.randn(1, 4), torch.ones(1, 2), torch.tensor([[0, 1]]), slot_kernel)  # 0, 1 resident
    ids = torch.tensor([[0, 5], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    scores = torch.tensor([[9.0, 3.0, 0, 0, 0, 8.0, 0, 0], [5.0, 6.0, 0, 0, 0, 0, 0, 0]])
    x = torch.randn(2, 4)
    loads = caches[0].stats.loads
    out = caches[0].run_lossy(x, weights, ids, slot_kernel, miss_policy, router_scores=scores)
    if miss_policy == "skip":  # token 0 keeps expert 0 with all of its weight
        expected0 = reference_moe(stores[0], x[:1], torch.tensor([[1.0]]), torch.tensor([[0]]))
    else:  # expert 5 replaced by the best-scored resident expert the token does not use: 1
        expected0 = reference_moe(stores[0], x[:1], weights[:1], torch.tensor([[0, 1]]))
    torch.testing.assert_close(out[:1], expected0)
    torch.testing.assert_close(out[1:], reference_moe(stores[0], x[1:], weights[1:], ids[1:]))
    assert caches[0].stats.loads >= loads + 1  # expert 5, loaded after the step for the next ones
    assert 5 in caches[0].resident_experts()


def test_reroute_takes_a_resident_expert_within_the_margin_and_loads_otherwise():
    resident = torch.zeros(8, dtype=torch.bool)
    resident[[0, 1, 2]] = True
    ids = torch.tensor([[0, 5], [0, 6]])
    logits = torch.tensor(
        [
            [9.0, 7.5, 1.0, 0, 0, 8.0, 0, 0],  # 5 (8.0) missing; 1 (7.5) resident, within 1.0 -> 1
            [9.0, 1.0, 2.0, 0, 0, 0, 8.0, 0],  # 6 (8.0) missing; best resident unused 2 (2.0), too far -> load 6
        ]
    )
    out, loads = reroute(ids, logits, resident, margin=1.0)
    assert out.tolist() == [[0, 1], [0, 6]] and loads == [6]
    out, loads = reroute(ids, logits, resident, margin=0.0)  # nothing is taken: exact
    assert out.tolist() == [[0, 5], [0, 6]] and sorted(loads) == [5, 6]
    out, loads = reroute(ids, logits, resident, margin=10.0)
    assert out.tolist() == [[0, 1], [0, 2]] and loads == []
    with pytest.raises(ValueError, match="margin must be >= 0"):
        reroute(ids, logits, resident, margin=-1.0)


def test_reroute_uses_an_expert_loaded_for_another_token_of_the_step():
    resident = torch.zeros(8, dtype=torch.bool)
    resident[0] = True
    ids = torch.tensor([[0, 5], [0, 5], [0, 6]])
    logits = torch.tensor(
        [
            [9.0, 0, 0, 0, 0, 8.0, 0, 0],
            [9.0, 0, 0, 0, 0, 8.0, 0, 0],
            [9.0, 0, 0, 0, 0, 7.8, 8.0, 0],  # 6 missing; 5 is loaded for the others and within the margin
        ]
    )
    out, loads = reroute(ids, logits, resident, margin=0.5)
    assert loads == [5]
    assert out.tolist() == [[0, 5], [0, 5], [0, 5]]


def test_reroute_never_gives_a_token_one_expert_twice():
    rng = np.random.default_rng(3)
    for _ in range(50):
        logits = torch.from_numpy(rng.normal(size=(16, 16))).float()
        ids = torch.topk(logits, 4, dim=1).indices
        resident = torch.from_numpy(rng.random(16) < 0.3)
        out, loads = reroute(ids, logits, resident, margin=float(rng.uniform(0, 3)))
        assert all(len(set(row)) == 4 for row in out.tolist())
        allowed = resident.clone()
        allowed[loads] = True
        assert bool(allowed[out].all())
        chosen = logits.gather(1, ids)
        taken = logits.gather(1, out)
        assert bool((taken >= chosen - 3.0 - 1e-6).all())


def test_reroute_step_runs_the_rerouted_experts_and_counts_loads():
    store = make_store()
    cache = ExpertSlotCache(store, 4, LRUPolicy())
    cache.ensure_resident([0, 1])
    ids = torch.tensor([[0, 5], [1, 6]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    logits = torch.tensor([[9.0, 7.5, 0, 0, 0, 8.0, 0, 0], [0, 9.0, 0, 0, 0, 0, 8.0, 0]])
    x = torch.randn(2, 4)
    loads = cache.stats.loads
    out = cache.run_lossy(x, weights, ids, slot_kernel, "reroute", router_scores=logits, reroute_margin=1.0)
    torch.testing.assert_close(out, reference_moe(store, x, weights, torch.tensor([[0, 1], [1, 6]])))
    assert cache.stats.loads - loads == 1  # 6 only; 5 was rerouted to 1
    with pytest.raises(ValueError, match="'reroute' needs router_scores"):
        cache.run_lossy(x, weights, ids, slot_kernel, "reroute")
