"""CPU cost of ExpertAwareGrouper.select per engine step, and what it buys over FCFS.

    python benchmarks/grouping_cost.py [--layers 48 --experts 128 --top-k 8 --calls 300]

No vLLM, no GPU. A synthetic decode workload: every request belongs to one of ``topics``
topics, each topic prefers 16 experts per layer, and each step a request's token routes
``--top-k`` experts per layer, from its topic's experts with probability ``on_topic``, else
uniformly. Two scenarios: noisy topics (8 topics, on_topic 0.85, 32 slots: at 128 and 256
requests any half of them covers nearly every expert, so a search finds nothing worth
holding back for and the grouper backs off) and clean topics (4 topics, on_topic 0.98, 64
slots: the search pays, so every step searches and extends the group to fill the slots). Signatures are rebuilt every step (as the adapter would from the step's
``topk_ids``, outside the timed call). For 32 / 128 / 256 running requests it prints the
wall time of one ``select`` call over all steps (median, p90, fastest: the fastest is the
cost itself when other processes on a shared machine did not get in the way) and over the
steps that searched for a group (``last_searched``; the others back off and let everyone
run, so they cost less), with the distinct experts per layer of the chosen requests against
FCFS choosing as many (the oldest ones), and their ratio. The cost target: under 1 ms at 256
requests, a searching step included. Then the same for ``hamming_two_way_split`` on 2T
tokens (ExpertFlow's token scheduler; its paper: < 10 ms). Writes the tables and the raw
numbers to benchmarks/results/grouping_cost.{md,json}, with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.core.grouping import (  # noqa: E402
    ExpertAwareGrouper,
    ExpertSignature,
    GroupingConfig,
    RequestView,
)
from vllm_expertflow.core.two_way_split import hamming_two_way_split  # noqa: E402
from vllm_expertflow.provenance import provenance, results_header  # noqa: E402

TOPIC_EXPERTS = 16  # experts per layer a topic prefers


def make_topics(rng: np.random.Generator, topics: int, layers: int, experts: int) -> np.ndarray:
    """``[topics, layers, TOPIC_EXPERTS]`` expert ids each topic prefers."""
    return np.argsort(rng.random((topics, layers, experts)), axis=-1)[..., :TOPIC_EXPERTS]


def route(
    rng: np.random.Generator, topics: np.ndarray, topic_of: np.ndarray, top_k: int, experts: int, on_topic_p: float
) -> np.ndarray:
    """One decode token per request: ``topk_ids [requests, layers, top_k]``, distinct per layer."""
    n, layers = len(topic_of), topics.shape[1]
    preferred = topics[topic_of]  # [n, layers, TOPIC_EXPERTS]
    on_topic = np.take_along_axis(preferred, np.argsort(rng.random(preferred.shape), axis=-1), axis=-1)
    uniform = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :TOPIC_EXPERTS]
    pick = np.where(rng.random(on_topic.shape) < on_topic_p, on_topic, uniform)[..., :top_k]
    # Duplicates (a uniform pick equal to an on-topic one) only shrink the union a little: fine here.
    return pick


def union_per_layer(signatures: list[ExpertSignature]) -> float:
    words = np.bitwise_or.reduce(np.stack([s.words for s in signatures]), axis=0)
    return float(ExpertSignature(words, signatures[0].num_experts).layer_counts().mean())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


def run(args: argparse.Namespace, requests: int) -> dict[str, float]:
    rng = np.random.default_rng(requests)
    topics = make_topics(rng, args.topics, args.layers, args.experts)
    topic_of = rng.integers(0, args.topics, requests)
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=args.capacity, max_skip_steps=2, min_fraction=0.5))
    times, searching, chosen, grouped, fcfs = [], [], [], [], []
    for step in range(args.warmup + args.calls):
        topk_ids = route(rng, topics, topic_of, args.top_k, args.experts, args.on_topic)
        signatures = ExpertSignature.from_batch_topk_ids(topk_ids, [1] * requests, args.experts)
        running = [RequestView(f"req-{i}", 0, float(i), signatures[i], 1) for i in range(requests)]
        start = time.perf_counter()
        # The cache-aware call, as the adapter makes it; the last union stands in for the slots.
        selected = grouper.select(running, step, resident=grouper.last_union)
        elapsed = time.perf_counter() - start
        if step < args.warmup:
            continue
        index = {view.request_id: i for i, view in enumerate(running)}
        times.append(elapsed)
        if grouper.last_searched:
            searching.append(elapsed)
        chosen.append(len(selected))
        grouped.append(union_per_layer([signatures[index[r]] for r in selected]))
        fcfs.append(union_per_layer(signatures[: len(selected)]))
    return {
        "requests": requests,
        "chosen": statistics.mean(chosen),
        "median_us": statistics.median(times) * 1e6,
        "p90_us": percentile(times, 0.9) * 1e6,
        # Fastest call: the cost itself, when no other process on a shared machine got in the way.
        "min_us": min(times) * 1e6,
        "searching_steps": len(searching),
        "search_median_us": statistics.median(searching) * 1e6 if searching else float("nan"),
        "search_p90_us": percentile(searching, 0.9) * 1e6,
        "search_mean_us": statistics.mean(searching) * 1e6 if searching else float("nan"),
        "search_min_us": min(searching, default=float("nan")) * 1e6,
        "grouped": statistics.mean(grouped),
        "fcfs": statistics.mean(fcfs),
    }


def split_cost(args: argparse.Namespace, tokens: int) -> tuple[float, float]:
    """Median ms of ExpertFlow's two-way split of ``tokens`` tokens, and its expert ratio vs halves by index."""
    rng = np.random.default_rng(tokens)
    topics = make_topics(rng, args.topics, args.layers, args.experts)
    topk_ids = route(rng, topics, rng.integers(0, args.topics, tokens), args.top_k, args.experts, args.on_topic)
    signatures = ExpertSignature.from_batch_topk_ids(topk_ids, [1] * tokens, args.experts)
    times = []
    for _ in range(max(5, args.calls // 20)):
        start = time.perf_counter()
        first, second = hamming_two_way_split(signatures)
        times.append(time.perf_counter() - start)
    split = sum(union_per_layer([signatures[i] for i in group]) for group in (first, second))
    halves = union_per_layer(signatures[: tokens // 2]) + union_per_layer(signatures[tokens // 2 :])
    return statistics.median(times) * 1e3, split / halves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)  # Qwen3-30B-A3B
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grouping_cost"))
    args = parser.parse_args()

    scenarios = [
        ("noisy topics, the search rarely pays", {"topics": 8, "on_topic": 0.85, "capacity": 32}),
        ("clean topics, the search pays", {"topics": 4, "on_topic": 0.98, "capacity": 64}),
    ]
    load_before = os.getloadavg()[0]
    results = []
    for name, overrides in scenarios:
        scenario = argparse.Namespace(**{**vars(args), **overrides})
        rows = []
        for requests in (32, 128, 256):
            rows.append(run(scenario, requests))
            print(f"{name}: {requests} requests done", file=sys.stderr)
        results.append((name, overrides, rows))
    splits = [(tokens, *split_cost(argparse.Namespace(**{**vars(args), **scenarios[0][1]}), tokens)) for tokens in (128, 512)]
    load_after = os.getloadavg()[0]

    header = results_header() + "\n\n" + (
        f"`select`: {args.layers} layers x {args.experts} experts, top-{args.top_k}, K=2, min_fraction 0.5, "
        f"{args.calls} calls after {args.warmup} warmup; wall time of one call, the cache-aware one the adapter "
        f"makes. Searching steps: the calls that searched for a group (the others back off after a search that "
        f"did not pay and let everyone run). Machine: {os.cpu_count()} CPUs, 1-minute load average "
        f"{load_before:.2f} before, {load_after:.2f} after (shared: the other processes' share shows in the "
        f"medians and p90s, the fastest call is the cost itself)."
    )
    tables = []
    for name, overrides, rows in results:
        tables += [
            f"{name} ({overrides['topics']} topics, on-topic {overrides['on_topic']}, "
            f"capacity {overrides['capacity']}):",
            "",
            "| requests | chosen | all steps median us | p90 us | min us | searching steps | search median us "
            "| search p90 us | search min us | experts/layer | FCFS | ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            tables.append(
                f"| {row['requests']} | {row['chosen']:.1f} | {row['median_us']:.0f} | {row['p90_us']:.0f} "
                f"| {row['min_us']:.0f} | {row['searching_steps']} | {row['search_median_us']:.0f} "
                f"| {row['search_p90_us']:.0f} | {row['search_min_us']:.0f} | {row['grouped']:.1f} "
                f"| {row['fcfs']:.1f} | {row['grouped'] / row['fcfs']:.2f} |"
            )
        tables.append("")
    split_table = [
        "`hamming_two_way_split` (ExpertFlow token scheduler, 2T tokens, noisy topics):",
        "",
        "| tokens | median ms | experts vs index halves |",
        "|---:|---:|---:|",
        *(f"| {tokens} | {ms:.2f} | {ratio:.2f} |" for tokens, ms, ratio in splits),
    ]
    text = "\n".join([header, "", *tables, *split_table]) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    record = {
        "provenance": provenance(),
        "args": vars(args),
        "cpus": os.cpu_count(),
        "load_average": [load_before, load_after],
        "select": {name: {"scenario": overrides, "rows": rows} for name, overrides, rows in results},
        "split": [
            {"tokens": tokens, "median_ms": ms, "experts_vs_index_halves": ratio} for tokens, ms, ratio in splits
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
