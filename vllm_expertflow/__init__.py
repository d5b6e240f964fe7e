"""vllm-expertflow: expert offloading for Mixture-of-Experts models in vLLM."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point; runs in every vLLM process."""
    from vllm_expertflow.vllm_adapter.plugin import register as _register

    _register()


def get_expert_cache_stats(llm: Any) -> dict[str, Any]:
    """Cache statistics of an offline ``vllm.LLM``: totals plus a per-layer list."""
    from vllm_expertflow.vllm_adapter.stats import get_expert_cache_stats as _get

    return _get(llm)


def get_scheduling_stats(llm: Any) -> dict[str, Any] | None:
    """The expert-aware scheduler's per-step record of an offline ``vllm.LLM`` built in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): grouping time and held-back requests per grouped step."""
    from vllm_expertflow.vllm_adapter.scheduler import get_scheduling_stats as _get

    return _get(llm)


def get_step_records(llm: Any) -> list[dict[str, Any]]:
    """Per engine step of an offline ``vllm.LLM``: tokens, distinct experts per MoE layer, and whether
    expert-aware scheduling changed the step's composition versus FCFS (``stats.get_step_records``)."""
    from vllm_expertflow.vllm_adapter.stats import get_step_records as _get

    return _get(llm)


def flush_expert_trace(llm: Any) -> None:
    """Write the routing steps an offline ``vllm.LLM`` has buffered to its ``trace_dir``."""
    llm.collective_rpc("expertflow_flush_trace")
