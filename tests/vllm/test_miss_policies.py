"""Lossy miss policies in a live engine: reroute's margin bounds its change, and the global pool runs them."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import run_generate

pytestmark = pytest.mark.vllm


def test_reroute_margin_zero_is_exact_and_a_wide_margin_loads_less(tiny_models, tmp_path):
    model = tiny_models["qwen3_moe"]  # 16 experts, top-2, 4 MoE layers
    base = {"enabled": True, "cache_slots": 4, "scheduling": "fcfs"}
    runs = [
        {"name": "exact", "offload": base},
        {"name": "reroute-0", "offload": {**base, "miss_policy": "reroute", "reroute_margin": 0.0}},
        {"name": "reroute-wide", "offload": {**base, "miss_policy": "reroute", "reroute_margin": 50.0}},
        {"name": "pool-skip", "offload": {**base, "policy": "expertflow", "miss_policy": "skip"}},
        {"name": "pool-reroute", "offload": {**base, "policy": "expertflow", "miss_policy": "reroute"}},
    ]
    results = {r["name"]: r for r in run_generate(model, runs, tmp_path=tmp_path)}
    exact, zero, wide = results["exact"], results["reroute-0"], results["reroute-wide"]
    # Margin 0 accepts no replacement: every miss loads, as in exact mode, so the same step composition
    # gives the same tokens and the same loads.
    assert zero["tokens"] == exact["tokens"]
    assert zero["cache"]["loads"] == exact["cache"]["loads"]
    # A margin wider than any logit gap takes a resident expert whenever the token has a free one: few loads.
    assert wide["cache"]["loads"] < exact["cache"]["loads"] / 2
    assert wide["tokens"] != exact["tokens"]
    for name in ("pool-skip", "pool-reroute"):
        result = results[name]
        assert len(result["tokens"]) == len(exact["tokens"])
        assert all(len(t) == len(exact["tokens"][0]) for t in result["tokens"])
        assert result["cache"]["hits"] + result["cache"]["misses"] > 0
