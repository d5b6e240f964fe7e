import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_expertflow.core.grouping import (
    ExpertAwareGrouper,
    ExpertSignature,
    GroupingConfig,
    RequestView,
)
from vllm_expertflow.core.policies import make_policy
from vllm_expertflow.core.slot_cache import plan_passes
from vllm_expertflow.core.slot_map import SlotMap
from vllm_expertflow.core.two_way_split import hamming_two_way_split

LAYERS, EXPERTS = 4, 16


def signature(experts_per_layer, layers: int = LAYERS, experts: int = EXPERTS) -> ExpertSignature:
    """The same expert set on every layer."""
    mask = np.zeros((layers, experts), dtype=bool)
    mask[:, list(experts_per_layer)] = True
    return ExpertSignature.from_mask(mask)


def union_per_layer(signatures: list[ExpertSignature]) -> float:
    mask = np.logical_or.reduce([s.to_mask() for s in signatures])
    return float(mask.sum(axis=1).mean())


def topic_workload(
    rng: np.random.Generator, topic_of: np.ndarray, layers: int, experts: int, per_topic: int, top_k: int
):
    """One decode step: each request routes top_k experts per layer from its topic's disjoint expert block."""
    n = len(topic_of)
    offsets = np.argsort(rng.random((n, layers, per_topic)), axis=-1)[..., :top_k]
    topk_ids = topic_of[:, None, None] * per_topic + offsets
    return ExpertSignature.from_batch_topk_ids(topk_ids, [1] * n, experts)


# --- ExpertSignature ----------------------------------------------------------------------------


def test_signature_from_topk_ids_is_union_over_tokens():
    topk_ids = np.array([[[0, 3], [5, 1]], [[3, 7], [-1, 2]]])  # [tokens=2, layers=2, top_k=2]
    sig = ExpertSignature.from_topk_ids(topk_ids, num_experts=70)
    expected = np.zeros((2, 70), dtype=bool)
    expected[0, [0, 3, 7]] = True
    expected[1, [5, 1, 2]] = True  # -1 (expert not on this rank) is skipped
    assert np.array_equal(sig.to_mask(), expected)
    assert sig == ExpertSignature.from_mask(expected)
    assert sig.words.shape == (2, 2)  # 70 experts need two 64-bit words per layer
    assert sig.layer_counts().tolist() == [3, 3]


def test_signature_accepts_torch_tensors():
    # vllm_expertflow.core imports torch already, so this costs the file nothing extra.
    torch = pytest.importorskip("torch")
    topk_ids = torch.tensor([[[1, 2]], [[2, 9]]], dtype=torch.int32)
    assert ExpertSignature.from_topk_ids(topk_ids, 10) == signature([1, 2, 9], layers=1, experts=10)


def test_batch_signatures_match_per_request_ones():
    rng = np.random.default_rng(0)
    topk_ids = rng.integers(0, EXPERTS, (7, LAYERS, 2))
    counts = [3, 0, 1, 3]
    batch = ExpertSignature.from_batch_topk_ids(topk_ids, counts, EXPERTS)
    starts = np.cumsum([0, *counts])
    for r, sig in enumerate(batch):
        assert sig == ExpertSignature.from_topk_ids(topk_ids[starts[r] : starts[r + 1]], EXPERTS)
    assert batch[1].layer_counts().sum() == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ExpertSignature.from_topk_ids(np.zeros((2, 3)), 8), "topk_ids must be int"),
        (lambda: ExpertSignature.from_topk_ids(np.full((1, 1, 1), 8), 8), "expert id 8 out of range 0..7"),
        (lambda: ExpertSignature.from_batch_topk_ids(np.zeros((3, 1, 1), int), [1, 1], 8), "summing to the 3"),
        (lambda: ExpertSignature.from_mask(np.zeros((2, 3), dtype=np.int8)), "mask must be bool"),
        (lambda: ExpertSignature(np.zeros((2, 1), dtype=np.uint64), 65), "uint64 \\[moe_layers, 2\\]"),
    ],
)
def test_signature_errors_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- hamming_two_way_split ----------------------------------------------------------------------


