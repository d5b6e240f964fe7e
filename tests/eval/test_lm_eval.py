"""lm-eval tasks (vllm_expertflow/eval/lm_eval_tasks): same items, same scores as the sweep's code path."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_expertflow.eval import harness, prompts, sweep
from vllm_expertflow.eval.lm_eval_tasks import utils

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "vllm_expertflow" / "eval" / "lm_eval_tasks"

pytest.importorskip("lm_eval", reason="lm-eval is in the `eval` extra: pip install 'lm-eval==0.4.13'")


def test_shipped_task_yamls_load_and_resolve_functions():
    from lm_eval.tasks._yaml_loader import load_yaml

    names = {}
    for path in sorted(TASKS.glob("*.yaml")):
        cfg = load_yaml(path)
        names[cfg["task"]] = cfg
        assert cfg["dataset_path"] == "parquet"
        assert cfg["dataset_kwargs"]["data_files"]["test"].startswith("data/lm_eval/")
        assert callable(cfg["process_results"]) and callable(cfg["doc_to_text"])
        assert cfg["generation_kwargs"]["max_gen_toks"] == prompts.MAX_TOKENS["direct"]
        assert cfg["generation_kwargs"]["until"] == sweep.STOP
    assert set(names) == {"vqav2_local", "mmbench_local", "vqav2_easyvqa", "mmbench_easyvqa"}


def test_make_tasks_selects_the_sweep_items(tmp_path):
    vqa, mmb = sweep.easy_vqa_files(tmp_path / "data", limit=5)
    written = harness.make_tasks(tmp_path / "tasks", vqa=str(vqa), mmbench_file=str(mmb), limit=3)
    assert [p.name for p in written] == ["vqav2_local.yaml", "mmbench_local.yaml"]
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(written[1])
    assert cfg["task"] == "mmbench_local" and callable(cfg["process_results"])
    docs = datasets.load_dataset("parquet", data_files=cfg["dataset_kwargs"]["data_files"],
                                 cache_dir=str(tmp_path / "hf"))["test"]
    items = sweep.select_mmbench(sweep.load_mmbench(mmb), 3)
    assert [d["index"] for d in docs] == [i.index for i in items]
    for doc, item in zip(docs, items, strict=True):
        assert utils.mmbench_item(doc) == item
        assert utils.mmbench_doc_to_text(doc) == "<image>" + sweep.mmbench.build_prompt(item)
    vqa_docs = datasets.load_dataset("parquet", data_files=load_yaml(written[0])["dataset_kwargs"]["data_files"],
                                     cache_dir=str(tmp_path / "hf"))["test"]
    vqa_items = sweep.load_vqa(vqa, 3)
    assert [d["question_id"] for d in vqa_docs] == [i.question_id for i in vqa_items]
    assert utils.vqav2_answers(vqa_docs[0]) == vqa_items[0].answers
    assert utils.vqav2_doc_to_image(vqa_docs[0])[0].size == vqa_items[0].load_image().size


def test_rationale_tasks_prompt_and_score_as_the_sweep(tmp_path):
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    vqa, mmb = sweep.easy_vqa_files(tmp_path / "data", limit=3)
    written = harness.make_tasks(tmp_path / "tasks", vqa=str(vqa), mmbench_file=str(mmb), limit=2, regime="rationale")
    assert [p.name for p in written] == ["vqav2_local_rationale.yaml", "mmbench_local_rationale.yaml"]
    vqa_cfg, mmb_cfg = (load_yaml(p) for p in written)
    assert vqa_cfg["generation_kwargs"]["max_gen_toks"] == prompts.MAX_TOKENS["rationale"]
    docs = datasets.load_dataset("parquet", data_files=mmb_cfg["dataset_kwargs"]["data_files"],
                                 cache_dir=str(tmp_path / "hf"))["test"]
    item = sweep.select_mmbench(sweep.load_mmbench(mmb), 2)[0]
    text = mmb_cfg["doc_to_text"](docs[0])
    assert text == "<image>" + prompts.mc_prompt(item.question, list(item.options.values()), "rationale")
    right = f"I see it.\nAnswer: {item.answer}"
    assert mmb_cfg["process_results"](docs[0], [right])["mmbench_row_accuracy"] == 1.0
    assert mmb_cfg["process_results"](docs[0], [item.answer])["mmbench_row_accuracy"] == 0.0  # no marker
    vqa_docs = datasets.load_dataset("parquet", data_files=vqa_cfg["dataset_kwargs"]["data_files"],
                                     cache_dir=str(tmp_path / "hf"))["test"]
    answer = utils.vqav2_answers(vqa_docs[0])[0]
    assert vqa_cfg["doc_to_text"](vqa_docs[0]).endswith(prompts.RATIONALE_OPEN_SUFFIX)
    assert vqa_cfg["process_results"](vqa_docs[0], [f"The answer is clear.\nAnswer: {answer}"]) == {
        "vqav2_accuracy": 1.0}


def test_metric_functions_match_the_project_metrics():
    doc = {"question_id": 1, "question": "what color?", "answers": [{"answer": "red"}] * 3 + [{"answer": "blue"}] * 7}
    expected = sweep.vqav2.score("Red.", ["red"] * 3 + ["blue"] * 7)
    assert utils.vqav2_process_results(doc, ["Red."]) == {"vqav2_accuracy": expected}
    row = {"index": 1_000_004, "question": "q", "hint": None, "A": "x", "B": "y", "C": None, "answer": "B"}
    assert utils.mmbench_process_results(row, ["B"]) == {"mmbench_circular_accuracy": (1_000_004, True),
                                                         "mmbench_row_accuracy": 1.0}
    assert utils.circular_accuracy([(4, True), (1_000_004, False), (5, True)]) == 0.5


def test_cpu_shims_answer_the_vllm_version_and_stub_ray():
    code = ("import importlib.metadata as m, importlib.util as u, sys; from vllm_expertflow.eval import harness; "
            "applied = harness.cpu_environment_shims(); print(m.version('vllm')); "
            "print(u.find_spec('ray') is not None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, ray_found = proc.stdout.split()
    assert version and ray_found == "True"  # lm-eval's vllm_vlms imports ray at module top


# ----------------------------------------------------------------------------------------------
# lm-eval on a random tiny VLM vs the sweep on the same items
# ----------------------------------------------------------------------------------------------




def _samples(output_dir: Path, task: str) -> list[dict]:
    [path] = list(output_dir.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.vllm
def test_lm_eval_scores_equal_the_sweep_scores(random_vlm, tmp_path):
    limit = 3
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "vllm_expertflow.eval.sweep", "--model", str(random_vlm), "--out",
                           str(out), "--limit", str(limit), "--regimes", "direct", "--capacities", "", "--no-plots"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    [vqa_file] = (out / "data").glob("*.parquet")
    [mmb_file] = (out / "data").glob("*.tsv")
    harness.make_tasks(tmp_path / "tasks", vqa=str(vqa_file), mmbench_file=str(mmb_file), limit=limit)

    model_args = {"pretrained": str(random_vlm), "dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True,
                  "limit_mm_per_prompt": {"image": 1, "video": 0}, "distributed_executor_backend": "uni",
                  "additional_config": {"expert_offload": {"enabled": True, "cache_slots": 2}}}
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    results_dir = tmp_path / "lm_eval_out"
    proc = subprocess.run([sys.executable, "-m", "vllm_expertflow.eval.harness", "lm-eval", "--model", "vllm-vlm",
                           "--model_args", json.dumps(model_args), "--include_path", str(tmp_path / "tasks"),
                           "--tasks", "vqav2_local,mmbench_local", "--apply_chat_template", "--batch_size", "auto",
                           "--output_path", str(results_dir), "--log_samples"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    [results_file] = list(results_dir.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]

    with open(out / "cells.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    base = {k: float(v) for k, v in rows["direct-off"].items() if k.endswith("_acc")}
    assert results["vqav2_local"]["vqav2_accuracy,none"] == pytest.approx(base["vqav2_acc"])
    assert results["mmbench_local"]["mmbench_circular_accuracy,none"] == pytest.approx(base["mmbench_circular_acc"])
    assert results["mmbench_local"]["mmbench_row_accuracy,none"] == pytest.approx(base["mmbench_row_acc"])

    # Stronger than equal scores (a random model scores ~0): the same answer to every item.
    sweep_vqa = {json.loads(x)["question_id"]: json.loads(x)["prediction"]
                 for x in (out / "cells" / "direct-off" / "vqav2.jsonl").read_text().splitlines()}
    sweep_mmb = {json.loads(x)["index"]: json.loads(x)["prediction"]
                 for x in (out / "cells" / "direct-off" / "mmbench.jsonl").read_text().splitlines()}
    lm_vqa = {s["doc"]["question_id"]: s["resps"][0][0] for s in _samples(results_dir, "vqav2_local")}
    lm_mmb = {s["doc"]["index"]: s["resps"][0][0] for s in _samples(results_dir, "mmbench_local")}
    assert len(lm_vqa) == limit and len(lm_mmb) == 4 * limit
    assert lm_vqa == sweep_vqa
    assert lm_mmb == sweep_mmb
