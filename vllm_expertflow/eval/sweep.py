"""Accuracy sweep: VQAv2 and MMBench accuracy of an MoE vision-language model across expert-cache settings.

    python -m vllm_expertflow.eval.sweep --model DIR --out DIR [--vqa FILE] [--mmbench FILE]
        [--grid full|reduced] [--limit N]

Grid (``full``): cache capacity {100, 75, 50, 25, 12.5}% of the experts per MoE layer
(``slots = max(top_k, round(pct * E))``) x budget mode {per-layer, global} x scheduling
{fcfs, expertflow} x miss policy {exact, skip, substitute}, plus an offload-off baseline.
``reduced``: capacities {100, 25} x {per-layer, global} x {fcfs, expertflow} x {exact, skip} (default
``--limit 40``). ``--capacities/--budget-modes/--schedulings/--miss-policies`` override an axis.

The ``global`` budget mode is the live cache's ``expertflow`` policy: one pool of ``slots x
MoE layers`` shared by all layers by predicted demand. It is lossless only, so its skip and
substitute cells are listed with status ``not available`` and never run or faked.
Two capacities that round to the same slot count run once; the second cell reuses the first
cell's outputs (column ``reused_from``).

Data: without ``--vqa``/``--mmbench`` the easy-vqa test split (a seeded sample of ``--limit``
questions, or all of it) is converted into ``--out/data`` as a VQAv2 lmms-lab parquet and an
MMBench TSV with CircularEval rotations. Given files are read in their published schemas
(``vqav2.load_lmms_parquet`` / ``load_official_json``, ``mmbench.load_tsv`` / ``load_parquet``);
``--limit N`` then takes the first N VQAv2 questions and the first N MMBench base questions
with all their rotations (rotations are generated for base questions the file has none for).

Each cell starts one engine (in this process, one after another), warms it up on two requests,
then generates greedily for every item in one ``LLM.generate`` call. Outputs under ``--out``:
``cells/<cell>/vqav2.jsonl`` (question_id, prediction, answers, ...), ``cells/<cell>/mmbench.jsonl``
(index, prediction, answer, options, ...), ``cells/<cell>/metrics.json``, ``cells.csv``,
``table.md`` and PNG plots. A cell whose ``metrics.json`` exists is skipped (resume); a sweep
directory refuses to resume with different model/data/generation settings.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vllm_expertflow.eval import mmbench, vqav2

BUNDLED_VLM = Path(__file__).resolve().parents[2] / "models" / "toy-qwen3-vl-moe"

CAPACITIES = {"full": (100.0, 75.0, 50.0, 25.0, 12.5), "reduced": (100.0, 25.0)}
BUDGET_MODES = {"full": ("per-layer", "global"), "reduced": ("per-layer", "global")}
SCHEDULINGS = {"full": ("fcfs", "expertflow"), "reduced": ("fcfs", "expertflow")}
MISS_POLICIES = {"full": ("exact", "skip", "substitute"), "reduced": ("exact", "skip")}
DEFAULT_LIMIT = {"full": None, "reduced": 40}
ALL_BUDGET_MODES = ("per-layer", "global")
# The global budget is the live cache's expertflow policy (one slot pool for all MoE layers),
# which runs lossless only.
GLOBAL_POLICY = "expertflow"
NOT_AVAILABLE_REASON = {
    "global": "the global slot budget (cache policy expertflow, one pool for all MoE layers) runs with the exact "
    "miss policy only; lossy miss policies are not available with it",
}
BASELINE = "baseline"
# Generation settings shared with the lm-eval tasks (lm_eval_tasks/*.yaml): greedy, few tokens. Special tokens
# stay in the text, as lm-eval's vLLM backends decode (skip_special_tokens=False), so both score the same string.
DEFAULT_MAX_TOKENS = 8
STOP = ["\n\n"]
DETOKENIZE = {"skip_special_tokens": False, "spaces_between_special_tokens": False}

CSV_COLUMNS = [
    "cell", "status", "budget_mode", "capacity_pct", "slots", "num_experts", "top_k", "scheduling",
    "miss_policy", "lossless", "vqav2_acc", "mmbench_circular_acc", "mmbench_row_acc", "agree_vqav2",
    "agree_mmbench", "agree_all", "hit_rate", "hits", "misses", "loads", "bytes_loaded", "generated_tokens",
    "loads_per_token", "tokens_per_s", "generate_s", "init_s", "expert_mib_device", "expert_mib_all",
    "n_vqav2", "n_mmbench_rows", "n_mmbench_questions", "grouped_steps", "steps_with_held_requests",
    "reused_from", "note",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One offload setting of the sweep (the baseline is not a Cell)."""

    budget_mode: str
    capacity_pct: float
    scheduling: str
    miss_policy: str

    @property
    def id(self) -> str:
        return f"{self.budget_mode}-c{self.capacity_pct:g}-{self.scheduling}-{self.miss_policy}"

    @property
    def available(self) -> bool:
        return self.budget_mode == "per-layer" or self.miss_policy == "exact"


