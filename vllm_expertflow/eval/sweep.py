"""Accuracy sweep: VQAv2 and MMBench accuracy of an MoE vision-language model across expert-offload settings.

    python -m vllm_expertflow.eval.sweep [--model DIR] [--out DIR] [--grid reduced|full] [--questions N]

Axes (``GRIDS``; each can be overridden with ``--regimes/--capacities/--budget-modes/--schedulings/--miss-policies/
--memory-budgets/--expert-shares``):

* prompt regime (``eval/prompts.py``): ``direct`` (the answer alone: loads happen in prefill) and ``rationale``
  (a short description, then ``Answer: X``: decode-heavy). Every cell is one regime; every column is per regime.
* capacity: expert slots per MoE layer as a percentage of the experts (``slots = max(top_k, round(pct * E))``);
  capacities that give the same slot count are one cell.
* budget mode: ``per-layer`` (an LRU cache per layer) or ``global`` (the ``expertflow`` pool shared by all layers).
* scheduling: ``fcfs`` or ``expertflow`` step composition.
* miss policy: ``exact`` (lossless), ``skip``, ``substitute``, ``reroute`` (lossy; core/miss_policies.py).
* memory budget: one device budget (a percentage of all experts' bytes) that holds the expert slots and the
  KV cache, split several ways (the experts' share; the rest is KV blocks, ``num_gpu_blocks_override``, at
  least one request's worth): fewer KV blocks hold fewer concurrent requests, so the scheduler has fewer to
  choose from.
* numerics control: offload off with ``max_num_seqs=1`` against offload off with vLLM's default batching, and
  exact-mode expertflow against exact-mode fcfs: outputs differ there only through batch composition.

With every expert resident the miss policy and the grouper have nothing to act on, so those cells run one
engine and the others reuse its outputs (column ``reused_from``). Each engine runs every regime, one after
the other (a warm-up on two requests first), stepping the engine to record each step's expert loads and
which requests it gave a token: ``modeled_tpot_ms`` charges each step its compute plus its loads as copies of
a Qwen3-30B-A3B expert at ``--link-gbps``, as ``benchmarks/token_scheduling.py`` does.

Statistics (``eval/stats.py``): every accuracy difference (a cell vs offload-off of its regime; expertflow vs
fcfs at equal other settings) gets a paired-bootstrap 95% CI over the items, and expertflow vs fcfs a McNemar
exact p-value. Outputs under ``--out``: ``cells/<cell>/{vqav2,mmbench}.jsonl`` and ``metrics.json``,
``cells.csv``, ``categories.csv`` (accuracy per question kind / MMBench category), ``table.md`` and PNG plots.
A cell whose ``metrics.json`` exists is skipped (resume); a directory refuses to resume with other settings.

Data: without ``--vqa``/``--mmbench``, a seeded sample of ``--questions`` questions of easy-vqa's test split
(about 9,600), converted into both formats (the same questions; MMBench with CircularEval rotations).
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
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vllm_expertflow.eval import mmbench, prompts, vqav2
from vllm_expertflow.eval.plots import num as _number
from vllm_expertflow.eval.stats import mcnemar_exact_p, paired_bootstrap_ci

REPO = Path(__file__).resolve().parents[2]
BUNDLED_VLM = REPO / "models" / "toy-qwen3-vl-moe"
STUDY_VLM = REPO / "models" / "study-qwen3-vl-moe"
# A random model of the study model's shape, built on first use when named with --model: the machinery
# runs on it without the trained checkpoint, its answers are garbage.
RANDOM_STUDY_SHAPE_VLM = REPO / ".cache" / "tiny-models" / "random-study-qwen3-vl-moe"
# The model the study runs by default (one constant: the sweep, `make study` and the docs follow it).
DEFAULT_MODEL = STUDY_VLM

REGIMES = prompts.REGIMES
ALL_BUDGET_MODES = ("per-layer", "global")
GLOBAL_POLICY = "expertflow"  # the live cache policy of the global budget mode: one pool for all MoE layers


@dataclasses.dataclass(frozen=True)
class Grid:
    regimes: tuple[str, ...]
    capacities: tuple[float, ...]  # percent of the experts per MoE layer
    budget_modes: tuple[str, ...]
    schedulings: tuple[str, ...]
    miss_policies: tuple[str, ...]
    memory_budgets: tuple[float, ...]  # device budget for slots + KV, percent of all experts' bytes
    expert_shares: tuple[float, ...]  # each budget's split: the experts' share, the rest KV blocks
    budget_miss_policies: tuple[str, ...]  # miss policies of the memory-budget cells (per-layer)
    questions: int | None  # VQAv2 questions and MMBench base questions (None: all)
    numerics_control: bool


GRIDS = {
    # `make study`: both regimes, 100% and 25%, both schedulings, exact and one lossy policy. Its numerics
    # channel is exact expertflow against exact fcfs; the max_num_seqs=1 control (one request per engine
    # step, so as many steps as tokens) alone would take longer than the rest on 2 cores.
    "reduced": Grid(REGIMES, (100.0, 25.0), ("per-layer",), ("fcfs", "expertflow"), ("exact", "reroute"), (), (),
                    (), 12, False),
    "full": Grid(REGIMES, (100.0, 75.0, 50.0, 25.0, 12.5), ALL_BUDGET_MODES, ("fcfs", "expertflow"),
                 ("exact", "skip", "substitute", "reroute"), (25.0, 50.0, 100.0), (0.5, 0.75, 0.9),
                 ("exact", "reroute"), 1000, True),
}
# Block size of every engine (vLLM's CPU attention needs a multiple of 32): the KV budget is counted in blocks.
KV_BLOCK_SIZE = 32
KV_DTYPE_BYTES = 2
# Modeled step time, as benchmarks/token_scheduling.py: compute scaled from 10 ms per step of a 48-layer model,
# plus each load as a copy of a Qwen3-30B-A3B bf16 expert (3 x 2048 x 768 x 2 bytes) over the host link.
MODELED_COMPUTE_MS_PER_LAYER = 10.0 / 48
MODELED_EXPERT_MB = 9.437
DEFAULT_LINK_GBPS = 25.0
# Generation: greedy; special tokens stay in the text, as lm-eval's vLLM backends decode, so both score the
# same string. The rationale regime's answer follows a newline, so only a blank line stops it early.
STOP = ["\n\n"]
DETOKENIZE = {"skip_special_tokens": False, "spaces_between_special_tokens": False}

CSV_COLUMNS = [
    "regime", "cell", "status", "kind", "budget_mode", "capacity_pct", "slots", "num_experts", "top_k",
    "scheduling", "miss_policy", "lossless", "memory_budget_pct", "expert_share", "memory_budget_mib",
    "expert_mib_device", "kv_mib", "kv_blocks", "kv_tokens", "max_num_seqs",
    "vqav2_acc", "vqav2_acc_yes_no", "vqav2_acc_shape", "vqav2_acc_color", "vqav2_unparsed",
    "mmbench_circular_acc", "mmbench_row_acc", "mmbench_unparsed",
    "vqav2_diff_vs_off", "vqav2_diff_vs_off_lo", "vqav2_diff_vs_off_hi",
    "mmbench_diff_vs_off", "mmbench_diff_vs_off_lo", "mmbench_diff_vs_off_hi",
    "vqav2_diff_vs_fcfs", "vqav2_diff_vs_fcfs_lo", "vqav2_diff_vs_fcfs_hi", "vqav2_mcnemar_p_vs_fcfs",
    "mmbench_diff_vs_fcfs", "mmbench_diff_vs_fcfs_lo", "mmbench_diff_vs_fcfs_hi", "mmbench_mcnemar_p_vs_fcfs",
    "agree_vqav2", "agree_mmbench", "agree_all", "agree_vs_fcfs",
    "hit_rate", "hits", "misses", "loads", "bytes_loaded", "generated_tokens", "engine_steps", "loads_per_token",
    "tokens_per_s", "modeled_tpot_ms_p50", "modeled_tpot_ms_p99", "modeled_tokens_per_s", "generate_s", "init_s",
    "expert_mib_all", "n_vqav2", "n_mmbench_rows", "n_mmbench_questions", "grouped_steps",
    "steps_with_held_requests", "reused_from", "note",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measured setting in one prompt regime.

    ``kind``: ``off`` (offload off, the regime's reference), ``control`` (offload off, one request per step),
    ``capacity`` (a slot count) or ``budget`` (a memory budget split between slots and KV blocks).
    """

    regime: str
    kind: str
    budget_mode: str = "off"
    slots: int | None = None
    scheduling: str | None = None
    miss_policy: str | None = None
    num_experts: int | None = None
    memory_budget_pct: float | None = None
    expert_share: float | None = None
    kv_blocks: int | None = None
    max_num_seqs: int | None = None

    @property
    def id(self) -> str:
        if self.kind == "off":
            return f"{self.regime}-off"
        if self.kind == "control":
            return f"{self.regime}-off-seq{self.max_num_seqs}"
        tail = f"{self.scheduling}-{self.miss_policy}"
        if self.kind == "budget":
            return f"{self.regime}-{self.budget_mode}-m{self.memory_budget_pct:g}-e{self.expert_share:g}-{tail}"
        return f"{self.regime}-{self.budget_mode}-s{self.slots}-{tail}"

    @property
    def capacity_pct(self) -> float | None:
        return None if self.slots is None else 100.0 * self.slots / self.num_experts

    @property
    def lossless(self) -> bool:
        return self.miss_policy in (None, "exact")

    def offload(self, cache_policy: str = "lru") -> dict[str, Any] | None:
        """The cell's ``additional_config["expert_offload"]`` (None: offload off)."""
        if self.slots is None:
            return None
        policy = GLOBAL_POLICY if self.budget_mode == "global" else cache_policy
        return {"enabled": True, "cache_slots": self.slots, "policy": policy, "scheduling": self.scheduling,
                "miss_policy": self.miss_policy}

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.kv_blocks is not None:
            args["num_gpu_blocks_override"] = self.kv_blocks
        if self.max_num_seqs is not None:
            args["max_num_seqs"] = self.max_num_seqs
        return args

    def engine_key(self) -> str:
        """Cells with equal keys would run identical engines (any regime): they share one engine, or its outputs.

        With every expert resident nothing is ever missing or worth grouping for, so scheduling and miss policy
        do not matter there.
        """
        offload = self.offload()
        if offload is not None and self.slots == self.num_experts:
            offload = {**offload, "scheduling": "fcfs", "miss_policy": "exact"}
        return json.dumps([offload, self.engine_args()], sort_keys=True)