def distinct_experts(mask: np.ndarray, groups) -> int:
    return sum(int(np.logical_or.reduce(mask[g]).sum()) for g in groups)


def test_split_beats_random_splits_on_clustered_tokens():
    rng = np.random.default_rng(1)
    topic_of = rng.permutation(np.repeat([0, 1, 2, 3], 16))
    sigs = topic_workload(rng, topic_of, layers=6, experts=64, per_topic=16, top_k=4)
    mask = np.stack([s.to_mask() for s in sigs])
    first, second = hamming_two_way_split(sigs)
    assert abs(len(first) - len(second)) <= 1
    assert sorted(np.concatenate([first, second]).tolist()) == list(range(64))
    split = distinct_experts(mask, (first, second))
    randoms = []
    for _ in range(20):
        perm = rng.permutation(64)
        randoms.append(distinct_experts(mask, (perm[:32], perm[32:])))
    assert split < 0.8 * np.mean(randoms)
    # Four topics of 16 tokens: the best halves keep every topic whole.
    whole = [np.flatnonzero(np.isin(topic_of, pair)) for pair in ([0, 1], [0, 2], [0, 3])]
    assert split <= min(distinct_experts(mask, (g, np.setdiff1d(np.arange(64), g))) for g in whole)


def test_split_separates_two_clean_clusters_and_is_deterministic():
    a, b = signature([0, 1, 2]), signature([8, 9, 10])
    sigs = [a, b, b, a, a, b, a, b]
    first, second = hamming_two_way_split(sigs)
    assert first.tolist() == [0, 3, 4, 6] and second.tolist() == [1, 2, 5, 7]
    again = hamming_two_way_split(np.stack([s.to_mask() for s in sigs]))  # bool input, same answer
    assert [g.tolist() for g in again] == [first.tolist(), second.tolist()]


def test_split_of_tiny_inputs():
    assert [g.tolist() for g in hamming_two_way_split([])] == [[], []]
    assert [g.tolist() for g in hamming_two_way_split([signature([1])])] == [[0], []]
    assert [g.tolist() for g in hamming_two_way_split([signature([1]), signature([1])])] == [[0], [1]]
    with pytest.raises(ValueError, match="same moe_layers and num_experts, got layers \\[2, 4\\]"):
        hamming_two_way_split([signature([1]), signature([1], layers=2)])


# --- ExpertAwareGrouper: helpers -----------------------------------------------------------------


def views(sigs, priorities=None, tokens=None, prefix="r") -> list[RequestView]:
    return [
        RequestView(
            f"{prefix}{i}",
            priority=0 if priorities is None else priorities[i],
            arrival_time=float(i),
            signature=s,
            num_tokens=1 if tokens is None else tokens[i],
        )
        for i, s in enumerate(sigs)
    ]


def check_step(config: GroupingConfig, running: list[RequestView], chosen: list[str]) -> None:
    """The per-step guarantees every selection must keep."""
    by_id = {r.request_id: r for r in running}
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(by_id)
    assert len(chosen) >= min(len(running), max(1, math.ceil(config.min_fraction * len(running) - 1e-9)))
    left_out = [r.priority for r in running if r.request_id not in chosen]
    if left_out and chosen:
        # Nothing strictly more urgent than a scheduled request is left out.
        assert min(left_out) >= max(by_id[c].priority for c in chosen)
    priorities = [by_id[c].priority for c in chosen]
    assert priorities == sorted(priorities)


# --- ExpertAwareGrouper: grouping quality --------------------------------------------------------


