"""The upstream patch series (patches/vllm) applies to the installed vLLM and carries the plugin.

The installed ``vllm`` package is copied to a temporary directory, the series is applied
with ``git apply``, and then, with that copy first on the path and the plugin forced onto
vLLM's public hooks (``EXPERTFLOW_VLLM_HOOKS=public``: no wrapper of the five replaced
vLLM internals is installed, and a missing hook is an error):
- the series' own unit tests pass (they live inside the patches, as vLLM tests would),
- the plugin's lossless equivalence test and an expert-aware scheduling test pass.
A patch that no longer applies fails the test at ``git apply --check``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vllm

from vllm_expertflow.vllm_adapter.vllm_api import HOOKS_ENV

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
SERIES = sorted((REPO / "patches" / "vllm").glob("*.patch"))
PLUGIN_TESTS = [
    "tests/vllm/test_offload_equivalence.py::test_greedy_tokens_identical_at_every_cache_size[qwen3_moe]",
    # Held requests keep their places while others wait for admission: the select_running hook's contract.
    "tests/vllm/test_scheduling.py::test_held_requests_keep_their_places_when_requests_wait_for_admission",
]


def copy_vllm(destination: Path) -> Path:
    """A copy of the installed vllm package; compiled extensions are linked, not copied."""
    source = Path(vllm.__file__).parent

    def copy(src: str, dst: str) -> None:
        if src.endswith(".so"):
            os.symlink(src, dst)
        else:
            shutil.copy2(src, dst)  # keeps mtimes, so the copied bytecode stays valid

    shutil.copytree(source, destination / "vllm", copy_function=copy)
    return destination


@pytest.fixture(scope="module")
def patched_vllm(tmp_path_factory) -> Path:
    root = copy_vllm(tmp_path_factory.mktemp("patched-vllm"))
    assert len(SERIES) >= 5, f"patch series missing: {SERIES}"
    for patch in SERIES:
        check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, capture_output=True, text=True)
        assert check.returncode == 0, f"{patch.name} no longer applies to the installed vLLM:\n{check.stderr}"
        subprocess.run(["git", "apply", str(patch)], cwd=root, check=True)
    return root


def run_pytest(patched: Path, tests: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(patched), str(REPO), env.get("PYTHONPATH", "")])
    env[HOOKS_ENV] = "public"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def test_series_unit_tests_pass_on_the_patched_copy(patched_vllm):
    tests = sorted(str(path.relative_to(patched_vllm)) for path in (patched_vllm / "tests").rglob("test_*.py"))
    assert len(tests) == len(SERIES)  # one unit test file per patch
    proc = run_pytest(patched_vllm, tests, cwd=patched_vllm)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_plugin_runs_on_public_hooks_only(patched_vllm):
    probe = (
        "import vllm, vllm_expertflow.vllm_adapter.vllm_api as api; "
        "print(vllm.__file__); print(api.public_hooks()); print(api.hooks_summary())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(patched_vllm), str(REPO)]), HOOKS_ENV: "public"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(patched_vllm) in proc.stdout
    assert "wrapped: none" in proc.stdout

    proc = run_pytest(patched_vllm, PLUGIN_TESTS, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert f"{len(PLUGIN_TESTS)} passed" in proc.stdout


def test_feature_checks_on_the_installed_vllm(monkeypatch):
    from vllm_expertflow.vllm_adapter import vllm_api

    def hooks(mode: str) -> dict[str, bool]:
        monkeypatch.setenv(HOOKS_ENV, mode)
        vllm_api.public_hooks.cache_clear()
        return vllm_api.public_hooks()

    try:
        found = hooks("auto")
        assert set(found) == {"cli_args", "step_hooks", "select_running", "apply_to_weights", "rebind_scan"}
        assert not any(hooks("wrappers").values())
        if not all(found.values()):
            missing = [name for name, present in found.items() if not present]
            with pytest.raises(RuntimeError, match=f"lacks the hooks {', '.join(missing)}"):
                hooks("public")
        with pytest.raises(ValueError, match="valid: auto, public, wrappers"):
            hooks("sometimes")
    finally:
        vllm_api.public_hooks.cache_clear()
