"""Live prefetch (lookahead, learned predictor) and the expertflow global pool are lossless.

Plain vLLM (plugin not loaded) against the plugin in fp32 greedy decoding, on two model
shapes. The predictor has random weights: its predictions are poor, which must cost loads,
never tokens.
"""

from __future__ import annotations

import json

import pytest

from tests.vllm.conftest import run_generate
from vllm_expertflow.core.predictors import RoutingPathPredictor

pytestmark = pytest.mark.vllm

FP32 = ["--dtype", "float32", "--num-prompts", "8", "--max-tokens", "10"]


@pytest.mark.parametrize("shape", ["qwen3_moe", "mixtral"])
def test_prefetch_and_expertflow_pool_keep_greedy_tokens_identical(shape, tiny_models, tmp_path):
    model = tiny_models[shape]
    config = json.loads((model / "config.json").read_text())
    num_experts = config.get("num_experts") or config["num_local_experts"]
    top_k = config["num_experts_per_tok"]
    predictor_path = tmp_path / "predictor.pt"
    RoutingPathPredictor(config["num_hidden_layers"], num_experts, top_k, hidden=16, seed=3).save(predictor_path)
    # 4 of 16 (qwen3_moe) or 8 (mixtral): room in the pool beyond each layer's floor of top_k experts
    slots = 4
    base = {"enabled": True, "cache_slots": slots, "scheduling": "fcfs"}
    predictor = {"prefetch": "predictor", "predictor_path": str(predictor_path)}
    runs = [
        {"name": "lookahead", "offload": {**base, "prefetch": "lookahead"}},
        {"name": "predictor", "offload": {**base, **predictor}},
        {"name": "expertflow", "offload": {**base, "policy": "expertflow"}},
        {"name": "expertflow-lookahead", "offload": {**base, "policy": "expertflow", "prefetch": "lookahead"}},
        {"name": "expertflow-predictor", "offload": {**base, "policy": "expertflow", **predictor}},
    ]
    [plain] = run_generate(model, [{"name": "plain"}], plain_vllm=True, tmp_path=tmp_path, extra_args=FP32)
    results = {r["name"]: r for r in run_generate(model, runs, tmp_path=tmp_path, extra_args=FP32)}
    assert len(plain["tokens"]) == 8 and all(len(t) == 10 for t in plain["tokens"])
    for name, result in results.items():
        assert result["tokens"] == plain["tokens"], f"{shape} {name} differs from plain vLLM"
        cache = result["cache"]
        assert cache["hits"] + cache["misses"] > 0
        assert cache["loads"] == cache["misses"] + cache["prefetch_loads"], name  # demand loads are the misses
        assert cache["prefetch_hits"] <= cache["prefetch_loads"]
    for name in ("lookahead", "predictor", "expertflow-lookahead"):
        assert results[name]["cache"]["prefetch_loads"] > 0, f"{name}: no prefetch loads"
        assert results[name]["cache"]["prefetch_hits"] > 0, f"{name}: no prefetch hits"
    assert results["expertflow"]["cache"]["prefetch_loads"] == 0  # no forecast prefetch without a predictor
    # The pool is shared: each layer's kernel sees every slot of it.
    assert {layer["slots"] for layer in results["expertflow"]["cache"]["layers"]} == {
        slots * config["num_hidden_layers"]
    }
