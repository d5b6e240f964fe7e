"""Session fixtures shared by the test packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def random_vlm(tmp_path_factory) -> Path:
    """An untrained tiny Qwen3-VL-MoE written by the training script's `init` (same format as the bundled one)."""
    out = tmp_path_factory.mktemp("vlm") / "random-qwen3-vl-moe"
    proc = subprocess.run([sys.executable, "scripts/train_toy_vlm.py", "init", "--out", str(out), "--save-dtype",
                           "bfloat16", "--init-range", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
