"""FCFS vs expert-aware step composition at 25%, 50% and 100% cache capacity, in one run.

    python benchmarks/token_scheduling.py [--model DIR] [--requests 48] [--max-tokens 24]

Workload: mixed requests arriving over time (one every --arrival-every engine steps):
image questions of different kinds when the model is a vision-language model, and text
prompts. Each setting runs in a fresh process with the in-process engine; the routing
trace recorded during the run gives the distinct experts per step. Prints a markdown table
and writes it with the raw numbers to benchmarks/results/token_scheduling.{md,json}.
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def build_workload(model: str, count: int, is_vlm: bool) -> list:
    from vllm_expertflow.tiny_models import sample_image_requests, sample_prompts

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
    workload = build_workload(args.model, args.requests, is_vlm)
    llm = LLM(**engine_kwargs(args.model, offload, multimodal=is_vlm), max_num_seqs=args.max_num_seqs)
    engine = llm.llm_engine
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
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
            engine.add_request(f"r{i}", prompt, sampling)
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
    trace = read_trace(offload["trace_dir"])
    distinct = [
        statistics.mean(len(set(step_ids[:, layer, :].ravel().tolist())) for layer in range(trace.num_layers))
        for step_ids in trace.iter_steps()
    ]
    ttft = [token_times[r][0] - added_at[r] for r in token_times]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in token_times.values() if len(t) > 1]
    generated = sum(len(t) for t in token_times.values())
    return {
        "generated_tokens": generated,
        "tok_s": generated / wall,
        "loads_per_token": stats["loads"] / generated,
        "hit_rate": stats["hit_rate"],
        "distinct_experts_per_step": statistics.mean(distinct),
        "steps": len(distinct),
        "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
        "tpot_p50": percentile(tpot, 0.5), "tpot_p99": percentile(tpot, 0.99),
        "grouping_ms_median": _grouping_ms(llm),
        "tokens": token_ids,
    }


def _grouping_ms(llm) -> float | None:
    from vllm_expertflow.vllm_adapter.vllm_api import inprocess_scheduler

    seconds = sorted(getattr(inprocess_scheduler(llm), "grouping_seconds", []))
    return 1e3 * seconds[len(seconds) // 2] if seconds else None


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
            grouper = ExpertAwareGrouper(GroupingConfig(capacity=capacity, max_skip_steps=2))
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
        f"(the rest uniform); LRU slot cache per layer with the live cache's pass planning; K=2, min_fraction 0.5. "
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
    default_model = REPO / "models" / "toy-qwen3-vl-moe"
    parser.add_argument("--model", default=str(default_model if default_model.exists() else
                                             REPO / "models" / "tiny-qwen3-moe"))
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--arrival-every", type=int, default=1, help="engine steps between arrivals")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--capacities", default="25,50,100", help="percent of the experts per layer")
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
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "token_scheduling"))
    args = parser.parse_args()
    if args.setting:
        print("RESULT " + json.dumps(run_setting(args, json.loads(args.setting))))
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.replay_only:
        run_live(args, out)
    replay_rows = replay_clustered(args)
    replay = replay_table(args, replay_rows)
    print(replay)
    replay_out = out.with_name(out.name + "_replay")
    replay_out.with_suffix(".md").write_text(replay + "\n")
    replay_out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": replay_rows}, indent=1))
    return 0


def run_live(args, out: Path) -> None:
    from tqdm import tqdm

    config = json.loads((Path(args.model) / "config.json").read_text())
    text = config.get("text_config", config)
    num_experts = text.get("num_experts") or text.get("num_local_experts")
    top_k = text["num_experts_per_tok"]
    rows = []
    settings = [(pct, scheduling) for pct in map(int, args.capacities.split(",")) for scheduling in ("fcfs", "expertflow")]
    for pct, scheduling in tqdm(settings, desc="settings"):
        slots = max(top_k, num_experts * pct // 100)
        with tempfile.TemporaryDirectory() as trace_dir:
            offload = {"enabled": True, "cache_slots": slots, "scheduling": scheduling, "trace_dir": trace_dir}
            cmd = [sys.executable, __file__, "--model", args.model, "--requests", str(args.requests),
                   "--max-tokens", str(args.max_tokens), "--arrival-every", str(args.arrival_every),
                   "--max-num-seqs", str(args.max_num_seqs), "--setting", json.dumps(offload)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"setting {pct}% {scheduling} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.split("RESULT ", 1)[1])
        rows.append({"capacity_pct": pct, "slots": slots, "scheduling": scheduling, **result})

    lines = ["| capacity | scheduling | distinct experts/step | loads/token | ratio to fcfs | tok/s | TTFT p50/p99 (s) "
             "| TPOT p50/p99 (ms) | p99 TPOT ratio | same output as fcfs | grouping ms/step |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in rows:
        fcfs = next(r for r in rows if r["capacity_pct"] == row["capacity_pct"] and r["scheduling"] == "fcfs")
        row["loads_ratio_to_fcfs"] = row["loads_per_token"] / fcfs["loads_per_token"] if fcfs["loads_per_token"] else 1
        row["tpot_p99_ratio_to_fcfs"] = row["tpot_p99"] / fcfs["tpot_p99"]
        # bf16: a request's tokens may differ where batch composition changes the numerics
        row["agreement_with_fcfs"] = sum(row["tokens"][r] == fcfs["tokens"].get(r) for r in row["tokens"]) / len(
            row["tokens"])
        lines.append(
            f"| {row['capacity_pct']}% ({row['slots']} slots) | {row['scheduling']} | "
            f"{row['distinct_experts_per_step']:.2f} | {row['loads_per_token']:.3f} | {row['loads_ratio_to_fcfs']:.3f} | "
            f"{row['tok_s']:.1f} | {row['ttft_p50']:.2f}/{row['ttft_p99']:.2f} | "
            f"{1e3 * row['tpot_p50']:.1f}/{1e3 * row['tpot_p99']:.1f} | {row['tpot_p99_ratio_to_fcfs']:.2f} | "
            f"{row['agreement_with_fcfs']:.0%} | "
            f"{'-' if row['grouping_ms_median'] is None else format(row['grouping_ms_median'], '.2f')} |")
    table = "\n".join(lines)
    header = (f"model `{Path(args.model).name}`, {args.requests} requests x {args.max_tokens} tokens, one arrival "
              f"every {args.arrival_every} step(s), max {args.max_num_seqs} running; CPU (2 cores)")
    print(header)
    print(table)
    out.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
