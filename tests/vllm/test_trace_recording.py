"""Recording routing traces from the live engine: outputs unchanged, and the trace is consistent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.vllm.conftest import run_generate
from vllm_expertflow.core import read_trace
from vllm_expertflow.core.simulate import simulate

pytestmark = pytest.mark.vllm


def test_trace_records_every_step_without_changing_outputs(tiny_models, tmp_path):
    model = tiny_models["qwen3_moe"]
    trace_dir = tmp_path / "trace"
    runs = [
        {"name": "lru-4", "offload": {"enabled": True, "cache_slots": 4}},
        {"name": "traced", "offload": {"enabled": True, "cache_slots": 4, "trace_dir": str(trace_dir)}},
    ]
    plain, traced = run_generate(model, runs, tmp_path=tmp_path)
    assert traced["tokens"] == plain["tokens"]

    trace = read_trace(trace_dir)
    config = json.loads((model / "config.json").read_text())
    assert trace.num_layers == config["num_hidden_layers"]
    assert trace.num_experts == (config.get("num_experts") or config["num_local_experts"]) and trace.top_k == config["num_experts_per_tok"]
    # the warm-up (2 prompts) and the measured batch (16 prompts x 16 tokens) are both in the trace
    num_requests = len(set(trace.request_id.tolist()))
    assert num_requests == 18
    # every request's positions run 0..n-1 without gaps: prompt tokens, then one per decode step
    for request_id in set(trace.request_id.tolist()):
        positions = trace.position[trace.request_id == request_id]
        assert positions.tolist() == list(range(len(positions)))
    decode_tokens = sum(len(t) - 1 for t in traced["tokens"])  # the last token is sampled, never fed back
    assert trace.num_tokens >= decode_tokens
    assert np.all((trace.topk_ids >= 0) & (trace.topk_ids < trace.num_experts))

    # Replaying the trace with the live cache's policy reproduces the live cache's loads
    # (both runs start cold, and the trace holds exactly the steps the live cache served).
    replay = simulate(trace, "lru", 4, bytes_per_expert=trace.bytes_per_expert)
    live_total_loads = traced["cache_total_loads"]
    assert replay.as_dict()["loads"] == live_total_loads
