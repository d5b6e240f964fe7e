import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.test_simulate import make_trace
from vllm_expertflow.core.expertflow_policy import ExpertFlowCache
from vllm_expertflow.core.predictors import DemandForecast, HistoryPredictor, RoutingPathPredictor, multi_hot
from vllm_expertflow.core.simulate import _step_passes, layer_passes, simulate
from vllm_expertflow.core.trace import TraceWriter
from vllm_expertflow.simulate import main as cli_main


def perfect_forecast(trace) -> DemandForecast:
    """What a perfect routing predictor would forecast: each step's own needs, with certainty."""
    demand = np.stack([multi_hot(step, trace.num_experts).max(axis=0) for step in trace.iter_steps()])
    return DemandForecast("perfect", demand.astype(np.float64))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_experts=st.integers(4, 10),
    top_k=st.integers(1, 3),
    capacity_extra=st.integers(0, 4),
    max_tokens=st.integers(1, 5),
)
def test_loads_never_beat_belady_in_any_layer(seed, num_experts, top_k, capacity_extra, max_tokens):
    # Belady's loads bound every policy's loads at a given capacity, prefetching ones too: a prefetch only
    # moves a load earlier. Demand misses carry no such bound (see the next test).
    trace = make_trace(seed, num_steps=12, max_tokens=max_tokens, num_experts=num_experts, top_k=top_k)
    capacity = min(top_k + capacity_extra, num_experts)
    belady = simulate(trace, "belady", capacity)
    for predictor in ("history", perfect_forecast(trace)):
        result = simulate(trace, "expertflow", capacity, predictor=predictor)
        for ours, best in zip(result.per_layer, belady.per_layer, strict=True):
            assert ours["loads"] >= best["loads"]


def test_prefetching_turns_misses_into_prefetches_so_demand_misses_can_fall_below_belady():
    trace = make_trace(3, num_steps=30, max_tokens=2, num_experts=8)
    belady = simulate(trace, "belady", 4)
    result = simulate(trace, "expertflow", 4, predictor=perfect_forecast(trace), policy_kwargs={"half_life": 8})
    assert result.prefetch_loads > 0 and result.prefetch_hits == result.prefetch_loads  # a perfect forecast
    assert result.demand_misses < belady.loads <= result.loads
    no_prefetch = simulate(trace, "expertflow", 4, predictor=perfect_forecast(trace), policy_kwargs={"prefetch": False})
    assert no_prefetch.prefetch_loads == 0 and no_prefetch.loads == no_prefetch.demand_misses >= belady.loads


@pytest.mark.parametrize("budget_mode", ["per-layer", "global"])
def test_counts_are_consistent(budget_mode):
    trace = make_trace(1)
    result = simulate(trace, "expertflow", 3, budget_mode=budget_mode, bytes_per_expert=1000, link_gbps=2.0)
    assert result.predictor == "history" and result.eviction.startswith("expertflow (history predictor)")
    assert result.loads == result.demand_misses + result.prefetch_loads
    assert result.loads == sum(row["loads"] for row in result.per_layer)
    assert result.prefetch_loads == sum(row["prefetch_loads"] for row in result.per_layer)
    assert result.prefetch_hits <= result.prefetch_loads
    assert result.hit_rate == pytest.approx(result.hits / (result.hits + result.demand_misses))
    assert result.bytes_loaded == 1000 * result.loads
    # Only demand misses stall; prefetches are assumed to overlap compute.
    assert result.projected_stall_s == pytest.approx(1000 * result.demand_misses / 2e9)
    if budget_mode == "per-layer":
        needed = sum(len(p) for layer in range(trace.num_layers) for p in layer_passes(trace, layer, 3))
        assert result.hits + result.demand_misses == needed
        assert result.total_slots == 3 * trace.num_layers


