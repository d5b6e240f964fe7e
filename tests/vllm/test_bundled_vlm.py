"""The bundled VLM through vLLM: it answers easy-vqa, and lossless offload leaves every answer unchanged."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "toy-qwen3-vl-moe"


def test_bundled_vlm_scores_and_lossless_offload_keeps_its_answers(tmp_path):
    assert MODEL.is_dir(), f"{MODEL} missing: run scripts/train_toy_vlm.py train"
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vllm_expertflow.eval.sweep", "--model", str(MODEL), "--out", str(out),
           "--limit", "24", "--regimes", "direct", "--capacities", "25", "--budget-modes", "per-layer,global",
           "--schedulings", "expertflow", "--miss-policies", "exact", "--no-plots"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    with open(out / "cells.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    base = rows["direct-off"]
    # 24 VQAv2-style questions and 24 MMBench-style ones (96 rotations); the card reports 0.985 on 2000.
    assert float(base["vqav2_acc"]) >= 0.85 and float(base["mmbench_circular_acc"]) >= 0.75, base
    for cell in ("direct-per-layer-s2-expertflow-exact", "direct-global-s2-expertflow-exact"):
        row = rows[cell]
        assert row["status"] == "ok", row
        assert float(row["agree_all"]) == 1.0, row  # 2 of 8 experts per layer, every answer unchanged
        assert float(row["loads_per_token"]) > 0 and float(row["hit_rate"]) < 1
