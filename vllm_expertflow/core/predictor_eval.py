"""How well a step-level routing predictor predicts, and the request splits that keep the score honest.

Used by ``scripts/train_predictor.py`` and the benchmarks, never by the live cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vllm_expertflow.core.predictors import StepPredictor, multi_hot
from vllm_expertflow.core.trace import RoutingTrace


def evaluate_predictor(predictor: StepPredictor, trace: RoutingTrace) -> dict[str, dict[str, float]]:
    """Replay ``trace`` and score ``predictor``'s expert sets, per layer.

    The predictor's request state is reset first, then it predicts each step before
    observing it. Per layer (keyed by layer name):

    - ``precision`` / ``recall``: of the step's predicted expert set (the union of its
      tokens' predicted top_k) against the set the step needed, summed over steps: the
      set a cache would prefetch against the set it had to hold.
    - ``token_recall``: the share of a token's true top_k experts among its predicted top_k
      (equal to the token-level precision, both sets having top_k experts).
    - ``steps``: steps scored.
    """
    predictor.check_trace(trace)
    predictor.reset()
    layers = trace.num_layers
    hit_sets = np.zeros(layers)
    predicted_sets = np.zeros(layers)
    needed_sets = np.zeros(layers)
    token_hits = np.zeros(layers)
    steps = 0
    for start, end in trace.step_bounds():
        requests, positions, ids = trace.request_id[start:end], trace.position[start:end], trace.topk_ids[start:end]
        guess = predictor.predict(requests, positions)
        true_hot = multi_hot(ids, trace.num_experts)  # [T, L, E]
        guess_hot = multi_hot(guess, trace.num_experts)
        token_hits += (true_hot * guess_hot).sum(axis=(0, 2))
        needed, predicted = true_hot.max(axis=0), guess_hot.max(axis=0)  # [L, E] step unions
        hit_sets += (needed * predicted).sum(axis=1)
        predicted_sets += predicted.sum(axis=1)
        needed_sets += needed.sum(axis=1)
        steps += 1
        predictor.observe(requests, positions, ids)
    predictor.reset()
    tokens = max(trace.num_tokens, 1) * trace.top_k
    return {
        name: {
            "precision": float(hit_sets[layer] / predicted_sets[layer]) if predicted_sets[layer] else 0.0,
            "recall": float(hit_sets[layer] / needed_sets[layer]) if needed_sets[layer] else 0.0,
            "token_recall": float(token_hits[layer] / tokens),
            "steps": steps,
        }
        for layer, name in enumerate(trace.layer_names)
    }


def select_requests(trace: RoutingTrace, request_ids: Iterable[str]) -> RoutingTrace:
    """The sub-trace of ``request_ids``' tokens, in their original steps (steps left empty vanish)."""
    keep = np.isin(trace.request_id, np.asarray(sorted({str(r) for r in request_ids})))
    return RoutingTrace(
        topk_ids=trace.topk_ids[keep],
        step_id=trace.step_id[keep],
        request_id=trace.request_id[keep],
        position=trace.position[keep],
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        layer_names=list(trace.layer_names),
        bytes_per_expert=trace.bytes_per_expert,
    )


def split_requests(trace: RoutingTrace, held_out_fraction: float, seed: int = 0) -> tuple[RoutingTrace, RoutingTrace]:
    """``(train, held_out)`` sub-traces: a random ``held_out_fraction`` of the requests is held out whole.

    Splitting by request (not by token) keeps a held-out request's earlier steps out of
    training, so the score measures requests the predictor never saw.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    requests = np.unique(trace.request_id)
    if len(requests) < 2:
        raise ValueError(f"a request split needs at least 2 requests, the trace has {len(requests)}")
    held = max(1, min(len(requests) - 1, round(held_out_fraction * len(requests))))
    order = np.random.default_rng(seed).permutation(len(requests))
    held_out = requests[order[:held]]
    train = requests[order[held:]]
    return select_requests(trace, train), select_requests(trace, held_out)
