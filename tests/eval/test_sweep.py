"""Accuracy sweep: grid, data selection, aggregation, RESULTS.md; one real sweep on a random tiny Qwen3-VL-MoE."""

from __future__ import annotations

import csv
import dataclasses
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


STUDY_SHAPE = sweep.ModelMemory(num_experts=128, top_k=8, moe_layers=6, bytes_per_expert=3 * 192 * 32 * 2,
                                kv_bytes_per_block=2 * 6 * 2 * 64 * 2 * sweep.KV_BLOCK_SIZE)
TOY = sweep.ModelMemory(num_experts=8, top_k=2, moe_layers=4, bytes_per_expert=3 * 192 * 128 * 2,
                        kv_bytes_per_block=2 * 4 * 2 * 64 * 2 * sweep.KV_BLOCK_SIZE)


def test_reduced_grid_is_both_regimes_two_capacities_two_schedulings_exact_and_one_lossy_policy():
    cells = sweep.build_grid(sweep.GRIDS["reduced"], STUDY_SHAPE, max_model_len=256)
    capacity = [c for c in cells if c.kind == "capacity"]
    assert {(c.regime, c.slots, c.scheduling, c.miss_policy) for c in capacity} == {
        (r, s, sched, m) for r in ("direct", "rationale") for s in (128, 32) for sched in ("fcfs", "expertflow")
        for m in ("exact", "reroute")}
    assert [c.id for c in cells if c.kind in ("off", "control")] == ["direct-off", "rationale-off"]
    # One engine per setting for both regimes; with every expert resident scheduling and miss policy cannot act.
    assert len({c.engine_key() for c in cells}) == 1 + 1 + 4
    full = sweep.build_grid(sweep.GRIDS["full"], STUDY_SHAPE, max_model_len=256)
    assert "rationale-off-seq1" in [c.id for c in full]
    assert capacity[0].offload() == {"enabled": True, "cache_slots": 128, "policy": "lru", "scheduling": "fcfs",
                                     "miss_policy": "exact"}


def test_full_grid_runs_every_cell_with_1000_questions_and_three_memory_budgets():
    grid = sweep.GRIDS["full"]
    assert grid.questions >= 1000 and len(grid.memory_budgets) >= 3 and len(grid.expert_shares) >= 2
    cells = sweep.build_grid(grid, STUDY_SHAPE, max_model_len=256)
    capacity = [c for c in cells if c.kind == "capacity"]
    # Every budget mode with every miss policy: nothing is "not available".
    assert {(c.budget_mode, c.miss_policy) for c in capacity} == {
        (b, m) for b in ("per-layer", "global") for m in ("exact", "skip", "substitute", "reroute")}
    budget = [c for c in cells if c.kind == "budget"]
    assert {(c.memory_budget_pct, c.expert_share) for c in budget} == {
        (b, e) for b in grid.memory_budgets for e in grid.expert_shares}
    for c in budget:  # each split fits its budget, and a larger expert share never gets fewer slots
        used = c.slots * STUDY_SHAPE.moe_layers * STUDY_SHAPE.bytes_per_expert + c.kv_blocks * STUDY_SHAPE.kv_bytes_per_block
        assert used <= c.memory_budget_pct / 100 * STUDY_SHAPE.all_experts_bytes
        assert c.kv_blocks >= 256 // sweep.KV_BLOCK_SIZE and c.slots >= 8
        assert c.engine_args() == {"num_gpu_blocks_override": c.kv_blocks}
    for b in grid.memory_budgets:
        slots = [c.slots for c in sorted(budget, key=lambda c: c.expert_share) if c.memory_budget_pct == b]
        assert slots == sorted(slots)


def test_capacities_with_the_same_slot_count_are_one_cell():
    grid = dataclasses.replace(sweep.GRIDS["reduced"], capacities=(100.0, 25.0, 12.5), regimes=("direct",),
                               numerics_control=False)
    cells = sweep.build_grid(grid, TOY, max_model_len=256)
    assert sorted({c.slots for c in cells if c.kind == "capacity"}) == [2, 8]  # 25% and 12.5% of 8: top_k = 2
    assert len([c for c in cells if c.kind == "capacity"]) == 2 * 2 * 2


