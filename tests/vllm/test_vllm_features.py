"""vLLM features keep working with expert offload at a quarter of the experts (4 of 16 slots).

Each feature runs on an engine with offload off and one with offload on, same arguments, and
the offloaded engine must produce the same tokens (and logprobs). The engines run in one probe
process per group (features_probe.py) to keep engine starts few; each feature is its own test,
reading its part of the probe's report, with vLLM's counters showing that the feature really ran
(prefix-cache hits, preemptions, drafted tokens). Async scheduling: test_async_scheduling.py.
The OpenAI server's features (streaming, disconnects, concurrency) are in test_serving.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO

pytestmark = pytest.mark.vllm

PROBE = Path(__file__).with_name("features_probe.py")


def run_probe(model: Path, group: str, out_dir: Path) -> dict:
    out = out_dir / f"{group}.json"
    proc = subprocess.run([sys.executable, str(PROBE), str(model), group, str(out)], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, f"features probe ({group}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def offline_report(tiny_models, tmp_path_factory) -> dict:
    return run_probe(tiny_models["qwen3_moe"], "offline", tmp_path_factory.mktemp("features"))


def both_modes(report: dict, feature: str) -> tuple[dict, dict]:
    """The feature's results with offload off and on; fails with vLLM's error if either engine raised."""
    runs = report[feature]
    for mode in ("off", "on"):
        assert "error" not in runs[mode], f"{feature} with offload {mode} raised:\n{runs[mode]['error']}"
    return runs["off"], runs["on"]


def test_prefix_caching_with_repeated_prompts(offline_report):
    off, on = both_modes(offline_report, "prefix_caching")
    assert on["prefix_cache_hits"] > 0, "the repeated prompts were not served from the prefix cache"
    assert on["first"] == off["first"]
    assert on["repeated"] == off["repeated"]
    assert on["repeated"] == on["first"]  # a prefix-cache hit changes nothing


def test_chunked_prefill_with_prompts_longer_than_the_token_budget(offline_report):
    off, on = both_modes(offline_report, "chunked_prefill")
    assert min(on["prompt_tokens"]) > 48, on["prompt_tokens"]  # max_num_batched_tokens: every prompt is chunked
    assert on["tokens"] == off["tokens"]


def test_preemption_forced_by_a_small_kv_cache(offline_report):
    off, on = both_modes(offline_report, "preemption")
    assert on["preemptions"] > 0, "the small KV cache did not force a preemption (vllm:num_preemptions)"
    assert on["tokens"] == off["tokens"]


def test_seeded_sampling_with_two_samples_per_prompt(offline_report):
    off, on = both_modes(offline_report, "seeded_sampling_n2")
    assert all(len(samples) == 2 for samples in on["samples"])
    assert any(a != b for a, b in on["samples"]), "n=2 at temperature 1 gave identical samples: not sampling"
    assert on["samples"] == off["samples"]


def test_logprobs_equal_offload_off(offline_report):
    off, on = both_modes(offline_report, "logprobs")
    assert on["tokens"] == off["tokens"]
    # Exactly equal, not within a tolerance: offload computes every token's experts with the same
    # kernel on the same rows (test_offload_equivalence), so the logits are bitwise the same.
    assert on["logprobs"] == off["logprobs"]
    assert on["prompt_logprobs"] == off["prompt_logprobs"]
    assert all(3 <= len(step) <= 4 for request in on["logprobs"] for step in request)  # top 3 (+ the sampled one)


def test_structured_output_choice(offline_report):
    off, on = both_modes(offline_report, "structured_output")
    assert all(text.strip() in on["choices"] for text in on["texts"]), on["texts"]
    assert on["tokens"] == off["tokens"]


def test_ngram_speculative_decoding(offline_report):
    off, on = both_modes(offline_report, "ngram_spec_decode")
    assert on["draft_tokens"] > 0 and on["accepted_tokens"] > 0, "the n-gram proposer drafted nothing"
    assert on["tokens"] == off["tokens"]


def test_tensor_parallel_2_on_cpu(tiny_models, tmp_path):
    cores = os.sched_getaffinity(0)
    if not {0, 1} <= cores:
        pytest.skip(f"the two ranks bind their OpenMP threads to cores 0 and 1 (VLLM_CPU_OMP_THREADS_BIND=0|1), "
                    f"but this process may run only on cores {sorted(cores)}")
    report = run_probe(tiny_models["qwen3_moe"], "tp2", tmp_path)
    off, on = both_modes(report, "tensor_parallel_2")
    assert on["tensor_parallel_size"] == 2
    assert on["tokens"] == off["tokens"]
