"""Render the architecture coverage table from the tests' results into the README.

    pytest -m vllm tests/vllm/test_architectures.py      # writes runs/coverage/architectures.json
    pytest -m vllm tests/vllm/test_vlm_architectures.py  # writes runs/coverage/vlm_architectures.json
    pytest -m vllm tests/vllm/test_offload_equivalence.py tests/vllm/test_vlm_offload.py  # runs/coverage/equivalence.json
    python scripts/make_coverage_table.py                 # README between the coverage markers, + a copy in docs/results

The table is generated, never edited by hand: the status column is what the tests observed.
The copy in docs/results/architecture_coverage.json records the commit it came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- coverage-table:start -->", "<!-- coverage-table:end -->"
COLUMNS = ("Architecture", "Example checkpoint", "Input", "Routing", "Shared experts", "Status", "Test")


TEXT_TESTS = "tests/vllm/test_architectures.py"


def render(entries: dict[str, dict]) -> str:
    """Text architectures first, then the vision-language ones, each by class name."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for entry in sorted(entries.values(), key=lambda e: (e["modality"] != "text", e["hf_class"])):
        test = f"{entry.get('test_file', TEXT_TESTS)}::{entry['test']}"
        cells = (entry["hf_class"], entry["example"], entry["modality"], entry["routing"], entry["shared_experts"],
                 entry["status"], f"`{test}`")
        rows.append("| " + " | ".join(" ".join(cell.replace("|", "/").split()) for cell in cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=[str(REPO / "runs" / "coverage" / name)
                                                         for name in ("architectures.json", "vlm_architectures.json",
                                                                      "equivalence.json")])
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args()
    entries = {}
    for results in args.results:
        if not Path(results).exists():
            raise SystemExit(f"{results} does not exist: run the test that writes it first (see --help)")
        # keyed by file and shape: a text shape and a VLM shape may share a name
        entries.update({f"{Path(results).stem}:{shape}": e for shape, e in json.loads(Path(results).read_text()).items()})
    table = render(entries)
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to write the table between")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    record = {"commit": commit.strip(),
              "command": "pytest -m vllm tests/vllm/test_architectures.py tests/vllm/test_vlm_architectures.py "
                         "tests/vllm/test_offload_equivalence.py tests/vllm/test_vlm_offload.py",
              "architectures": entries}
    (REPO / "docs" / "results" / "architecture_coverage.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    print(table)


if __name__ == "__main__":
    main()
