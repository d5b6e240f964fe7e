"""A Qwen3-VL-MoE with image inputs: offload is lossless there too (the bundled model's architecture)."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import run_generate

pytestmark = pytest.mark.vllm




def test_image_requests_identical_at_every_cache_size(random_vlm, tmp_path):
    [plain] = run_generate(random_vlm, [{"name": "plain"}], plain_vllm=True, tmp_path=tmp_path,
                           extra_args=["--images"])
    runs = [{"name": f"slots-{s}", "offload": {"enabled": True, "cache_slots": s}} for s in (2, 4, 8)]
    results = run_generate(random_vlm, runs, tmp_path=tmp_path, extra_args=["--images"])
    for result in results:
        assert result["tokens"] == plain["tokens"], result["name"]
    assert results[0]["cache"]["passes"] > results[0]["cache"]["steps"]  # image prefills overflowed 2 slots