def test_global_mode_keeps_top_k_experts_per_layer():
    trace = make_trace(2, num_steps=30, max_tokens=5, num_experts=8, top_k=2, num_layers=4)
    cache = ExpertFlowCache(8, 4, 3, budget_mode="global", min_per_layer=2)
    forecast = DemandForecast.of(HistoryPredictor(4, 8, 2), trace)
    most = 0
    for index, step_ids in enumerate(trace.iter_steps()):
        cache.begin_step(forecast.demand[index])
        for layer in range(4):
            passes = _step_passes(step_ids[:, layer, :], cache.max_pass_experts(layer))
            for pass_index, needed in enumerate(passes):
                cache.admit(layer, needed, passes[pass_index + 1 :])
                assert sum(len(cache.resident(other)) for other in range(4)) <= cache.num_slots
                most = max(most, len(cache.resident(layer)))
        # Every layer has run and needed >= top_k experts, so from here on none may drop below top_k.
        assert all(len(cache.resident(layer)) >= 2 for layer in range(4))
    # The pool is shared by demand, not split evenly: a layer held more than its even share of 3.
    assert most > 3
    assert cache.max_pass_experts(0) == 3 * 4 - 3 * 2


def test_global_mode_with_one_layer_is_per_layer_mode():
    trace = make_trace(5, num_layers=1)
    per_layer = simulate(trace, "expertflow", 3)
    pooled = simulate(trace, "expertflow", 3, budget_mode="global")
    assert (pooled.loads, pooled.demand_misses, pooled.hits) == (
        per_layer.loads,
        per_layer.demand_misses,
        per_layer.hits,
    )
    assert simulate(trace, "belady", 3, budget_mode="global").loads == simulate(trace, "belady", 3).loads


@pytest.mark.parametrize("seed", range(4))
def test_global_belady_is_the_pooled_reference(seed):
    trace = make_trace(seed, num_steps=15)
    belady = simulate(trace, "belady", 3, budget_mode="global")
    assert belady.eviction == "global Belady over (layer, expert) keys"
    assert belady.loads <= simulate(trace, "lru", 3, budget_mode="global").loads


def test_later_passes_of_the_step_are_kept():
    cache = ExpertFlowCache(6, 1, 3, prefetch=False)
    cache.begin_step(np.zeros((1, 6)))
    cache.admit(0, [0, 1, 2])
    # Expert 3 needs a slot; experts 1 and 2 are equally cold, but 1 is needed by the step's next pass.
    cache.admit(0, [3, 0], later=[[1, 4]])
    assert cache.resident(0) == {0, 1, 3}


def test_prefetch_never_evicts_a_key_the_step_is_likely_to_need():
    # Two layers share 4 slots (floor 1 each). Layer 1 holds 0, 1, 2 from the last step.
    cache = ExpertFlowCache(6, 2, 2, budget_mode="global", min_per_layer=1, prefetch=True)
    cache.begin_step(np.zeros((2, 6)))
    cache.admit(0, [5])
    cache.admit(1, [0, 1, 2])
    demand = np.zeros((2, 6))
    demand[0, 4] = 0.95  # layer 0 will surely need expert 4: prefetch it
    demand[1, [0, 1, 2]] = [0.5, 0.3, 0.05]  # which layer-1 expert may it displace?
    assert cache.begin_step(demand) == [(0, 4)]
    # Only the one the step is unlikely to need (0.05 <= 1 - 0.9) was evicted ...
    assert cache.resident(1) == {0, 1}
    demand[0, 3] = 0.95
    demand[0, 5] = 0.5
    # ... and with none left below that, the next prefetch is not made.
    assert cache.begin_step(demand) == []
    assert cache.resident(1) == {0, 1}


def test_the_vectorised_next_use_is_the_scalar_one():
    # _victim ranks pool keys with _next_use_of and a layer's own keys with _next_use: one formula, two codes.
    trace = make_trace(3, num_steps=12, max_tokens=4, num_experts=8, top_k=2, num_layers=3)
    cache = ExpertFlowCache(8, 3, 3, budget_mode="global", min_per_layer=2)
    forecast = DemandForecast.of(HistoryPredictor(3, 8, 2), trace)
    layers, experts = np.meshgrid(np.arange(3), np.arange(8), indexing="ij")
    for index, step_ids in enumerate(trace.iter_steps()):
        cache.begin_step(forecast.demand[index])
        for layer in range(3):
            for needed in _step_passes(step_ids[:, layer, :], cache.max_pass_experts(layer)):
                cache.admit(layer, needed)
            scalar = [
                cache._next_use(int(lay), int(e), {}) for lay, e in zip(layers.ravel(), experts.ravel(), strict=True)
            ]
            assert cache._next_use_of(layers.ravel(), experts.ravel()).tolist() == scalar


