"""Lossless offload: greedy output equals plain vLLM's at every cache size.

Plain vLLM runs in its own process with the plugin not loaded at all; the offloaded runs
share one process, one engine after another, with the plugin loaded.
"""

from __future__ import annotations

import json

import pytest

from tests.vllm.conftest import record_coverage, run_generate

pytestmark = pytest.mark.vllm


def offload(slots: int) -> dict:
    return {"enabled": True, "cache_slots": slots}


# The coverage table's columns for the families whose rows this test provides (Qwen2-MoE's row
# comes from tests/vllm/test_architectures.py, which runs it at the table's slot counts).
COVERAGE = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen/Qwen3-30B-A3B (text model of Qwen3-VL-30B-A3B)",
                  "softmax top-k, renormalised", "none"),
    "mixtral": ("MixtralForCausalLM", "mistralai/Mixtral-8x7B-Instruct-v0.1", "softmax over the top-k logits", "none"),
}


@pytest.mark.parametrize("shape", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_greedy_tokens_identical_at_every_cache_size(shape, tiny_models, tmp_path, request):
    model = tiny_models[shape]
    config = json.loads((model / "config.json").read_text())
    num_experts = config.get("num_experts") or config["num_local_experts"]
    top_k = config["num_experts_per_tok"]
    sizes = sorted({top_k, num_experts // 4, num_experts // 2, num_experts})

    [plain] = run_generate(model, [{"name": "plain"}], plain_vllm=True, tmp_path=tmp_path)
    runs = [{"name": "plugin-offload-off"}] + [{"name": f"slots-{s}", "offload": offload(s)} for s in sizes]
    results = run_generate(model, runs, tmp_path=tmp_path)

    assert len(plain["tokens"]) >= 16
    assert len({len(p) for p in plain["tokens"]}) == 1  # ignore_eos: every request generated in full
    for result in results:
        assert result["tokens"] == plain["tokens"], f"{shape} {result['name']} differs from plain vLLM"

    by_name = {r["name"]: r for r in results}
    assert by_name["plugin-offload-off"]["cache"] is None
    smallest, full = by_name[f"slots-{sizes[0]}"]["cache"], by_name[f"slots-{num_experts}"]["cache"]
    num_layers = config["num_hidden_layers"]
    assert len(smallest["layers"]) == num_layers
    # top_k slots cannot hold a batch's experts: steps were split into several passes
    assert smallest["passes"] > smallest["steps"]
    assert smallest["loads"] > full["loads"]
    # with every expert resident, nothing is loaded twice (the warm-up loaded most of them)
    assert full["loads"] <= num_experts * num_layers
    assert full["evictions"] == 0
    assert full["hits"] + full["misses"] > 0
    if shape in COVERAGE:
        hf_class, example, routing, shared = COVERAGE[shape]
        slots = "/".join(str(s) for s in sizes)
        record_coverage("equivalence", shape, {
            "hf_class": hf_class, "example": example, "modality": "text", "routing": routing, "shared_experts": shared,
            "status": f"lossless at {slots} of {num_experts} slots (expertflow scheduling)",
            "test": request.node.name, "test_file": "tests/vllm/test_offload_equivalence.py"})
