"""The offload mechanism itself: torch only, never vLLM, so it runs and is tested anywhere."""

from vllm_expertflow.core.expert_store import ExpertStore
from vllm_expertflow.core.policies import (
    POLICIES,
    BeladyPolicy,
    LFRUPolicy,
    LFUPolicy,
    LRUPolicy,
    ReplacementPolicy,
    StaticPolicy,
    make_policy,
)
from vllm_expertflow.core.slot_cache import ExpertSlotCache, plan_passes
from vllm_expertflow.core.slot_map import LayerCacheStats, SlotMap
from vllm_expertflow.core.trace import RoutingTrace, TraceWriter, read_trace

__all__ = [
    "POLICIES",
    "BeladyPolicy",
    "LFRUPolicy",
    "LFUPolicy",
    "RoutingTrace",
    "StaticPolicy",
    "TraceWriter",
    "read_trace",
    "ExpertSlotCache",
    "ExpertStore",
    "LRUPolicy",
    "LayerCacheStats",
    "ReplacementPolicy",
    "SlotMap",
    "make_policy",
    "plan_passes",
]
