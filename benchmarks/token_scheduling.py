"""FCFS vs expert-aware step composition at 25%, 50% and 100% cache capacity, in one run.

    python benchmarks/token_scheduling.py [--workload mixed|topics] [--model DIR|SHAPE] [--requests 48]

Requests arrive over time (one every --arrival-every engine steps). Workloads:

* ``mixed`` (default model: the bundled VLM): image questions of different kinds and text
  prompts. The bundled models have 8 or 16 experts per layer: a dozen requests need most
  of them, so grouping has little to work with. Results: ``token_scheduling.{md,json}``.
* ``topics`` (default model: ``qwen3_moe_topics``, built into ``.cache/tiny-models``): text
  prompts of --topics topics on a synthetic model whose 64 experts per layer are planted to
  specialise by topic (``vllm_expertflow/tiny_models.py``), the premise of expert-aware
  grouping; planted, not trained. Results: ``token_scheduling_topics.{md,json}``.

Each setting runs in a fresh process with the in-process engine; the routing trace recorded
during the run gives the distinct experts per step. Prints a markdown table and writes it
with the raw numbers to benchmarks/results/. A core replay on clustered routing follows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vllm_expertflow.provenance import git_commit, machine_load, provenance, results_header  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


WORKLOADS = ("mixed", "topics", "rationale", "direct")
# The study model's shape with random weights, built here until the trained one (models/study-qwen3-vl-moe) exists.
STUDY_SHAPE_RANDOM = "study-shape-random"
STUDY_MODEL = "study-qwen3-vl-moe"
DEFAULT_MODELS = {"mixed": "toy-qwen3-vl-moe", "topics": "qwen3_moe_topics", "rationale": STUDY_MODEL,
                  "direct": STUDY_MODEL}
# Longer answers on the topic model: there, decode steps are what grouping can reorder. Room for every
# request to run at once. The study's two regimes on easy-vqa test questions: a short rationale before the
# answer (decode-heavy, as reasoning VLMs answer) and a direct answer of 1-3 tokens (prefill-heavy).
WORKLOAD_DEFAULTS = {
    "mixed": {"max_tokens": 24, "max_num_seqs": 32, "requests": 48, "arrival_every": 1, "capacities": "25,50,100",
              "max_tokens_spread": 0},
    "topics": {"max_tokens": 64, "max_num_seqs": 64, "requests": 48, "arrival_every": 1, "capacities": "25,50,100",
               "max_tokens_spread": 0},
    "rationale": {"max_tokens": 48, "max_num_seqs": 64, "requests": 96, "arrival_every": 0, "capacities": "25,50",
                  "max_tokens_spread": 16},
    "direct": {"max_tokens": 2, "max_num_seqs": 64, "requests": 96, "arrival_every": 0, "capacities": "25,50",
               "max_tokens_spread": 1},
}
PROMPT_STYLES = ("rationale", "direct")  # the study's regimes, prompts from vllm_expertflow.eval.prompts


def build_study_shape_random(out_dir: Path) -> Path:
    """A random Qwen3-VL-MoE of the study model's shape (skipped if present).

    Text: hidden 192, 6 layers, all MoE, 128 experts top-8, moe_intermediate 32; the bundled
    toy VLM's vision tower, tokenizer and processor. Random routers route near-uniformly, the
    pessimistic case for grouping: a trained router clusters by content.
    """
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    if (out_dir / "model.safetensors").exists():
        return out_dir
    toy = REPO / "models" / "toy-qwen3-vl-moe"
    config = Qwen3VLMoeConfig.from_pretrained(toy)
    text = config.text_config
    text.num_hidden_layers, text.num_experts, text.num_experts_per_tok = 6, 128, 8
    text.moe_intermediate_size, text.mlp_only_layers, text.decoder_sparse_step = 32, [], 1
    assert text.hidden_size == 192 and 2 * text.moe_intermediate_size != text.hidden_size
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            tensor = tensor.transpose(1, 2)  # transformers' internal layout -> the released one vLLM loads
        state[name] = tensor.detach().to(torch.float32).contiguous()
    config.dtype = text.dtype = config.vision_config.dtype = "float32"
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in ("generation_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (toy / name).exists():
            shutil.copy(toy / name, out_dir / name)
    return out_dir


def resolve_model(name: str) -> str:
    """A checkpoint directory, or a tiny model shape built (once) into ``.cache/tiny-models/SHAPE``."""
    from vllm_expertflow.tiny_models import MODEL_SHAPES, build_tiny_moe

    for candidate in (Path(name), REPO / "models" / name):
        if (candidate / "config.json").exists():
            return str(candidate)
    if name in (STUDY_SHAPE_RANDOM, STUDY_MODEL):  # the trained study model is missing: its shape, random
        if name == STUDY_MODEL:
            print(f"models/{STUDY_MODEL} not found: using {STUDY_SHAPE_RANDOM} (random weights)", file=sys.stderr)
        return str(build_study_shape_random(REPO / ".cache" / "tiny-models" / STUDY_SHAPE_RANDOM))
    if name in MODEL_SHAPES:
        return str(build_tiny_moe(name, REPO / ".cache" / "tiny-models" / name))
    if name == DEFAULT_MODELS["mixed"]:  # the bundled VLM is missing: fall back to the bundled text model
        return str(REPO / "models" / "tiny-qwen3-moe")
    raise SystemExit(f"--model {name!r} is neither a checkpoint directory nor a tiny model shape {list(MODEL_SHAPES)}")


def build_workload(args, is_vlm: bool) -> list:
    from vllm_expertflow.tiny_models import sample_image_requests, sample_prompts, sample_topic_prompts

    model, count = args.model, args.requests
    if args.workload in PROMPT_STYLES:
        return easy_vqa_requests(model, count, args.workload)
    if args.workload == "topics":
        return [prompt for _, prompt in sample_topic_prompts(count, int(args.topics), seed=3)]
    if not is_vlm:
        return sample_prompts(count, seed=3, min_words=4, max_words=30)
    images = sample_image_requests(model, count - count // 4, seed=3)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = []
    for i in range(count // 4):
        messages = [{"role": "user", "content": f"What color is a {['circle', 'square', 'triangle'][i % 3]}?"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    workload = []
    for i in range(count):  # interleave: every fourth request is text
        workload.append(texts.pop() if i % 4 == 3 and texts else images.pop(0) if images else texts.pop())
    return workload


def easy_vqa_requests(model: str, count: int, regime: str) -> list[dict]:
    """easy-vqa test questions as the study samples them (seeded, in split order), in one prompt regime."""
    from PIL import Image
    from transformers import AutoTokenizer

    from vllm_expertflow.eval.prompts import open_prompt
    from vllm_expertflow.eval.vqav2 import select_easy_vqa_questions

    tokenizer = AutoTokenizer.from_pretrained(model)
    requests = []
    for item in select_easy_vqa_questions("test", limit=count, seed=0):
        content = [{"type": "image"}, {"type": "text", "text": open_prompt(item.question, regime)}]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        requests.append({"prompt": prompt, "multi_modal_data": {"image": Image.open(item.image_path).convert("RGB")}})
    return requests


def answer_lengths(args, count: int) -> list[int]:
    """Tokens each request generates: ``max_tokens`` +- ``max_tokens_spread``, uniform, the same in every setting.

    Answers of different lengths finish at different steps, so places free up one by one and the
    waiting requests' admission order is the scheduler's choice, as when a benchmark of 1,000
    questions runs with 64 places.
    """
    import random

    rng = random.Random(7)
    low, high = max(1, args.max_tokens - args.max_tokens_spread), args.max_tokens + args.max_tokens_spread
    return [rng.randint(low, high) for _ in range(count)]


def run_setting(args, offload: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    import vllm_expertflow
    from vllm_expertflow.core import read_trace
    from vllm_expertflow.generate import engine_kwargs

    is_vlm = (Path(args.model) / "preprocessor_config.json").exists() or (
        Path(args.model) / "processor_config.json").exists()
    workload = build_workload(args, is_vlm)
    llm = LLM(**engine_kwargs(args.model, offload, multimodal=is_vlm), max_num_seqs=args.max_num_seqs)
    engine = llm.llm_engine
    lengths = answer_lengths(args, len(workload))
    arrivals = {f"r{i}": i * args.arrival_every for i in range(len(workload))}
    pending = list(range(len(workload)))
    added_at: dict[str, float] = {}
    token_times: dict[str, list[float]] = {}
    token_ids: dict[str, list[int]] = {}
    step = 0
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[f"r{pending[0]}"] <= step:
            i = pending.pop(0)
            prompt = workload[i]
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=lengths[i], ignore_eos=True))
            added_at[f"r{i}"] = time.perf_counter()
        now_outputs = engine.step()
        now = time.perf_counter()
        for output in now_outputs:
            token_ids[output.request_id] = list(output.outputs[0].token_ids)
            seen = token_times.setdefault(output.request_id, [])
            new = len(output.outputs[0].token_ids) - len(seen)
            seen.extend([now] * max(new, 0))
        step += 1
    wall = time.perf_counter() - start
    vllm_expertflow.flush_expert_trace(llm)
    stats = vllm_expertflow.get_expert_cache_stats(llm)
    records = vllm_expertflow.get_step_records(llm)
    trace = read_trace(offload["trace_dir"])
    distinct = [
        statistics.mean(len(set(step_ids[:, layer, :].ravel().tolist())) for layer in range(trace.num_layers))
        for step_ids in trace.iter_steps()
    ]
    ttft = [token_times[r][0] - added_at[r] for r in token_times]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times.values() if len(t) > 1]
    generated = sum(len(t) for t in token_times.values())
    lengths_by_id = {f"r{i}": n for i, n in enumerate(lengths)}
    timing = trace_timing(trace, offload["cache_slots"], args, lengths_by_id)
    # The cache policy changes loads, not the steps: each policy replays the same trace.
    by_policy = {}
    for policy in args.replay_policies.split(","):
        replayed = trace_timing(trace, offload["cache_slots"], args, lengths_by_id, policy)
        by_policy[policy] = {**replayed, "loads_per_token": replayed["replayed_loads"] / generated}
    if timing["replayed_loads"] != stats["loads"]:
        print(f"warning: the trace replays to {timing['replayed_loads']} loads, the live cache counted {stats['loads']}",
              file=sys.stderr)
    return {
        "generated_tokens": generated,
        "tok_s": generated / wall,
        "loads_per_token": stats["loads"] / generated,
        "hit_rate": stats["hit_rate"],
        "distinct_experts_per_step": statistics.mean(distinct),
        "steps": len(distinct),
        "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
        "tpot_p50": percentile(tpot, 0.5), "tpot_p99": percentile(tpot, 0.99),
        **timing,
        "by_policy": by_policy,
        **_grouping_stats(llm),
        **composition_stats(records, trace, offload["cache_slots"]),
        "tokens": token_ids,
    }


# Replayable cache policies: the plugin's, and vLLM PR #37190's LFRU (freq / age) as its docs describe it.
REPLAY_POLICIES = {"lru": ("lru", {}), "lfru": ("lfru", {}), "lfru-37190": ("lfru", {"score": "freq_over_age"})}


def composition_stats(records: list[dict], trace, slots: int) -> dict:
    """What the steps looked like: how many the scheduler changed versus FCFS, and unions against the slots.

    ``records``: ``vllm_expertflow.get_step_records``; each prefill's own union comes from the
    trace (a request's first step: its prompt, or its first chunk).
    """
    import numpy as np

    from vllm_expertflow.vllm_adapter.stats import summarize_step_records

    summary = summarize_step_records(records, slots)
    first_step_union = []
    for request_id in np.unique(trace.request_id):
        rows = trace.request_id == request_id
        first = trace.step_id[rows].min()
        ids = trace.topk_ids[rows & (trace.step_id == first)]  # [tokens, layers, top_k]
        first_step_union.append(np.mean([len(np.unique(ids[:, layer])) for layer in range(ids.shape[1])]))
    prefill_union = np.array(first_step_union)
    return {
        "changed_steps": summary["changed_steps"],
        "changed_fraction": summary["changed_fraction"],
        "fcfs_fallback_steps": summary["fcfs_fallback_steps"],
        "steps_over_slots": summary["steps_over_slots"],
        "steps_with_prefill": summary["steps_with_prefill"],
        "tokens_per_step": summary["tokens_per_step"],
        "prefill_union_mean": float(prefill_union.mean()),
        "prefills_over_slots": int((prefill_union > slots).sum()),
        "prefills": len(prefill_union),
    }


def trace_timing(trace, slots: int, args, generated: dict[str, int], policy: str = "lru") -> dict:
    """TPOT from the routing trace, free of the shared CPU's timing noise: in engine steps, and modeled.

    Each step's expert loads come from replaying the trace through the live cache's LRU and pass
    planning (checked against the live count by the caller); the modeled step takes the replay's
    compute time scaled to this model's layers plus its loads at the replay's copy cost.
    Request ``r`` generates ``generated[r]`` tokens (ignore_eos): its last that many steps produced them.
    """
    import numpy as np

    from vllm_expertflow.core.policies import make_policy
    from vllm_expertflow.core.slot_cache import plan_passes
    from vllm_expertflow.core.slot_map import SlotMap

    name, options = REPLAY_POLICIES[policy]
    maps = [SlotMap(trace.num_experts, slots, make_policy(name, **options)) for _ in range(trace.num_layers)]
    loads = []
    for step_ids in trace.iter_steps():  # [step_tokens, layers, top_k]
        before = sum(m.stats.loads for m in maps)
        for layer, slot_map in enumerate(maps):
            rows = step_ids[:, layer, :]
            for pass_rows in plan_passes(rows, slots):
                slot_map.admit(np.unique(rows[pass_rows]).tolist())
        loads.append(sum(m.stats.loads for m in maps) - before)
    # Steps with a prefill: some request ran more than one token (its prompt or a chunk of it).
    with_prefill = []
    for step in np.unique(trace.step_id):
        _, counts = np.unique(trace.request_id[trace.step_id == step], return_counts=True)
        with_prefill.append(bool(counts.max() > 1))
    compute_ms = args.replay_compute_ms * trace.num_layers / args.replay_layers
    clock_ms = np.cumsum(compute_ms + np.array(loads) * args.replay_expert_mb / args.replay_link_gbps)
    rank = np.searchsorted(np.unique(trace.step_id), trace.step_id)
    tpot_steps, tpot_ms = [], []
    for request_id in np.unique(trace.request_id):
        # vLLM's engine suffixes the ids it was given ("r7" runs as "r7-<random>").
        name = str(request_id) if str(request_id) in generated else str(request_id).rsplit("-", 1)[0]
        steps = np.unique(rank[trace.request_id == request_id])[-generated[name]:]
        if len(steps) > 1:
            tpot_steps.append((steps[-1] - steps[0]) / (len(steps) - 1))
            tpot_ms.append((clock_ms[steps[-1]] - clock_ms[steps[0]]) / (len(steps) - 1))
    return {
        "replayed_loads": int(sum(loads)),
        "prefill_step_loads_share": sum(n for n, p in zip(loads, with_prefill, strict=True) if p) / max(1, sum(loads)),
        "tpot_steps_p50": percentile(tpot_steps, 0.5), "tpot_steps_p99": percentile(tpot_steps, 0.99),
        "tpot_modeled_ms_p50": percentile(tpot_ms, 0.5), "tpot_modeled_ms_p99": percentile(tpot_ms, 0.99),
    }


def _grouping_stats(llm) -> dict:
    """Median grouping time per step, and in how many grouped steps requests were held back."""
    import vllm_expertflow

    recorded = vllm_expertflow.get_scheduling_stats(llm) or {"grouping_seconds": [], "held_per_step": []}
    seconds = sorted(recorded["grouping_seconds"])
    held = recorded["held_per_step"]
    scores = recorded.get("prediction_scores", [])
    return {
        "grouping_ms_median": 1e3 * seconds[len(seconds) // 2] if seconds else None,
        "grouped_steps": len(seconds),
        "steps_holding_back": sum(1 for h in held if h),
        "held_mean": statistics.mean(held) if held else 0.0,
        # New requests' predicted experts against their first step's, pooled over layers.
        "predicted_requests": len(scores),
        "prediction_precision": statistics.mean(p for p, _ in scores) if scores else None,
        "prediction_recall": statistics.mean(r for _, r in scores) if scores else None,
    }


# --- core replay on clustered routing ------------------------------------------------------------
# The live runs above use the bundled models, whose 8 (VLM) or 16 (text) experts per layer are
# almost all needed by any dozen requests: no subset fits a 25% cache, so there is nothing for
# grouping to win there. ExpertFlow's premise is a large expert count with routing clustered by
# request kind; this replay measures the same grouper and slot cache (core only, no vLLM) on such
# routing, at the shape of Qwen3-30B-A3B.


def replay_clustered(args) -> list[dict]:
    import numpy as np

    from vllm_expertflow.core.grouping import ExpertAwareGrouper, ExpertSignature, GroupingConfig, RequestView
    from vllm_expertflow.core.policies import make_policy
    from vllm_expertflow.core.slot_cache import plan_passes
    from vllm_expertflow.core.slot_map import SlotMap

    layers, experts, top_k = args.replay_layers, args.replay_experts, args.replay_top_k
    kinds, topic_experts, on_topic = args.replay_kinds, args.replay_kind_experts, args.replay_on_topic
    rows = []
    for pct in (25, 50):
        capacity = experts * pct // 100
        for scheduling in ("fcfs", "expertflow"):
            rng = np.random.default_rng(0)  # the same requests and routing for both schedulings
            preferred = np.argsort(rng.random((kinds, layers, experts)), axis=-1)[..., :topic_experts]
            kind_of = np.arange(args.replay_requests) % kinds  # the kinds arrive interleaved
            route_rng = np.random.default_rng(1)
            maps = [SlotMap(experts, capacity, make_policy("lru")) for _ in range(layers)]
            grouper = ExpertAwareGrouper(GroupingConfig(
                capacity=capacity, max_skip_steps=args.max_skip_steps, min_fraction=args.min_run_fraction,
                max_overflow_ratio=overflow_ratio(args.max_overflow_ratio)))
            produced = {r: 0 for r in range(args.replay_requests)}
            token_steps: dict[int, list[int]] = {r: [] for r in produced}
            running: list[int] = []
            next_request, step, loads, tokens, distinct = 0, 0, 0, 0, []
            clock_ms, token_times_ms = 0.0, {r: [] for r in produced}  # modeled wall time
            while next_request < args.replay_requests or running:
                while (next_request < args.replay_requests and len(running) < args.replay_max_running
                       and next_request < (step + 1) * args.replay_arrivals):
                    running.append(next_request)
                    next_request += 1
                # Each running request's token this step, drawn whether or not it runs (same stream).
                picks = preferred[kind_of[running]]  # [n, L, topic_experts]
                on = np.take_along_axis(picks, np.argsort(route_rng.random(picks.shape), axis=-1), axis=-1)
                off = np.argsort(route_rng.random((len(running), layers, experts)), axis=-1)[..., :topic_experts]
                routed = np.where(route_rng.random(on.shape) < on_topic, on, off)[..., :top_k]
                if scheduling == "fcfs":
                    chosen = list(range(len(running)))
                else:
                    resident = np.zeros((layers, experts), dtype=bool)
                    for layer, slot_map in enumerate(maps):
                        resident[layer, list(slot_map.resident())] = True
                    signatures = ExpertSignature.from_batch_topk_ids(routed, [1] * len(running), experts)
                    views = [RequestView(str(r), 0, float(r), signatures[i]) for i, r in enumerate(running)]
                    picked = set(grouper.select(views, step, resident=resident))
                    chosen = [i for i, r in enumerate(running) if str(r) in picked]
                before = sum(m.stats.loads for m in maps)
                union = 0
                for layer, slot_map in enumerate(maps):
                    layer_rows = routed[chosen, layer, :]
                    union += len(np.unique(layer_rows))
                    for pass_rows in plan_passes(layer_rows, capacity):
                        slot_map.admit(np.unique(layer_rows[pass_rows]).tolist())
                step_loads = sum(m.stats.loads for m in maps) - before
                loads += step_loads
                # Modeled step time: compute plus the step's expert copies over the host link.
                clock_ms += args.replay_compute_ms + step_loads * args.replay_expert_mb / args.replay_link_gbps
                distinct.append(union / layers)
                tokens += len(chosen)
                for i in chosen:
                    r = running[i]
                    produced[r] += 1
                    token_steps[r].append(step)
                    token_times_ms[r].append(clock_ms)
                finished = [running[i] for i in chosen if produced[running[i]] == args.replay_tokens]
                for r in finished:
                    grouper.forget(str(r))
                running = [r for r in running if r not in finished]
                step += 1
            gaps = [(s[-1] - s[0]) / (len(s) - 1) for s in token_steps.values() if len(s) > 1]
            tpot_ms = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times_ms.values() if len(t) > 1]
            rows.append({"capacity_pct": pct, "slots": capacity, "scheduling": scheduling, "steps": step,
                         "loads_per_token": loads / tokens, "distinct_experts_per_step": float(np.mean(distinct)),
                         "tpot_steps_p50": percentile(gaps, 0.5), "tpot_steps_p99": percentile(gaps, 0.99),
                         "tpot_ms_p50": percentile(tpot_ms, 0.5), "tpot_ms_p99": percentile(tpot_ms, 0.99)})
    return rows


def replay_table(args, rows: list[dict]) -> str:
    lines = [
        f"Core replay (no vLLM): {args.replay_layers} layers x {args.replay_experts} experts, top-{args.replay_top_k} "
        f"(Qwen3-30B-A3B's shape); {args.replay_requests} decode requests of {args.replay_tokens} tokens, "
        f"{args.replay_arrivals} arrivals per step, at most {args.replay_max_running} running; {args.replay_kinds} "
        f"request kinds arriving interleaved, each routing {args.replay_on_topic:.0%} of its picks within its own "
        f"{args.replay_kind_experts} experts per layer "
        f"(the rest uniform); LRU slot cache per layer with the live cache's pass planning; K={args.max_skip_steps}, "
        f"min_run_fraction {args.min_run_fraction:g}, max_overflow_ratio {args.max_overflow_ratio}. "
        f"TPOT in engine steps per token (a step counted as one unit whatever its size), and modeled: each step "
        f"{args.replay_compute_ms:g} ms of compute plus its expert copies ({args.replay_expert_mb:g} MB each, "
        f"Qwen3-30B-A3B's bf16 expert) at {args.replay_link_gbps:g} GB/s, one after the other (no overlap).",
        "",
        "| capacity | scheduling | distinct experts/step | loads/token | ratio to fcfs | TPOT steps p50/p99 "
        "| p99 ratio (steps) | modeled TPOT ms p50/p99 | p99 ratio (modeled) |",
        "|---|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for row in rows:
        fcfs = next(r for r in rows if r["capacity_pct"] == row["capacity_pct"] and r["scheduling"] == "fcfs")
        row["loads_ratio_to_fcfs"] = row["loads_per_token"] / fcfs["loads_per_token"]
        row["tpot_p99_ratio_to_fcfs"] = row["tpot_steps_p99"] / fcfs["tpot_steps_p99"]
        row["tpot_ms_p99_ratio_to_fcfs"] = row["tpot_ms_p99"] / fcfs["tpot_ms_p99"]
        lines.append(
            f"| {row['capacity_pct']}% ({row['slots']} slots) | {row['scheduling']} | "
            f"{row['distinct_experts_per_step']:.1f} | {row['loads_per_token']:.2f} | {row['loads_ratio_to_fcfs']:.3f} | "
            f"{row['tpot_steps_p50']:.2f}/{row['tpot_steps_p99']:.2f} | {row['tpot_p99_ratio_to_fcfs']:.2f} | "
            f"{row['tpot_ms_p50']:.0f}/{row['tpot_ms_p99']:.0f} | {row['tpot_ms_p99_ratio_to_fcfs']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed")
    parser.add_argument("--model", help="checkpoint directory or tiny model shape (default: per workload, "
                                        f"{DEFAULT_MODELS})")
    parser.add_argument("--topics", default="8,4",
                        help="topics workload: how many of the model's topics the prompts come from, one table each")
    parser.add_argument("--requests", type=int, help=f"default per workload: {WORKLOAD_DEFAULTS}")
    parser.add_argument("--max-tokens", type=int, help=f"default per workload: {WORKLOAD_DEFAULTS}")
    parser.add_argument("--max-tokens-spread", type=int,
                        help="each request generates max_tokens +- this many tokens (seeded); default per workload")
    parser.add_argument("--arrival-every", type=int,
                        help="engine steps between arrivals (0: all at once); default per workload")
    parser.add_argument("--max-num-seqs", type=int, help=f"default per workload: {WORKLOAD_DEFAULTS}")
    parser.add_argument("--max-skip-steps", type=int, default=2, help="expertflow fairness limit K")
    parser.add_argument("--min-run-fraction", type=float, default=0.5,
                        help="expertflow's throughput bound (min_run_fraction: share of running requests run each step)")
    parser.add_argument("--max-overflow-ratio", default="0.25",
                        help="expertflow's hold-back rule (max_overflow_ratio; 'none': off)")
    parser.add_argument("--capacities", help="percent of the experts per layer; default per workload")
    parser.add_argument("--replay-only", action="store_true", help="only the core replay on clustered routing")
    parser.add_argument("--replay-layers", type=int, default=48)
    parser.add_argument("--replay-experts", type=int, default=128)
    parser.add_argument("--replay-top-k", type=int, default=8)
    parser.add_argument("--replay-kinds", type=int, default=2, help="request kinds (e.g. image questions, text)")
    parser.add_argument("--replay-kind-experts", type=int, default=24, help="experts per layer a kind prefers")
    parser.add_argument("--replay-on-topic", type=float, default=0.95)
    parser.add_argument("--replay-requests", type=int, default=96)
    parser.add_argument("--replay-tokens", type=int, default=32)
    parser.add_argument("--replay-arrivals", type=int, default=2, help="new requests per step")
    parser.add_argument("--replay-max-running", type=int, default=32)
    parser.add_argument("--replay-compute-ms", type=float, default=10.0, help="modeled compute per step")
    parser.add_argument("--replay-expert-mb", type=float, default=9.437, help="bytes per expert (3 x 2048 x 768 bf16)")
    parser.add_argument("--replay-link-gbps", type=float, default=25.0, help="modeled host-to-device GB/s")
    parser.add_argument("--replay-policies", default="lru",
                        help=f"cache policies each live run's trace is replayed with, of {list(REPLAY_POLICIES)}")
    parser.add_argument("--no-core-replay", action="store_true", help="skip the core replay on clustered routing")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    parser.add_argument("--out", help="results path without extension (default: benchmarks/results/"
                        "token_scheduling, with _WORKLOAD appended for workloads other than mixed)")
    args = parser.parse_args()
    unknown = [p for p in args.replay_policies.split(",") if p not in REPLAY_POLICIES]
    if unknown:
        parser.error(f"--replay-policies {unknown} unknown; valid: {list(REPLAY_POLICIES)}")
    if args.model is None and not args.setting:
        args.model = DEFAULT_MODELS[args.workload]
    for key, value in WORKLOAD_DEFAULTS[args.workload].items():  # also for --setting: the parent passes them
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.setting:
        print("RESULT " + json.dumps(run_setting(args, json.loads(args.setting))))
        return 0

    default_out = REPO / "benchmarks" / "results" / "token_scheduling"
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    args.command = " ".join(["python", "benchmarks/token_scheduling.py", *sys.argv[1:]])
    args.commit = git_commit()
    if not args.replay_only:
        args.model = resolve_model(args.model)
        live_out = out if args.out or args.workload == "mixed" else out.with_name(f"{out.name}_{args.workload}")
        run_live(args, live_out)
    if args.no_core_replay or (args.workload != "mixed" and not args.replay_only):
        return 0  # the core replay belongs to the default run
    replay_rows = replay_clustered(args)
    replay = replay_table(args, replay_rows)
    print(replay)
    replay_out = out.with_name(out.name + "_replay")
    with_extension(replay_out, ".md").write_text(results_header() + "\n\n" + replay + "\n")
    with_extension(replay_out, ".json").write_text(
        json.dumps({"provenance": provenance(), "args": vars(args), "rows": replay_rows}, indent=1))
    return 0


def with_extension(out: Path, extension: str) -> Path:
    """``out`` plus an extension; not ``with_suffix``, which would cut ``_min_fraction_0.25`` at its dot."""
    return out.with_name(out.name + extension)


def _machine_load() -> str:
    load = machine_load()
    return f"load average {load['load_1m']:.2f} (1 min) / {load['load_5m']:.2f} (5 min) on {load['cpus']} CPUs"


def run_live(args, out: Path) -> None:
    """Every capacity x scheduling setting, once per topic count (topics workload); writes one results file."""
    topic_counts = [int(t) for t in str(args.topics).split(",")] if args.workload == "topics" else [None]
    load_before = _machine_load()
    started = time.perf_counter()
    sections, all_rows = [], []
    for topics in topic_counts:
        rows = run_settings(args, topics)
        section = live_header(args, topics) + "\n\n" + live_table(rows)
        if len(args.replay_policies.split(",")) > 1:
            section += "\n\n" + policy_table(rows, args.replay_policies.split(","))
        print(section)
        sections.append(section)
        all_rows += [{"topics": topics, **row} for row in rows]
    elapsed_s = time.perf_counter() - started
    sections.insert(0, f"{results_header()} Load before the run: {load_before}; {elapsed_s:.0f} s in all.")
    if args.workload in PROMPT_STYLES:
        sections.append(composition_table(all_rows))
    with_extension(out, ".md").write_text("\n\n".join(sections) + "\n")
    with_extension(out, ".json").write_text(json.dumps(
        {"provenance": {**provenance(), "load_before": load_before, "elapsed_s": elapsed_s}, "args": vars(args),
         "rows": all_rows}, indent=1))


def run_settings(args, topics: int | None) -> list[dict]:
    from tqdm import tqdm

    config = json.loads((Path(args.model) / "config.json").read_text())
    text = config.get("text_config", config)
    num_experts = text.get("num_experts") or text.get("num_local_experts")
    top_k = text["num_experts_per_tok"]
    rows = []
    settings = [(pct, scheduling) for pct in map(int, args.capacities.split(",")) for scheduling in ("fcfs", "expertflow")]
    for pct, scheduling in tqdm(settings, desc="settings" if topics is None else f"{topics} topics"):
        slots = max(top_k, num_experts * pct // 100)
        with tempfile.TemporaryDirectory() as trace_dir:
            offload = {"enabled": True, "cache_slots": slots, "scheduling": scheduling, "trace_dir": trace_dir,
                       "max_skip_steps": args.max_skip_steps, "max_overflow_ratio": args.max_overflow_ratio,
                       "min_run_fraction": args.min_run_fraction}
            cmd = [sys.executable, __file__, "--workload", args.workload, "--model", args.model,
                   "--topics", str(topics or 0), "--requests", str(args.requests),
                   "--max-tokens", str(args.max_tokens), "--max-tokens-spread", str(args.max_tokens_spread),
                   "--arrival-every", str(args.arrival_every),
                   "--max-num-seqs", str(args.max_num_seqs), "--setting", json.dumps(offload),
                   *replay_options(args)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"setting {pct}% {scheduling} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.split("RESULT ", 1)[1])
        rows.append({"capacity_pct": pct, "slots": slots, "scheduling": scheduling, **result})
    return rows


def live_table(rows: list[dict]) -> str:
    lines = ["| capacity | scheduling | distinct experts/step | loads/token | ratio to fcfs | tok/s | TTFT p50/p99 (s) "
             "| TPOT p50/p99 (ms) | p99 ratio | TPOT steps p99 | modeled TPOT p50/p99 (ms) | p99 ratio (modeled) "
             "| same output as fcfs | steps holding back | steps changed vs fcfs | grouping ms/step |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        fcfs = next(r for r in rows if r["capacity_pct"] == row["capacity_pct"] and r["scheduling"] == "fcfs")
        row["loads_ratio_to_fcfs"] = row["loads_per_token"] / fcfs["loads_per_token"] if fcfs["loads_per_token"] else 1
        row["tpot_p99_ratio_to_fcfs"] = row["tpot_p99"] / fcfs["tpot_p99"]
        row["tpot_modeled_p99_ratio_to_fcfs"] = row["tpot_modeled_ms_p99"] / fcfs["tpot_modeled_ms_p99"]
        # bf16: a request's tokens may differ where batch composition changes the numerics
        row["agreement_with_fcfs"] = sum(row["tokens"][r] == fcfs["tokens"].get(r) for r in row["tokens"]) / len(
            row["tokens"])
        holding = f"{row['steps_holding_back']}/{row['grouped_steps']}" if row["grouped_steps"] else "-"
        lines.append(
            f"| {row['capacity_pct']}% ({row['slots']} slots) | {row['scheduling']} | "
            f"{row['distinct_experts_per_step']:.2f} | {row['loads_per_token']:.3f} | {row['loads_ratio_to_fcfs']:.3f} | "
            f"{row['tok_s']:.1f} | {row['ttft_p50']:.2f}/{row['ttft_p99']:.2f} | "
            f"{1e3 * row['tpot_p50']:.1f}/{1e3 * row['tpot_p99']:.1f} | {row['tpot_p99_ratio_to_fcfs']:.2f} | "
            f"{row['tpot_steps_p99']:.2f} | {row['tpot_modeled_ms_p50']:.1f}/{row['tpot_modeled_ms_p99']:.1f} | "
            f"{row['tpot_modeled_p99_ratio_to_fcfs']:.2f} | {row['agreement_with_fcfs']:.0%} | {holding} | "
            f"{row['changed_steps']}/{row['steps']} ({row['changed_fraction']:.0%}) | "
            f"{'-' if row['grouping_ms_median'] is None else format(row['grouping_ms_median'], '.2f')} |")
    return "\n".join(lines)


def overflow_ratio(text: str) -> float | None:
    return None if str(text).lower() == "none" else float(text)


def replay_options(args) -> list[str]:
    """The parent's --replay-* options, for a child that models TPOT with them."""
    return [item for name, value in vars(args).items() if name.startswith("replay_") and name != "replay_only"
            for item in (f"--{name.replace('_', '-')}", str(value))]


def policy_table(rows: list[dict], policies: list[str]) -> str:
    """Each run's trace replayed with each cache policy: loads and modeled TPOT side by side."""
    lines = ["Cache policies on each run's routing trace (the live cache is LRU; a policy changes the loads, not "
             "the steps): `lfru` is this plugin's (score halves every 256 accesses), `lfru-37190` vLLM PR #37190's "
             "as its documentation describes it (freq / age, frequency forgotten on eviction).",
             "",
             "| capacity | scheduling | cache policy | loads/token | ratio to fcfs + lru | modeled TPOT p50/p99 (ms) "
             "| p99 ratio to fcfs + lru | TPOT steps p99 |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for row in rows:
        base = next(r for r in rows if r["capacity_pct"] == row["capacity_pct"] and r["scheduling"] == "fcfs")
        base = base["by_policy"]["lru"] if "lru" in base["by_policy"] else next(iter(base["by_policy"].values()))
        for policy in policies:
            result = row["by_policy"][policy]
            loads_ratio = result["loads_per_token"] / base["loads_per_token"] if base["loads_per_token"] else 1.0
            lines.append(
                f"| {row['capacity_pct']}% ({row['slots']} slots) | {row['scheduling']} | {policy} | "
                f"{result['loads_per_token']:.3f} | {loads_ratio:.3f} | "
                f"{result['tpot_modeled_ms_p50']:.1f}/{result['tpot_modeled_ms_p99']:.1f} | "
                f"{result['tpot_modeled_ms_p99'] / base['tpot_modeled_ms_p99']:.2f} | {result['tpot_steps_p99']:.2f} |")
    return "\n".join(lines)


def composition_table(rows: list[dict]) -> str:
    """Why grouping can or cannot pay: step and prefill unions against the slots, and how well new requests
    were predicted before their first step."""
    lines = ["Step composition (`vllm_expertflow.get_step_records`; a prefill's own union from the routing trace: "
             "its request's first step). Prediction: each new request's experts as the scheduler predicted them "
             "before its first step (routers on its text tokens' embeddings, plus its image's experts if an "
             "earlier request had the same picture), against what that step used, pooled over layers.",
             "",
             "| capacity | scheduling | steps | with a prefill | changed vs fcfs | left as fcfs (prefill overflows) "
             "| tokens/step | distinct experts/layer/step | steps over the slots | loads in steps with a prefill "
             "| a prefill's own union/layer | prefills over the slots | prediction precision / recall (requests) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        prediction = "-" if row.get("prediction_precision") is None else (
            f"{row['prediction_precision']:.2f} / {row['prediction_recall']:.2f} ({row['predicted_requests']})")
        lines.append(
            f"| {row['capacity_pct']}% ({row['slots']} slots) | {row['scheduling']} | {row['steps']} | "
            f"{row['steps_with_prefill']} | {row['changed_steps']} ({row['changed_fraction']:.0%}) | "
            f"{row['fcfs_fallback_steps']} | {row['tokens_per_step']:.1f} | {row['distinct_experts_per_step']:.1f} | "
            f"{row['steps_over_slots']} | {row['prefill_step_loads_share']:.0%} | {row['prefill_union_mean']:.1f} | "
            f"{row['prefills_over_slots']}/"
            f"{row['prefills']} | {prediction} |")
    return "\n".join(lines)


def live_header(args, topics: int | None) -> str:
    arrivals = f"one arrival every {args.arrival_every} step(s)" if args.arrival_every else "all arriving at once"
    spread = f" +- {args.max_tokens_spread}" if args.max_tokens_spread else ""
    header = (f"model `{Path(args.model).name}`, {args.requests} requests x {args.max_tokens}{spread} tokens, "
              f"{arrivals}, "
              f"max {args.max_num_seqs} running, K={args.max_skip_steps}, min_run_fraction {args.min_run_fraction:g}, "
              f"max_overflow_ratio {args.max_overflow_ratio}; "
              f"on CPU, where expert copies cost almost nothing and wall-clock TPOT follows the machine's load. "
              f"TPOT steps: engine steps per generated token. Modeled TPOT, from the routing trace: each step "
              f"{args.replay_compute_ms:g} ms x layers/{args.replay_layers} of compute plus its expert loads at "
              f"{args.replay_expert_mb:g} MB (a Qwen3-30B-A3B bf16 expert) / {args.replay_link_gbps:g} GB/s each, "
              f"no overlap.")
    if args.workload in PROMPT_STYLES:
        model = (f"`{STUDY_SHAPE_RANDOM}` is the study model's shape with random weights "
                 f"(`build_study_shape_random`: Qwen3-VL-MoE, text hidden 192, 6 layers all MoE, 128 experts top-8, "
                 f"moe_intermediate 32; the toy VLM's vision tower and tokenizer), not the trained model. "
                 if Path(args.model).name == STUDY_SHAPE_RANDOM else "")
        return (f"### {args.workload} regime\n\n{header} easy-vqa test questions as the study samples them "
                f"(seeded, split order) in the study's {args.workload} prompt (`eval/prompts.py`), every request "
                f"submitted at once, generating with ignore_eos. {model}")
    if topics is None:
        return header
    return (f"### {topics} topics\n\nSynthetic topic workload: {header} Prompts of {topics} topics (about 90% "
            f"words of their topic) on `qwen3_moe_topics`, a tiny random model whose router is planted so that "
            f"each of its 8 topics routes mostly to its own 8 of the 64 experts per layer (top-4); not trained, "
            f"so it shows when grouping can pay, not how often real models cluster this way.")


if __name__ == "__main__":
    sys.exit(main())
