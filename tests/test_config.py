"""ExpertOffloadConfig: every bad setting is refused with the bad value and the valid ones."""

from __future__ import annotations

import pytest

from vllm_expertflow.config import ExpertOffloadConfig, ExpertOffloadConfigError


def parse(**raw):
    return ExpertOffloadConfig.from_additional_config({"expert_offload": raw})


def test_absent_section_means_disabled():
    assert ExpertOffloadConfig.from_additional_config(None).enabled is False
    assert ExpertOffloadConfig.from_additional_config({"other": 1}).enabled is False


def test_values_from_cli_strings_are_coerced():
    config = parse(enabled="true", cache_slots="4", policy="LRU")
    assert (config.enabled, config.cache_slots, config.policy) == (True, 4, "lru")


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ExpertOffloadConfigError, match=r"'mru'.*valid policies are \['lru', 'lfu', 'lfru', 'expertflow'\]"):
        parse(enabled=True, cache_slots=4, policy="mru")


@pytest.mark.parametrize("raw, given", [({}, "neither"), ({"cache_slots": 4, "cache_gb": 1.0}, "both")])
def test_exactly_one_of_slots_and_gb(raw, given):
    with pytest.raises(ExpertOffloadConfigError, match=f"exactly one of cache_slots.*{given} given"):
        parse(enabled=True, **raw)


def test_sizes_need_not_be_given_when_disabled():
    assert parse(enabled=False).cache_slots is None


def test_unknown_key_is_refused():
    with pytest.raises(ExpertOffloadConfigError, match=r"unknown expert_offload key\(s\) \['slots'\]"):
        parse(enabled=True, slots=4)


@pytest.mark.parametrize("raw", [{"cache_slots": 0}, {"cache_slots": 2.5}, {"cache_gb": -1}, {"cache_gb": "x"}])
def test_non_positive_or_malformed_sizes(raw):
    with pytest.raises(ExpertOffloadConfigError):
        parse(enabled=True, **raw)


def test_slots_below_top_k_name_the_valid_range():
    config = parse(enabled=True, cache_slots=1)
    with pytest.raises(ExpertOffloadConfigError, match=r"cache_slots=1 is below the model's top_k=2.*2\.\.16"):
        config.plan_slots(num_experts=16, top_k=2, bytes_per_expert=1000, num_moe_layers=4)


def test_budget_below_top_k_names_the_minimum_gb():
    per_expert = 3 * 1024**2  # 3 MiB
    config = parse(enabled=True, cache_gb=0.01)
    with pytest.raises(ExpertOffloadConfigError, match=r"the minimum is 0\.09375 GB"):
        config.plan_slots(num_experts=16, top_k=2, bytes_per_expert=per_expert, num_moe_layers=16)


def test_budget_is_shared_over_layers_and_slots_are_clamped():
    per_expert = 1024**2
    config = parse(enabled=True, cache_gb=1.0)
    assert config.plan_slots(num_experts=64, top_k=2, bytes_per_expert=per_expert, num_moe_layers=32) == 32
    assert parse(enabled=True, cache_slots=99).plan_slots(
        num_experts=16, top_k=2, bytes_per_expert=1, num_moe_layers=1) == 16


def test_prefetch_modes_and_predictor_path_go_together():
    config = parse(enabled=True, cache_slots=4, prefetch="LOOKAHEAD")
    assert config.prefetch == "lookahead" and config.predictor_path is None
    assert parse(enabled=True, cache_slots=4, prefetch="predictor", predictor_path="p.pt").predictor_path == "p.pt"
    with pytest.raises(ExpertOffloadConfigError, match=r"'oracle'.*\['none', 'lookahead', 'predictor'\]"):
        parse(enabled=True, cache_slots=4, prefetch="oracle")
    with pytest.raises(ExpertOffloadConfigError, match=r"needs predictor_path \(--expert-predictor PATH\)"):
        parse(enabled=True, cache_slots=4, prefetch="predictor")
    with pytest.raises(ExpertOffloadConfigError, match=r"predictor_path='p.pt'.*only used with prefetch 'predictor'"):
        parse(enabled=True, cache_slots=4, prefetch="lookahead", predictor_path="p.pt")
    with pytest.raises(ExpertOffloadConfigError, match="needs enabled=True"):
        parse(enabled=False, prefetch="lookahead")


