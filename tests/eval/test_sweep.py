"""Accuracy sweep: grid, data selection, aggregation, RESULTS.md; one real sweep on a random tiny Qwen3-VL-MoE."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_expertflow.eval import mmbench, sweep

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pct", "experts", "top_k", "slots"),
    [(100, 8, 2, 8), (75, 8, 2, 6), (50, 8, 2, 4), (25, 8, 2, 2), (12.5, 8, 2, 2),
     (100, 128, 8, 128), (12.5, 128, 8, 16), (25, 64, 6, 16), (12.5, 64, 6, 8), (12.5, 6, 2, 2), (50, 5, 1, 3)],
)
def test_slots_for(pct, experts, top_k, slots):
    assert sweep.slots_for(pct, experts, top_k) == slots


def test_slots_for_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        sweep.slots_for(0, 8, 2)
    with pytest.raises(ValueError, match="capacity"):
        sweep.slots_for(150, 8, 2)


def test_full_grid_has_every_combination_and_lossy_global_cells_unavailable():
    cells = sweep.build_grid("full")
    assert len(cells) == 5 * 2 * 2 * 3
    assert len({c.id for c in cells}) == len(cells)
    assert {c.capacity_pct for c in cells} == {100, 75, 50, 25, 12.5}
    unavailable = [c for c in cells if not c.available]
    assert {(c.budget_mode, c.miss_policy) for c in unavailable} == {("global", "skip"), ("global", "substitute")}
    with pytest.raises(ValueError, match="exact miss policy only"):
        sweep.offload_settings(unavailable[0], 4)
    global_exact = next(c for c in cells if c.budget_mode == "global" and c.miss_policy == "exact")
    assert sweep.offload_settings(global_exact, 4)["policy"] == "expertflow"  # one pool for all layers


def test_reduced_grid():
    cells = sweep.build_grid("reduced")
    assert {(c.capacity_pct, c.budget_mode, c.scheduling, c.miss_policy) for c in cells} == {
        (cap, mode, s, m)
        for cap in (100, 25)
        for mode in ("per-layer", "global")
        for s in ("fcfs", "expertflow")
        for m in ("exact", "skip")
    }
    assert sweep.offload_settings(cells[0], 8) == {"enabled": True, "cache_slots": 8, "policy": "lru",
                                                    "scheduling": cells[0].scheduling,
                                                    "miss_policy": cells[0].miss_policy}


def test_grid_overrides_are_validated():
    cells = sweep.build_grid(
        "reduced", capacities=[50], budget_modes=["per-layer"], schedulings=["expertflow"], miss_policies=["substitute"]
    )
    assert [c.id for c in cells] == ["per-layer-c50-expertflow-substitute"]
    assert sweep.build_grid("full", capacities=[]) == []
    with pytest.raises(ValueError, match="miss policy"):
        sweep.build_grid("reduced", miss_policies=["drop"])
    with pytest.raises(ValueError, match="budget mode"):
        sweep.build_grid("reduced", budget_modes=["shared"])


def test_moe_shape_reads_nested_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_experts": 128, "num_experts_per_tok": 8}}))
    assert sweep.moe_shape(str(tmp_path)) == (128, 8)
    (tmp_path / "config.json").write_text(json.dumps({"language_config": {"n_routed_experts": 64,
                                                                         "num_experts_per_tok": 6}}))
    assert sweep.moe_shape(str(tmp_path)) == (64, 6)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="MoE"):
        sweep.moe_shape(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Data selection
# ----------------------------------------------------------------------------------------------


def _item(index: int, answer: str = "B") -> mmbench.MMBenchItem:
    return mmbench.MMBenchItem(index=index, question=f"q{index}", hint="", options={"A": "x", "B": "y", "C": "z"},
                               answer=answer, category="c")


def test_select_mmbench_keeps_rotation_groups_and_completes_missing_rotations():
    stored = [_item(7), _item(7 + 1_000_000, "A"), _item(7 + 2_000_000, "C"), _item(3), _item(9)]
    selected = sweep.select_mmbench(stored, limit=2)
    assert [r.index for r in selected] == [7, 1_000_007, 2_000_007, 3, 1_000_003, 2_000_003]
    assert selected[4].answer == "A"  # generated rotation: the answer text moved from B to A
    assert len(sweep.select_mmbench(stored, None)) == 9


def test_select_mmbench_rejects_unanswered_rows():
    with pytest.raises(ValueError, match="no answer"):
        sweep.select_mmbench([mmbench.MMBenchItem(1, "q", "", {"A": "x", "B": "y"}, None, "")], None)


def test_easy_vqa_files_are_the_same_questions_in_both_formats(tmp_path):
    vqa, mmb = sweep.easy_vqa_files(tmp_path, limit=6)
    vqa_items = sweep.load_vqa(vqa, None)
    mmb_items = sweep.select_mmbench(sweep.load_mmbench(mmb), None)
    assert len(vqa_items) == 6 and len(mmb_items) == 24
    assert sorted(i.question_id for i in vqa_items) == sorted({r.index % 1_000_000 for r in mmb_items})
    assert sweep.easy_vqa_files(tmp_path, limit=6) == (vqa, mmb)  # reused, not rewritten


# ----------------------------------------------------------------------------------------------
# Aggregation and RESULTS.md on a synthetic sweep directory (no engine)
# ----------------------------------------------------------------------------------------------


def _fake_cell(out: Path, cell_id: str, meta: dict, vqa_preds: list[str], mmb_preds: list[str],
               cache: dict | None) -> None:
    d = out / "cells" / cell_id
    d.mkdir(parents=True)
    with open(d / "vqav2.jsonl", "w") as f:
        for qid, p in enumerate(vqa_preds):
            f.write(json.dumps({"question_id": qid, "prediction": p, "answers": ["red"] * 10}) + "\n")
    with open(d / "mmbench.jsonl", "w") as f:
        for k, p in enumerate(mmb_preds):  # one question, rotations 0..3; the answer is always A
            f.write(json.dumps({"index": k * 1_000_000, "prediction": p, "answer": "A",
                                "options": {"A": "a", "B": "b"}, "correct": p == "A"}) + "\n")
    (d / "metrics.json").write_text(json.dumps({**meta, "cell": cell_id, "generated_tokens": 10, "generate_s": 2.0,
                                                "init_s": 1.0, "cache": cache, "moe_layers": 4,
                                                "bytes_per_expert": 1024 * 1024}))


def _synthetic_sweep(out: Path) -> list[sweep.Cell]:
    cells = sweep.build_grid("reduced", capacities=[100, 25], budget_modes=["per-layer", "global"],
                             schedulings=["fcfs", "expertflow"], miss_policies=["exact", "skip"])
    _fake_cell(out, "baseline", {"budget_mode": "off", "num_experts": 8, "top_k": 2}, ["red", "blue"],
               ["A", "A", "A", "A"], None)
    for c in cells:
        if not c.available or c.id == "per-layer-c25-expertflow-skip":
            continue  # the last one stays pending
        lossy = c.miss_policy == "skip" and c.capacity_pct == 25
        meta = {**{"budget_mode": c.budget_mode, "capacity_pct": c.capacity_pct, "scheduling": c.scheduling,
                   "miss_policy": c.miss_policy}, "slots": sweep.slots_for(c.capacity_pct, 8, 2), "num_experts": 8,
                "top_k": 2}
        cache = {"hit_rate": 0.9 if c.capacity_pct == 100 else 0.5, "hits": 9, "misses": 1, "loads": 5,
                 "bytes_loaded": 5 << 20}
        _fake_cell(out, c.id, meta, ["red", "green" if lossy else "blue"], ["A", "B" if lossy else "A", "A", "A"],
                   cache)
    return cells


def test_aggregate_writes_csv_and_table_with_not_available_and_pending_cells(tmp_path):
    cells = _synthetic_sweep(tmp_path)
    rows = sweep.aggregate(tmp_path, cells, 8, 2)
    with open(tmp_path / "cells.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == sweep.CSV_COLUMNS
    by_cell = {r["cell"]: r for r in csv_rows}
    assert len(csv_rows) == len(cells) + 1
    base = by_cell["baseline"]
    assert float(base["vqav2_acc"]) == 0.5 and float(base["mmbench_circular_acc"]) == 1.0
    assert float(base["agree_all"]) == 1.0
    exact = by_cell["per-layer-c25-fcfs-exact"]
    assert float(exact["agree_all"]) == 1.0 and exact["lossless"] == "True" and exact["slots"] == "2"
    lossy = by_cell["per-layer-c25-fcfs-skip"]
    assert float(lossy["vqav2_acc"]) == 0.5  # "green" is as wrong as "blue"
    assert float(lossy["agree_vqav2"]) == 0.5 and float(lossy["agree_all"]) == pytest.approx(4 / 6)
    assert float(lossy["mmbench_circular_acc"]) == 0.0 and float(lossy["mmbench_row_acc"]) == 0.75
    assert float(lossy["loads_per_token"]) == 0.5 and float(lossy["tokens_per_s"]) == 5.0
    assert float(lossy["expert_mib_device"]) == 2 * 4 and float(lossy["expert_mib_all"]) == 8 * 4
    assert by_cell["per-layer-c25-expertflow-skip"]["status"] == "pending"
    # The global budget (policy expertflow) runs lossless only: its skip cells are not available.
    unavailable = [r for r in csv_rows if r["status"] == "not available"]
    assert sorted((r["budget_mode"], r["miss_policy"]) for r in unavailable) == [("global", "skip")] * 4
    assert all(not r["vqav2_acc"] for r in unavailable)
    assert by_cell["global-c25-expertflow-exact"]["status"] == "ok"
    table = (tmp_path / "table.md").read_text()
    assert table.count("not available") >= 4 and "pending" in table
    assert len(rows) == len(csv_rows)
    paths = sweep.plot(rows, tmp_path)
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_make_results_fills_the_answer_from_the_csv(tmp_path):
    out = tmp_path / "sweep"
    cells = _synthetic_sweep(out)
    sweep.plot(sweep.aggregate(out, cells, 8, 2), out)
    (out / "sweep.json").write_text(json.dumps({"run_key": {"model": "m", "dtype": "bfloat16", "limit": 2},
                                                "num_experts": 8, "top_k": 2, "grid": "reduced",
                                                "data_source": "test", "argv": ["sweep", "--model", "m"]}))
    results = tmp_path / "docs" / "RESULTS.md"
    proc = subprocess.run([sys.executable, "scripts/make_results.py", "--sweep", str(out), "--out", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert "no accuracy effect" in text  # both ExpertFlow exact cells agree with the baseline
    assert "answered every item as offload-off in 4 of 4 cells" in text  # the global (expertflow) cells
    assert "its 4 lossy cells were not run" in text
    assert "per-layer-c25-fcfs-skip" in text  # the worst lossy cell, named from the data
    assert "66.7% of answers unchanged" in text
    assert (tmp_path / "docs" / "results" / "accuracy_vs_capacity.png").exists()
    assert "](results/accuracy_vs_capacity.png)" in text


# ----------------------------------------------------------------------------------------------
# A real sweep (starts vLLM engines)
# ----------------------------------------------------------------------------------------------




def _run_sweep(model: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vllm_expertflow.eval.sweep", "--model", str(model), "--out", str(out),
           "--limit", "2", "--max-tokens", "4", "--capacities", "25,12.5", "--schedulings", "fcfs,expertflow",
           "--miss-policies", "exact,skip", "--budget-modes", "per-layer,global", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.vllm
def test_sweep_on_a_random_tiny_vlm(random_vlm, tmp_path):
    out = tmp_path / "sweep"
    proc = _run_sweep(random_vlm, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]

    # Data converted from easy-vqa; predictions in the documented fields.
    assert sorted(p.name for p in (out / "data").iterdir()) == ["mmbench_easyvqa_test_n2_s0.tsv",
                                                                "vqav2_easyvqa_test_n2_s0.parquet"]
    for cell in ("baseline", "per-layer-c25-fcfs-exact", "per-layer-c25-expertflow-skip"):
        vqa = [json.loads(line) for line in (out / "cells" / cell / "vqav2.jsonl").read_text().splitlines()]
        mmb = [json.loads(line) for line in (out / "cells" / cell / "mmbench.jsonl").read_text().splitlines()]
        assert len(vqa) == 2 and len(mmb) == 8
        assert {"question_id", "prediction", "answers"} <= set(vqa[0]) and len(vqa[0]["answers"]) == 10
        assert {"index", "prediction", "answer", "options"} <= set(mmb[0])

    with open(out / "cells.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == sweep.CSV_COLUMNS
    assert len(rows) == 1 + 16
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 13  # baseline, 8 per-layer cells, 4 global (exact) cells
    for r in ok:
        for column in ("vqav2_acc", "mmbench_circular_acc", "mmbench_row_acc", "agree_all", "tokens_per_s"):
            assert r[column] != "", (r["cell"], column)
    # 25% and 12.5% of 8 experts both round to top_k = 2 slots: the second runs no engine.
    assert rows["per-layer-c12.5-fcfs-exact"]["reused_from"] == "per-layer-c25-fcfs-exact"
    assert rows["per-layer-c12.5-fcfs-exact"]["slots"] == "2"
    offload = [r for r in ok if r["cell"] != "baseline"]
    assert all(float(r["hit_rate"]) < 1 and float(r["loads_per_token"]) > 0 for r in offload)
    unavailable = [r for r in rows.values() if r["status"] == "not available"]
    assert sorted((r["budget_mode"], r["miss_policy"]) for r in unavailable) == [("global", "skip")] * 4
    assert all(r["vqav2_acc"] == "" for r in unavailable)
    assert "not available" in (out / "table.md").read_text()
    assert all((out / name).exists() for name in ("accuracy_vs_capacity.png", "hit_rate_vs_capacity.png"))

    # Lossless: the exact miss policy answers exactly as offload-off, with either scheduling.
    for r in offload:
        if r["miss_policy"] == "exact":
            assert float(r["agree_all"]) == 1.0, r["cell"]
            assert r["vqav2_acc"] == rows["baseline"]["vqav2_acc"]
            assert r["mmbench_circular_acc"] == rows["baseline"]["mmbench_circular_acc"]

    # Resume: nothing left to run, no engine started; outputs untouched.
    before = (out / "cells" / "per-layer-c25-fcfs-skip" / "metrics.json").stat().st_mtime_ns
    again = _run_sweep(random_vlm, out, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 run(s)" in again.stderr and "LLM(" not in again.stderr
    assert (out / "cells" / "per-layer-c25-fcfs-skip" / "metrics.json").stat().st_mtime_ns == before

    # A different setting in the same directory is refused instead of mixing results.
    other = _run_sweep(random_vlm, out, "--max-tokens", "6", timeout=300)
    assert other.returncode != 0 and "different settings" in other.stderr


def test_make_results_states_step_composition_from_recorded_scheduler_stats():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_results", REPO / "scripts" / "make_results.py")
    make_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_results)
    sentence = make_results.step_composition_sentence([
        {"cell": "c100", "grouped_steps": 0.0, "steps_with_held_requests": 0.0},
        {"cell": "c50", "grouped_steps": 12.0, "steps_with_held_requests": 0.0},
        {"cell": "c25", "grouped_steps": 10.0, "steps_with_held_requests": 3.0},
    ])
    assert "grouping was off in 1 cell (c100" in sentence
    assert "held no request back in any of its 12 grouped steps" in sentence
    assert "held requests back in 3 of 10 grouped steps in 1 cell (c25)" in sentence
    # Without recorded stats nothing is inferred from equal loads.
    unknown = make_results.step_composition_sentence([{"cell": "c25", "grouped_steps": None}])
    assert "not stated" in unknown and "never found" not in unknown
