"""Fixtures for tests that start vLLM engines: tiny models built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_expertflow.tiny_models import build_tiny_moe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {shape: build_tiny_moe(shape, root / shape) for shape in ("qwen3_moe", "mixtral", "qwen2_moe")}


def run_generate(model: Path, runs: list[dict], *, plain_vllm: bool = False, tmp_path: Path, extra_args=(),
                 timeout: int = 600) -> list[dict]:
    """Run ``vllm_expertflow.generate`` in a fresh process (``plain_vllm``: without the plugin)."""
    out = tmp_path / f"result-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    env = dict(os.environ)
    if plain_vllm:
        env["VLLM_PLUGINS"] = ""  # vLLM loads no general plugin at all
    cmd = [sys.executable, "-m", "vllm_expertflow.generate", "--model", str(model), "--runs", json.dumps(runs),
           "--out", str(out), *extra_args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"generate failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())
