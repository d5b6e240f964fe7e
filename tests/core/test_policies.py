import functools
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_expertflow.core.policies import (
    POLICIES,
    BeladyPolicy,
    LFRUPolicy,
    LFUPolicy,
    LRUPolicy,
    ReplacementPolicy,
    StaticPolicy,
    make_policy,
)
from vllm_expertflow.core.slot_map import SlotMap


def replay(policy: ReplacementPolicy, passes: list[list[int]], num_slots: int, num_experts: int = 8) -> SlotMap:
    slot_map = SlotMap(num_experts, num_slots, policy)
    for index, needed in enumerate(passes):
        policy.on_pass_begin(index)
        slot_map.admit(needed)
    return slot_map


# Expert 0 is used often but long ago, expert 1 once but recently; then expert 2 needs a slot.
OLD_POPULAR = [[0], [0], [0], [1], [2]]


def evicted_by(policy: ReplacementPolicy, passes: list[list[int]], num_slots: int = 2) -> set[int]:
    """Experts the passes used that are no longer resident at the end."""
    slot_map = replay(policy, passes, num_slots)
    return {e for p in passes for e in p} - set(slot_map.resident())


def test_lru_evicts_least_recent():
    assert evicted_by(LRUPolicy(), OLD_POPULAR) == {0}


def test_lfu_evicts_least_frequent():
    assert evicted_by(LFUPolicy(), OLD_POPULAR) == {1}


def test_lfu_keeps_counts_of_evicted_experts_and_breaks_ties_by_recency():
    # 0 and 1 are used twice; 1 more recently, so 0 goes when 2 arrives.
    assert evicted_by(LFUPolicy(), [[0], [1], [0], [1], [2]]) == {0}
    # [2, 1] evicts 0 (3 uses), but its count survives: back with 4 uses it outlasts 1 (3 uses).
    slot_map = replay(LFUPolicy(), [[0], [0], [0], [1], [1], [2, 1], [0], [3]], num_slots=2)
    assert set(slot_map.resident()) == {0, 3}


def test_lfru_decay_moves_between_lru_and_lfu():
    assert evicted_by(LFRUPolicy(half_life=0.1), OLD_POPULAR) == {0}  # fast decay: recency wins
    assert evicted_by(LFRUPolicy(half_life=1e9), OLD_POPULAR) == {1}  # no decay: frequency wins
    with pytest.raises(ValueError, match="half_life must be a positive"):
        LFRUPolicy(half_life=0)


def test_lfru_freq_over_age_is_pr_37190s_score():
    # 0 was used 4 times long ago, 1 and 2 three times each lately: LFU (and a slow decay) keeps
    # the most frequent, #37190's freq / age lets the old one go.
    passes = [[0]] * 4 + [[1], [2]] * 3 + [[3]]
    assert evicted_by(LFRUPolicy(), passes, num_slots=3) == {1}
    assert evicted_by(LFRUPolicy(score="freq_over_age"), passes, num_slots=3) == {0}
    # Its frequency is the entry's: an evicted expert comes back with a count of 1.
    policy = LFRUPolicy(score="freq_over_age")
    replay(policy, [[0], [0], [1], [2], [0]], num_slots=2)
    assert policy._freq == {0: 1, 2: 1}
    with pytest.raises(ValueError, match="valid: \\['decayed', 'freq_over_age'\\]"):
        LFRUPolicy(score="age")


def test_static_pins_warm_up_favourites():
    policy = StaticPolicy()
    policy.warm_up([1, 50, 10, 0])
    # LRU would evict 1 here (least recent); static keeps it for its warm-up count.
    slot_map = replay(policy, [[1], [0], [2], [3], [0]], num_slots=2)
    assert 1 in slot_map.resident()
    assert set(slot_map.resident()) == {1, 0}
    assert slot_map.stats.evictions == 3  # the second slot churns while 1 stays


