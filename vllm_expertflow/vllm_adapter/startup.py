"""Front-end startup: CLI flags, and the checks that must fail before any model is built.

The flags are added to vLLM's own parser and carried into
``additional_config["expert_offload"]`` (``EngineArgs.from_cli_args`` drops names it does
not know). The checks run in ``EngineArgs.create_engine_config``, which every entry point
(``LLM``, ``vllm serve``, the OpenAI server module) calls in the front-end process before
it spawns the engine: a bad setting is reported there, not as a buried worker error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vllm_expertflow.config import (
    ADDITIONAL_CONFIG_KEY,
    CACHE_POLICIES,
    MISS_POLICIES,
    PREFETCH_MODES,
    SCHEDULING_POLICIES,
    ExpertOffloadConfig,
    ExpertOffloadConfigError,
)
from vllm_expertflow.vllm_adapter.stats import ensure_stats_dir, register_prometheus_collector
from vllm_expertflow.vllm_adapter.vllm_api import (
    EngineArgs,
    MoEModelShape,
    expert_parallel_enabled,
    init_logger,
    install_cli_args,
    kernel_intermediate_size,
    moe_model_shape,
    scheduler_choice,
    use_scheduler_cls,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log config applies

# HF model types whose experts carry biases (gate/up [2I] and down [H]); a slot holds them with the weights.
EXPERT_BIAS_MODEL_TYPES = ("gpt_oss",)

# argparse dest -> expert_offload key
CLI_KEYS = {
    "enable_expert_offload": "enabled",
    "expert_cache_slots": "cache_slots",
    "expert_cache_gb": "cache_gb",
    "expert_cache_policy": "policy",
    "expert_trace_dir": "trace_dir",
    "expert_scheduling": "scheduling",
    "expert_scheduling_max_skip": "max_skip_steps",
    "expert_scheduling_min_fraction": "min_run_fraction",
    "expert_scheduling_max_overflow": "max_overflow_ratio",
    "expert_miss_policy": "miss_policy",
    "expert_reroute_margin": "reroute_margin",
    "expert_prefetch": "prefetch",
    "expert_predictor": "predictor_path",
}


def _bounded(parse, is_valid, requirement: str):
    """An argparse ``type=`` that refuses values failing ``is_valid`` with the requirement in the message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return convert