def test_select_touches_fewer_experts_than_fcfs_on_clustered_traffic():
    rng = np.random.default_rng(2)
    layers, experts, topics = 8, 64, 4
    topic_of = rng.integers(0, topics, 48)
    # The mechanics of grouping, also where the chosen union exceeds the slots.
    config = GroupingConfig(capacity=16, max_skip_steps=2, min_fraction=0.5, max_overflow_ratio=None)
    grouper = ExpertAwareGrouper(config)
    grouped, fcfs = [], []
    for step in range(200):
        sigs = topic_workload(rng, topic_of, layers, experts, per_topic=16, top_k=4)
        running = views(sigs)
        chosen = grouper.select(running, step)
        check_step(config, running, chosen)
        index = [int(c[1:]) for c in chosen]
        grouped.append(union_per_layer([sigs[i] for i in index]))
        fcfs.append(union_per_layer(sigs[: len(chosen)]))  # FCFS: as many requests, oldest first
    assert np.mean(grouped) < 0.75 * np.mean(fcfs)


def test_select_keeps_every_cluster_whole_when_slots_allow():
    # Three topics of 4 requests; the slots hold two topics' experts.
    sigs = [signature(range(4 * t, 4 * t + 4)) for t in (0, 1, 2) for _ in range(4)]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=8, max_skip_steps=5, min_fraction=0.25))
    chosen = grouper.select(views(sigs), 0)
    topics = sorted({int(c[1:]) // 4 for c in chosen})
    assert len(chosen) == 8 and len(topics) == 2  # filled to capacity with whole topics, no third
    assert grouper.last_union is not None and grouper.last_union.layer_counts().tolist() == [8] * LAYERS


def test_cache_aware_selection_loads_less_per_token_than_fcfs_and_cache_blind():
    # Two topics whose experts each fill the slots: FCFS needs both every step; a cache-blind
    # grouper alternates them; a cache-aware one runs a topic while the other may wait.
    rng = np.random.default_rng(4)
    capacity, per_topic, top_k = 4, 4, 2
    topic_of = np.arange(24) % 2
    config = GroupingConfig(capacity=capacity, max_skip_steps=2, min_fraction=0.25)

    def run(mode: str) -> float:
        grouper = ExpertAwareGrouper(config)
        maps = [SlotMap(EXPERTS, capacity, make_policy("lru")) for _ in range(LAYERS)]
        loads = tokens = 0
        for step in range(60):
            offsets = np.argsort(rng.random((len(topic_of), LAYERS, per_topic)), axis=-1)[..., :top_k]
            rows = topic_of[:, None, None] * per_topic + offsets  # one decode token per request
            sigs = ExpertSignature.from_batch_topk_ids(rows, [1] * len(rows), EXPERTS)
            resident = np.zeros((LAYERS, EXPERTS), dtype=bool)
            for layer, slot_map in enumerate(maps):
                resident[layer, list(slot_map.resident())] = True
            running = views(sigs)
            if mode == "fcfs":
                chosen = list(range(len(rows)))
            else:
                order = grouper.select(running, step, resident=resident if mode == "aware" else None)
                check_step(config, running, order)
                chosen = sorted(int(c[1:]) for c in order)
            before = sum(m.stats.loads for m in maps)
            for layer, slot_map in enumerate(maps):
                step_rows = rows[chosen, layer, :]
                for pass_rows in plan_passes(step_rows, capacity):
                    slot_map.admit(np.unique(step_rows[pass_rows]).tolist())
            loads += sum(m.stats.loads for m in maps) - before
            tokens += len(chosen)
        return loads / tokens

    fcfs, blind, aware = run("fcfs"), run("blind"), run("aware")
    assert aware <= 0.75 * fcfs, (aware, fcfs)
    assert aware < blind, (aware, blind)


def test_requests_are_held_back_only_when_that_removes_most_of_the_excess_over_the_slots():
    # Two topics of 4 experts: with 4 slots a topic fits and the other waits. With 2 slots a topic
    # is 2 over (8 over all layers), everyone 6 over (24): holding back keeps a third of the excess,
    # more than the default quarter, and would only split the reloads, so everyone runs.
    sigs = [signature(range(4 * (i % 2), 4 * (i % 2) + 4)) for i in range(8)]
    fits = ExpertAwareGrouper(GroupingConfig(capacity=4, max_skip_steps=2, min_fraction=0.5))
    assert len(fits.select(views(sigs), 0)) == 4
    too_small = ExpertAwareGrouper(GroupingConfig(capacity=2, max_skip_steps=2, min_fraction=0.5))
    assert len(too_small.select(views(sigs), 0)) == 8
    lenient = ExpertAwareGrouper(GroupingConfig(capacity=2, max_skip_steps=2, min_fraction=0.5, max_overflow_ratio=0.5))
    assert len(lenient.select(views(sigs), 0)) == 4
    fits_only = ExpertAwareGrouper(GroupingConfig(capacity=3, max_skip_steps=2, min_fraction=0.5, max_overflow_ratio=0))
    assert len(fits_only.select(views(sigs), 0)) == 8
    legacy = ExpertAwareGrouper(GroupingConfig(capacity=3, max_skip_steps=2, min_fraction=0.5, max_overflow_ratio=None))
    assert len(legacy.select(views(sigs), 0)) == 4


def test_resident_experts_are_free_for_selection():
    # Same cost without a cache; with topic 1 resident, topic 1 runs.
    sigs = [signature(range(4 * (i % 2), 4 * (i % 2) + 4)) for i in range(8)]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4, max_skip_steps=3, min_fraction=0.5))
    resident = signature(range(4, 8))
    chosen = grouper.select(views(sigs), 0, resident=resident)
    assert sorted(int(c[1:]) % 2 for c in chosen) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="resident has words"):
        grouper.select(views(sigs), 1, resident=signature([0], layers=LAYERS + 1))