def test_static_takes_a_mapping_and_acts_as_lru_before_warm_up():
    assert evicted_by(StaticPolicy(counts={1: 5}), OLD_POPULAR) == {0}
    assert evicted_by(StaticPolicy(counts={0: 5}), OLD_POPULAR) == {1}
    assert evicted_by(StaticPolicy(), OLD_POPULAR) == evicted_by(LRUPolicy(), OLD_POPULAR)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        StaticPolicy(counts=[1, -2])


def test_belady_evicts_the_farthest_next_use():
    passes = [[0], [1], [2], [0], [1]]
    policy = BeladyPolicy(passes)
    policy.on_pass_begin(2)
    assert policy.next_use(0) == 3 and policy.next_use(1) == 4 and policy.next_use(5) == float("inf")
    assert policy.choose_victim([0, 1], protected={2}) == 1
    # LRU evicts 0 and then misses on it; Belady keeps it.
    assert replay(BeladyPolicy(passes), passes, 2).stats.loads == 4
    assert replay(LRUPolicy(), passes, 2).stats.loads == 5


def test_belady_refuses_an_unknown_position_or_a_different_sequence():
    policy = BeladyPolicy([[0], [1]])
    with pytest.raises(RuntimeError, match="on_pass_begin"):
        policy.choose_victim([0], protected={1})
    with pytest.raises(ValueError, match="outside the known future of 2 passes"):
        policy.on_pass_begin(2)
    policy.on_pass_begin(1)
    with pytest.raises(RuntimeError, match="belady's future says"):
        policy.choose_victim([0], protected={3})


def test_make_policy_names_and_kwargs():
    assert sorted(POLICIES) == ["belady", "lfru", "lfu", "lru", "static"]
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert make_policy("lfru", half_life=8).half_life == 8
    assert isinstance(make_policy("belady", future=[[0]]), BeladyPolicy)
    with pytest.raises(ValueError, match=r"unknown replacement policy 'mru'; valid policies are \['belady'"):
        make_policy("mru")
    with pytest.raises(ValueError, match=r"policy 'belady'.*it takes \['future'\]"):
        make_policy("belady")
    with pytest.raises(ValueError, match="it takes no arguments"):
        make_policy("lru", half_life=3)


passes_strategy = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=9)


def build(name: str, passes: list[list[int]]) -> ReplacementPolicy:
    if name == "belady":
        return BeladyPolicy(passes)
    if name == "static":
        return StaticPolicy([sum(e in p for p in passes) for e in range(6)])
    return make_policy(name)


@settings(max_examples=60, deadline=None)
@given(passes=passes_strategy, num_slots=st.integers(3, 5))
def test_every_policy_keeps_a_pass_resident(passes, num_slots):
    for name in POLICIES:
        slot_map = SlotMap(6, num_slots, build(name, passes))
        for index, needed in enumerate(passes):
            slot_map.policy.on_pass_begin(index)
            slot_map.admit(needed)
            assert set(needed) <= set(slot_map.resident()), name
            assert len(slot_map.resident()) <= num_slots


def optimal_loads(passes: list[list[int]], num_slots: int) -> int:
    """Fewest loads of any demand-loading schedule, by exhaustive search over eviction choices."""
    sets = [frozenset(p) for p in passes]

    @functools.cache
    def best(index: int, resident: frozenset[int]) -> int:
        if index == len(sets):
            return 0
        needed = sets[index]
        missing = needed - resident
        overflow = len(resident) + len(missing) - num_slots
        if overflow <= 0:
            return len(missing) + best(index + 1, resident | missing)
        choices = itertools.combinations(sorted(resident - needed), overflow)
        return len(missing) + min(best(index + 1, (resident - set(out)) | missing) for out in choices)

    return best(0, frozenset())


@settings(max_examples=80, deadline=None)
@given(passes=passes_strategy, num_slots=st.integers(3, 4))
def test_belady_matches_the_exhaustive_optimum(passes, num_slots):
    assert replay(BeladyPolicy(passes), passes, num_slots, num_experts=6).stats.loads == optimal_loads(
        passes, num_slots
    )
