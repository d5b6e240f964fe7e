"""Offline greedy generation under several expert-offload settings, one engine after another.

The tests, the benchmarks and the README's demo all run through this module, so they
compare like with like: the same prompts, the same sampling, the same engine arguments.

    python -m vllm_expertflow.generate --model DIR --runs '[{"name": "off"}, {"name": "s4",
        "offload": {"enabled": true, "cache_slots": 4}}]' --out result.json

Every engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the "uni"
executor): an engine starts in seconds instead of a minute on the CPU machines. Run with
``VLLM_PLUGINS=""`` for plain vLLM without the plugin loaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any


def _set_cpu_defaults() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def engine_kwargs(model: str, offload: dict[str, Any] | None, *, max_model_len: int = 512,
                  dtype: str = "bfloat16", multimodal: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=model,
        enforce_eager=True,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=0,
        distributed_executor_backend="uni",
    )
    if multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": 1, "video": 0}
    if offload is not None:
        kwargs["additional_config"] = {"expert_offload": offload}
    return kwargs


def load_requests(model: str, num_prompts: int, with_images: bool, seed: int = 1) -> list[Any]:
    """Prompts of varied lengths; with images, chat-formatted image questions."""
    from vllm_expertflow.tiny_models import sample_prompts

    if not with_images:
        return sample_prompts(num_prompts, seed=seed)
    from vllm_expertflow.tiny_models import sample_image_requests

    return sample_image_requests(model, num_prompts, seed=seed)


def run(model: str, runs: list[dict[str, Any]], *, num_prompts: int = 16, max_tokens: int = 16,
        with_images: bool = False, dtype: str = "bfloat16", prompts: list[str] | None = None) -> list[dict[str, Any]]:
    _set_cpu_defaults()
    from vllm import LLM, SamplingParams

    import vllm_expertflow

    requests = prompts if prompts is not None else load_requests(model, num_prompts, with_images)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    results = []
    for spec in runs:
        offload = spec.get("offload")
        start = time.perf_counter()
        # "engine": other LLM(...) arguments for this run (e.g. max_num_seqs).
        llm = LLM(**{**engine_kwargs(model, offload, dtype=dtype, multimodal=with_images), **spec.get("engine", {})})
        init_s = time.perf_counter() - start
        outputs, generate_s, stats, total = measured_generate(llm, requests, sampling)
        if offload and offload.get("trace_dir"):
            vllm_expertflow.flush_expert_trace(llm)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        scheduling = _scheduling_stats(llm)
        steps = vllm_expertflow.get_step_records(llm) if offload and offload.get("enabled") else None
        results.append({
            "name": spec.get("name", json.dumps(offload)),
            "offload": offload,
            "tokens": tokens,
            "texts": [o.outputs[0].text for o in outputs],
            "generated_tokens": sum(len(t) for t in tokens),
            "init_s": init_s,
            "generate_s": generate_s,
            "cache": stats,  # the measured batch only
            "cache_total_loads": total["loads"] if total else None,  # warm-up included
            "scheduling": scheduling,
            "steps": steps,  # per engine step, warm-up included (vllm_expertflow.get_step_records)
        })
        del llm
        gc.collect()
    return results


def _scheduling_stats(llm) -> dict[str, Any] | None:
    import vllm_expertflow

    try:
        recorded = vllm_expertflow.get_scheduling_stats(llm)
    except RuntimeError:  # engine core in another process: its scheduler is not readable here
        return None
    if not (recorded and recorded["grouping_on"]):
        return None
    seconds = recorded["grouping_seconds"] or [0.0]
    held = recorded["held_per_step"]
    scores = recorded["prediction_scores"]
    return {
        "grouped_steps": len(recorded["grouping_seconds"]),
        "steps_with_held_requests": sum(1 for h in held if h),
        "cache_aware_steps": recorded["cache_aware_steps"],
        "changed_steps": recorded["changed_steps"],
        "fcfs_fallback_steps": recorded["fcfs_fallback_steps"],
        "predicted_requests": len(scores),
        "prediction_precision": sum(p for p, _ in scores) / len(scores) if scores else None,
        "grouping_ms_median": 1e3 * sorted(seconds)[len(seconds) // 2],
        "grouping_ms_max": 1e3 * max(seconds),
    }


def measured_generate(llm, requests, sampling) -> tuple[list, float, dict[str, Any] | None, dict[str, Any] | None]:
    """Warm up on two requests, then generate all of them timed.

    Returns ``(outputs, generate_s, cache stats of the timed batch only, cache stats including the warm-up)``;
    the stats are None without an expert cache.
    """
    llm.generate(requests[:2], sampling, use_tqdm=False)  # warm-up, outside the timing
    before = _stats_or_none(llm)
    start = time.perf_counter()
    outputs = llm.generate(requests, sampling, use_tqdm=False)
    generate_s = time.perf_counter() - start
    total = _stats_or_none(llm)
    stats = _subtract(total, before) if total is not None and before is not None else None
    return outputs, generate_s, stats, total


def _stats_or_none(llm) -> dict[str, Any] | None:
    import vllm_expertflow

    try:
        return vllm_expertflow.get_expert_cache_stats(llm)
    except (RuntimeError, NotImplementedError):
        return None


def _subtract(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    from vllm_expertflow.vllm_adapter.stats import TOTAL_KEYS

    out = {key: after[key] - before[key] for key in TOTAL_KEYS}
    needed = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / needed if needed else 0.0
    out["layers"] = [
        {"layer": a["layer"], "slots": a["slots"], **{k: a[k] - b[k] for k in TOTAL_KEYS}}
        for a, b in zip(after["layers"], before["layers"], strict=True)
    ]
    out["memory"] = after.get("memory")  # bytes held, not counted: the engine's, not the batch's
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", default='[{"name": "offload-off"}]',
                        help="JSON list of {name, offload[, engine]}: offload is an expert_offload dict or null; "
                             "engine, other LLM(...) arguments")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--images", action="store_true", help="image questions (vision-language models)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts-file", help="JSON list of prompt strings (instead of generated ones)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        runs = json.loads(args.runs)
    except json.JSONDecodeError as exc:
        parser.error(f"--runs is not valid JSON ({exc}): {args.runs!r}")
    prompts = None
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = json.load(f)
    results = run(args.model, runs, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                  with_images=args.images, dtype=args.dtype, prompts=prompts)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    for result in results:
        cache = result["cache"]
        line = f"{result['name']}: {result['generated_tokens']} tokens in {result['generate_s']:.2f}s"
        if cache:
            line += (f"; hit rate {cache['hit_rate']:.3f}, loads {cache['loads']}, "
                     f"bytes loaded {cache['bytes_loaded']}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
