"""The ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (front end, engine core, workers),
sometimes more than once per process. It must be idempotent and cheap, and with offload
off it changes nothing observable: the registered layer subclasses defer to vLLM's own
code unless ``additional_config["expert_offload"]["enabled"]`` is true.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_expertflow.vllm_adapter import startup, vllm_api
    from vllm_expertflow.vllm_adapter.moe import (
        OffloadedRoutedExperts,
        OffloadedUnquantizedFusedMoEMethod,
        model_loaded,
        offloaded_subclass,
    )
    from vllm_expertflow.vllm_adapter.stats import (
        building_model,
        release_worker_group,
        worker_cache_stats,
        worker_flush_trace,
        worker_step_records,
    )

    vllm_api.quiet_repeated_cpu_thread_warning()
    if not vllm_api.is_oot_registered("RoutedExperts"):
        routed = {vllm_api.RoutedExperts: OffloadedRoutedExperts}
        routed.update({model_cls: offloaded_subclass(model_cls) for model_cls in vllm_api.model_routed_experts_classes()})
        vllm_api.register_oot_layers(routed, OffloadedUnquantizedFusedMoEMethod)
    vllm_api.WorkerBase.expertflow_cache_stats = worker_cache_stats
    vllm_api.WorkerBase.expertflow_flush_trace = worker_flush_trace
    vllm_api.WorkerBase.expertflow_step_records = worker_step_records
    # Before any worker loads a model: the offloaded layers are built inside load_model, too late
    # to wrap it for that engine. With offload off no group is made and the layers run plain.
    vllm_api.install_model_load_hooks(building_model, model_loaded, release_worker_group)
    startup.install()
    _registered = True
