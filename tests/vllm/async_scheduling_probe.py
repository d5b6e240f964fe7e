"""Asks vLLM for async scheduling with offload on, then drives AsyncExpertAwareScheduler directly (run by the tests).

vLLM-CPU turns async scheduling off at startup, so the engine runs the synchronous subclass;
the async subclass is then built with the engine's own scheduler arguments and stepped by
hand on step outputs carrying expert signatures, as the workers' outputs do.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from vllm_expertflow.core.grouping import ExpertSignature
    from vllm_expertflow.generate import engine_kwargs
    from vllm_expertflow.vllm_adapter import scheduler as ours
    from vllm_expertflow.vllm_adapter.routing import SIGNATURES_ATTR
    from vllm_expertflow.vllm_adapter.vllm_api import inprocess_scheduler

    model = sys.argv[1]
    captured = {}
    original_init = ours.ExpertAwareSchedulingMixin.__init__

    def capture_init(self, *args, **kwargs):
        captured.setdefault("args", (args, kwargs))
        original_init(self, *args, **kwargs)

    ours.ExpertAwareSchedulingMixin.__init__ = capture_init
    prompts = ["the cache holds experts", "a red circle", "many small experts route tokens", "the sky"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    report = {}
    llm = LLM(**engine_kwargs(model, {"enabled": True, "cache_slots": 4}, max_model_len=256), async_scheduling=True)
    engine_scheduler = inprocess_scheduler(llm)
    report["engine_scheduler"] = type(engine_scheduler).__name__
    report["engine_async_scheduling"] = bool(engine_scheduler.vllm_config.scheduler_config.async_scheduling)
    report["offload_tokens"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    # The async subclass on the engine's scheduler arguments (its config has offload on, 4 of 16 slots).
    args, kwargs = captured["args"]
    scheduler = ours.AsyncExpertAwareScheduler(*args, **kwargs)
    layers, experts = 4, 16
    kinds = []  # kind 0 uses experts 0-3 of every layer, kind 1 experts 8-11: together 8, above the 4 slots
    for kind in (0, 1):
        mask = np.zeros((layers, experts), dtype=bool)
        mask[:, 8 * kind : 8 * kind + 4] = True
        kinds.append(ExpertSignature.from_mask(mask))
    requests = 8
    for i in range(requests):
        scheduler.add_request(Request(f"q{i}", list(range(3, 11)), SamplingParams(max_tokens=6, ignore_eos=True),
                                      None, arrival_time=float(i)))
    produced = {f"q{i}": 0 for i in range(requests)}
    sat_out = {f"q{i}": 0 for i in range(requests)}
    longest_wait, most_running, steps = 0, 0, 0
    while scheduler.has_unfinished_requests() and steps < 200:
        output = scheduler.schedule()
        ids = list(output.num_scheduled_tokens)
        most_running = max(most_running, len(scheduler.running))
        for request_id in produced:
            if request_id in ids or scheduler.requests.get(request_id) is None:
                sat_out[request_id] = 0
            else:
                sat_out[request_id] += 1
                longest_wait = max(longest_wait, sat_out[request_id])
        step_output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                        sampled_token_ids=[[5] for _ in ids])
        setattr(step_output, SIGNATURES_ATTR, {r: kinds[int(r[1:]) % 2] for r in ids})
        for r in ids:
            produced[r] += 1
        scheduler.update_from_output(output, step_output)
        steps += 1
    stats = scheduler.scheduling_stats()
    report["direct"] = {
        "steps": steps, "unfinished": scheduler.get_num_unfinished_requests(),
        "grouped_steps": len(stats["grouping_seconds"]), "steps_holding_back": sum(1 for h in stats["held_per_step"] if h),
        "longest_wait": longest_wait, "most_running": most_running,
        "max_num_running_reqs": scheduler.max_num_running_reqs,
    }
    del llm
    plain = LLM(**engine_kwargs(model, None, max_model_len=256))
    report["offload_off_tokens"] = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params)]
    del plain

    print("REPORT " + json.dumps(report))
