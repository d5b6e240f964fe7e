import os
import sys

from vllm_expertflow.provenance import provenance, results_header


def test_results_header_names_the_commit_command_and_measured_load(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/offline_throughput.py", "--repeats", "3"])
    monkeypatch.setattr(os, "getloadavg", lambda: (3.25, 2.5, 1.75))
    header = results_header()
    assert "command `python" in header and "benchmarks/offline_throughput.py --repeats 3`" in header
    assert "load average 3.25 / 2.50 / 1.75" in header
    commit = provenance()["commit"]
    assert commit != "unknown" and f"Commit `{commit}`" in header


def test_rewritten_results_do_not_make_the_commit_dirty_but_code_changes_do(tmp_path, monkeypatch):
    import subprocess

    from vllm_expertflow import provenance as provenance_module

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(provenance_module, "REPO", tmp_path)
    clean = provenance_module.git_commit()
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("rerun\n")
    assert provenance_module.git_commit() == clean and not clean.endswith("+dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance_module.git_commit() == f"{clean}+dirty"