def test_the_vectorised_victims_are_the_scalar_ones():
    # In global mode _victims ranks the pool with numpy; both rules must pick what a plain loop over the
    # same candidates (resident, not protected, not another layer's floor) would, soon-needed keys included.
    trace = make_trace(4, num_steps=15, max_tokens=4, num_experts=8, top_k=2, num_layers=3)
    cache = ExpertFlowCache(8, 3, 3, budget_mode="global", min_per_layer=2)
    forecast = DemandForecast.of(HistoryPredictor(3, 8, 2), trace)
    rng = np.random.default_rng(0)
    checked = 0
    for index, step_ids in enumerate(trace.iter_steps()):
        cache.begin_step(forecast.demand[index])
        for layer in range(3):
            for needed in _step_passes(step_ids[:, layer, :], cache.max_pass_experts(layer)):
                cache.admit(layer, needed)
            own = sorted(cache.resident(layer))
            soon = {int(e): int(d) for e, d in zip(rng.permutation(own)[:2], (2, 1), strict=False)}
            protected = {(layer, int(rng.choice(own)))}
            candidates = [
                (owner, e)
                for owner in range(3)
                for e in sorted(cache.resident(owner))
                if (owner, e) not in protected and (owner == layer or len(cache.resident(owner)) > 2)
            ]

            def later(key, soon=soon, layer=layer):
                return soon.get(key[1], 0) if key[0] == layer else 0

            by_demand = min(
                candidates,
                key=lambda k: (-cache._next_use(*k, soon if k[0] == layer else {}), cache._last_use[k], k),
            )
            by_lru = min(candidates, key=lambda k: (later(k) > 0, -later(k), cache._recent[k], k))
            assert cache._victims(layer, protected, soon) == (by_demand, by_lru)
            checked += 1
    assert checked == 3 * trace.num_steps


def skewed_decode_trace(seed: int):
    # One token a step (batch-1 decode): every miss evicts, so the eviction rule decides the loads.
    return make_trace(seed, num_steps=300, max_tokens=1, num_experts=8, top_k=2, num_layers=3)


def misleading_forecast(trace) -> DemandForecast:
    """Confidently wrong: the rarer an expert of a layer, the likelier the forecast calls it."""
    counts = np.stack([np.bincount(trace.topk_ids[:, layer].ravel(), minlength=8) for layer in range(3)])
    rarity = 1.0 - counts / counts.max(axis=1, keepdims=True)
    return DemandForecast("misleading", np.broadcast_to(rarity, (trace.num_steps, 3, 8)).copy())


@pytest.mark.parametrize("budget_mode", ["per-layer", "global"])
@pytest.mark.parametrize("seed", range(3))
def test_adaptive_eviction_falls_back_to_lru_when_the_forecast_misleads(budget_mode, seed):
    trace = skewed_decode_trace(seed)
    lru = simulate(trace, "lru", 4, budget_mode=budget_mode).loads

    def loads(forecast, eviction):
        options = {"eviction": eviction, "prefetch": False}
        return simulate(
            trace, "expertflow", 4, budget_mode=budget_mode, predictor=forecast, policy_kwargs=options
        ).loads

    bad = misleading_forecast(trace)
    assert loads(bad, "demand") > 1.1 * lru  # the forecast alone misleads eviction ...
    assert loads(bad, "adaptive") <= 1.02 * lru  # ... the adaptive rule notices and does about as LRU does
    good = perfect_forecast(trace)
    # A forecast worth following is followed: the gain over LRU stays.
    assert loads(good, "adaptive") <= 1.02 * loads(good, "demand") < lru


