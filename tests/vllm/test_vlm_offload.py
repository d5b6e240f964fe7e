"""A Qwen3-VL-MoE with image inputs: offload is lossless there too (the bundled model's architecture)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO, run_generate

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def random_vlm(tmp_path_factory) -> Path:
    """An untrained tiny Qwen3-VL-MoE written by the training script's `init` (same format as the bundled one)."""
    out = tmp_path_factory.mktemp("vlm") / "random-qwen3-vl-moe"
    proc = subprocess.run([sys.executable, "scripts/train_toy_vlm.py", "init", "--out", str(out), "--save-dtype",
                           "bfloat16", "--init-range", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_image_requests_identical_at_every_cache_size(random_vlm, tmp_path):
    [plain] = run_generate(random_vlm, [{"name": "plain"}], plain_vllm=True, tmp_path=tmp_path,
                           extra_args=["--images"])
    runs = [{"name": f"slots-{s}", "offload": {"enabled": True, "cache_slots": s}} for s in (2, 4, 8)]
    results = run_generate(random_vlm, runs, tmp_path=tmp_path, extra_args=["--images"])
    for result in results:
        assert result["tokens"] == plain["tokens"], result["name"]
    assert results[0]["cache"]["passes"] > results[0]["cache"]["steps"]  # image prefills overflowed 2 slots