def slots_for(capacity_pct: float, num_experts: int, top_k: int) -> int:
    """Slots per MoE layer for a capacity in percent: ``max(top_k, round(pct/100 * E))`` (half up), <= E."""
    if not 0 < capacity_pct <= 100:
        raise ValueError(f"capacity must be in (0, 100] percent, got {capacity_pct}")
    return min(num_experts, max(top_k, int(math.floor(capacity_pct / 100 * num_experts + 0.5))))


def offload_settings(cell: Cell, slots: int, cache_policy: str = "lru") -> dict[str, Any]:
    """The ``additional_config["expert_offload"]`` dict of a cell.

    Global cells hold the same device memory as per-layer ones (``slots`` per layer on average)
    in one pool that the expertflow policy shares between layers by predicted demand.
    """
    if not cell.available:
        raise ValueError(f"cell {cell.id}: {NOT_AVAILABLE_REASON[cell.budget_mode]}")
    policy = GLOBAL_POLICY if cell.budget_mode == "global" else cache_policy
    return {"enabled": True, "cache_slots": slots, "policy": policy, "scheduling": cell.scheduling,
            "miss_policy": cell.miss_policy}


def build_grid(grid: str, *, capacities: Sequence[float] | None = None, budget_modes: Sequence[str] | None = None,
               schedulings: Sequence[str] | None = None, miss_policies: Sequence[str] | None = None) -> list[Cell]:
    """Cells of a named grid, each axis optionally overridden, in a fixed order (capacity descending)."""
    if grid not in CAPACITIES:
        raise ValueError(f"unknown grid {grid!r}; valid: {sorted(CAPACITIES)}")
    from vllm_expertflow.config import MISS_POLICIES as VALID_MISS
    from vllm_expertflow.config import SCHEDULING_POLICIES as VALID_SCHED

    caps = sorted({float(c) for c in (capacities if capacities is not None else CAPACITIES[grid])}, reverse=True)
    modes = list(budget_modes if budget_modes is not None else BUDGET_MODES[grid])
    scheds = list(schedulings if schedulings is not None else SCHEDULINGS[grid])
    misses = list(miss_policies if miss_policies is not None else MISS_POLICIES[grid])
    for name, values, valid in (("budget mode", modes, ALL_BUDGET_MODES), ("scheduling", scheds, VALID_SCHED),
                                ("miss policy", misses, VALID_MISS)):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"unknown {name} {bad}; valid: {list(valid)}")
    for c in caps:
        if not 0 < c <= 100:
            raise ValueError(f"capacity must be in (0, 100] percent, got {c:g}")
    return [Cell(m, c, s, p) for m in modes for c in caps for s in scheds for p in misses]


