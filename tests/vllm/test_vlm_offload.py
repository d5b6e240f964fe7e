"""A Qwen3-VL-MoE with image inputs: offload is lossless there too (the bundled model's architecture)."""

from __future__ import annotations

import json

import pytest

from tests.vllm.conftest import record_coverage, run_generate

pytestmark = pytest.mark.vllm




def test_image_requests_identical_at_every_cache_size(random_vlm, tmp_path, request):
    [plain] = run_generate(random_vlm, [{"name": "plain"}], plain_vllm=True, tmp_path=tmp_path,
                           extra_args=["--images"])
    runs = [{"name": f"slots-{s}", "offload": {"enabled": True, "cache_slots": s}} for s in (2, 4, 8)]
    results = run_generate(random_vlm, runs, tmp_path=tmp_path, extra_args=["--images"])
    for result in results:
        assert result["tokens"] == plain["tokens"], result["name"]
    assert results[0]["cache"]["passes"] > results[0]["cache"]["steps"]  # image prefills overflowed 2 slots
    text_config = json.loads((random_vlm / "config.json").read_text())["text_config"]
    num_experts = text_config.get("num_experts") or text_config["num_local_experts"]
    record_coverage("equivalence", "qwen3_vl_moe", {
        "hf_class": "Qwen3VLMoeForConditionalGeneration", "example": "Qwen/Qwen3-VL-30B-A3B-Instruct",
        "modality": "image+text", "routing": "softmax top-k, renormalised", "shared_experts": "none",
        "status": f"lossless at 2/4/8 of {num_experts} slots (expertflow scheduling)", "test": request.node.name,
        "test_file": "tests/vllm/test_vlm_offload.py"})
