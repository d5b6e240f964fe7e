"""Replay a routing trace through a cache policy and report loads, hit rate and projected stall.

    python -m vllm_expertflow.simulate --trace TRACE_DIR --policy lru --capacity 16 --json
    python -m vllm_expertflow.simulate --trace TRACE_DIR --policy expertflow --predictor history \
        --capacity 16 --budget-mode global

Runs without vLLM: it only needs the core (torch, numpy) and a trace written by
``vllm_expertflow.core.trace.TraceWriter`` (format: docs/trace-format.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vllm_expertflow.core.simulate import BUDGET_MODES, DEFAULT_LINK_GBPS, GLOBAL_POLICIES, SIM_POLICIES, simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_expertflow.simulate",
        description="Replay a routing trace through an expert cache policy.",
    )
    parser.add_argument("--trace", required=True, help="trace directory of routing-NNNNNN.npz chunks, or one .npz file")
    parser.add_argument("--policy", required=True, help=f"cache policy, one of {list(SIM_POLICIES)}")
    parser.add_argument("--capacity", required=True, type=int, help="expert slots per MoE layer (top_k..num_experts)")
    parser.add_argument(
        "--budget-mode",
        default="per-layer",
        help=f"{' or '.join(BUDGET_MODES)}: slots owned by each layer, or one pool of capacity * layers "
        f"({', '.join(GLOBAL_POLICIES)})",
    )
    parser.add_argument(
        "--predictor",
        default=None,
        help="expertflow: routing predictor, 'history' (default), 'frequency', or a file written by "
        "scripts/train_predictor.py",
    )
    parser.add_argument(
        "--prefetch-threshold",
        type=float,
        default=None,
        help="expertflow: predicted probability that a step needs an expert at which it is prefetched",
    )
    parser.add_argument("--no-prefetch", action="store_true", help="expertflow: demand loading only")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=DEFAULT_LINK_GBPS,
        help=f"host-to-device bandwidth in GB/s (1e9 bytes/s) for the projected stall; default {DEFAULT_LINK_GBPS}",
    )
    parser.add_argument(
        "--bytes-per-expert",
        type=int,
        default=None,
        help="bytes of one expert's weights; default: the trace's metadata",
    )
    parser.add_argument(
        "--half-life", type=float, default=None, help="lfru: accesses after which a count halves; expertflow: passes"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="static: leading steps that rank the experts; default all"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policy_kwargs: dict[str, object] = {} if args.half_life is None else {"half_life": args.half_life}
    if args.prefetch_threshold is not None:
        policy_kwargs["prefetch_threshold"] = args.prefetch_threshold
    if args.no_prefetch:
        policy_kwargs["prefetch"] = False
    try:
        result = simulate(
            args.trace,
            args.policy,
            args.capacity,
            budget_mode=args.budget_mode,
            bytes_per_expert=args.bytes_per_expert,
            link_gbps=args.link_gbps,
            policy_kwargs=policy_kwargs,
            warmup_steps=args.warmup_steps,
            predictor=args.predictor,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = result.as_dict()
    if args.json:
        print(json.dumps(report))
        return 0
    for key, value in report.items():
        if key != "per_layer":
            print(f"{key:>18}: {value}")
    print(f"{'layer':>18}  {'loads':>8}  {'misses':>8}  {'prefetch':>8}  {'hit_rate':>8}  {'passes':>8}")
    for row in report["per_layer"]:
        print(
            f"{row['layer']:>18}  {row['loads']:>8}  {row['misses']:>8}  {row.get('prefetch_loads', 0):>8}  "
            f"{row['hit_rate']:>8.4f}  {row['passes']:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
