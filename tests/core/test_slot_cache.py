"""The live slot cache against a plain-dict model of what must be resident."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_expertflow.core import ExpertSlotCache, ExpertStore, LRUPolicy, make_policy, plan_passes


def make_store(num_experts: int = 8, seed: int = 0) -> ExpertStore:
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 6, 4, generator=generator)
    w2 = torch.randn(num_experts, 4, 3, generator=generator)
    return ExpertStore([w13, w2])


def reference_moe(store: ExpertStore, x, topk_weights, topk_ids):
    """A dense reference: each token sums its experts' (toy) outputs."""
    w13, w2 = store.weights
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            out[t] += topk_weights[t, j] * (w13[e].sum() * x[t] + w2[e].sum())
    return out


def slot_kernel(x, slot_weights, topk_weights, slot_ids):
    assert slot_ids.dtype == torch.int32
    assert int(slot_ids.min()) >= 0, "a token was routed to a non-resident expert"
    w13, w2 = slot_weights
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(slot_ids.shape[1]):
            s = int(slot_ids[t, j])
            out[t] += topk_weights[t, j] * (w13[s].sum() * x[t] + w2[s].sum())
    return out


steps = st.lists(
    st.lists(st.lists(st.integers(0, 7), min_size=2, max_size=2, unique=True), min_size=1, max_size=12),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(steps=steps, num_slots=st.integers(2, 8))
def test_cache_matches_dict_model_and_dense_output(steps, num_slots):
    store = make_store()
    cache = ExpertSlotCache(store, num_slots, LRUPolicy())
    resident: dict[int, None] = {}  # insertion order = recency, the plain model of LRU
    expected_loads = 0
    for step in steps:
        topk_ids = torch.tensor(step)
        x = torch.randn(len(step), 4)
        topk_weights = torch.rand(len(step), 2)
        out = cache.run(x, topk_weights, topk_ids, slot_kernel)
        torch.testing.assert_close(out, reference_moe(store, x, topk_weights, topk_ids), rtol=0, atol=0)
        passes = plan_passes(np.array(step), num_slots) if len({e for r in step for e in r}) > num_slots \
            else [np.arange(len(step))]
        for rows in passes:
            needed = sorted({e for i in rows for e in step[i]})
            for e in needed:
                if e in resident:
                    resident.pop(e)
                    resident[e] = None
            for e in needed:
                if e not in resident:
                    expected_loads += 1
                    if len(resident) == num_slots:
                        victim = next(v for v in resident if v not in needed)
                        resident.pop(victim)
                    resident[e] = None
        assert set(cache.map.resident()) == set(resident)
        # every resident expert's slot holds exactly that expert's weights
        for expert, slot in cache.map.resident().items():
            for slot_buffer, source in zip(cache.slots, store.expert(expert), strict=True):
                assert torch.equal(slot_buffer[slot], source)
    assert cache.stats.loads == expected_loads
    assert cache.stats.bytes_loaded == expected_loads * store.bytes_per_expert
    assert cache.stats.loads - cache.stats.evictions == len(resident)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru"])
def test_step_needing_more_experts_than_slots_is_split_and_exact(policy):
    store = make_store()
    cache = ExpertSlotCache(store, 2, make_policy(policy))
    topk_ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 0]])
    x = torch.randn(5, 4)
    w = torch.rand(5, 2)
    out = cache.run(x, w, topk_ids, slot_kernel)
    torch.testing.assert_close(out, reference_moe(store, x, w, topk_ids), rtol=0, atol=0)
    assert cache.stats.steps == 1
    assert cache.stats.passes == 4  # tokens 0 and 4 use the same experts and share a pass


def test_ids_already_on_the_host_are_used_as_given():
    # The MoE layer passes the routing it read back once; the cache must plan from it, not re-read.
    store = make_store()
    topk_ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    x, w = torch.randn(4, 4), torch.rand(4, 2)
    plain, given = ExpertSlotCache(store, 2, LRUPolicy()), ExpertSlotCache(store, 2, LRUPolicy())
    expected = plain.run(x, w, topk_ids, slot_kernel)
    out = given.run(x, w, topk_ids, slot_kernel, host_topk_ids=topk_ids.numpy().copy())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert given.stats.as_dict() == plain.stats.as_dict()
    # Planning follows the host ids: ids that disagree with the device tensor leave an expert unloaded.
    wrong = ExpertSlotCache(store, 2, LRUPolicy())
    with pytest.raises(AssertionError, match="non-resident"):
        wrong.run(x, w, topk_ids, slot_kernel, host_topk_ids=np.zeros_like(topk_ids.numpy()))


def test_plan_passes_covers_every_token_once_within_capacity():
    rows = np.array([[0, 1], [2, 3], [1, 0], [3, 2], [4, 5], [0, 1]])
    passes = plan_passes(rows, 2)
    # tokens with the same experts share a pass, wherever they sit in the batch
    assert [p.tolist() for p in passes] == [[0, 2, 5], [1, 3], [4]]
    assert [p.tolist() for p in plan_passes(rows, 6)] == [[0, 1, 2, 3, 4, 5]]
    assert plan_passes(np.zeros((0, 2), dtype=int), 2) == []
    with pytest.raises(ValueError, match="needs 3 experts but capacity is 2"):
        plan_passes(np.array([[0, 1, 2]]), 2)


