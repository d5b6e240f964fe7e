"""A model that does not fit: its experts are 4x the device budget, and the device side never holds more than the budget.

One engine, in a probe process that hooks the offloaded layer's loading and serving path
(``memory_budget_probe.py`` explains how the device and host tiers are told apart on CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO

pytestmark = pytest.mark.vllm


def test_experts_four_times_the_budget_load_and_serve_within_it(tiny_models, tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("memory_budget_probe.py")),
                           str(tiny_models["qwen3_moe"]), str(out)], capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    total, budget = report["all_expert_bytes"], report["budget_bytes"]
    print(f"expert bytes: all {total}, budget {budget}, peak on the device side {report['peak_device']} "
          f"(while loading {report['peak_device_loading']}), host store {report['host_final']}")
    assert total == 4 * budget  # the model does not fit
    assert report["offloaded_layers"] == report["moe_layers"] == 4
    # Loading: every weight-loader call was accounted, and no expert parameter reached the device.
    assert report["weight_loader_calls"] >= report["moe_layers"]
    assert report["parameters_stay_on_host"]  # vLLM does not move them to the device to post-process them
    assert report["peak_device_loading"] <= budget
    # Serving: the kernel reads only slot buffers, never the host store, and they fit the budget.
    assert report["peak_device"] <= budget
    assert report["kernel"]["count"] > 0 and report["kernel"]["reads_host_store"] == 0
    assert report["kernel"]["max_weight_bytes"] <= budget // report["moe_layers"]
    # The host store holds every expert exactly once (the parameters are its tensors, not a second copy).
    assert report["host_final"] == total
    # The experts really were swapped through the small cache while serving.
    assert report["slots"] == [4]
    assert report["cache"]["misses"] > 0 and report["cache"]["loads"] > 16 * report["moe_layers"]
    assert report["generated_tokens"] == 8 * 8
    # The engine's own accounting (get_expert_cache_stats()["memory"]) agrees with the probe's.
    assert report["memory"] == {"device_expert_bytes": report["peak_device"], "host_expert_bytes": total,
                                "all_expert_bytes": total, "budget_bytes": budget}
