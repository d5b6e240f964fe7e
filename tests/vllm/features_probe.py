"""Runs vLLM features with expert offload off and on, one process per group (run by test_vllm_features.py).

    python tests/vllm/features_probe.py MODEL GROUP OUT_JSON

GROUP "offline": one engine pair (offload off, then 4 of 16 slots) with prefix caching, chunked
prefill under a 48-token budget and a KV cache small enough to force preemption, each feature its
own ``generate`` call; then one pair with n-gram speculative decoding. GROUP "tp2": one pair with
``tensor_parallel_size=2``. The report maps each feature to ``{"off": ..., "on": ...}`` (what each
engine produced, and the vLLM counters that show the feature really ran) or ``{"error": ...}``,
so one broken feature does not hide the others.
"""

import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

OFFLOAD = {"enabled": True, "cache_slots": 4}  # a quarter of the tiny Qwen3-MoE's 16 experts
BLOCK_SIZE = 32
KV_BLOCKS = 9  # vLLM keeps one back: 256 tokens of KV cache (max_model_len); the preemption workload below needs 1.5 times that
# Single words: the tiny word-level tokenizer has no space-marked tokens for a grammar to join words with.
CHOICES = ["red", "blue", "green", "yellow"]


def counters(llm) -> dict[str, int]:
    """vLLM's Prometheus counters of this engine (the registry is reset when an engine starts)."""
    from vllm_expertflow.vllm_adapter.vllm_api import engine_counters

    return engine_counters(llm)