def test_lossy_miss_policies_are_refused_with_prefetch_but_run_in_the_global_pool():
    with pytest.raises(ExpertOffloadConfigError, match="miss_policy='skip'"):
        parse(enabled=True, cache_slots=4, miss_policy="skip", prefetch="lookahead")
    for miss_policy in ("skip", "substitute", "reroute"):
        assert parse(enabled=True, cache_slots=4, miss_policy=miss_policy, policy="expertflow").miss_policy == miss_policy


def test_reroute_margin_is_checked_and_defaults_to_one_logit():
    config = parse(enabled=True, cache_slots=4, miss_policy="reroute")
    assert config.reroute_margin is None and config.effective_reroute_margin == 1.0
    config = parse(enabled=True, cache_slots=4, miss_policy="reroute", reroute_margin="0.25")
    assert config.effective_reroute_margin == 0.25
    assert ExpertOffloadConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ExpertOffloadConfigError, match=r"reroute_margin=0.5 \(--expert-reroute-margin\) is only used "
                       r"with miss_policy 'reroute', but miss_policy is 'skip'"):
        parse(enabled=True, cache_slots=4, miss_policy="skip", reroute_margin=0.5)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ExpertOffloadConfigError, match="reroute_margin must be a finite number >= 0"):
            parse(enabled=True, cache_slots=4, miss_policy="reroute", reroute_margin=bad)
    with pytest.raises(ExpertOffloadConfigError, match="'drop'.*'reroute'"):
        parse(enabled=True, cache_slots=4, miss_policy="drop")


def test_scheduling_knobs_are_checked_and_reach_the_grouper_settings():
    config = ExpertOffloadConfig.from_additional_config(
        {"expert_offload": {"enabled": True, "cache_slots": 4, "min_run_fraction": "0.25", "max_overflow_ratio": "none"}}
    )
    assert (config.min_run_fraction, config.max_overflow_ratio) == (0.25, None)
    # The engine re-reads the settings from to_dict(): "no limit" must survive the round trip.
    assert ExpertOffloadConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ExpertOffloadConfigError, match=r"min_run_fraction must be in \(0, 1\], got 0\.0"):
        ExpertOffloadConfig.from_additional_config({"expert_offload": {"min_run_fraction": 0}})
    with pytest.raises(ExpertOffloadConfigError, match=r"max_overflow_ratio must be in \[0, 1\] or null.*got 2\.0"):
        ExpertOffloadConfig.from_additional_config({"expert_offload": {"max_overflow_ratio": 2}})


def test_the_engine_rebuilds_the_front_ends_config_without_parsing_again():
    front = parse(enabled=True, cache_gb=1.0, max_overflow_ratio="none").resolved(slots_per_layer=6)
    serialized = front.to_serialized()
    assert ExpertOffloadConfig.from_serialized({"expert_offload": serialized}) == front
    assert ExpertOffloadConfig.from_serialized(None) == ExpertOffloadConfig()
    assert front.groups_requests(num_experts=16) and not front.groups_requests(num_experts=6)
    assert not front.resolved(None).groups_requests(num_experts=16)  # not resolved: never groups
    # A raw user dict reaching the engine means the front end's checks never ran: refuse it.
    with pytest.raises(ExpertOffloadConfigError, match="without the front end's startup checks"):
        ExpertOffloadConfig.from_serialized({"expert_offload": {"enabled": True, "cache_slots": 4}})
    # What the front end resolves is not a user setting.
    with pytest.raises(ExpertOffloadConfigError, match=r"unknown expert_offload key\(s\) \['slots_per_layer'\]"):
        parse(enabled=True, cache_slots=4, slots_per_layer=4)