def test_search_backs_off_after_it_did_not_pay():
    # Holding back never pays here (see above), so searches come after 1, 2, 4, ... steps of everyone running.
    sigs = [signature(range(4 * (i % 2), 4 * (i % 2) + 4)) for i in range(8)]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=2, max_skip_steps=2, min_fraction=0.5))
    searched = []
    for step in range(12):
        assert len(grouper.select(views(sigs), step)) == 8
        searched.append(grouper.last_searched)
    assert [step for step, s in enumerate(searched) if s] == [0, 2, 5, 10]


@pytest.mark.parametrize("capacity", [None, EXPERTS])
def test_unbounded_slots_schedule_everyone(capacity):
    rng = np.random.default_rng(3)
    sigs = [ExpertSignature.from_mask(rng.random((LAYERS, EXPERTS)) < 0.3) for _ in range(10)]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=capacity, min_fraction=0.1))
    assert sorted(grouper.select(views(sigs), 0)) == sorted(f"r{i}" for i in range(10))


# --- ExpertAwareGrouper: guarantees --------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_requests=st.integers(1, 48),
    max_skip=st.integers(0, 3),
    min_fraction=st.sampled_from([0.05, 0.2, 0.5, 0.9]),
    capacity=st.integers(1, EXPERTS),
    levels=st.integers(1, 3),
    churn=st.booleans(),
    cache_aware=st.booleans(),
)
def test_no_request_waits_more_than_k_steps(
    seed, num_requests, max_skip, min_fraction, capacity, levels, churn, cache_aware
):
    rng = np.random.default_rng(seed)
    config = GroupingConfig(capacity=capacity, max_skip_steps=max_skip, min_fraction=min_fraction)
    grouper = ExpertAwareGrouper(config)
    next_id = 0

    def new_request() -> tuple[str, int, float]:
        nonlocal next_id
        next_id += 1
        return f"q{next_id}", int(rng.integers(0, levels)), float(next_id)

    live = [new_request() for _ in range(num_requests)]
    outlier = live[0][0]  # its experts (only the last one) never overlap anyone else's
    outlier_sig = signature([EXPERTS - 1])
    masks = rng.random((32, LAYERS, EXPERTS)) < 0.25
    masks[:, :, -1] = False
    bank = [ExpertSignature.from_mask(m) for m in masks]  # random signatures, drawn anew every step
    waited: dict[str, int] = {}
    for step in range(500):
        running = []
        # Draws past the bank (about 1 in 12) give an unknown signature, as for a request just admitted.
        draws = rng.integers(0, len(bank) + 3, len(live))
        for (rid, priority, arrival), draw in zip(live, draws, strict=True):
            sig = outlier_sig if rid == outlier else (bank[draw] if draw < len(bank) else None)
            running.append(RequestView(rid, priority, arrival, sig, 1 + int(draw) % 3))
        resident = rng.random((LAYERS, EXPERTS)) < 0.3 if cache_aware else None
        order = grouper.select(running, step, resident=resident)
        check_step(config, running, order)
        chosen = set(order)
        for r in running:
            waited[r.request_id] = 0 if r.request_id in chosen else waited.get(r.request_id, 0) + 1
            assert waited[r.request_id] <= max_skip, f"{r.request_id} left out {waited[r.request_id]} steps"
            assert grouper.skip_count(r.request_id) == waited[r.request_id]
        if churn and step % 7 == 6 and len(live) > 1:
            done = live.pop(int(rng.integers(1, len(live))))  # the outlier stays to the end
            grouper.forget(done[0])
            live.append(new_request())