def moe_shape(model: str) -> tuple[int, int]:
    """(routed experts per MoE layer, top_k) from the checkpoint's config.json (nested text configs searched)."""
    path = Path(model) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
    else:  # a Hub id
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    experts = _find_key(config, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))
    top_k = _find_key(config, ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"))
    if experts is None or top_k is None:
        raise ValueError(f"{model}: config.json names no expert count / top_k; is it an MoE model?")
    return int(experts), int(top_k)


def _find_key(config: dict, keys: Sequence[str]) -> Any:
    for sub in (config, config.get("text_config") or {}, config.get("language_config") or {},
                config.get("llm_config") or {}):
        for key in keys:
            if isinstance(sub.get(key), int) and sub[key] > 0:
                return sub[key]
    return None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def easy_vqa_files(data_dir: Path, limit: int | None, seed: int = 0) -> tuple[Path, Path]:
    """Write (once) the easy-vqa test split as VQAv2 parquet + MMBench TSV; the same questions in both."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tag = f"n{limit}" if limit is not None else "all"
    vqa = data_dir / f"vqav2_easyvqa_test_{tag}_s{seed}.parquet"
    mmb = data_dir / f"mmbench_easyvqa_test_{tag}_s{seed}.tsv"
    if not vqa.exists():
        tmp = vqa.with_suffix(".tmp")
        vqav2.write_easy_vqa_lmms_parquet(tmp, "test", limit, seed)
        os.replace(tmp, vqa)
    if not mmb.exists():
        tmp = mmb.with_suffix(".tmp")
        mmbench.write_easy_vqa_mmbench(tmp, "test", limit, seed, fmt="tsv")
        os.replace(tmp, mmb)
    return vqa, mmb


def load_vqa(path: str | Path, limit: int | None, annotations: str | None = None,
             images: str | None = None) -> list[vqav2.VQAItem]:
    """VQAv2 items: lmms-lab parquet (file or directory) or official questions JSON (+ annotations, images)."""
    p = Path(path)
    if p.suffix == ".json":
        if annotations is None or images is None:
            raise ValueError("official VQAv2 JSON needs --vqa-annotations and --vqa-images as well")
        items = vqav2.load_official_json(p, annotations, images)
        items = items[:limit] if limit is not None else items
    else:
        items = vqav2.load_lmms_parquet(p, limit)
    unanswered = [i.question_id for i in items if not i.answers]
    if unanswered:
        raise ValueError(f"{path}: {len(unanswered)} question(s) have no answers (a test split?), "
                         f"e.g. question_id {unanswered[0]}; accuracy needs annotated questions")
    return items


def load_mmbench(path: str | Path) -> list[mmbench.MMBenchItem]:
    p = Path(path)
    if p.suffix.lower() in (".tsv", ".txt"):
        return mmbench.load_tsv(p)
    return mmbench.load_parquet(p)


def select_mmbench(items: Sequence[mmbench.MMBenchItem], limit: int | None) -> list[mmbench.MMBenchItem]:
    """The first ``limit`` base questions (by first appearance) with all their rows, rotations completed.

    Rows are grouped by ``index % 1_000_000``; a group with only its base row gets its rotations
    from :func:`mmbench.circular_rotations` (files without stored rotations). Groups keep file
    order; within a group rows are ordered by index.

    Raises:
        ValueError: if a selected row has no answer (test split).
    """
    groups: dict[int, list[mmbench.MMBenchItem]] = {}
    for item in items:
        base = item.index % mmbench.ROTATION_STRIDE
        if base not in groups:
            if limit is not None and len(groups) >= limit:
                continue
            groups[base] = []
        groups[base].append(item)
    out: list[mmbench.MMBenchItem] = []
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: r.index)
        if len(rows) == 1 and rows[0].index < mmbench.ROTATION_STRIDE:
            rows = mmbench.circular_rotations(rows[0])
        for row in rows:
            if row.answer is None:
                raise ValueError(f"MMBench index {row.index} has no answer (a test split?); accuracy needs answers")
        out.extend(rows)
    return out


def render_prompt(tokenizer: Any, text: str, with_image: bool = True, chat_template: str | None = None) -> str:
    """Chat-formatted user turn (image first, then the text) with the generation prompt."""
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)


def build_requests(model: str, vqa_items: Sequence[vqav2.VQAItem], mmb_items: Sequence[mmbench.MMBenchItem],
                   chat_template: str | None = None) -> list[dict[str, Any]]:
    """vLLM requests, VQAv2 items first then MMBench rows: ``{"prompt", "multi_modal_data"}``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    requests = []
    for item in vqa_items:
        requests.append({"prompt": render_prompt(tokenizer, vqav2.build_prompt(item.question), True, chat_template),
                         "multi_modal_data": {"image": item.load_image()}})
    for row in mmb_items:
        with_image = row.image is not None
        request: dict[str, Any] = {"prompt": render_prompt(tokenizer, mmbench.build_prompt(row), with_image,
                                                           chat_template)}
        if with_image:
            request["multi_modal_data"] = {"image": row.load_image()}
        requests.append(request)
    return requests


# ---------------------------------------------------------------------------------------------
# Running one cell
# ---------------------------------------------------------------------------------------------


def run_engine(model: str, offload: dict[str, Any] | None, requests: list[dict[str, Any]], *,
               max_tokens: int, dtype: str, max_model_len: int, engine_args: dict[str, Any]) -> dict[str, Any]:
    """Start an engine, warm it up on two requests, generate for all; texts, token ids, stats, timings."""
    from vllm_expertflow.generate import _scheduling_stats, _set_cpu_defaults, engine_kwargs, measured_generate

    _set_cpu_defaults()
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model, offload, max_model_len=max_model_len, dtype=dtype, multimodal=True)
    kwargs.update(engine_args)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=STOP, **DETOKENIZE)
    start = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - start
    try:
        outputs, generate_s, stats, _ = measured_generate(llm, requests, sampling)
        scheduling = _scheduling_stats(llm)
    finally:
        del llm
        gc.collect()
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    result: dict[str, Any] = {
        "texts": [o.outputs[0].text for o in outputs],
        "token_ids": token_ids,
        "generated_tokens": sum(len(t) for t in token_ids),
        "init_s": init_s,
        "generate_s": generate_s,
        "scheduling_stats": scheduling,
        "cache": None,
    }
    if stats is not None:
        layers = stats.pop("layers")
        result["cache"] = stats
        result["moe_layers"] = len(layers)
        result["bytes_per_expert"] = stats["bytes_loaded"] / stats["loads"] if stats["loads"] else None
    return result