def test_memory_split_keeps_one_request_of_kv_and_refuses_a_budget_below_top_k():
    # 25% of the study shape's experts: 7.08 MB; half to experts = 16 slots per layer, the rest 36 blocks.
    assert STUDY_SHAPE.split(25, 0.5, 8) == (16, 36)
    slots, blocks = STUDY_SHAPE.split(25, 0.99, 8)
    assert blocks >= 8  # never below one request of max_model_len
    assert STUDY_SHAPE.split(1, 0.5, 8) is None
    grid = dataclasses.replace(sweep.GRIDS["reduced"], memory_budgets=(1.0,), expert_shares=(0.5,),
                               budget_miss_policies=("exact",))
    with pytest.raises(ValueError, match="cannot hold top_k=8 slots"):
        sweep.build_grid(grid, STUDY_SHAPE, max_model_len=256)


def test_grid_overrides_are_validated():
    args = sweep.parse_args(["--grid", "full", "--capacities", "50", "--budget-modes", "global", "--schedulings",
                             "expertflow", "--miss-policies", "reroute", "--memory-budgets", "50", "--expert-shares",
                             "0.5", "--questions", "7", "--regimes", "rationale"])
    assert args.grid_spec.questions == 7 and args.grid_spec.regimes == ("rationale",)
    cells = sweep.build_grid(args.grid_spec, STUDY_SHAPE, max_model_len=256)
    assert "rationale-global-s64-expertflow-reroute" in [c.id for c in cells]
    assert sweep.parse_args(["--questions", "0"]).grid_spec.questions is None  # all
    for bad in (["--miss-policies", "drop"], ["--budget-modes", "shared"], ["--regimes", "chatty"]):
        with pytest.raises(ValueError, match="unknown"):
            sweep.build_grid(sweep.parse_args(bad).grid_spec, STUDY_SHAPE, max_model_len=256)


def test_model_memory_reads_the_study_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 6, "hidden_size": 192,
        "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "mlp_only_layers": [], "decoder_sparse_step": 1}}))
    assert sweep.model_memory(str(tmp_path)) == STUDY_SHAPE


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
# Scoring of both regimes
# ----------------------------------------------------------------------------------------------


def test_rationale_is_scored_on_the_answer_after_the_last_marker():
    answers = ["red"] * 10
    text = "I look at the image. I see one red circle. The question asks for the color. The color is red.\nAnswer: red"
    assert sweep.score_vqa(text, answers, "rationale") == (1.0, True)
    assert sweep.score_vqa("Answer: blue. Wait.\nAnswer: red", answers, "rationale") == (1.0, True)
    assert sweep.score_vqa("The color is red.", answers, "rationale") == (0.0, False)  # no marker: wrong
    assert sweep.score_vqa("red", answers, "direct") == (1.0, True)
    row = mmbench.MMBenchItem(0, "What color?", "", {"A": "blue", "B": "red", "C": "green", "D": "gray"}, "B", "color")
    assert sweep.score_mmbench("I see one red circle. Option B is red.\nAnswer: B", row, "rationale") == ("B", True)
    assert sweep.score_mmbench("Option B is red.", row, "rationale") == (None, False)
    assert sweep.score_mmbench("B", row, "direct") == ("B", True)
    assert [sweep.question_kind([a]) for a in ("yes", "circle", "red", "42")] == ["yes/no", "shape", "color", "other"]


# ----------------------------------------------------------------------------------------------
# Aggregation, statistics and RESULTS.md on a synthetic sweep directory (no engine)
# ----------------------------------------------------------------------------------------------


def _fake_cell(out: Path, cell: sweep.Cell, vqa_right: list[bool], mmb_right: list[bool], cache: dict | None,
               prediction_suffix: str = "") -> None:
    d = out / "cells" / cell.id
    d.mkdir(parents=True)
    with open(d / "vqav2.jsonl", "w") as f:
        for qid, right in enumerate(vqa_right):
            f.write(json.dumps({"question_id": qid, "prediction": ("red" if right else "blue") + prediction_suffix,
                                "answers": ["red"] * 10, "kind": ["color", "shape", "yes/no"][qid % 3],
                                "score": float(right), "parsed": True}) + "\n")
    with open(d / "mmbench.jsonl", "w") as f:
        for q, right in enumerate(mmb_right):  # one row per question: CircularEval on a single rotation
            f.write(json.dumps({"index": q, "prediction": "A" if right else "B", "answer": "A", "category": "color",
                                "options": {"A": "a", "B": "b"}, "correct": right, "parsed": True}) + "\n")
    (d / "metrics.json").write_text(json.dumps({"cell": cell.id, "generated_tokens": 100, "generate_s": 2.0,
                                                "init_s": 1.0, "cache": cache, "moe_layers": 6,
                                                "bytes_per_expert": 36864, "engine_steps": 10,
                                                "modeled_tokens_per_s": 50.0, "modeled_tpot_ms_p50": 1.5,
                                                "modeled_tpot_ms_p99": 3.0}))