def test_outlier_runs_at_least_every_k_plus_one_steps():
    # Everyone shares experts 0 and 1, the outlier uses 14 and 15: on cost alone it would never run.
    sigs = [signature([0, 1]) for _ in range(9)] + [signature([14, 15])]
    for k in (0, 1, 2, 3):
        grouper = ExpertAwareGrouper(GroupingConfig(capacity=2, max_skip_steps=k, min_fraction=0.3))
        runs = [step for step in range(40) if "r9" in grouper.select(views(sigs), step)]
        gaps = np.diff([-1, *runs, 40]) - 1  # steps left out between runs
        assert gaps.max() <= k
        assert k == 0 or len(runs) < 40  # it does sit out when it may


def test_strictly_more_urgent_requests_are_never_left_out():
    rng = np.random.default_rng(4)
    sigs = [ExpertSignature.from_mask(rng.random((LAYERS, EXPERTS)) < 0.3) for _ in range(12)]
    priorities = [1, 0, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    config = GroupingConfig(capacity=4, max_skip_steps=2, min_fraction=0.25, max_overflow_ratio=None)
    grouper = ExpertAwareGrouper(config)
    least_urgent_chosen = []
    for step in range(30):
        running = views(sigs, priorities)
        chosen = grouper.select(running, step)
        check_step(config, running, chosen)  # nobody more urgent than a chosen request is left out
        least_urgent_chosen.append(max(priorities[int(c[1:])] for c in chosen))
    # min_fraction needs 3 of the 4 priority-0 requests; the others only run when forced (every K+1 steps).
    assert least_urgent_chosen.count(0) > 0 and least_urgent_chosen.count(2) > 0


def test_forced_request_pulls_in_every_more_urgent_one():
    sigs = [signature([0]), signature([1]), signature([2])]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=1, max_skip_steps=1, min_fraction=0.3))
    running = views(sigs, priorities=[0, 1, 2])
    assert grouper.select(running, 0) == ["r0"]
    # r1 and r2 hit the limit together: r2 (least urgent) runs, so r0 and r1 must too.
    assert grouper.select(running, 1) == ["r0", "r1", "r2"]


