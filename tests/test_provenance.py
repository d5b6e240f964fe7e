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