def write_cell(cell_dir: Path, result: dict[str, Any], meta: dict[str, Any],
               vqa_items: Sequence[vqav2.VQAItem], mmb_items: Sequence[mmbench.MMBenchItem]) -> None:
    """Predictions JSONL + metrics.json (written last: its presence marks the cell done)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    texts, ids = result["texts"], result["token_ids"]
    n = len(vqa_items)
    with open(cell_dir / "vqav2.jsonl", "w") as f:
        for item, text, tok in zip(vqa_items, texts[:n], ids[:n], strict=True):
            f.write(json.dumps({"question_id": item.question_id, "prediction": text, "answers": item.answers,
                                "question": item.question, "score": vqav2.score(text, item.answers),
                                "token_ids": tok}) + "\n")
    with open(cell_dir / "mmbench.jsonl", "w") as f:
        for row, text, tok in zip(mmb_items, texts[n:], ids[n:], strict=True):
            f.write(json.dumps({"index": row.index, "prediction": text, "answer": row.answer,
                                "options": row.options, "extracted": mmbench.extract_choice(text, row.options),
                                "correct": mmbench.is_correct(text, row), "token_ids": tok}) + "\n")
    metrics = {k: v for k, v in result.items() if k not in ("texts", "token_ids")}
    metrics.update(meta)
    tmp = cell_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, cell_dir / "metrics.json")


def copy_cell(src: Path, dst: Path, meta: dict[str, Any]) -> None:
    """A cell whose settings equal an earlier cell's (same slots): reuse its outputs, say so."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vqav2.jsonl", "mmbench.jsonl"):
        shutil.copyfile(src / name, dst / name)
    metrics = json.loads((src / "metrics.json").read_text())
    metrics.update(meta)
    metrics["reused_from"] = src.name
    tmp = dst / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, dst / "metrics.json")


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _agreement(rows: Sequence[dict], base: dict[Any, str] | None, key: str) -> float | None:
    if base is None or not rows:
        return None
    return sum(1 for r in rows if base.get(r[key]) == r["prediction"]) / len(rows)


