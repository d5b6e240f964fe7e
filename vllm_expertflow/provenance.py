"""What produced a results file: the commit, the command line and the machine's measured load.

Every file under ``benchmarks/results/`` starts with ``results_header()``, measured when the
run ends, so a number can be traced to the code and the conditions that gave it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Outputs, not code: a run that rewrites an earlier result has not changed what it measures.
RESULTS_PATHS = ("benchmarks/results", "docs/results", "docs/RESULTS.md", "docs/RESULTS_memory_budget.md")


def git_commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files other than results differ from it;
    ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){path}" for path in RESULTS_PATHS)], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def machine_load() -> dict[str, float | int]:
    one, five, fifteen = os.getloadavg()
    return {"cpus": os.cpu_count() or 0, "load_1m": one, "load_5m": five, "load_15m": fifteen}


def provenance() -> dict[str, object]:
    """The header's facts as a dict, for JSON results."""
    return {"commit": git_commit(), "command": command_line(), **machine_load()}


def results_header() -> str:
    """One Markdown paragraph: commit, command line, CPUs and load averages (1/5/15 min) now."""
    facts = provenance()
    return (
        f"Commit `{facts['commit']}`; command `{facts['command']}`; machine: {facts['cpus']} CPUs, load average "
        f"{facts['load_1m']:.2f} / {facts['load_5m']:.2f} / {facts['load_15m']:.2f} (1 / 5 / 15 min) at the end "
        f"of the run."
    )