def test_adaptive_eviction_scores_the_rule_whose_victim_came_back_first():
    cache = ExpertFlowCache(4, 1, 2, prefetch=False, regret_half_life=1e9)
    demand = np.array([[0.0, 0.9, 0.0, 0.0]])  # the forecast wants expert 1 kept, LRU would evict it
    cache.begin_step(demand)
    cache.admit(0, [1])
    cache.admit(0, [0])
    cache.admit(0, [2])  # demand evicts 0 (less likely), LRU would have evicted 1 (older): a disagreement
    assert cache.resident(0) == {1, 2} and cache.followed == {"demand": 1, "lru": 0}
    # 0, demand's victim, is needed before 1: demand's pick was the wrong one, so this very miss
    # follows LRU and evicts the least recently used, 1, where demand would take 2.
    cache.admit(0, [0])
    assert cache._trust[0] == -1.0
    assert cache.resident(0) == {0, 2} and cache.followed == {"demand": 1, "lru": 1}


def test_bad_options_name_the_valid_ones():
    trace = make_trace(7, num_steps=3)
    with pytest.raises(ValueError, match=r"unknown expertflow option\(s\) \['alpha'\]; valid options are \['prefetch'"):
        simulate(trace, "expertflow", 3, policy_kwargs={"alpha": 1})
    with pytest.raises(ValueError, match="a predictor is only used by policy 'expertflow', got one with policy 'lru'"):
        simulate(trace, "lru", 3, predictor="history")
    with pytest.raises(ValueError, match=r"prefetch_threshold must be a probability in \(0, 1\], got 0"):
        simulate(trace, "expertflow", 3, policy_kwargs={"prefetch_threshold": 0})
    with pytest.raises(
        ValueError, match=r"unknown eviction rule 'belady'; valid rules are \['adaptive', 'demand', 'lru'\]"
    ):
        simulate(trace, "expertflow", 3, policy_kwargs={"eviction": "belady"})
    with pytest.raises(ValueError, match="regret_half_life must be a positive number of settled disagreements, got 0"):
        simulate(trace, "expertflow", 3, policy_kwargs={"regret_half_life": 0})
    with pytest.raises(ValueError, match="demand forecast has shape"):
        simulate(trace, "expertflow", 3, predictor=DemandForecast("x", np.zeros((1, 1, 1))))


def write_trace(trace, path):
    with TraceWriter(path, trace.num_experts, trace.top_k, trace.layer_names, bytes_per_expert=4096) as writer:
        for start, end in trace.step_bounds():
            writer.record_step(
                trace.step_id[start], trace.request_id[start:end], trace.position[start:end], trace.topk_ids[start:end]
            )


def test_cli_expertflow_json(tmp_path, capsys):
    # In-process: a subprocess would spend seconds importing torch (test_simulate runs the real CLI once).
    trace = make_trace(8)
    write_trace(trace, tmp_path / "trace")
    common = ["--trace", str(tmp_path / "trace"), "--policy", "expertflow", "--capacity", "3", "--json"]
    assert cli_main([*common, "--budget-mode", "global", "--predictor", "history"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("loads", "demand_misses", "prefetch_loads", "hit_rate", "bytes_loaded", "projected_stall_s"):
        assert key in report
    assert report["loads"] == report["demand_misses"] + report["prefetch_loads"]
    assert report["loads"] == simulate(trace, "expertflow", 3, budget_mode="global").loads
    assert report["projected_stall_s"] == pytest.approx(4096 * report["demand_misses"] / 25e9)

    learned = RoutingPathPredictor(trace.num_layers, trace.num_experts, trace.top_k, hidden=8)
    learned.fit([trace], epochs=1)
    learned.save(tmp_path / "rpp.pt")
    assert cli_main([*common, "--predictor", str(tmp_path / "rpp.pt"), "--no-prefetch"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["predictor"] == "learned" and report["prefetch_loads"] == 0

    assert cli_main([*common, "--predictor", "oracle"]) == 2
    assert "valid choices are 'frequency', 'history'" in capsys.readouterr().err
    assert cli_main([*common[:3], "lru", *common[4:], "--predictor", "history"]) == 2
    assert "only used by policy 'expertflow'" in capsys.readouterr().err