_positive_int = _bounded(int, lambda v: v >= 1, "a positive integer (slots per MoE layer)")
_fraction = _bounded(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_overflow_ratio = _bounded(
    lambda text: "none" if text.lower() == "none" else float(text),
    lambda v: v == "none" or 0.0 <= v <= 1.0,
    "a number in [0, 1] or 'none'",
)
_non_negative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0 (steps)")
_positive_float = _bounded(float, lambda v: v > 0, "a positive number of GB")
_margin = _bounded(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0 (router logits)")


def add_cli_args(parser):
    group = parser.add_argument_group(
        "Expert offload (vllm-expertflow)",
        "Keep MoE experts in host memory and a cache of expert slots on the device.",
    )
    group.add_argument("--enable-expert-offload", action="store_true", default=None,
                       help="Replace the fused MoE layer by the expert-offloaded one.")
    group.add_argument("--expert-cache-slots", type=_positive_int, default=None,
                       help="Device expert slots per MoE layer (at least the model's top_k).")
    group.add_argument("--expert-cache-gb", type=_positive_float, default=None,
                       help="Device memory for expert slots over all MoE layers, in GiB. "
                            "Give this or --expert-cache-slots, not both.")
    group.add_argument("--expert-cache-policy", choices=CACHE_POLICIES, default=None,
                       help="Replacement policy of the expert cache; 'expertflow' shares one slot pool "
                            "(slots per layer x MoE layers) over all MoE layers by predicted demand.")
    group.add_argument("--expert-prefetch", choices=PREFETCH_MODES, default=None,
                       help="Load experts ahead of use: 'lookahead' applies the next MoE layer's router to the "
                            "current layer's input; 'predictor' runs a trained routing predictor "
                            "(--expert-predictor) once per step. Lossless either way.")
    group.add_argument("--expert-predictor", default=None, metavar="PATH",
                       help="Routing predictor for --expert-prefetch predictor (scripts/train_predictor.py).")
    group.add_argument("--expert-scheduling", choices=SCHEDULING_POLICIES, default=None,
                       help="Step composition with offload on: 'expertflow' (default) groups requests that use "
                            "the same experts; 'fcfs' keeps vLLM's own order.")
    group.add_argument("--expert-scheduling-max-skip", type=_non_negative_int, default=None,
                       help="Fairness bound of expertflow scheduling: a running request sits out at most this "
                            "many consecutive steps (default 2).")
    group.add_argument("--expert-scheduling-min-fraction", type=_fraction, default=None,
                       help="Throughput bound of expertflow scheduling: at least this share of the running "
                            "requests runs every step (default 0.5).")
    group.add_argument("--expert-scheduling-max-overflow", type=_overflow_ratio, default=None,
                       help="Hold requests back only if the chosen ones' experts beyond the slots are at most "
                            "this share of everyone's (default 0.25; 'none': whenever they load less).")
    group.add_argument("--expert-miss-policy", choices=MISS_POLICIES, default=None,
                       help="'exact' (default, lossless) loads missing experts before computing; 'skip', "
                            "'substitute' and 'reroute' do not wait (reroute: for an expert scored within "
                            "--expert-reroute-margin of it) and CHANGE OUTPUTS (for accuracy studies only).")
    group.add_argument("--expert-reroute-margin", type=_margin, default=None,
                       help="With --expert-miss-policy reroute: a missing expert is replaced by a resident (or "
                            "already loaded) one whose router logit is at most this much lower, else loaded "
                            "(default 1.0: at least exp(-1) = 37%% of its routing probability).")
    group.add_argument("--expert-trace-dir", default=None,
                       help="Record every step's routing (request, position, top-k experts per MoE layer) "
                            "as .npz chunks in this directory; see docs/trace-format.md.")
    return parser


def cli_additional_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``additional_config`` entries the given flags make (merged into the user's)."""
    given = {key: getattr(args, dest) for dest, key in CLI_KEYS.items() if getattr(args, dest, None) is not None}
    return {ADDITIONAL_CONFIG_KEY: given} if given else {}


def prepare_engine_args(engine_args: Any) -> ExpertOffloadConfig:
    """Parse and validate the offload settings (the one parse), before vLLM builds its config."""
    offload = ExpertOffloadConfig.from_additional_config(engine_args.additional_config)
    if ADDITIONAL_CONFIG_KEY in (engine_args.additional_config or {}):
        # The engine processes rebuild the config from this form; they never see the user's dict.
        engine_args.additional_config = {
            **engine_args.additional_config, ADDITIONAL_CONFIG_KEY: offload.to_serialized(),
        }
    if offload.enabled:
        if not engine_args.enforce_eager:
            # The cache decides residency in Python on every MoE call; CUDA graphs and
            # torch.compile would replay a stale decision.
            logger.warning("expert offload runs the model eagerly: enforce_eager set to True")
            engine_args.enforce_eager = True
    return offload


def check_model(offload: ExpertOffloadConfig, vllm_config: Any) -> None:
    """Model-dependent checks, from the HF config, before any weights are read; resolves the slots per layer."""
    if not offload.enabled:
        return
    shape = moe_model_shape(vllm_config)
    num_experts = shape.num_experts
    if not num_experts:
        logger.warning("expert offload enabled, but %s has no MoE layers: serving it normally", shape.name)
        return
    if shape.quantization:
        raise ExpertOffloadConfigError(
            f"expert offload supports unquantized MoE weights only; {shape.name} uses "
            f"quantization={shape.quantization!r}. Valid: an unquantized (bf16/fp16/fp32) checkpoint"
        )
    if shape.transformers_backend:
        raise ExpertOffloadConfigError(
            f"expert offload cannot serve {shape.name}: vLLM has no native implementation of its architecture "
            f"and runs it through the Transformers backend ({shape.transformers_backend}), whose MoE layers the "
            f"offloaded expert layer does not replace. Serve it without --enable-expert-offload, or with a vLLM "
            f"that implements the architecture natively"
        )
    if expert_parallel_enabled(vllm_config):
        raise ExpertOffloadConfigError(
            "expert offload does not support expert parallelism yet (--enable-expert-parallel is set); "
            "drop --enable-expert-parallel or --enable-expert-offload"
        )
    if offload.scheduling == "expertflow" and shape.mla_on_cpu:
        logger.warning(
            "expert scheduling 'expertflow' changes which requests share an engine step, and %s uses MLA "
            "attention, whose vLLM-CPU rotary kernel gives a request's rows different values in different "
            "batches: greedy output can then differ from plain vLLM's (as it does between two max_num_seqs "
            "settings). --expert-scheduling fcfs keeps vLLM's step composition and token identity",
            shape.name,
        )
    if offload.cache_slots is not None and offload.cache_slots > num_experts:
        logger.warning(
            "expert cache_slots=%d exceeds the %d experts per layer of %s: clamped to %d",
            offload.cache_slots, num_experts, shape.name, num_experts,
        )
    offload = offload.resolved(plan_slots_per_layer(offload, shape))  # raises below top_k slots
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = offload.to_serialized()
    if offload.predictor_path is not None:
        check_predictor(offload.predictor_path, shape)
    if offload.trace_dir and any(Path(offload.trace_dir).glob("routing-*.npz")):
        raise ExpertOffloadConfigError(
            f"trace_dir={offload.trace_dir!r} (--expert-trace-dir) already holds a routing trace; "
            f"give an empty or new directory"
        )
    if offload.miss_policy != "exact":
        margin = f" (reroute margin {offload.effective_reroute_margin:g})" if offload.miss_policy == "reroute" else ""
        logger.warning(
            "expert miss policy %r%s is LOSSY: outputs will differ from the model's; use it for accuracy "
            "studies, not for serving", offload.miss_policy, margin,
        )
    install_scheduler(offload, vllm_config)
    stats_dir = ensure_stats_dir()
    register_prometheus_collector(stats_dir)


def check_predictor(path: str, shape: MoEModelShape) -> None:
    """The predictor file exists, loads, and predicts this model's MoE layers and experts."""
    from vllm_expertflow.core.predictors import RoutingPathPredictor

    if not Path(path).is_file():
        raise ExpertOffloadConfigError(
            f"predictor_path={path!r} (--expert-predictor) is not a file; give the output of "
            f"scripts/train_predictor.py --out FILE"
        )
    try:
        predictor = RoutingPathPredictor.load(path)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ExpertOffloadConfigError(f"predictor_path={path!r} (--expert-predictor) does not load: {exc}") from None
    num_layers = estimate_num_moe_layers(shape.text_config, shape.num_layers)
    num_experts, top_k = shape.num_experts, shape.top_k
    if (predictor.num_layers, predictor.num_experts, predictor.top_k) != (num_layers, num_experts, top_k):
        raise ExpertOffloadConfigError(
            f"predictor_path={path!r} (--expert-predictor) was trained for {predictor.num_layers} MoE layers x "
            f"{predictor.num_experts} experts (top_k {predictor.top_k}), but {shape.name} has {num_layers} "
            f"MoE layers x {num_experts} experts (top_k {top_k}); train one on this model's routing trace"
        )


def install_scheduler(offload: ExpertOffloadConfig, vllm_config: Any) -> None:
    """Use the expert-aware scheduler matching vLLM's choice of sync or async scheduling."""
    from vllm_expertflow.vllm_adapter.scheduler import SCHEDULER_CLASSES

    is_async, user_choice = scheduler_choice(vllm_config)
    ours = SCHEDULER_CLASSES[is_async]
    if user_choice is not None and user_choice not in SCHEDULER_CLASSES.values():
        if offload.scheduling == "fcfs":
            return  # the user's scheduler composes steps; the cache works under any order
        raise ExpertOffloadConfigError(
            f"--scheduler-cls {user_choice!r} cannot be combined with --enable-expert-offload, which installs "
            f"its own scheduler ({ours}); drop --scheduler-cls, or keep vLLM's order with "
            f"--expert-scheduling fcfs"
        )
    use_scheduler_cls(vllm_config, ours)


def plan_slots_per_layer(offload: ExpertOffloadConfig, shape: MoEModelShape) -> int:
    """Slots per MoE layer, computed once here from the experts' size after the kernel's padding.

    The worker and the scheduler read the result from the serialised config; the worker
    checks the loaded weights against ``bytes_per_expert`` (``moe.py``).
    """
    return offload.plan_slots(
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        bytes_per_expert=bytes_per_expert(shape),
        num_moe_layers=estimate_num_moe_layers(shape.text_config, shape.num_layers),
    )


def bytes_per_expert(shape: MoEModelShape) -> int:
    """Host and slot bytes of one expert as the kernel holds it: gate and up ``[I, H]`` plus down ``[H, I]``,
    and their biases ``[2I]`` and ``[H]`` where the model has them."""
    text_config = shape.text_config
    hidden = text_config.hidden_size
    intermediate = kernel_intermediate_size(
        getattr(text_config, "moe_intermediate_size", None) or text_config.intermediate_size)
    biases = 2 * intermediate + hidden if shape.model_type in EXPERT_BIAS_MODEL_TYPES else 0
    return (3 * hidden * intermediate + biases) * shape.dtype_bytes


def estimate_num_moe_layers(text_config: Any, num_layers: int) -> int:
    dense = set(getattr(text_config, "mlp_only_layers", None) or [])
    sparse_step = getattr(text_config, "decoder_sparse_step", 1) or 1
    first_dense = getattr(text_config, "first_k_dense_replace", 0) or 0
    moe_layers = [
        i for i in range(num_layers)
        if i not in dense and (i + 1) % sparse_step == 0 and i >= first_dense
    ]
    return max(len(moe_layers), 1)


def install() -> None:
    """Add the flags and wrap EngineArgs so the checks run; idempotent."""
    install_cli_args(add_cli_args, cli_additional_config)
    if getattr(EngineArgs, "_expertflow_installed", False):
        return
    original_create_engine_config = EngineArgs.create_engine_config

    def create_engine_config_with_offload(self, *args, **kwargs):
        offload = prepare_engine_args(self)
        vllm_config = original_create_engine_config(self, *args, **kwargs)
        check_model(offload, vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config_with_offload
    EngineArgs._expertflow_installed = True