def test_unknown_signatures_are_scheduled_not_held_back():
    sigs = [signature([0, 1])] * 6 + [None, None]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=2, max_skip_steps=3, min_fraction=0.25))
    for step in range(5):
        chosen = grouper.select(views(sigs), step)
        assert {"r6", "r7"} <= set(chosen)
    all_unknown = ExpertAwareGrouper(GroupingConfig(capacity=1, min_fraction=0.1))
    assert len(all_unknown.select(views([None] * 4), 0)) == 4
    assert all_unknown.last_union is None


def test_order_forced_first_then_decodes_before_prefill_chunks():
    sigs = [signature([0]), signature([0]), signature([0]), signature([5])]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=1, max_skip_steps=1, min_fraction=0.5))
    tokens = [512, 1, 1, 1]
    assert grouper.select(views(sigs, tokens=tokens), 0) == ["r1", "r2", "r0"]
    # r3 (experts nobody shares) was left out once: now forced, it goes first.
    assert grouper.select(views(sigs, tokens=tokens), 1)[0] == "r3"


def test_skip_counters_and_forget():
    sigs = [signature([0]), signature([0]), signature([9])]
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=1, max_skip_steps=2, min_fraction=0.5))
    chosen = grouper.select(views(sigs), 0)
    assert "r2" not in chosen and grouper.skip_count("r2") == 1 and grouper.skip_count("r0") == 0
    grouper.forget("r2")
    assert grouper.skip_count("r2") == 0
    grouper.forget("never-seen")  # finished before it ever ran: fine
    grouper.select(views(sigs), 1)
    assert grouper.skip_count("r2") == 1  # counted afresh from the forget


def test_selection_is_deterministic_and_ignores_input_order():
    rng = np.random.default_rng(5)
    steps = [[ExpertSignature.from_mask(rng.random((LAYERS, EXPERTS)) < 0.2) for _ in range(20)] for _ in range(30)]
    priorities = rng.integers(0, 2, 20).tolist()
    config = GroupingConfig(capacity=6, max_skip_steps=2, min_fraction=0.4)
    a, b, c = (ExpertAwareGrouper(config) for _ in range(3))
    perm = rng.permutation(20)
    for step, sigs in enumerate(steps):
        running = views(sigs, priorities)
        first = a.select(running, step)
        assert b.select(running, step) == first
        assert c.select([running[i] for i in perm], step) == first


def test_bool_masks_are_accepted_as_signatures():
    masks = [signature([0, 1]).to_mask(), signature([0, 1]).to_mask(), signature([7]).to_mask()]
    packed = [signature([0, 1]), signature([0, 1]), signature([7])]
    config = GroupingConfig(capacity=2, max_skip_steps=2, min_fraction=0.5)
    assert ExpertAwareGrouper(config).select(views(masks), 0) == ExpertAwareGrouper(config).select(views(packed), 0)


def test_strided_signature_words_are_accepted():
    # Words sliced out of a wider array are not one buffer; they stack all the same.
    wide = np.stack([signature([e]).words for e in (0, 0, 9)], axis=-1)  # [LAYERS, 1, 3]
    strided = [ExpertSignature(wide[:, :, i], EXPERTS) for i in range(3)]
    assert not strided[0].words.flags.c_contiguous
    config = GroupingConfig(capacity=1, max_skip_steps=2, min_fraction=0.5)
    packed = [signature([0]), signature([0]), signature([9])]
    assert ExpertAwareGrouper(config).select(views(strided), 0) == ExpertAwareGrouper(config).select(views(packed), 0)