def cell_row(cell_dir: Path, base_vqa: dict | None, base_mmb: dict | None) -> dict[str, Any]:
    """One ``cells.csv`` row from a finished cell directory (accuracy recomputed from the predictions)."""
    m = json.loads((cell_dir / "metrics.json").read_text())
    vqa = _read_jsonl(cell_dir / "vqav2.jsonl")
    mmb = _read_jsonl(cell_dir / "mmbench.jsonl")
    row: dict[str, Any] = {k: m.get(k) for k in ("cell", "budget_mode", "capacity_pct", "slots", "num_experts",
                                                 "top_k", "scheduling", "miss_policy", "generated_tokens",
                                                 "generate_s", "init_s", "reused_from")}
    row["status"] = "ok"
    row["lossless"] = m.get("miss_policy") in (None, "exact")
    row["n_vqav2"] = len(vqa)
    row["n_mmbench_rows"] = len(mmb)
    row["n_mmbench_questions"] = len({r["index"] % mmbench.ROTATION_STRIDE for r in mmb})
    row["vqav2_acc"] = sum(vqav2.score(r["prediction"], r["answers"]) for r in vqa) / len(vqa) if vqa else None
    if mmb:
        row["mmbench_circular_acc"] = mmbench.circular_eval([(r["index"], r["correct"]) for r in mmb])
        row["mmbench_row_acc"] = sum(bool(r["correct"]) for r in mmb) / len(mmb)
    row["agree_vqav2"] = _agreement(vqa, base_vqa, "question_id")
    row["agree_mmbench"] = _agreement(mmb, base_mmb, "index")
    if base_vqa is not None or base_mmb is not None:
        total = len(vqa) * (base_vqa is not None) + len(mmb) * (base_mmb is not None)
        same = (row["agree_vqav2"] or 0) * len(vqa) * (base_vqa is not None) + \
            (row["agree_mmbench"] or 0) * len(mmb) * (base_mmb is not None)
        row["agree_all"] = same / total if total else None
    tokens = m.get("generated_tokens") or 0
    row["tokens_per_s"] = tokens / m["generate_s"] if m.get("generate_s") else None
    cache = m.get("cache")
    if cache:
        for key in ("hit_rate", "hits", "misses", "loads", "bytes_loaded"):
            row[key] = cache[key]
        row["loads_per_token"] = cache["loads"] / tokens if tokens else None
        bpe, layers = m.get("bytes_per_expert"), m.get("moe_layers")
        if bpe and layers:
            row["expert_mib_device"] = m["slots"] * layers * bpe / 2**20
            row["expert_mib_all"] = m["num_experts"] * layers * bpe / 2**20
    if "scheduling_stats" in m:  # recorded by the expert-aware scheduler; None: it never grouped
        recorded = m["scheduling_stats"] or {}
        row["grouped_steps"] = recorded.get("grouped_steps", 0)
        row["steps_with_held_requests"] = recorded.get("steps_with_held_requests", 0)
    notes = []
    if m.get("reused_from"):
        notes.append(f"same slots as {m['reused_from']}: outputs reused")
    if m.get("miss_policy") in ("skip", "substitute"):
        notes.append("lossy miss policy")
    row["note"] = "; ".join(notes)
    return row


def aggregate(out: Path, cells: Sequence[Cell], num_experts: int, top_k: int) -> list[dict[str, Any]]:
    """Write ``cells.csv`` and ``table.md`` from every finished cell; not-available/failed/pending cells listed."""
    cells_dir = out / "cells"
    base_dir = cells_dir / BASELINE
    base_vqa = base_mmb = None
    if (base_dir / "metrics.json").exists():
        base_vqa = {r["question_id"]: r["prediction"] for r in _read_jsonl(base_dir / "vqav2.jsonl")}
        base_mmb = {r["index"]: r["prediction"] for r in _read_jsonl(base_dir / "mmbench.jsonl")}
    rows: list[dict[str, Any]] = []
    if base_vqa is not None:
        rows.append(cell_row(base_dir, base_vqa, base_mmb))
    else:
        rows.append({"cell": BASELINE, "status": _pending_status(base_dir), "budget_mode": "off"})
    for cell in cells:
        d = cells_dir / cell.id
        common = {"cell": cell.id, "budget_mode": cell.budget_mode, "capacity_pct": cell.capacity_pct,
                  "slots": slots_for(cell.capacity_pct, num_experts, top_k), "num_experts": num_experts,
                  "top_k": top_k, "scheduling": cell.scheduling, "miss_policy": cell.miss_policy,
                  "lossless": cell.miss_policy == "exact"}
        if not cell.available:
            rows.append({**common, "status": "not available", "note": NOT_AVAILABLE_REASON[cell.budget_mode]})
        elif (d / "metrics.json").exists():
            rows.append(cell_row(d, base_vqa, base_mmb))
        else:
            rows.append({**common, "status": _pending_status(d), "note": _failure_note(d)})
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    return rows


