"""Builds LLMs with given offload settings and reports what happened, as JSON (run by the tests)."""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from vllm_expertflow.config import ExpertOffloadConfigError
    from vllm_expertflow.generate import engine_kwargs

    cases = json.loads(sys.argv[1])
    report = []
    for model, offload in cases:
        try:
            llm = LLM(**engine_kwargs(model, offload, max_model_len=256))
            out = llm.generate(["the cache"], SamplingParams(temperature=0, max_tokens=4))
            report.append({"ok": True, "tokens": list(out[0].outputs[0].token_ids)})
            del llm
        except ExpertOffloadConfigError as exc:
            report.append({"ok": False, "error": str(exc)})
    print("REPORT " + json.dumps(report))