def test_empty_step():
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4))
    assert grouper.select([], 0) == [] and grouper.last_union is None


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity must be a slot count >= 1 or None"),
        ({"capacity": 4, "max_skip_steps": -1}, "max_skip_steps must be an int >= 0, got -1"),
        ({"capacity": 4, "min_fraction": 0.0}, "min_fraction must be in \\(0, 1\\], got 0.0"),
        ({"capacity": 4, "min_fraction": 1.5}, "min_fraction must be in \\(0, 1\\], got 1.5"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupingConfig(**kwargs)


def test_select_errors_name_the_bad_value():
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4))
    grouper.select(views([signature([0])]), 5)
    with pytest.raises(ValueError, match="step must increase between select calls: got 5 after 5"):
        grouper.select(views([signature([0])]), 5)
    with pytest.raises(ValueError, match="repeated: \\['r0'\\]"):
        grouper.select(views([signature([0])]) * 2, 6)
    with pytest.raises(ValueError, match="num_tokens must be >= 1, got 0 for request 'r0'"):
        grouper.select(views([signature([0])], tokens=[0]), 7)
    with pytest.raises(ValueError, match="signatures disagree in shape"):
        grouper.select(views([signature([0]), signature([0], layers=2)]), 8)
    assert grouper.select(views([signature([0])]), 6) == ["r0"]  # rejected calls did not use up step 6


# --- admission_order ------------------------------------------------------------------------------


def test_admission_order_priority_then_head_of_line_then_affinity():
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4))
    union = signature([0, 1, 2, 3])
    waiting = views(
        [
            signature([12, 13]),  # r0: oldest of priority 0, far from the union: stays first
            signature([9, 10, 11]),  # r1: adds 3
            signature([0, 1]),  # r2: adds nothing
            signature([3, 8]),  # r3: adds 1
            None,  # r4: unknown -> the mean of its level's known costs
            signature([0]),  # r5: priority 1, fits perfectly but less urgent
        ],
        priorities=[0, 0, 0, 0, 0, 1],
    )
    # New experts per layer at priority 0: r0 2, r1 3, r2 0, r3 1 -> r4 counts as their mean, 1.5.
    assert grouper.admission_order(waiting, union) == ["r0", "r2", "r3", "r4", "r1", "r5"]
    # No union: costs are signature sizes per layer (r0 2, r1 3, r2 2, r3 2; r4 2.25), ties by arrival.
    assert grouper.admission_order(waiting, None) == ["r0", "r2", "r3", "r4", "r1", "r5"]
    assert grouper.admission_order([], union) == []
    with pytest.raises(ValueError, match="current_union has words"):
        grouper.admission_order(waiting, signature([0], layers=2))


# --- prefill composition: admission fairness and the FCFS fallback rule --------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_skip", [0, 1, 2, 3])
def test_admission_passes_over_no_waiting_request_more_than_k_times_and_never_inverts_priority(seed, max_skip):
    # Each step admits a few of the waiting requests in admission_order; new ones keep arriving, many
    # of them a perfect fit for the step's experts. The outlier (experts nobody else uses) is never
    # the head of the line at first: on affinity alone it would wait forever.
    rng = np.random.default_rng(seed)
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4, max_skip_steps=max_skip))
    union = signature([0, 1, 2, 3])
    next_id = 0

    def arrive(sig=None):
        nonlocal next_id
        next_id += 1
        if sig is None:
            sig = signature([0, 1]) if rng.random() < 0.6 else signature(rng.choice(EXPERTS - 1, 3, replace=False))
        return RequestView(f"w{next_id}", int(rng.integers(0, 2)), float(next_id), sig, 12)

    waiting = [arrive(), arrive(signature([EXPERTS - 1])), *[arrive() for _ in range(4)]]
    outlier = waiting[1]
    overtaken: dict[str, int] = {}
    for _ in range(60):
        order = grouper.admission_order(waiting, union)
        ranks = {request_id: i for i, request_id in enumerate(order)}
        by_id = {view.request_id: view for view in waiting}
        for a in waiting:
            for b in waiting:
                if a.priority < b.priority:
                    assert ranks[a.request_id] < ranks[b.request_id], "a less urgent request went first"
        admitted = set(order[: int(rng.integers(1, 3))])
        # The bound as a user sees it: overtaken by a later arrival of the same or a lower urgency.
        keys = [(by_id[r].priority, by_id[r].arrival_time) for r in admitted]
        for view in waiting:
            if view.request_id in admitted:
                continue
            passed = any(p >= view.priority and t > view.arrival_time for p, t in keys)
            overtaken[view.request_id] = overtaken.get(view.request_id, 0) + 1 if passed else 0
            assert overtaken[view.request_id] <= max_skip
        grouper.note_admission(waiting, admitted)
        for view in waiting:
            if view.request_id not in admitted:
                assert grouper.passed_over_count(view.request_id) == overtaken[view.request_id]
        waiting = [v for v in waiting if v.request_id not in admitted] + [arrive() for _ in range(len(admitted))]
        if all(v.request_id != outlier.request_id for v in waiting):
            break
    assert all(v.request_id != outlier.request_id for v in waiting), "the outlier was never admitted"