def _pending_status(d: Path) -> str:
    return "failed" if (d / "error.txt").exists() else "pending"


def _failure_note(d: Path) -> str:
    err = d / "error.txt"
    if not err.exists():
        return ""
    lines = [line for line in err.read_text().strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "failed"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if pct:
        return f"{100 * v:.1f}"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


TABLE_HEADER = ("| cell | budget | capacity % | slots | scheduling | miss policy | VQAv2 acc % | MMBench circ % | "
                "MMBench row % | agree % | hit rate % | loads/token | tok/s | status |")


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    """The main table: one line per cell; not-available and failed cells say so."""
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for r in rows:
        status = r.get("status", "")
        if status != "ok":
            metrics = ["not available" if status == "not available" else status] + ["-"] * 6
        else:
            metrics = [_fmt(r.get("vqav2_acc"), pct=True), _fmt(r.get("mmbench_circular_acc"), pct=True),
                       _fmt(r.get("mmbench_row_acc"), pct=True), _fmt(r.get("agree_all"), pct=True),
                       _fmt(r.get("hit_rate"), pct=True), _fmt(r.get("loads_per_token")),
                       _fmt(r.get("tokens_per_s"))]
        note = status if status == "ok" and not r.get("reused_from") else (
            f"reused {r['reused_from']}" if r.get("reused_from") else status)
        cap = _fmt(r.get("capacity_pct")) if r.get("capacity_pct") not in (None, "") else "-"
        lines.append("| " + " | ".join([
            str(r.get("cell", "")), str(r.get("budget_mode") or "-"), cap, _fmt(r.get("slots")),
            str(r.get("scheduling") or "-"), str(r.get("miss_policy") or "-"), *metrics, note]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy_vs_capacity.png, hit_rate_vs_capacity.png, throughput_vs_capacity.png (per-layer ok cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("cell") != BASELINE]
    base = next((r for r in rows if r.get("cell") == BASELINE and r.get("status") == "ok"), None)
    series: dict[tuple[str, str], list[dict]] = {}
    for r in ok:
        series.setdefault((r["scheduling"], r["miss_policy"]), []).append(r)
    colors = {"fcfs": "tab:blue", "expertflow": "tab:orange"}
    styles = {"exact": "-", "skip": "--", "substitute": ":"}
    markers = {"exact": "o", "skip": "s", "substitute": "^"}

    def draw(ax, key: str, scale: float = 1.0, baseline: bool = True) -> None:
        for (sched, miss), rs in sorted(series.items()):
            pts = sorted((_num(r["capacity_pct"]), _num(r.get(key))) for r in rs if _num(r.get(key)) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], styles.get(miss, "-"),
                        marker=markers.get(miss, "o"), color=colors.get(sched), label=f"{sched} / {miss}")
        if baseline and base is not None and _num(base.get(key)) is not None:
            ax.axhline(_num(base[key]) * scale, color="black", linestyle="-.", linewidth=1, label="offload off")
        ax.set_xlabel("expert cache capacity (% of experts per MoE layer)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (key, title) in zip(axes, (("vqav2_acc", "VQAv2 accuracy %"),
                                       ("mmbench_circular_acc", "MMBench CircularEval accuracy %"),
                                       ("agree_all", "answers equal to offload-off %")), strict=True):
        draw(ax, key, 100.0, baseline=key != "agree_all")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy vs expert cache capacity (per-layer budget)")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_capacity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    draw(axes[0], "hit_rate", 100.0, baseline=False)
    axes[0].set_title("expert cache hit rate %")
    draw(axes[1], "loads_per_token", baseline=False)
    axes[1].set_title("expert loads per generated token")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "hit_rate_vs_capacity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    draw(ax, "tokens_per_s")
    ax.set_title("throughput (generated tokens/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "throughput_vs_capacity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _manifest_check(out: Path, manifest: dict[str, Any]) -> None:
    path = out / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        keys = [k for k in manifest["run_key"] if old.get("run_key", {}).get(k) != manifest["run_key"][k]]
        if keys:
            diffs = ", ".join(f"{k}: {old.get('run_key', {}).get(k)!r} -> {manifest['run_key'][k]!r}" for k in keys)
            raise SystemExit(f"{out} holds a sweep with different settings ({diffs}); use another --out to start "
                             f"a new sweep, or the old settings to resume")
    path.write_text(json.dumps(manifest, indent=1))


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return ",".join(f"{f.name}:{f.stat().st_size}" for f in sorted(p.glob("*.parquet")))
    return f"{p.stat().st_size}:{hashlib.sha256(p.read_bytes()[:1 << 20]).hexdigest()[:16]}"


def _path_key(path: str | None, out: Path) -> str | None:
    """A data path for the resume check: relative when inside --out, so a moved sweep directory still resumes."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _axis(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_VLM),
                        help="checkpoint directory or Hub id of an MoE VLM (default: the bundled toy Qwen3-VL-MoE)")
    parser.add_argument("--out", default=None,
                        help="sweep directory (created; resumed when it exists; default runs/study-<grid>)")
    parser.add_argument("--vqa", help="VQAv2: lmms-lab parquet (file or directory) or official questions JSON")
    parser.add_argument("--vqa-annotations", help="official VQAv2 annotations JSON (with a questions JSON)")
    parser.add_argument("--vqa-images", help="COCO image directory (with a questions JSON)")
    parser.add_argument("--mmbench", help="MMBench TSV or parquet (with answers: dev split)")
    parser.add_argument("--grid", choices=sorted(CAPACITIES), default="reduced")
    parser.add_argument("--limit", type=int, default=None,
                        help="VQAv2 questions and MMBench base questions to evaluate (default: reduced 40, full all)")
    parser.add_argument("--capacities", help="override: comma-separated percents, e.g. 100,50,25")
    parser.add_argument("--budget-modes", help="override: per-layer,global")
    parser.add_argument("--schedulings", help="override: fcfs,expertflow")
    parser.add_argument("--miss-policies", help="override: exact,skip,substitute")
    parser.add_argument("--cache-policy", default="lru", help="slot replacement policy (lru, lfu, lfru)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--chat-template", help="Jinja chat template file for models whose tokenizer has none")
    parser.add_argument("--engine-args", default="{}", help="JSON dict of extra vllm.LLM kwargs")
    parser.add_argument("--seed", type=int, default=0, help="easy-vqa question sample seed")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="start at most N engines, then aggregate and exit (3 if cells remain): for a fresh "
                             "process per engine, loop while the exit status is 3")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.limit is None:
        args.limit = DEFAULT_LIMIT[args.grid]
    if args.out is None:
        args.out = f"runs/study-{args.grid}"
    try:
        args.engine_args = json.loads(args.engine_args)
    except json.JSONDecodeError as exc:
        parser.error(f"--engine-args is not valid JSON ({exc})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    wall_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_experts, top_k = moe_shape(args.model)
    cells = build_grid(args.grid, capacities=_axis(args.capacities, float), budget_modes=_axis(args.budget_modes),
                       schedulings=_axis(args.schedulings), miss_policies=_axis(args.miss_policies))

    if args.vqa is None and args.mmbench is None:
        vqa_path, mmb_path = (str(p) for p in easy_vqa_files(out / "data", args.limit, args.seed))
        source = "easy-vqa test split"
    else:
        vqa_path, mmb_path, source = args.vqa, args.mmbench, "given files"
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    manifest = {
        "run_key": {
            "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
            "vqa": _path_key(vqa_path, out), "vqa_digest": _file_digest(vqa_path), "mmbench": _path_key(mmb_path, out),
            "mmbench_digest": _file_digest(mmb_path), "limit": args.limit, "max_tokens": args.max_tokens,
            "dtype": args.dtype, "max_model_len": args.max_model_len, "stop": STOP, "detokenize": DETOKENIZE,
            "chat_template": hashlib.sha256(chat_template.encode()).hexdigest()[:16] if chat_template else None,
            "engine_args": args.engine_args, "cache_policy": args.cache_policy,
        },
        "data_source": source, "num_experts": num_experts, "top_k": top_k, "grid": args.grid,
        "cells": [c.id for c in cells], "argv": list(sys.argv if argv is None else ["sweep", *argv]),
    }
    _manifest_check(out, manifest)

    vqa_items = load_vqa(vqa_path, args.limit, args.vqa_annotations, args.vqa_images) if vqa_path else []
    mmb_items = select_mmbench(load_mmbench(mmb_path), args.limit) if mmb_path else []
    if not vqa_items and not mmb_items:
        raise SystemExit("no items to evaluate")

    runnable = [c for c in cells if c.available]
    todo_ids = [BASELINE] + [c.id for c in runnable]
    done = {i for i in todo_ids if (out / "cells" / i / "metrics.json").exists()}
    print(f"sweep: {num_experts} experts top_k {top_k}; {len(vqa_items)} VQAv2 questions, {len(mmb_items)} MMBench "
          f"rows; {len(todo_ids)} runs ({len(done)} done), {len(cells) - len(runnable)} cells not available",
          file=sys.stderr)
    requests = build_requests(args.model, vqa_items, mmb_items, chat_template) if len(done) < len(todo_ids) else []
    run_opts = dict(max_tokens=args.max_tokens, dtype=args.dtype, max_model_len=args.max_model_len,
                    engine_args=args.engine_args)

    by_setting: dict[tuple, str] = {}
    engines = 0
    bar = tqdm(total=len(todo_ids), desc="sweep cells", unit="cell", file=sys.stderr)
    for cell_id in todo_ids:
        cell = None if cell_id == BASELINE else next(c for c in runnable if c.id == cell_id)
        d = out / "cells" / cell_id
        bar.set_postfix_str(cell_id)
        if cell is None:
            meta: dict[str, Any] = {"cell": BASELINE, "budget_mode": "off", "num_experts": num_experts,
                                    "top_k": top_k, "offload": None}
            offload = None
            setting: tuple = ("off",)
        else:
            slots = slots_for(cell.capacity_pct, num_experts, top_k)
            offload = offload_settings(cell, slots, args.cache_policy)
            meta = {"cell": cell.id, **dataclasses.asdict(cell), "slots": slots, "num_experts": num_experts,
                    "top_k": top_k, "offload": offload}
            setting = (cell.budget_mode, slots, cell.scheduling, cell.miss_policy)
        earlier = by_setting.get(setting)
        by_setting.setdefault(setting, cell_id)
        if cell_id in done:
            bar.update(1)
            continue
        if earlier is not None and (out / "cells" / earlier / "metrics.json").exists():
            copy_cell(out / "cells" / earlier, d, meta)
            bar.update(1)
            continue
        if args.max_runs is not None and engines >= args.max_runs:
            break
        engines += 1
        try:
            result = run_engine(args.model, offload, requests, **run_opts)
        except Exception:  # one failing setting must not lose the others; resume retries it
            d.mkdir(parents=True, exist_ok=True)
            (d / "error.txt").write_text(traceback.format_exc())
            print(f"sweep: cell {cell_id} failed; see {d / 'error.txt'}", file=sys.stderr)
            bar.update(1)
            continue
        (d / "error.txt").unlink(missing_ok=True)
        write_cell(d, result, meta, vqa_items, mmb_items)
        bar.update(1)
    bar.close()

    ran = engines
    rows = aggregate(out, cells, num_experts, top_k)
    if not args.no_plots:
        plot(rows, out)
    wall = time.perf_counter() - wall_start
    with open(out / "timing.jsonl", "a") as f:
        f.write(json.dumps({"wall_s": round(wall, 1), "runs": ran, "grid": args.grid, "limit": args.limit,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print(f"sweep: {ran} run(s) in {wall:.0f} s wall", file=sys.stderr)
    print((out / "table.md").read_text())
    failed = [r["cell"] for r in rows if r.get("status") == "failed"]
    if failed:
        print(f"sweep: {len(failed)} cell(s) failed: {failed}", file=sys.stderr)
        return 1
    pending = [r["cell"] for r in rows if r.get("status") == "pending"]
    if pending:
        print(f"sweep: {len(pending)} cell(s) left for the next invocation", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
