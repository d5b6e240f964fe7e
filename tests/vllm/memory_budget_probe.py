"""Serves a model whose experts do not fit the device budget, accounting expert bytes per tier throughout (run by the tests).

    python tests/vllm/memory_budget_probe.py MODEL OUT_JSON

The expert budget (``cache_gb``) is a quarter of all the model's expert bytes. The engine and
its worker run in this process, so the probe hooks the offloaded layer's own code path:
after every weight-loader call, around every ``process_weights_after_loading`` and at every
expert-kernel call it adds up the expert tensors the offloaded MoE layers hold, by tier:

- device: the slot buffers, plus any expert parameter that is not in host memory;
- host: the expert parameters (after loading they are the host store's tensors).

On CPU both tiers are the same RAM, so a tier is told by where the code puts a tensor, not by
its device type. To make the host placement observable, the layer's ``create_weights`` runs
here under a ``meta`` default device, standing in for the accelerator device vLLM's loader
builds the model under: an expert parameter that followed the ambient device, as vLLM's own
``create_weights`` does, would land there and count as device bytes.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

EXPERT_PARAMS = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def all_expert_bytes(model_dir: str) -> tuple[int, int]:
    """(bytes of every expert of every MoE layer as the kernel holds them, MoE layers), from the HF config."""
    from transformers import AutoConfig

    from vllm_expertflow.vllm_adapter.vllm_api import kernel_intermediate_size

    config = AutoConfig.from_pretrained(model_dir)
    intermediate = kernel_intermediate_size(config.moe_intermediate_size)
    per_expert = 3 * config.hidden_size * intermediate * 2  # gate, up, down in bf16
    return config.num_experts * per_expert * config.num_hidden_layers, config.num_hidden_layers


if __name__ == "__main__":
    import torch
    from vllm import LLM, SamplingParams

    import vllm_expertflow
    from vllm_expertflow.generate import engine_kwargs
    from vllm_expertflow.tiny_models import sample_prompts
    from vllm_expertflow.vllm_adapter import moe

    model, out_path = sys.argv[1], sys.argv[2]
    total, num_layers = all_expert_bytes(model)
    budget = total // 4
    layers = []  # every offloaded MoE layer, in creation order
    samples = []  # {"phase", "device", "host"} after each hooked call
    kernel_calls = {"count": 0, "max_weight_bytes": 0, "reads_host_store": 0}

    def sample(phase: str) -> None:
        device, host = {}, {}
        for layer in layers:
            for name in EXPERT_PARAMS:
                param = getattr(layer, name, None)
                if param is not None:
                    (host if param.device.type == "cpu" else device)[param.data_ptr()] = nbytes(param)
            cache = getattr(layer, "expert_cache", None)
            for slot_buffer in cache.slots if cache is not None else ():
                device[slot_buffer.data_ptr()] = nbytes(slot_buffer)
        samples.append({"phase": phase, "device": sum(device.values()), "host": sum(host.values())})

    original_create = moe.OffloadedUnquantizedFusedMoEMethod.create_weights

    def create_weights_under_device_context(self, layer, *args, **kwargs):
        with torch.device("meta"):
            original_create(self, layer, *args, **kwargs)
        layers.append(layer)
        sample("create_weights")

    original_loader = moe.OffloadedRoutedExperts.weight_loader

    def weight_loader(self, *args, **kwargs):
        result = original_loader(self, *args, **kwargs)
        sample("weight_loader")
        return result

    original_process = moe.OffloadedUnquantizedFusedMoEMethod.process_weights_after_loading

    def process_weights_after_loading(self, layer):
        sample("before_process_weights")
        original_process(self, layer)
        sample("after_process_weights")

    original_kernel = moe.moe_kernel_apply

    def kernel(layer, hidden_states, w13, w2, *args, **kwargs):
        store = {w.data_ptr() for w in layer.expert_cache.store.weights}
        kernel_calls["count"] += 1
        kernel_calls["max_weight_bytes"] = max(kernel_calls["max_weight_bytes"], nbytes(w13) + nbytes(w2))
        kernel_calls["reads_host_store"] += w13.data_ptr() in store or w2.data_ptr() in store
        return original_kernel(layer, hidden_states, w13, w2, *args, **kwargs)

    moe.OffloadedUnquantizedFusedMoEMethod.create_weights = create_weights_under_device_context
    moe.OffloadedRoutedExperts.weight_loader = weight_loader
    moe.OffloadedUnquantizedFusedMoEMethod.process_weights_after_loading = process_weights_after_loading
    moe.moe_kernel_apply = kernel

    offload = {"enabled": True, "cache_gb": budget / 1024**3}
    llm = LLM(**engine_kwargs(model, offload, max_model_len=256))
    loaded_samples = len(samples)
    outputs = llm.generate(sample_prompts(8, seed=1), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    sample("served")
    stats = vllm_expertflow.get_expert_cache_stats(llm)
    report = {
        "all_expert_bytes": total,
        "budget_bytes": budget,
        "moe_layers": num_layers,
        "offloaded_layers": len(layers),
        "parameters_stay_on_host": all(not m.quant_method.requires_device_loading for m in layers),
        "peak_device_loading": max(s["device"] for s in samples[:loaded_samples]),
        "peak_device": max(s["device"] for s in samples),
        "host_final": samples[-1]["host"],
        "samples": len(samples),
        "weight_loader_calls": sum(s["phase"] == "weight_loader" for s in samples),
        "kernel": kernel_calls,
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "cache": {key: stats[key] for key in ("hits", "misses", "loads", "passes", "steps")},
        "slots": sorted({layer["slots"] for layer in stats["layers"]}),
        "memory": stats["memory"],  # the engine's own accounting (ExpertCacheGroup.memory)
    }
    with open(out_path, "w") as out:
        json.dump(report, out, indent=1)