def test_a_request_passed_over_k_times_goes_first_after_the_head():
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4, max_skip_steps=2))
    union = signature([0, 1])
    waiting = views([signature([0]), signature([12, 13, 14]), signature([0, 1]), signature([1])])
    assert grouper.admission_order(waiting, union) == ["r0", "r2", "r3", "r1"]
    for _ in range(2):  # r2 and r3 overtake r1 twice
        grouper.note_admission(waiting[1:], {"r2"})
    assert grouper.passed_over_count("r1") == 2
    assert grouper.admission_order(waiting, union) == ["r0", "r1", "r2", "r3"]
    grouper.note_admission(waiting[1:], {"r1"})
    assert grouper.passed_over_count("r1") == 0
    grouper.forget("r3")
    assert grouper.passed_over_count("r3") == 0


def test_select_with_prefill_chunks_keeps_the_minimum_and_priorities():
    # Two prefill chunks (many tokens, wide expert sets) among decodes; the decodes share experts.
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4, max_skip_steps=2, min_fraction=0.5))
    running = [
        RequestView("d0", 0, 0.0, signature([0, 1]), 1),
        RequestView("d1", 0, 1.0, signature([0, 2]), 1),
        RequestView("p2", 0, 2.0, signature(range(4, 12)), 40),
        RequestView("d3", 0, 3.0, signature([1, 2]), 1),
        RequestView("p4", 1, 4.0, signature(range(8, 16)), 40),
        RequestView("d5", 1, 5.0, signature([0, 1]), 1),
    ]
    for step in range(6):
        order = grouper.select(running, step)
        assert len(order) >= 3
        chosen = set(order)
        for a in running:
            for b in running:
                if a.priority < b.priority and b.request_id in chosen:
                    assert a.request_id in chosen
        assert all(grouper.skip_count(v.request_id) <= 2 for v in running)


def test_a_prefill_overflows_alone_when_most_layers_exceed_the_slots():
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4))
    assert not grouper.overflows_alone(None)
    assert not grouper.overflows_alone(signature([0, 1, 2, 3]))
    assert grouper.overflows_alone(signature([0, 1, 2, 3, 4]))
    mask = np.zeros((LAYERS, EXPERTS), dtype=bool)
    mask[:, :3] = True
    mask[: LAYERS // 2, :8] = True  # half the layers over the slots: its step runs in passes anyway
    assert grouper.overflows_alone(ExpertSignature.from_mask(mask))
    mask[: LAYERS // 2 - 1] = False
    mask[: LAYERS // 2 - 1, :3] = True
    assert not grouper.overflows_alone(ExpertSignature.from_mask(mask))
    assert not ExpertAwareGrouper(GroupingConfig(capacity=None)).overflows_alone(signature(range(EXPERTS)))


def test_a_prediction_is_sized_by_how_many_predicted_experts_get_used():
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=4))
    predicted = signature(range(7))  # over-claims: requests like it used about half of what was predicted
    assert grouper.overflows_alone(predicted)
    assert not grouper.overflows_alone(predicted, scale=0.5)
    assert grouper.overflows_alone(signature([0, 1, 2]), scale=2.0)