def _synthetic_sweep(out: Path) -> list[sweep.Cell]:
    """Offload off; per-layer 32 slots: fcfs/expertflow x exact/reroute; expertflow-reroute loses 60 of 200."""
    grid = dataclasses.replace(sweep.GRIDS["reduced"], capacities=(25.0,), regimes=("rationale",),
                               numerics_control=False)
    cells = sweep.build_grid(grid, STUDY_SHAPE, max_model_len=256)
    n = 200
    for cell in cells:
        vqa = [q % 2 == 0 for q in range(n)]  # offload off: half right
        mmb = [q % 4 != 0 for q in range(n)]
        if cell.scheduling == "expertflow" and cell.miss_policy == "reroute":
            vqa = [right and q >= 120 for q, right in enumerate(vqa)]
        cache = None if cell.kind == "off" else {"hit_rate": 0.5, "hits": 50, "misses": 50, "loads": 50,
                                                 "bytes_loaded": 50 * 36864}
        _fake_cell(out, cell, vqa, mmb, cache)
    return cells


def test_aggregate_writes_cis_mcnemar_agreement_and_categories(tmp_path):
    out = tmp_path / "sweep"
    cells = _synthetic_sweep(out)
    sweep.aggregate(out, cells, 8)
    with open(out / "cells.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == sweep.CSV_COLUMNS
    hurt = rows["rationale-per-layer-s32-expertflow-reroute"]
    assert float(hurt["vqav2_acc"]) == pytest.approx(0.2)  # 40 of the 100 right ones remain
    assert float(hurt["vqav2_diff_vs_off"]) == pytest.approx(-0.3)
    assert float(hurt["vqav2_diff_vs_off_hi"]) < 0 < float(rows["rationale-per-layer-s32-fcfs-exact"]["agree_all"])
    assert float(hurt["vqav2_diff_vs_fcfs"]) == pytest.approx(-0.3)
    assert float(hurt["vqav2_mcnemar_p_vs_fcfs"]) < 1e-10  # 60 discordant pairs, all one way
    assert float(hurt["mmbench_diff_vs_fcfs"]) == 0 and float(hurt["mmbench_mcnemar_p_vs_fcfs"]) == 1.0
    assert float(hurt["mmbench_diff_vs_fcfs_lo"]) == 0 == float(hurt["mmbench_diff_vs_fcfs_hi"])
    assert float(hurt["agree_vs_fcfs"]) == pytest.approx((400 - 60) / 400)
    assert rows["rationale-per-layer-s32-fcfs-exact"]["vqav2_diff_vs_fcfs"] == ""  # fcfs has no fcfs partner
    assert float(rows["rationale-off"]["vqav2_acc_shape"]) == pytest.approx(
        sum(q % 2 == 0 for q in range(200) if q % 3 == 1) / len([q for q in range(200) if q % 3 == 1]))
    with open(out / "categories.csv") as f:
        categories = list(csv.DictReader(f))
    assert {(r["format"], r["category"]) for r in categories if r["cell"] == "rationale-off"} == {
        ("vqav2", "color"), ("vqav2", "shape"), ("vqav2", "yes/no"), ("mmbench", "color")}
    table = (out / "table.md").read_text()
    assert "### rationale" in table and "-30.0 [" in table and "]*" in table


def test_make_results_states_effects_only_where_the_ci_excludes_zero(tmp_path):
    out = tmp_path / "sweep"
    cells = _synthetic_sweep(out)
    sweep.aggregate(out, cells, 8)
    (out / "sweep.json").write_text(json.dumps({"run_key": {"model": "m", "dtype": "bfloat16", "limit": 200},
                                                "num_experts": 128, "top_k": 8, "moe_layers": 6, "grid": "reduced",
                                                "modeled": {"compute_ms_per_layer": 10 / 48, "expert_mb": 9.437,
                                                            "link_gbps": 25.0},
                                                "data_source": "test", "argv": ["sweep", "--model", "m"]}))
    results = tmp_path / "docs" / "RESULTS.md"
    proc = subprocess.run([sys.executable, "scripts/make_results.py", "--sweep", str(out), "--out", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert "**Scheduling changed accuracy** in 1 of 4 comparisons" in text  # VQAv2 of the reroute pair only
    assert "VQAv2 -30.0 points (95% CI" in text
    assert "MMBench CircularEval" not in text.split("**Scheduling changed accuracy**")[1].split("- **Channel")[0]
    assert "Expertflow answered 100.0% .. 100.0% of items exactly as fcfs" in text  # the exact pair
    assert "- Produced by: commit" in text
    for name in ("accuracy_vs_capacity.png", "mmbench_categories.png", "hit_rate_vs_capacity.png"):
        assert (tmp_path / "docs" / "results" / name).exists()
        assert f"](results/{name})" in text


# ----------------------------------------------------------------------------------------------
# A real sweep (starts vLLM engines)
# ----------------------------------------------------------------------------------------------


def _run_sweep(model: Path, out: Path, *extra: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vllm_expertflow.eval.sweep", "--model", str(model), "--out", str(out),
           "--questions", "2", "--capacities", "100,25,12.5", "--miss-policies", "exact,skip",
           "--memory-budgets", "100", "--expert-shares", "0.5", "--budget-miss-policies", "exact",
           "--numerics-control", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.vllm
def test_sweep_on_a_random_tiny_vlm(random_vlm, tmp_path):
    out = tmp_path / "sweep"
    proc = _run_sweep(random_vlm, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["mmbench_easyvqa_test_n2_s0.tsv",
                                                                "vqav2_easyvqa_test_n2_s0.parquet"]
    with open(out / "cells.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    # Per regime: off, the max_num_seqs=1 control, 2 slot counts x 2 schedulings x 2 miss policies, 2 budget cells.
    assert len(rows) == 2 * (2 + 8 + 2) and all(r["status"] == "ok" for r in rows.values())
    for regime in ("direct", "rationale"):
        vqa = [json.loads(line) for line in (out / "cells" / f"{regime}-off" / "vqav2.jsonl").read_text().splitlines()]
        assert len(vqa) == 2 and {"prediction", "score", "parsed", "kind"} <= set(vqa[0])
        off = rows[f"{regime}-off"]
        for r in rows.values():
            if r["regime"] != regime or r["kind"] == "off":
                continue
            for column in ("vqav2_acc", "mmbench_circular_acc", "agree_all", "tokens_per_s", "vqav2_diff_vs_off_lo",
                           "vqav2_diff_vs_off_hi", "generated_tokens", "engine_steps"):
                assert r[column] != "", (r["cell"], column)
            if r["miss_policy"] == "exact":
                # Lossless: the same answers as offload off (the exact cells' step composition equals it here).
                assert r["vqav2_acc"] == off["vqav2_acc"], r["cell"]
            if r["kind"] in ("capacity", "budget") and r["slots"] != "8":
                assert float(r["hit_rate"]) < 1 and float(r["loads_per_token"]) > 0
                assert r["modeled_tpot_ms_p50"] != "" or regime == "direct"
        full = [r for r in rows.values() if r["regime"] == regime and r["slots"] == "8" and r["kind"] == "capacity"]
        assert len(full) == 4 and sum(r["reused_from"] == "" for r in full) == 1  # every expert resident: one engine
        budget = [r for r in rows.values() if r["regime"] == regime and r["kind"] == "budget"]
        assert [(int(r["slots"]), int(r["kv_blocks"])) for r in budget] == [TOY.split(100, 0.5, 8)] * 2 == [(4, 36)] * 2
        expertflow = rows[f"{regime}-per-layer-s2-expertflow-skip"]
        assert expertflow["vqav2_mcnemar_p_vs_fcfs"] != "" and expertflow["agree_vs_fcfs"] != ""
    assert (out / "accuracy_vs_capacity.png").exists() and (out / "accuracy_vs_throughput.png").exists()
    made = json.loads((out / "cells" / "direct-per-layer-s2-fcfs-skip" / "metrics.json").read_text())
    assert len(made["commit"]) == 12 and made["loadavg_1m"] >= 0, made  # what produced the cell

    # Resume: nothing left to run, no engine started; outputs untouched.
    before = (out / "cells" / "direct-per-layer-s2-fcfs-skip" / "metrics.json").stat().st_mtime_ns
    again = _run_sweep(random_vlm, out, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 run(s)" in again.stderr and "LLM(" not in again.stderr
    assert (out / "cells" / "direct-per-layer-s2-fcfs-skip" / "metrics.json").stat().st_mtime_ns == before

    # A different setting in the same directory is refused instead of mixing results.
    other = _run_sweep(random_vlm, out, "--max-model-len", "512", timeout=300)
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
