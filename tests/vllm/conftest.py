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
COVERAGE_DIR = REPO / "runs" / "coverage"


def record_coverage(results: str, shape: str, entry: dict) -> None:
    """Add one architecture's observed outcome to ``runs/coverage/<results>.json``.

    ``scripts/make_coverage_table.py`` renders these files into the README's table; an entry
    needs ``hf_class``, ``example``, ``modality``, ``routing``, ``shared_experts``, ``status``,
    ``test`` and, outside tests/vllm/test_architectures.py, ``test_file``.
    """
    COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
    path = COVERAGE_DIR / f"{results}.json"
    entries = json.loads(path.read_text()) if path.exists() else {}
    entries[shape] = entry
    path.write_text(json.dumps(entries, indent=1, sort_keys=True))


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