def counted(llm, name: str, run):
    before = counters(llm).get(name, 0)
    result = run()
    return result, counters(llm).get(name, 0) - before


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def batch_features(llm) -> dict:
    """Features that need no engine argument of their own, on an engine with prefix caching, a 48-token
    budget and a small KV cache. Each returns what the offload-on engine must reproduce."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams  # public: vLLM's structured-outputs docs import it so

    from vllm_expertflow.tiny_models import sample_prompts

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    features = {}

    def prefix_caching():
        prompts = [p + " the cache holds experts" for p in sample_prompts(4, seed=21, min_words=30, max_words=40)]
        first = llm.generate(prompts, greedy, use_tqdm=False)
        second, hits = counted(llm, "vllm:prefix_cache_hits", lambda: llm.generate(prompts, greedy, use_tqdm=False))
        return {"first": tokens(first), "repeated": tokens(second), "prefix_cache_hits": hits}

    def chunked_prefill():
        prompts = [" ".join(sample_prompts(4, seed=30 + i, min_words=25, max_words=35)) for i in range(3)]
        outputs = llm.generate(prompts, greedy, use_tqdm=False)
        return {"tokens": tokens(outputs), "prompt_tokens": [len(o.prompt_token_ids) for o in outputs]}

    def preemption():
        prompts = sample_prompts(6, seed=40, min_words=15, max_words=25)
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        outputs, preempted = counted(llm, "vllm:num_preemptions",
                                     lambda: llm.generate(prompts, params, use_tqdm=False))
        return {"tokens": tokens(outputs), "preemptions": preempted}

    def seeded_sampling_n2():
        # Short prompts: 2 prompts x n=2 prefills of at most 10 tokens fit the 48-token budget. A seeded
        # request whose prefill is chunked crashes vLLM-CPU 0.32 with offload off too (the model runner
        # rewinds the request's generator with set_offset, which CPU generators do not have).
        prompts = sample_prompts(2, seed=50, min_words=4, max_words=10)
        params = [SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True)
                  for i in range(len(prompts))]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return {"samples": [[list(c.token_ids) for c in o.outputs] for o in outputs]}

    def logprobs():
        prompts = sample_prompts(4, seed=60)
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=3)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return {
            "tokens": tokens(outputs),
            # per request, per position: {token id: logprob} of the sampled token and the top 3
            "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                         for o in outputs],
            "prompt_logprobs": [[{str(t): lp.logprob for t, lp in step.items()} if step else None
                                 for step in o.prompt_logprobs] for o in outputs],
        }

    def structured_output():
        prompts = sample_prompts(4, seed=70)
        params = SamplingParams(temperature=0.0, max_tokens=8,
                                structured_outputs=StructuredOutputsParams(choice=CHOICES))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return {"tokens": tokens(outputs), "texts": [o.outputs[0].text for o in outputs], "choices": CHOICES}

    for feature in (prefix_caching, chunked_prefill, preemption, logprobs, structured_output, seeded_sampling_n2):
        start = time.perf_counter()
        try:
            features[feature.__name__] = feature()
        except Exception as exc:  # reported per feature: one that breaks must not hide the rest
            features[feature.__name__] = {"error": error_text(exc)}
        features[feature.__name__]["seconds"] = round(time.perf_counter() - start, 1)
    return features


def spec_decode_features(llm) -> dict:
    from vllm import SamplingParams

    from vllm_expertflow.tiny_models import sample_prompts

    # Repeated phrases give the n-gram proposer matches to draft from.
    prompts = [" ".join([p] * 4) for p in sample_prompts(4, seed=80, min_words=4, max_words=8)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs, drafted = counted(llm, "vllm:spec_decode_num_draft_tokens",
                               lambda: llm.generate(prompts, params, use_tqdm=False))
    accepted = counters(llm).get("vllm:spec_decode_num_accepted_tokens", 0)
    return {"ngram_spec_decode": {"tokens": tokens(outputs), "draft_tokens": drafted, "accepted_tokens": accepted}}


def tp2_features(llm) -> dict:
    from vllm import SamplingParams

    from vllm_expertflow.tiny_models import sample_prompts
    from vllm_expertflow.vllm_adapter.vllm_api import tensor_parallel_size

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(sample_prompts(8, seed=90), params, use_tqdm=False)
    return {"tensor_parallel_2": {"tokens": tokens(outputs), "tensor_parallel_size": tensor_parallel_size(llm)}}


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-4000:]


GROUPS = {
    # (engine arguments beside engine_kwargs', the features run on it)
    "offline": [
        (dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=48,
              block_size=BLOCK_SIZE, num_gpu_blocks_override=KV_BLOCKS, max_model_len=256), batch_features),
        (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
                                  "prompt_lookup_min": 2}), spec_decode_features),
    ],
    "tp2": [(dict(tensor_parallel_size=2, distributed_executor_backend="mp"), tp2_features)],
}


def run_group(model: str, group: str) -> dict:
    from vllm import LLM

    from vllm_expertflow.generate import engine_kwargs

    report: dict = {}
    for extra, features in GROUPS[group]:
        for mode, offload in (("off", None), ("on", OFFLOAD)):
            kwargs = {**engine_kwargs(model, offload, max_model_len=512), "disable_log_stats": False, **extra}
            start = time.perf_counter()
            try:
                llm = LLM(**kwargs)
                results = features(llm)
                del llm
                gc.collect()
            except Exception as exc:  # the engine itself failed: every feature it carries reports it
                results = {name: {"error": error_text(exc)} for name in feature_names(features)}
            for name, result in results.items():
                report.setdefault(name, {})[mode] = result
            report.setdefault("engine_seconds", []).append(round(time.perf_counter() - start, 1))
    return report


def feature_names(features) -> list[str]:
    return {
        batch_features: ["prefix_caching", "chunked_prefill", "preemption", "seeded_sampling_n2", "logprobs",
                         "structured_output"],
        spec_decode_features: ["ngram_spec_decode"],
        tp2_features: ["tensor_parallel_2"],
    }[features]


if __name__ == "__main__":
    model, group, out = sys.argv[1:4]
    if group == "tp2":
        # One OpenMP thread per rank, each on its own core (the default reserves one of two cores).
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    report = run_group(model, group)
    with open(out, "w") as f:
        json.dump(report, f)
