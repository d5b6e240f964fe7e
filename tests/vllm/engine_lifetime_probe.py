"""Creates and deletes offload engines in one process and reports memory, threads and stats, as JSON (run by the tests)."""

import ctypes
import gc
import json
import os
import sys
import threading
import weakref

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def resident_bytes() -> int:
    # glibc keeps freed heap pages (tensors below its mmap threshold) for reuse; hand them back
    # first, so resident memory shows what is still held, not the allocator's cache.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def snapshot_threads() -> int:
    return sum(thread.name == "expertflow-stats" for thread in threading.enumerate())


if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    import vllm_expertflow
    from vllm_expertflow.core.expert_store import ExpertStore
    from vllm_expertflow.generate import engine_kwargs

    stores = weakref.WeakSet()  # every layer's host experts, held weakly: what survives an engine's deletion
    original_store_init = ExpertStore.__init__

    def tracked_store_init(self, *args, **kwargs):
        original_store_init(self, *args, **kwargs)
        stores.add(self)

    ExpertStore.__init__ = tracked_store_init

    model, engines = sys.argv[1], int(sys.argv[2])
    params = SamplingParams(temperature=0, max_tokens=4)
    report = {"rss_after": [], "threads_after": [], "threads_while_running": [], "stores_while_running": [],
              "stores_after": []}
    for _ in range(engines):
        llm = LLM(**engine_kwargs(model, {"enabled": True, "cache_slots": 4}, max_model_len=256))
        llm.generate(["the cache"], params)
        assert vllm_expertflow.get_expert_cache_stats(llm)["loads"] > 0
        report["threads_while_running"].append(snapshot_threads())
        report["stores_while_running"].append(len(stores))
        del llm
        gc.collect()  # the engine's finalizer shuts the worker down, which stops the snapshot thread
        gc.collect()  # and what that thread last held
        report["rss_after"].append(resident_bytes())
        report["threads_after"].append(snapshot_threads())
        report["stores_after"].append(len(stores))
    plain = LLM(**engine_kwargs(model, None, max_model_len=256))
    plain.generate(["the cache"], params)
    try:
        report["offload_off_stats"] = vllm_expertflow.get_expert_cache_stats(plain)
    except RuntimeError as exc:
        report["offload_off_stats"] = None
        report["offload_off_error"] = str(exc)
    print("REPORT " + json.dumps(report))
