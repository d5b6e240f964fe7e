"""The study model's training script: deterministic given its seed, and it builds the study shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")
REPO = Path(__file__).resolve().parents[1]


def _train(out: Path) -> None:
    cmd = [sys.executable, "scripts/train_study_vlm.py", "train", "--out", str(out), "--steps", "2", "--batch", "4",
           "--monitor-every", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_training_is_deterministic_and_builds_the_study_shape(tmp_path):
    _train(tmp_path / "a")
    _train(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    text = json.loads((tmp_path / "a" / "config.json").read_text())["text_config"]
    assert (text["num_local_experts"], text["num_experts_per_tok"], text["num_hidden_layers"]) == (128, 8, 6), text