@settings(max_examples=50, deadline=None)
@given(steps=steps, capacity=st.integers(2, 8))
def test_plan_passes_partitions_rows_and_respects_capacity(steps, capacity):
    rows = np.array([row for step in steps for row in step])
    passes = plan_passes(rows, capacity)
    covered = np.sort(np.concatenate(passes))
    assert covered.tolist() == list(range(len(rows)))
    for index in passes:
        assert len(np.unique(rows[index])) <= capacity


def test_bad_slot_counts_and_expert_ids_are_rejected():
    store = make_store()
    with pytest.raises(ValueError, match=r"num_slots must be in 1\.\.8"):
        ExpertSlotCache(store, 9, LRUPolicy())
    cache = ExpertSlotCache(store, 2, LRUPolicy())
    with pytest.raises(ValueError, match="expert id 8 out of range"):
        cache.ensure_resident([0, 8])
    with pytest.raises(ValueError, match="3 distinct experts needed at once"):
        cache.ensure_resident([0, 1, 2])
    # a rejected request leaves the cache as it was
    assert cache.map.resident() == {}
    assert cache.stats.loads == 0


def test_store_rejects_mismatched_expert_counts():
    with pytest.raises(ValueError, match="expert count as its first dim"):
        ExpertStore([torch.zeros(4, 2), torch.zeros(3, 2)])


def test_skip_drops_missing_experts_and_rescales_weights():
    store = make_store()
    cache = ExpertSlotCache(store, 3, LRUPolicy())
    cache.ensure_resident([0, 1])
    topk_ids = torch.tensor([[0, 5], [1, 0], [6, 7]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    x = torch.randn(3, 4)
    out = cache.run_lossy(x, weights, topk_ids, slot_kernel, "skip")
    # token 0 keeps expert 0 with all of its weight; token 1 is complete
    torch.testing.assert_close(out[0], reference_moe(store, x[:1], torch.tensor([[1.0]]), torch.tensor([[0]]))[0])
    torch.testing.assert_close(out[1], reference_moe(store, x[1:2], weights[1:2], topk_ids[1:2])[0])
    # token 2 had no resident expert: it waited for its experts and ran exactly
    torch.testing.assert_close(out[2], reference_moe(store, x[2:], weights[2:], topk_ids[2:])[0])


def test_substitute_uses_the_best_scored_resident_expert():
    store = make_store()
    cache = ExpertSlotCache(store, 3, LRUPolicy())
    cache.ensure_resident([0, 1, 2])
    topk_ids = torch.tensor([[0, 5]])
    weights = torch.tensor([[0.6, 0.4]])
    scores = torch.tensor([[9.0, 1.0, 3.0, 0.0, 0.0, 8.0, 0.0, 0.0]])  # 5 missing; best resident unused: 2
    x = torch.randn(1, 4)
    out = cache.run_lossy(x, weights, topk_ids, slot_kernel, "substitute", router_scores=scores)
    torch.testing.assert_close(out, reference_moe(store, x, weights, torch.tensor([[0, 2]])))


def test_lossy_step_loads_demanded_experts_for_later_and_rejects_unknown_policy():
    store = make_store()
    cache = ExpertSlotCache(store, 2, LRUPolicy())
    cache.ensure_resident([0, 1])
    topk_ids = torch.tensor([[4, 5], [4, 5], [4, 0]])
    cache.run_lossy(torch.randn(3, 4), torch.full((3, 2), 0.5), topk_ids, slot_kernel, "skip")
    assert set(cache.map.resident()) == {4, 5}  # the most demanded experts, ready for the next step


def test_tokens_without_a_resident_expert_run_exactly():
    store = make_store()
    cache = ExpertSlotCache(store, 2, LRUPolicy())
    topk_ids = torch.tensor([[0, 1], [2, 3], [4, 5]])  # cold cache, three orphan tokens
    x, w = torch.randn(3, 4), torch.rand(3, 2)
    out = cache.run_lossy(x, w, topk_ids, slot_kernel, "skip")
    torch.testing.assert_close(out, reference_moe(store, x, w, topk_ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="valid: \\['skip', 'substitute', 'reroute'\\]"):
        cache.run_lossy(torch.randn(1, 4), torch.ones(1, 2), topk_ids[:1], slot_kernel, "drop")


def test_covered_tokens_stay_lossy_when_orphans_need_more_than_the_slots():
    # A large batch used to make the whole step exact; now only the tokens without a resident expert are.
    store = make_store()
    cache = ExpertSlotCache(store, 2, LRUPolicy())
    cache.ensure_resident([0, 1])
    topk_ids = torch.tensor([[0, 5], [2, 3], [4, 6]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    x = torch.randn(3, 4)
    out = cache.run_lossy(x, weights, topk_ids, slot_kernel, "skip")
    torch.testing.assert_close(out[0], reference_moe(store, x[:1], torch.tensor([[1.0]]), torch.tensor([[0]]))[0])
    torch.testing.assert_close(out[1:], reference_moe(store, x[1:], weights[1:], topk_ids[1:]))
    assert cache.stats.misses >= 1 + 4  # expert 5 dropped; 2, 3, 4, 6 loaded for the orphans
