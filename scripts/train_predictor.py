"""Train the learned routing-path predictor on recorded routing traces and compare it with the baselines.

    python scripts/train_predictor.py --trace TRACE_DIR [--trace MORE ...] [--held-out-fraction 0.2] --out rpp.pt

Each trace's requests are split at random: ``--held-out-fraction`` of them (whole requests)
are held out, the rest train the ``RoutingPathPredictor`` (and fit the baselines' frequency
and repeat-rate statistics). It then prints, per MoE layer, the precision and recall of
the step-level expert sets each predictor forecasts for the held-out requests (frequency
top-k, previous-step history, learned), and the token-level recall. The saved file is
what ``python -m vllm_expertflow.simulate --policy expertflow --predictor FILE`` reads.

Runs without vLLM (torch and numpy only).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.core.predictor_eval import evaluate_predictor, split_requests  # noqa: E402
from vllm_expertflow.core.predictors import (  # noqa: E402
    FrequencyPredictor,
    HistoryPredictor,
    RoutingPathPredictor,
    StepPredictor,
)
from vllm_expertflow.core.trace import RoutingTrace, read_trace  # noqa: E402

Metrics = Mapping[str, Mapping[str, float]]  # layer name -> {precision, recall, token_recall, steps}


def format_table(scores: Mapping[str, Metrics]) -> str:
    """One row per layer (and their mean): each predictor's step-set precision / recall, then token recall."""
    names = list(scores)
    layers = list(next(iter(scores.values())))
    header = f"{'layer':<28}" + "".join(f"{name + ' P/R':>18}" for name in names)
    header += "".join(f"{name + ' tok':>14}" for name in names)
    lines = [header, "-" * len(header)]

    def row(label: str, pick) -> str:
        cells = "".join(f"{pick(n, 'precision'):>9.3f}{pick(n, 'recall'):>9.3f}" for n in names)
        return f"{label:<28}" + cells + "".join(f"{pick(n, 'token_recall'):>14.3f}" for n in names)

    for layer in layers:
        lines.append(row(layer[-28:], lambda n, key, layer=layer: scores[n][layer][key]))
    lines.append(row("mean", lambda n, key: sum(scores[n][layer][key] for layer in layers) / len(layers)))
    return "\n".join(lines)


def compare(predictors: Sequence[StepPredictor], held_out: RoutingTrace) -> dict[str, Metrics]:
    return {p.name: evaluate_predictor(p, held_out) for p in predictors}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", action="append", required=True, help="trace directory or .npz (repeatable)")
    parser.add_argument("--held-out-fraction", type=float, default=0.2, help="share of requests held out; default 0.2")
    parser.add_argument("--out", required=True, help="write the trained predictor here (torch file)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128, help="MLP width")
    parser.add_argument("--seed", type=int, default=0, help="request split and initialisation")
    args = parser.parse_args(argv)
    try:
        traces = [read_trace(path) for path in args.trace]
        splits = [split_requests(trace, args.held_out_fraction, seed=args.seed) for trace in traces]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = traces[0]
    shape = (first.num_layers, first.num_experts, first.top_k)
    predictors: list[StepPredictor] = [FrequencyPredictor(*shape), HistoryPredictor(*shape)]
    learned = RoutingPathPredictor(*shape, hidden=args.hidden, seed=args.seed)
    train = [part for part, _ in splits]
    try:
        for predictor in predictors:
            predictor.fit(train)
        start = time.perf_counter()
        losses = learned.fit(train, epochs=args.epochs, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = sum(part.num_tokens for part in train)
    print(
        f"trained on {tokens} tokens of {sum(len(set(p.request_id)) for p in train)} requests in "
        f"{time.perf_counter() - start:.1f}s; BCE {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    learned.save(args.out)
    print(f"saved {args.out}")
    for path, (_, held_out) in zip(args.trace, splits, strict=True):
        requests = len(set(held_out.request_id))
        print(f"\nheld out: {requests} requests, {held_out.num_tokens} tokens, {held_out.num_steps} steps of {path}")
        print(format_table(compare([*predictors, learned], held_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