def slots_for(capacity_pct: float, num_experts: int, top_k: int) -> int:
    """Slots per MoE layer for a capacity in percent: ``max(top_k, round(pct/100 * E))`` (half up), <= E."""
    if not 0 < capacity_pct <= 100:
        raise ValueError(f"capacity must be in (0, 100] percent, got {capacity_pct}")
    return min(num_experts, max(top_k, int(math.floor(capacity_pct / 100 * num_experts + 0.5))))


@dataclasses.dataclass(frozen=True)
class ModelMemory:
    """What a memory budget buys on a model: bytes per expert (all MoE layers: ``x moe_layers``) and per KV block."""

    num_experts: int
    top_k: int
    moe_layers: int
    bytes_per_expert: int  # one expert of one layer
    kv_bytes_per_block: int  # every layer's K and V for KV_BLOCK_SIZE tokens

    @property
    def all_experts_bytes(self) -> int:
        return self.num_experts * self.moe_layers * self.bytes_per_expert

    def split(self, budget_pct: float, expert_share: float, min_kv_blocks: int) -> tuple[int, int] | None:
        """``(slots per layer, KV blocks)`` of a budget split, or None when it cannot hold top_k slots.

        The KV share never drops below ``min_kv_blocks`` (one request of the maximum length): vLLM refuses
        to start with less, and what it takes from the experts' share is taken from the slots.
        """
        budget = budget_pct / 100 * self.all_experts_bytes
        per_slot = self.moe_layers * self.bytes_per_expert
        blocks = max(min_kv_blocks, int((1 - expert_share) * budget // self.kv_bytes_per_block))
        slots = min(self.num_experts, int((budget - blocks * self.kv_bytes_per_block) // per_slot))
        if slots < self.top_k:
            return None
        # What the slots leave (a whole slot's bytes are more than a block's) goes to the KV cache.
        blocks = int((budget - slots * per_slot) // self.kv_bytes_per_block)
        return slots, blocks


def model_memory(model: str) -> ModelMemory:
    """From config.json: expert and KV block bytes of an unquantized bf16 MoE checkpoint (nested text configs)."""
    config = _read_config(model)
    text = config.get("text_config") or config.get("language_config") or config.get("llm_config") or config
    num_experts, top_k = moe_shape(model)
    layers = int(text["num_hidden_layers"])
    dense = set(text.get("mlp_only_layers") or [])
    step = int(text.get("decoder_sparse_step") or 1)
    moe_layers = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
    hidden = int(text["hidden_size"])
    inter = int(text.get("moe_intermediate_size") or text["intermediate_size"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    return ModelMemory(num_experts, top_k, moe_layers, 3 * hidden * inter * KV_DTYPE_BYTES,
                       2 * layers * kv_heads * head_dim * KV_DTYPE_BYTES * KV_BLOCK_SIZE)


def build_grid(grid: Grid, memory: ModelMemory, *, max_model_len: int) -> list[Cell]:
    """Every cell of a grid in a fixed order: per regime, offload off, the control, capacities, budgets."""
    from vllm_expertflow.config import MISS_POLICIES as VALID_MISS
    from vllm_expertflow.config import SCHEDULING_POLICIES as VALID_SCHED

    for name, values, valid in (("regime", grid.regimes, REGIMES), ("budget mode", grid.budget_modes, ALL_BUDGET_MODES),
                                ("scheduling", grid.schedulings, VALID_SCHED),
                                ("miss policy", grid.miss_policies + grid.budget_miss_policies, VALID_MISS)):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"unknown {name} {bad}; valid: {list(valid)}")
    for c in grid.capacities:
        if not 0 < c <= 100:
            raise ValueError(f"capacity must be in (0, 100] percent, got {c:g}")
    for share in grid.expert_shares:
        if not 0 < share < 1:
            raise ValueError(f"an expert share must be in (0, 1), got {share:g}")
    for budget in grid.memory_budgets:
        if not budget > 0:
            raise ValueError(f"a memory budget must be a positive percentage, got {budget:g}")
    E = memory.num_experts
    # Capacities that round to the same slot count are one cell (the largest capacity names it).
    slot_counts = sorted({slots_for(c, E, memory.top_k) for c in grid.capacities}, reverse=True)
    min_blocks = math.ceil(max_model_len / KV_BLOCK_SIZE)
    cells: list[Cell] = []
    for regime in grid.regimes:
        cells.append(Cell(regime, "off"))
        if grid.numerics_control:
            cells.append(Cell(regime, "control", max_num_seqs=1))
        for mode in grid.budget_modes:
            for slots in slot_counts:
                for sched in grid.schedulings:
                    for miss in grid.miss_policies:
                        cells.append(Cell(regime, "capacity", mode, slots, sched, miss, E))
        for budget in grid.memory_budgets:
            for share in grid.expert_shares:
                split = memory.split(budget, share, min_blocks)
                if split is None:
                    raise ValueError(
                        f"memory budget {budget:g}% of the experts' bytes cannot hold top_k={memory.top_k} slots per "
                        f"layer and {min_blocks} KV blocks (one request of --max-model-len {max_model_len}); raise it"
                    )
                for sched in grid.schedulings:
                    for miss in grid.budget_miss_policies:
                        cells.append(Cell(regime, "budget", "per-layer", split[0], sched, miss, E, budget, share,
                                          split[1]))
    return cells


def _read_config(model: str) -> dict[str, Any]:
    path = Path(model) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download  # a Hub id

    return json.loads(Path(hf_hub_download(model, "config.json")).read_text())


def moe_shape(model: str) -> tuple[int, int]:
    """(routed experts per MoE layer, top_k) from the checkpoint's config.json (nested text configs searched)."""
    config = _read_config(model)
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


def question_kind(answers: Sequence[str]) -> str:
    """An easy-vqa question's kind from its answer (``yes/no``, ``shape``, ``color``); ``other`` for the rest."""
    answer = vqav2.normalize_answer(answers[0]) if answers else ""
    if answer in vqav2.EASY_VQA_YES_NO:
        return "yes/no"
    if answer in vqav2.EASY_VQA_SHAPES:
        return "shape"
    return "color" if answer in _easy_vqa_colors() else "other"


def _easy_vqa_colors() -> frozenset[str]:
    try:
        import easy_vqa
    except ImportError:
        return frozenset()
    return frozenset(a for a in easy_vqa.get_answers() if vqav2.easy_vqa_kind(a) == "color")


def score_vqa(prediction: str, answers: Sequence[str], regime: str) -> tuple[float, bool]:
    """``(VQA soft score, parsed)`` of a prediction: the whole text (direct) or what follows the last ``Answer:``."""
    final = prompts.final_answer(prediction, regime)
    return (0.0, False) if final is None else (vqav2.score(final, answers), True)


def score_mmbench(prediction: str, row: mmbench.MMBenchItem, regime: str) -> tuple[str | None, bool]:
    """``(extracted letter, parsed)``; a rationale without ``Answer:`` is unparsed and wrong."""
    final = prompts.final_answer(prediction, regime)
    return (None, False) if final is None else (mmbench.extract_choice(final, row.options), True)


def build_requests(model: str, regime: str, vqa_items: Sequence[vqav2.VQAItem],
                   mmb_items: Sequence[mmbench.MMBenchItem], chat_template: str | None = None) -> list[dict[str, Any]]:
    """vLLM requests of one regime, VQAv2 items first then MMBench rows: ``{"prompt", "multi_modal_data"}``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    requests = []
    for item in vqa_items:
        text = prompts.open_prompt(item.question, regime)
        requests.append({"prompt": render_prompt(tokenizer, text, True, chat_template),
                         "multi_modal_data": {"image": item.load_image()}})
    for row in mmb_items:
        hint = "" if mmbench._missing(row.hint) else str(row.hint).strip()
        text = prompts.mc_prompt(row.question, list(row.options.values()), regime, hint)
        with_image = row.image is not None
        request: dict[str, Any] = {"prompt": render_prompt(tokenizer, text, with_image, chat_template)}
        if with_image:
            request["multi_modal_data"] = {"image": row.load_image()}
        requests.append(request)
    return requests


# ---------------------------------------------------------------------------------------------
# Running one engine
# ---------------------------------------------------------------------------------------------


def run_engine(model: str, offload: dict[str, Any] | None, workloads: dict[str, list[dict[str, Any]]], *,
               dtype: str, max_model_len: int, engine_args: dict[str, Any], max_tokens: dict[str, int],
               moe_layers: int, link_gbps: float) -> dict[str, dict[str, Any]]:
    """Start one engine, warm it up on two requests, then run each regime's requests in turn (stepped)."""
    from vllm_expertflow.generate import _scheduling_stats, _set_cpu_defaults, engine_kwargs

    _set_cpu_defaults()
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model, offload, max_model_len=max_model_len, dtype=dtype, multimodal=True)
    kwargs["block_size"] = KV_BLOCK_SIZE
    kwargs.update(engine_args)
    start = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - start
    results = {}
    try:
        first = next(iter(workloads.values()))
        llm.generate(first[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        for regime, requests in workloads.items():
            sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens[regime], stop=STOP, **DETOKENIZE)
            result = stepped_generate(llm, regime, requests, sampling)
            result.update(modeled_timing(result.pop("step_loads"), result.pop("token_steps"), moe_layers=moe_layers,
                                         link_gbps=link_gbps))
            result["init_s"] = init_s
            result["scheduling_stats"] = _scheduling_stats(llm)
            results[regime] = result
    finally:
        del llm
        gc.collect()
    return results


def stepped_generate(llm, regime: str, requests: list[dict[str, Any]], sampling) -> dict[str, Any]:
    """Generate by stepping the engine: texts, token ids, cache stats, and per step its loads and its tokens."""
    from vllm_expertflow.generate import _stats_or_none, _subtract

    engine = llm.llm_engine
    ids = [f"{regime}-{i}" for i in range(len(requests))]
    before = _stats_or_none(llm)
    last_loads = before["loads"] if before else 0
    start = time.perf_counter()
    for request_id, request in zip(ids, requests, strict=True):
        engine.add_request(request_id, request, sampling)
    step_loads: list[int] = []
    token_steps: dict[str, list[int]] = {i: [] for i in ids}
    finished: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        stats = _stats_or_none(llm) if before is not None else None
        loads = stats["loads"] if stats else 0
        step_loads.append(loads - last_loads)
        last_loads = loads
        for output in outputs:
            seen = token_steps[output.request_id]
            seen.extend([len(step_loads) - 1] * (len(output.outputs[0].token_ids) - len(seen)))
            if output.finished:
                finished[output.request_id] = output
    generate_s = time.perf_counter() - start
    outputs = [finished[i] for i in ids]
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    result: dict[str, Any] = {
        "texts": [o.outputs[0].text for o in outputs], "token_ids": token_ids,
        "generated_tokens": sum(len(t) for t in token_ids), "generate_s": generate_s, "engine_steps": len(step_loads),
        "step_loads": step_loads, "token_steps": token_steps, "cache": None,
    }
    after = _stats_or_none(llm)
    if after is not None and before is not None:
        stats = _subtract(after, before)
        result["moe_layers"] = len(stats.pop("layers"))
        result["cache"] = stats
        result["bytes_per_expert"] = stats["bytes_loaded"] / stats["loads"] if stats["loads"] else None
    return result


def modeled_timing(step_loads: Sequence[int], token_steps: dict[str, list[int]], *, moe_layers: int,
                   link_gbps: float) -> dict[str, Any]:
    """Modeled TPOT (p50/p99 over requests) and throughput: each step its compute plus its loads' copies."""
    import numpy as np

    step_ms = MODELED_COMPUTE_MS_PER_LAYER * moe_layers + np.asarray(step_loads, dtype=np.float64) * (
        MODELED_EXPERT_MB / link_gbps)
    clock = np.cumsum(step_ms)
    tpot = [(clock[s[-1]] - clock[s[0]]) / (len(s) - 1) for s in token_steps.values() if len(s) > 1]
    tokens = sum(len(s) for s in token_steps.values())
    total_ms = float(clock[-1]) if len(clock) else 0.0
    return {
        "modeled_tpot_ms_p50": float(np.percentile(tpot, 50)) if tpot else None,
        "modeled_tpot_ms_p99": float(np.percentile(tpot, 99)) if tpot else None,
        "modeled_tokens_per_s": tokens / (total_ms / 1e3) if total_ms else None,
        "modeled": {"compute_ms_per_layer": MODELED_COMPUTE_MS_PER_LAYER, "expert_mb": MODELED_EXPERT_MB,
                    "link_gbps": link_gbps},
    }


def write_cell(cell_dir: Path, result: dict[str, Any], meta: dict[str, Any], regime: str,
               vqa_items: Sequence[vqav2.VQAItem], mmb_items: Sequence[mmbench.MMBenchItem]) -> None:
    """Predictions JSONL + metrics.json (written last: its presence marks the cell done)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    texts, ids = result["texts"], result["token_ids"]
    n = len(vqa_items)
    with open(cell_dir / "vqav2.jsonl", "w") as f:
        for item, text, tok in zip(vqa_items, texts[:n], ids[:n], strict=True):
            score, parsed = score_vqa(text, item.answers, regime)
            f.write(json.dumps({"question_id": item.question_id, "prediction": text, "answers": item.answers,
                                "question": item.question, "kind": question_kind(item.answers), "score": score,
                                "parsed": parsed, "token_ids": tok}) + "\n")
    with open(cell_dir / "mmbench.jsonl", "w") as f:
        for row, text, tok in zip(mmb_items, texts[n:], ids[n:], strict=True):
            extracted, parsed = score_mmbench(text, row, regime)
            f.write(json.dumps({"index": row.index, "prediction": text, "answer": row.answer, "options": row.options,
                                "category": row.category, "extracted": extracted, "parsed": parsed,
                                "correct": extracted == row.answer, "token_ids": tok}) + "\n")
    metrics = {k: v for k, v in result.items() if k not in ("texts", "token_ids")}
    metrics.update(meta)
    tmp = cell_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, cell_dir / "metrics.json")


def copy_cell(src: Path, dst: Path, meta: dict[str, Any]) -> None:
    """A cell whose engine would equal an earlier cell's: reuse its outputs, say so."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vqav2.jsonl", "mmbench.jsonl"):
        shutil.copyfile(src / name, dst / name)
    metrics = json.loads((src / "metrics.json").read_text())
    metrics.update({k: v for k, v in meta.items() if k not in PROVENANCE_KEYS})  # the outputs' source made them
    metrics["reused_from"] = src.name
    tmp = dst / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, dst / "metrics.json")


PROVENANCE_KEYS = ("commit", "dirty", "loadavg_1m", "cpus")


def provenance() -> dict[str, Any]:
    """What produced a cell: the commit (and whether the tree had uncommitted changes) and the machine's load,
    so a results file made from cells of several runs can say which code and conditions each came from."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": bool(status) if status is not None else None,
            "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def cell_meta(cell: Cell, memory: ModelMemory, cache_policy: str) -> dict[str, Any]:
    meta = {"cell": cell.id, **provenance(), **dataclasses.asdict(cell), "capacity_pct": cell.capacity_pct, "top_k": memory.top_k,
            "num_experts": memory.num_experts, "offload": cell.offload(cache_policy), "engine_args": cell.engine_args()}
    if cell.kind == "budget":
        meta["memory_budget_mib"] = cell.memory_budget_pct / 100 * memory.all_experts_bytes / 2**20
        meta["kv_mib"] = cell.kv_blocks * memory.kv_bytes_per_block / 2**20
        meta["kv_tokens"] = cell.kv_blocks * KV_BLOCK_SIZE
    return meta



# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class CellOutputs:
    """A finished cell's per-item outcomes, keyed for pairing with another cell's."""

    metrics: dict[str, Any]
    vqa: list[dict[str, Any]]
    mmb: list[dict[str, Any]]

    @classmethod
    def read(cls, d: Path) -> CellOutputs:
        return cls(json.loads((d / "metrics.json").read_text()), _read_jsonl(d / "vqav2.jsonl"),
                   _read_jsonl(d / "mmbench.jsonl"))

    def vqa_scores(self) -> dict[int, float]:
        return {r["question_id"]: float(r["score"]) for r in self.vqa}

    def mmb_questions(self) -> dict[int, bool]:
        """CircularEval outcome per base question: every rotation right."""
        out: dict[int, bool] = {}
        for r in self.mmb:
            base = r["index"] % mmbench.ROTATION_STRIDE
            out[base] = out.get(base, True) and bool(r["correct"])
        return out

    def predictions(self) -> dict[tuple[str, int], str]:
        return {**{("vqa", r["question_id"]): r["prediction"] for r in self.vqa},
                **{("mmb", r["index"]): r["prediction"] for r in self.mmb}}


def _paired(a: dict, b: dict) -> tuple[list, list]:
    keys = sorted(set(a) & set(b))
    return [a[k] for k in keys], [b[k] for k in keys]


def compare(row: dict[str, Any], suffix: str, mine: CellOutputs, other: CellOutputs, *, mcnemar: bool,
            seed: int) -> None:
    """Fill ``{vqav2,mmbench}_diff_{suffix}`` (+ ``_lo``/``_hi``, and McNemar's p) of ``mine`` minus ``other``."""
    for name, a, b, correct in (("vqav2", mine.vqa_scores(), other.vqa_scores(), lambda s: s >= 1.0),
                                ("mmbench", mine.mmb_questions(), other.mmb_questions(), bool)):
        x, y = _paired(a, b)
        if not x:
            continue
        diff, lo, hi = paired_bootstrap_ci([float(v) for v in x], [float(v) for v in y], seed=seed)
        row[f"{name}_diff_{suffix}"], row[f"{name}_diff_{suffix}_lo"], row[f"{name}_diff_{suffix}_hi"] = diff, lo, hi
        if mcnemar:
            row[f"{name}_mcnemar_p_{suffix}"] = mcnemar_exact_p([correct(v) for v in x], [correct(v) for v in y])


def agreement(mine: CellOutputs, other: CellOutputs) -> float | None:
    a, b = mine.predictions(), other.predictions()
    keys = set(a) & set(b)
    return sum(a[k] == b[k] for k in keys) / len(keys) if keys else None


def cell_row(cell: Cell, outputs: CellOutputs) -> dict[str, Any]:
    """A ``cells.csv`` row's own columns (comparisons are filled by :func:`aggregate`)."""
    m, vqa, mmb = outputs.metrics, outputs.vqa, outputs.mmb
    row: dict[str, Any] = {k: m.get(k) for k in ("generated_tokens", "generate_s", "init_s", "reused_from",
                                                 "engine_steps", "modeled_tpot_ms_p50", "modeled_tpot_ms_p99",
                                                 "modeled_tokens_per_s", "memory_budget_mib", "kv_mib", "kv_tokens")}
    row.update(_cell_columns(cell))
    row["status"] = "ok"
    row["n_vqav2"], row["n_mmbench_rows"] = len(vqa), len(mmb)
    row["n_mmbench_questions"] = len({r["index"] % mmbench.ROTATION_STRIDE for r in mmb})
    if vqa:
        row["vqav2_acc"] = sum(r["score"] for r in vqa) / len(vqa)
        row["vqav2_unparsed"] = sum(not r["parsed"] for r in vqa) / len(vqa)
        for kind, column in (("yes/no", "vqav2_acc_yes_no"), ("shape", "vqav2_acc_shape"),
                             ("color", "vqav2_acc_color")):
            scores = [r["score"] for r in vqa if r["kind"] == kind]
            row[column] = sum(scores) / len(scores) if scores else None
    if mmb:
        row["mmbench_circular_acc"] = mmbench.circular_eval([(r["index"], r["correct"]) for r in mmb])
        row["mmbench_row_acc"] = sum(bool(r["correct"]) for r in mmb) / len(mmb)
        row["mmbench_unparsed"] = sum(not r["parsed"] for r in mmb) / len(mmb)
    tokens = m.get("generated_tokens") or 0
    row["tokens_per_s"] = tokens / m["generate_s"] if m.get("generate_s") else None
    cache = m.get("cache")
    if cache:
        for key in ("hit_rate", "hits", "misses", "loads", "bytes_loaded"):
            row[key] = cache[key]
        row["loads_per_token"] = cache["loads"] / tokens if tokens else None
        bpe, layers = m.get("bytes_per_expert"), m.get("moe_layers")
        if bpe and layers:
            row["expert_mib_device"] = cell.slots * layers * bpe / 2**20
            row["expert_mib_all"] = cell.num_experts * layers * bpe / 2**20
    if "scheduling_stats" in m:  # recorded by the expert-aware scheduler; None: it never grouped
        recorded = m["scheduling_stats"] or {}
        row["grouped_steps"] = recorded.get("grouped_steps", 0)
        row["steps_with_held_requests"] = recorded.get("steps_with_held_requests", 0)
    notes = []
    if m.get("reused_from"):
        notes.append(f"outputs of {m['reused_from']} (the same engine)")
    if not cell.lossless:
        notes.append("lossy miss policy")
    row["note"] = "; ".join(notes)
    return row


def _cell_columns(cell: Cell) -> dict[str, Any]:
    return {"regime": cell.regime, "cell": cell.id, "kind": cell.kind, "budget_mode": cell.budget_mode,
            "capacity_pct": cell.capacity_pct, "slots": cell.slots, "num_experts": cell.num_experts,
            "scheduling": cell.scheduling, "miss_policy": cell.miss_policy, "lossless": cell.lossless,
            "memory_budget_pct": cell.memory_budget_pct, "expert_share": cell.expert_share,
            "kv_blocks": cell.kv_blocks, "max_num_seqs": cell.max_num_seqs}


def fcfs_counterpart(cell: Cell) -> Cell | None:
    """The fcfs cell at the same other settings as an expertflow cell."""
    if cell.scheduling != "expertflow":
        return None
    return dataclasses.replace(cell, scheduling="fcfs")


def aggregate(out: Path, cells: Sequence[Cell], top_k: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Write ``cells.csv``, ``categories.csv`` and ``table.md`` from every finished cell; others listed as pending/failed."""
    cells_dir = out / "cells"
    finished = {c.id: CellOutputs.read(cells_dir / c.id) for c in cells if (cells_dir / c.id / "metrics.json").exists()}
    by_id = {c.id: c for c in cells}
    rows: list[dict[str, Any]] = []
    for cell in cells:
        if cell.id not in finished:
            d = cells_dir / cell.id
            rows.append({**_cell_columns(cell), "top_k": top_k, "status": _pending_status(d), "note": _failure_note(d)})
            continue
        mine = finished[cell.id]
        row = cell_row(cell, mine)
        row["top_k"] = top_k
        off = finished.get(Cell(cell.regime, "off").id)
        if off is not None and cell.kind != "off":
            compare(row, "vs_off", mine, off, mcnemar=False, seed=seed)
            row["agree_vqav2"] = agreement(CellOutputs({}, mine.vqa, []), CellOutputs({}, off.vqa, []))
            row["agree_mmbench"] = agreement(CellOutputs({}, [], mine.mmb), CellOutputs({}, [], off.mmb))
            row["agree_all"] = agreement(mine, off)
        fcfs = fcfs_counterpart(cell)
        if fcfs is not None and fcfs.id in finished and fcfs.id in by_id:
            compare(row, "vs_fcfs", mine, finished[fcfs.id], mcnemar=True, seed=seed)
            row["agree_vs_fcfs"] = agreement(mine, finished[fcfs.id])
        rows.append(row)
    with open(out / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    write_categories(out / "categories.csv", cells, finished)
    (out / "table.md").write_text(markdown_tables(rows) + "\n")
    return rows


CATEGORY_COLUMNS = ["regime", "cell", "format", "category", "n", "acc"]


def write_categories(path: Path, cells: Sequence[Cell], finished: dict[str, CellOutputs]) -> None:
    """Accuracy per VQAv2 question kind and per MMBench category (CircularEval within the category)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CATEGORY_COLUMNS)
        writer.writeheader()
        for cell in cells:
            outputs = finished.get(cell.id)
            if outputs is None:
                continue
            kinds: dict[str, list[float]] = {}
            for r in outputs.vqa:
                kinds.setdefault(r["kind"], []).append(r["score"])
            for kind, scores in sorted(kinds.items()):
                writer.writerow({"regime": cell.regime, "cell": cell.id, "format": "vqav2", "category": kind,
                                 "n": len(scores), "acc": _csv_value(sum(scores) / len(scores))})
            categories: dict[str, list[tuple[int, bool]]] = {}
            for r in outputs.mmb:
                categories.setdefault(r.get("category") or "-", []).append((r["index"], r["correct"]))
            for category, records in sorted(categories.items()):
                questions = len({i % mmbench.ROTATION_STRIDE for i, _ in records})
                writer.writerow({"regime": cell.regime, "cell": cell.id, "format": "mmbench", "category": category,
                                 "n": questions, "acc": _csv_value(mmbench.circular_eval(records))})


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
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def fmt_ci(row: dict[str, Any], key: str) -> str:
    """``+1.2 [-0.3, +2.8]`` in points, ``*`` when the interval excludes zero."""
    diff, lo, hi = (_number(row.get(k)) for k in (key, f"{key}_lo", f"{key}_hi"))
    if diff is None:
        return "-"
    mark = "*" if lo is not None and hi is not None and (lo > 0 or hi < 0) else ""
    return f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


TABLE_HEADER = ("| cell | setting | VQAv2 % | MMBench circ % | VQAv2 vs off (95% CI) | MMBench vs off (95% CI) | "
                "vs fcfs: VQAv2 / MMBench (McNemar p) | agree % | hit % | loads/tok | tok/s | modeled TPOT p50/p99 ms |")


def _setting(r: dict[str, Any]) -> str:
    kind = r.get("kind")
    if kind == "off":
        return "offload off"
    if kind == "control":
        return f"offload off, max_num_seqs={r.get('max_num_seqs')}"
    slots = _fmt(_number(r.get("slots")))
    head = f"{r.get('budget_mode')}, {slots} slots ({_fmt(_number(r.get('capacity_pct')), digits=3)}%)"
    if kind == "budget":
        head = (f"budget {_fmt(_number(r.get('memory_budget_pct')))}% x {_fmt(_number(r.get('expert_share')))} experts: "
                f"{slots} slots + {_fmt(_number(r.get('kv_blocks')))} KV blocks")
    return f"{head}, {r.get('scheduling')}, {r.get('miss_policy')}"


def markdown_tables(rows: Iterable[dict[str, Any]]) -> str:
    """One table per regime; ``*`` marks a difference whose 95% CI excludes zero."""
    rows = list(rows)
    out = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        out += [f"### {regime}", "", TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
        for r in (r for r in rows if r["regime"] == regime):
            if r.get("status") != "ok":
                out.append(f"| {r['cell']} | {_setting(r)} | {r.get('status')}: {r.get('note') or ''} |" + " |" * 10)
                continue
            vs_fcfs = "-"
            if r.get("vqav2_diff_vs_fcfs") is not None:
                vs_fcfs = (f"{fmt_ci(r, 'vqav2_diff_vs_fcfs')} (p {_fmt(r.get('vqav2_mcnemar_p_vs_fcfs'))}) / "
                           f"{fmt_ci(r, 'mmbench_diff_vs_fcfs')} (p {_fmt(r.get('mmbench_mcnemar_p_vs_fcfs'))})")
            tpot = f"{_fmt(r.get('modeled_tpot_ms_p50'))}/{_fmt(r.get('modeled_tpot_ms_p99'))}"
            out.append("| " + " | ".join([
                r["cell"] + (f" (= {r['reused_from']})" if r.get("reused_from") else ""), _setting(r),
                _fmt(r.get("vqav2_acc"), pct=True), _fmt(r.get("mmbench_circular_acc"), pct=True),
                fmt_ci(r, "vqav2_diff_vs_off"), fmt_ci(r, "mmbench_diff_vs_off"), vs_fcfs,
                _fmt(r.get("agree_all"), pct=True), _fmt(r.get("hit_rate"), pct=True), _fmt(r.get("loads_per_token")),
                _fmt(r.get("tokens_per_s")), tpot]) + " |")
        out.append("")
    return "\n".join(out)



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


def _axis(text: str | None, cast=str) -> tuple | None:
    if text is None:
        return None
    return tuple(cast(v.strip()) for v in text.split(",") if v.strip())


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The named grid with the command line's overrides."""
    grid = GRIDS[args.grid]
    overrides = {
        "regimes": _axis(args.regimes), "capacities": _axis(args.capacities, float),
        "budget_modes": _axis(args.budget_modes), "schedulings": _axis(args.schedulings),
        "miss_policies": _axis(args.miss_policies), "memory_budgets": _axis(args.memory_budgets, float),
        "expert_shares": _axis(args.expert_shares, float), "budget_miss_policies": _axis(args.budget_miss_policies),
    }
    grid = dataclasses.replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    if args.questions is not None:
        grid = dataclasses.replace(grid, questions=None if args.questions == 0 else args.questions)
    if args.numerics_control is not None:
        grid = dataclasses.replace(grid, numerics_control=args.numerics_control)
    return grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help=f"checkpoint directory or Hub id of an MoE VLM (default: {DEFAULT_MODEL}, built on first "
                             f"use when it is the random study-shape model)")
    parser.add_argument("--out", default=None,
                        help="sweep directory (created; resumed when it exists; default runs/study-<grid>)")
    parser.add_argument("--vqa", help="VQAv2: lmms-lab parquet (file or directory) or official questions JSON")
    parser.add_argument("--vqa-annotations", help="official VQAv2 annotations JSON (with a questions JSON)")
    parser.add_argument("--vqa-images", help="COCO image directory (with a questions JSON)")
    parser.add_argument("--mmbench", help="MMBench TSV or parquet (with answers: dev split)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="reduced")
    parser.add_argument("--questions", "--limit", dest="questions", type=int, default=None,
                        help="VQAv2 questions and MMBench base questions per cell (default: the grid's, reduced "
                             f"{GRIDS['reduced'].questions}, full {GRIDS['full'].questions}; 0: all)")
    parser.add_argument("--regimes", help="override: direct,rationale")
    parser.add_argument("--capacities", help="override: comma-separated percents, e.g. 100,50,25")
    parser.add_argument("--budget-modes", help="override: per-layer,global")
    parser.add_argument("--schedulings", help="override: fcfs,expertflow")
    parser.add_argument("--miss-policies", help="override: exact,skip,substitute,reroute")
    parser.add_argument("--memory-budgets", help="override: device budgets (slots + KV), percent of all experts' bytes")
    parser.add_argument("--expert-shares", help="override: each budget's share for expert slots, e.g. 0.5,0.75,0.9")
    parser.add_argument("--budget-miss-policies", help="override: miss policies of the memory-budget cells")
    parser.add_argument("--numerics-control", action=argparse.BooleanOptionalAction, default=None,
                        help="run the offload-off max_num_seqs=1 control (default: full grid yes, reduced no)")
    parser.add_argument("--cache-policy", default="lru", help="per-layer slot replacement policy (lru, lfu, lfru)")
    parser.add_argument("--link-gbps", type=float, default=DEFAULT_LINK_GBPS,
                        help="modeled host-to-device bandwidth for the modeled TPOT (GB/s)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--chat-template", help="Jinja chat template file for models whose tokenizer has none")
    parser.add_argument("--engine-args", default="{}", help="JSON dict of extra vllm.LLM kwargs")
    parser.add_argument("--seed", type=int, default=0, help="easy-vqa question sample seed")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="start at most N engines, then aggregate and exit (3 if cells remain): for a fresh "
                             "process per engine, loop while the exit status is 3")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.questions is not None and args.questions < 0:
        parser.error(f"--questions must be >= 0 (0: all), got {args.questions}")
    if not args.link_gbps > 0:
        parser.error(f"--link-gbps must be positive, got {args.link_gbps}")
    if args.out is None:
        args.out = f"runs/study-{args.grid}"
    try:
        args.engine_args = json.loads(args.engine_args)
    except json.JSONDecodeError as exc:
        parser.error(f"--engine-args is not valid JSON ({exc})")
    try:
        args.grid_spec = grid_from_args(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    wall_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(args.model).resolve() == RANDOM_STUDY_SHAPE_VLM.resolve():
        from vllm_expertflow.tiny_models import build_study_shape_vlm

        build_study_shape_vlm(RANDOM_STUDY_SHAPE_VLM)
    grid = args.grid_spec
    memory = model_memory(args.model)
    try:
        cells = build_grid(grid, memory, max_model_len=args.max_model_len)
    except ValueError as exc:
        raise SystemExit(f"sweep: {exc}") from None
    limit = grid.questions

    if args.vqa is None and args.mmbench is None:
        vqa_path, mmb_path = (str(p) for p in easy_vqa_files(out / "data", limit, args.seed))
        source = "easy-vqa test split"
    else:
        vqa_path, mmb_path, source = args.vqa, args.mmbench, "given files"
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    manifest = {
        "run_key": {
            "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
            "vqa": _path_key(vqa_path, out), "vqa_digest": _file_digest(vqa_path), "mmbench": _path_key(mmb_path, out),
            "mmbench_digest": _file_digest(mmb_path), "limit": limit, "max_tokens": prompts.MAX_TOKENS,
            "dtype": args.dtype, "max_model_len": args.max_model_len, "stop": STOP, "detokenize": DETOKENIZE,
            "chat_template": hashlib.sha256(chat_template.encode()).hexdigest()[:16] if chat_template else None,
            "engine_args": args.engine_args, "cache_policy": args.cache_policy, "block_size": KV_BLOCK_SIZE,
        },
        "data_source": source, "num_experts": memory.num_experts, "top_k": memory.top_k,
        "moe_layers": memory.moe_layers, "bytes_per_expert": memory.bytes_per_expert,
        "kv_bytes_per_block": memory.kv_bytes_per_block, "grid": args.grid, "grid_spec": dataclasses.asdict(grid),
        "modeled": {"compute_ms_per_layer": MODELED_COMPUTE_MS_PER_LAYER, "expert_mb": MODELED_EXPERT_MB,
                    "link_gbps": args.link_gbps},
        "cells": [c.id for c in cells], "argv": list(sys.argv if argv is None else ["sweep", *argv]),
    }
    _manifest_check(out, manifest)

    vqa_items = load_vqa(vqa_path, limit, args.vqa_annotations, args.vqa_images) if vqa_path else []
    mmb_items = select_mmbench(load_mmbench(mmb_path), limit) if mmb_path else []
    if not vqa_items and not mmb_items:
        raise SystemExit("no items to evaluate")

    # One engine per distinct engine key; it runs every regime whose cell is not done yet.
    engines: dict[str, list[Cell]] = {}
    for cell in cells:
        engines.setdefault(cell.engine_key(), []).append(cell)
    done = {c.id for c in cells if (out / "cells" / c.id / "metrics.json").exists()}
    print(f"sweep: {memory.num_experts} experts top_k {memory.top_k}, {memory.moe_layers} MoE layers; "
          f"{len(vqa_items)} VQAv2 questions, {len(mmb_items)} MMBench rows; {len(cells)} cells ({len(done)} done), "
          f"{len(engines)} engines", file=sys.stderr)
    requests: dict[str, list[dict[str, Any]]] = {}
    run_opts = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_tokens=prompts.MAX_TOKENS,
                    moe_layers=memory.moe_layers, link_gbps=args.link_gbps)
    started = 0
    bar = tqdm(total=len(engines), desc="sweep engines", unit="engine", file=sys.stderr)
    for group in engines.values():
        bar.update(1)
        # Cells of one regime in a group: the first runs, the others reuse its outputs.
        runners = {}
        for cell in group:
            runners.setdefault(cell.regime, cell)
        todo = [c for c in runners.values() if c.id not in done]
        if todo:
            if args.max_runs is not None and started >= args.max_runs:
                continue
            started += 1
            first = todo[0]
            bar.set_postfix_str(first.id)
            for cell in todo:
                if cell.regime not in requests:
                    requests[cell.regime] = build_requests(args.model, cell.regime, vqa_items, mmb_items,
                                                           chat_template)
            try:
                results = run_engine(args.model, first.offload(args.cache_policy),
                                     {c.regime: requests[c.regime] for c in todo},
                                     engine_args={**args.engine_args, **first.engine_args()}, **run_opts)
            except Exception:  # one failing setting must not lose the others; resume retries it
                for cell in todo:
                    d = out / "cells" / cell.id
                    d.mkdir(parents=True, exist_ok=True)
                    (d / "error.txt").write_text(traceback.format_exc())
                print(f"sweep: engine of {first.id} failed; see {out / 'cells' / first.id / 'error.txt'}",
                      file=sys.stderr)
                continue
            for cell in todo:
                d = out / "cells" / cell.id
                (d / "error.txt").unlink(missing_ok=True)
                write_cell(d, results[cell.regime], cell_meta(cell, memory, args.cache_policy), cell.regime,
                           vqa_items, mmb_items)
                done.add(cell.id)
        for cell in group:
            source = runners[cell.regime]
            if cell.id not in done and source.id in done:
                copy_cell(out / "cells" / source.id, out / "cells" / cell.id, cell_meta(cell, memory, args.cache_policy))
                done.add(cell.id)
    bar.close()

    rows = aggregate(out, cells, memory.top_k, seed=args.seed)
    if not args.no_plots:
        from vllm_expertflow.eval import plots

        plots.plot_all(rows, out / "categories.csv", out)
    wall = time.perf_counter() - wall_start
    with open(out / "timing.jsonl", "a") as f:
        f.write(json.dumps({"wall_s": round(wall, 1), "runs": started, "grid": args.grid, "questions": limit,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print(f"sweep: {started} run(s) in {wall:.0f} s wall", file=sys.stderr)
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
