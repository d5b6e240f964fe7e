"""Runs every tiny architecture with offload off and at several slot counts, one process for all (run by the tests).

    python tests/vllm/architecture_probe.py CASES_JSON OUT_JSON

CASES_JSON: a list of ``{"shape", "model", "slots": [...], "scheduling"}``. Each case is
reported as ``{"shape", "runs": [{name, tokens, cache, moe_layers}]}`` or, when startup
refused offload, ``{"shape", "refused": message, "refused_before_load": bool}``.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def moe_layers(worker) -> dict:
    """Every fused-MoE layer of the loaded model and whether it runs on an expert cache (in the worker)."""
    from vllm_expertflow.vllm_adapter.vllm_api import RoutedExperts

    layers = [m for m in worker.get_model().modules() if isinstance(m, RoutedExperts)]
    return {"total": len(layers), "offloaded": sum(getattr(m, "expert_cache", None) is not None for m in layers)}


def run_case(case: dict) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    import vllm_expertflow
    from vllm_expertflow.config import ExpertOffloadConfigError
    from vllm_expertflow.generate import engine_kwargs
    from vllm_expertflow.tiny_models import sample_prompts

    prompts = sample_prompts(16, seed=1)
    sampling = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    offloads = [None] + [{"enabled": True, "cache_slots": s, "scheduling": case["scheduling"]} for s in case["slots"]]
    runs = []
    for offload in offloads:
        start = time.perf_counter()
        try:
            llm = LLM(**engine_kwargs(case["model"], offload, max_model_len=256))
        except ExpertOffloadConfigError as exc:
            # startup.check_model runs in the front end's create_engine_config, before any engine
            # (and so any weight load) starts; a refusal from a worker would come after loading.
            frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
            return {"shape": case["shape"], "refused": str(exc), "refused_before_load": "check_model" in frames,
                    "runs": runs}
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        # An offload-off engine has no cache: get_expert_cache_stats would raise.
        cache = vllm_expertflow.get_expert_cache_stats(llm) if offload is not None else None
        runs.append({
            "name": "offload-off" if offload is None else f"slots-{offload['cache_slots']}",
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "cache": cache,
            "moe_layers": llm.collective_rpc(moe_layers)[0],
            "seconds": time.perf_counter() - start,
        })
        del llm
        gc.collect()
    return {"shape": case["shape"], "runs": runs}


def run_cases(run_case, cases_path: str, out_path: str) -> None:
    """Each case in turn; the report is rewritten after each, so a crash keeps the cases before it."""
    cases = json.loads(open(cases_path).read())
    report = []
    for case in cases:
        started = time.perf_counter()
        try:
            result = run_case(case)
        except Exception as exc:  # reported per architecture: one that vLLM-CPU cannot run must not hide the rest
            where = traceback.extract_tb(exc.__traceback__)[-1]  # an assert's message may be empty: say where
            origin = f"{where.filename.split('site-packages/')[-1]}:{where.lineno} {where.name}: {where.line}"
            result = {"shape": case["shape"], "error": f"{type(exc).__name__}: {exc} (at {origin})"[:3000]}
        result["seconds"] = time.perf_counter() - started
        report.append(result)
        with open(out_path, "w") as out:
            json.dump(report, out)


if __name__ == "__main__":
    run_cases(run_case, sys.argv[1], sys.argv[2])
