"""CPU cost of ExpertAwareGrouper.select per engine step, and what it buys over FCFS.

    python benchmarks/grouping_cost.py [--layers 48 --experts 128 --top-k 8 --capacity 32 --calls 300]

numpy only (no vLLM, no GPU). A synthetic decode workload: every request belongs to one of
``--topics`` topics, each topic prefers 16 experts per layer, and each step a request's token
routes ``--top-k`` experts per layer, from its topic's experts with probability 0.85, else
uniformly. Signatures are rebuilt every step (as the adapter would from the step's
``topk_ids``, outside the timed call). For 32 / 128 / 256 running requests it prints the
median, p90 and fastest wall time of one ``select`` call (the fastest is the cost itself
when other processes on a shared machine did not get in the way), and the distinct experts
per layer of the chosen requests against FCFS choosing as many (the oldest ones), with
their ratio. The cost target is a median under 1 ms at 256 requests. Then the same for
``hamming_two_way_split`` on 2T tokens (ExpertFlow's token scheduler; its paper: < 10 ms).
"""

from __future__ import annotations

import argparse
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
    hamming_two_way_split,
)

TOPIC_EXPERTS = 16  # experts per layer a topic prefers
ON_TOPIC = 0.85  # probability a routed expert comes from the topic's set


def make_topics(rng: np.random.Generator, topics: int, layers: int, experts: int) -> np.ndarray:
    """``[topics, layers, TOPIC_EXPERTS]`` expert ids each topic prefers."""
    return np.argsort(rng.random((topics, layers, experts)), axis=-1)[..., :TOPIC_EXPERTS]


def route(rng: np.random.Generator, topics: np.ndarray, topic_of: np.ndarray, top_k: int, experts: int) -> np.ndarray:
    """One decode token per request: ``topk_ids [requests, layers, top_k]``, distinct per layer."""
    n, layers = len(topic_of), topics.shape[1]
    preferred = topics[topic_of]  # [n, layers, TOPIC_EXPERTS]
    on_topic = np.take_along_axis(preferred, np.argsort(rng.random(preferred.shape), axis=-1), axis=-1)
    uniform = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :TOPIC_EXPERTS]
    pick = np.where(rng.random(on_topic.shape) < ON_TOPIC, on_topic, uniform)[..., :top_k]
    # Duplicates (a uniform pick equal to an on-topic one) only shrink the union a little: fine here.
    return pick


def union_per_layer(signatures: list[ExpertSignature]) -> float:
    words = np.bitwise_or.reduce(np.stack([s.words for s in signatures]), axis=0)
    return float(ExpertSignature(words, signatures[0].num_experts).layer_counts().mean())


def run(args: argparse.Namespace, requests: int) -> dict[str, float]:
    rng = np.random.default_rng(requests)
    topics = make_topics(rng, args.topics, args.layers, args.experts)
    topic_of = rng.integers(0, args.topics, requests)
    grouper = ExpertAwareGrouper(GroupingConfig(capacity=args.capacity, max_skip_steps=2, min_fraction=0.5))
    times, chosen, grouped, fcfs = [], [], [], []
    for step in range(args.warmup + args.calls):
        topk_ids = route(rng, topics, topic_of, args.top_k, args.experts)
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
        chosen.append(len(selected))
        grouped.append(union_per_layer([signatures[index[r]] for r in selected]))
        fcfs.append(union_per_layer(signatures[: len(selected)]))
    times.sort()
    return {
        "requests": requests,
        "chosen": statistics.mean(chosen),
        "median_us": statistics.median(times) * 1e6,
        "p90_us": times[int(0.9 * (len(times) - 1))] * 1e6,
        # Fastest call: the cost itself, when no other process on a shared machine got in the way.
        "min_us": times[0] * 1e6,
        "grouped": statistics.mean(grouped),
        "fcfs": statistics.mean(fcfs),
    }


def split_cost(args: argparse.Namespace, tokens: int) -> tuple[float, float]:
    """Median time of ExpertFlow's two-way split of ``tokens`` tokens, and its expert ratio vs halves by index."""
    rng = np.random.default_rng(tokens)
    topics = make_topics(rng, args.topics, args.layers, args.experts)
    topk_ids = route(rng, topics, rng.integers(0, args.topics, tokens), args.top_k, args.experts)
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
    parser.add_argument("--topics", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    print(
        f"select: {args.layers} layers x {args.experts} experts, top-{args.top_k}, {args.topics} topics, "
        f"capacity {args.capacity}, K=2, min_fraction 0.5, {args.calls} calls"
    )
    header = ("requests", "chosen", "median us", "p90 us", "min us", "experts/layer", "FCFS", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (8, 7, 10, 8, 7, 14, 6, 6), strict=True)))
    for requests in (32, 128, 256):
        row = run(args, requests)
        print(
            f"{row['requests']:>8} {row['chosen']:>7.1f} {row['median_us']:>10.0f} {row['p90_us']:>8.0f} "
            f"{row['min_us']:>7.0f} "
            f"{row['grouped']:>14.1f} {row['fcfs']:>6.1f} {row['grouped'] / row['fcfs']:>6.2f}"
        )
    print("\nhamming_two_way_split (ExpertFlow token scheduler, 2T tokens):")
    print(f"{'tokens':>8} {'median ms':>10} {'experts vs index halves':>24}")
    for tokens in (128, 512):
        ms, ratio = split_cost(args, tokens)
        print(f"{tokens:>8} {ms:>10.2f} {ratio:>24.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
