"""The expert-offloaded fused-MoE layer.

``OffloadedUnquantizedFusedMoEMethod`` keeps the expert weights in host memory (they are
created there, loaded there and prepacked there; the device never holds all of them),
and ``OffloadedRoutedExperts`` runs vLLM's own MoE kernel on a per-layer slot cache.
With offload off both behave exactly like the vLLM classes they subclass.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_expertflow.config import EXPERTFLOW_POLICY, ExpertOffloadConfig, ExpertOffloadConfigError
from vllm_expertflow.core import ExpertSlotCache, ExpertStore, make_policy
from vllm_expertflow.core.expert_pool import ExpertPool, PooledLayerCache
from vllm_expertflow.core.miss_policies import NEEDS_ROUTER_SCORES
from vllm_expertflow.core.predictors import (
    LookaheadPredictor,
    PromptRoutingPredictor,
    RoutingPathPredictor,
    step_demand,
)
from vllm_expertflow.vllm_adapter.routing import (
    IMAGE_SIGNATURES_ATTR,
    PROMPT_TABLE_ATTR,
    RESIDENT_ATTR,
    SIGNATURES_ATTR,
    first_positions,
)
from vllm_expertflow.vllm_adapter.stats import ExpertCacheGroup, group_being_built, group_of_worker
from vllm_expertflow.vllm_adapter.vllm_api import (
    RoutedExperts,
    UnquantizedFusedMoEMethod,
    expert_bias_names,
    get_current_vllm_config,
    init_logger,
    install_router_logits_capture,
    install_worker_step_hooks,
    moe_input_norm_weights,
    moe_kernel_apply,
    moe_router_weights,
    request_image_spans,
    step_finished_requests,
    step_token_counts,
    step_total_tokens,
    vocabulary_embeddings,
    worker_additional_config,
    worker_model,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so vLLM's log config applies


def _offload_config() -> ExpertOffloadConfig:
    """The config of the engine whose model is being built (offload off outside a worker's model load)."""
    group = group_being_built()
    return group.offload if group is not None else ExpertOffloadConfig()


class OffloadedUnquantizedFusedMoEMethod(UnquantizedFusedMoEMethod):
    def __init__(self, moe) -> None:
        super().__init__(moe)
        self.offload = _offload_config()
        if self.offload.enabled:
            # vLLM would move host parameters to the device to post-process them; we prepack
            # them where they are so the full expert set never lands on the device.
            self.requires_device_loading = False

    def create_weights(self, layer, *args, **kwargs) -> None:
        if not self.offload.enabled:
            return super().create_weights(layer, *args, **kwargs)
        with torch.device("cpu"):
            super().create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        if self.offload.enabled and isinstance(layer, OffloadedRoutedExperts):
            layer.build_expert_cache()


def refuse_unsupported_layer(layer_name: str, quant_method: object, local_num_experts: int,
                             global_num_experts: int) -> None:
    """The layer-level refusals, as the layer is built: before any weight is read.

    The front end already refused what the HF config shows (``startup.check_model``); these
    catch what only the built layer knows (the quantization method vLLM chose, its kernel).
    """
    if not isinstance(quant_method, OffloadedUnquantizedFusedMoEMethod):
        raise ExpertOffloadConfigError(
            f"expert offload supports unquantized MoE weights only; layer {layer_name} uses "
            f"{type(quant_method).__name__}. Serve an unquantized (bf16/fp16/fp32) checkpoint or "
            f"disable --enable-expert-offload"
        )
    if local_num_experts != global_num_experts:
        raise ExpertOffloadConfigError(
            f"expert offload does not support expert parallelism yet ({local_num_experts} local of "
            f"{global_num_experts} experts on layer {layer_name}); disable expert parallelism"
        )
    if quant_method.is_monolithic:
        raise ExpertOffloadConfigError(
            f"expert offload needs a modular MoE kernel, but layer {layer_name} selected the "
            f"monolithic backend {quant_method.unquantized_backend}; choose another MoE backend"
        )


class OffloadedRoutedExperts(RoutedExperts):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.expert_cache: ExpertSlotCache | None = None
        self.offload = _offload_config()
        if not self.offload.enabled:
            return
        refuse_unsupported_layer(self.layer_name, self.quant_method, self.local_num_experts, self.global_num_experts)
        self._group: ExpertCacheGroup = group_being_built()
        self._group.add_layer(self.layer_name)
        install_worker_step_hooks(begin_worker_step, end_worker_step)
        if self.offload.miss_policy in NEEDS_ROUTER_SCORES:
            install_router_logits_capture()
        self._device = torch.device(get_current_vllm_config().device_config.device)

    def build_expert_cache(self) -> None:
        """Move the experts into a host store and give the layer its slots (after loading)."""
        on_cuda = self._device.type == "cuda"
        # A slot holds all of an expert's tensors: its weights and, where the model has them, its biases.
        params = [getattr(self, name) for name in ("w13_weight", "w2_weight", *expert_bias_names(self))]
        store = ExpertStore([param.data for param in params], pin_memory=on_cuda)
        # The parameters now point at the store's (pinned) tensors: one host copy, not two.
        for param, stored in zip(params, store.weights, strict=True):
            param.data = stored
        num_slots = self.offload.slots_per_layer  # planned once by the front end (startup.plan_slots_per_layer)
        self._group.check_planned_size(store.bytes_per_expert)
        self._layer_index = self._group.layer_names.index(self.layer_name)
        if self.offload.policy == EXPERTFLOW_POLICY:
            if self._group.pool is None:
                # ExpertFlowCache prefetches from its own step forecast only when a predictor makes one.
                self._group.pool = ExpertPool(
                    store, self._group.num_layers, num_slots, self.top_k, self._device,
                    prefetch=self.offload.prefetch == "predictor",
                )
            self.expert_cache = self._group.pool.add_layer(self._layer_index, store)
        else:
            self.expert_cache = ExpertSlotCache(store, num_slots, make_policy(self.offload.policy), self._device)
        # Same decision, same inputs as the scheduler's (scheduler.py).
        self._group.scheduler_wants_signatures |= self.offload.groups_requests(store.num_experts)
        self._group.add_cache(self.layer_name, self.expert_cache, top_k=self.top_k)

    def forward_modular(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ):
        cache = self.expert_cache
        if cache is None:
            return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        # The step's routing reaches the host once per layer (each read-back waits for the
        # device): the recorder, the lookahead's prediction and the cache all use this copy.
        predicted = self._lookahead_picks(x)
        if predicted is None:
            host_ids = topk_ids.to("cpu", torch.int32)
        else:
            both = torch.cat([topk_ids.reshape(-1).int(), predicted.reshape(-1).int()]).cpu()
            host_ids = both[: topk_ids.numel()].view(topk_ids.shape)
            self._lookahead_prefetch(both[topk_ids.numel() :].view(predicted.shape), host_ids)
        recorder = self._group.recorder
        if recorder is not None:
            recorder.record(self.layer_name, host_ids)
        # Shared experts run once over the whole input; only the first pass takes them.
        pending_shared = [shared_experts, shared_experts_input]

        def run_kernel(hidden_states, slot_weights, weights, slot_ids):
            shared, shared_input = pending_shared
            pending_shared[0] = pending_shared[1] = None
            out = moe_kernel_apply(
                self, hidden_states, slot_weights[0], slot_weights[1], weights, slot_ids, cache.num_slots,
                shared, shared_input, biases=slot_weights[2:],
            )
            if not isinstance(out, torch.Tensor):
                raise NotImplementedError(
                    f"expert offload needs a finalized MoE output; the kernel returned {type(out).__name__}"
                )
            return out

        if self.offload.miss_policy != "exact":
            return cache.run_lossy(x, topk_weights, topk_ids, run_kernel, self.offload.miss_policy,
                                   router_scores=getattr(self, "last_router_logits", None),
                                   reroute_margin=self.offload.effective_reroute_margin)
        return cache.run(x, topk_weights, topk_ids, run_kernel, host_topk_ids=host_ids.numpy())

    def _lookahead_picks(self, x: torch.Tensor) -> torch.Tensor | None:
        """The next MoE layer's experts as its router would pick them on this layer's input (on the device).

        None when lookahead prefetch is off or there is no next offloaded layer.
        """
        group = self._group
        following = self._layer_index + 1
        if group.lookahead is None or following >= group.num_layers:
            return None
        if group.caches.get(group.layer_names[following]) is None:
            return None
        rows = group.step_tokens if group.step_tokens is not None else x.shape[0]  # drop padding rows
        if rows == 0:
            return None
        return group.lookahead.predict(x[:rows], self._layer_index, 1)[:, 0, :]  # [T, top_k]

    def _lookahead_prefetch(self, picks: torch.Tensor, host_ids: torch.Tensor) -> None:
        """Prefetch the next MoE layer's predicted experts (``picks``, on the host), most wanted first.

        Issued before this layer's kernel so that, on CUDA, the copies overlap it; the next
        layer waits for them only when it runs.
        """
        group = self._group
        next_cache = group.caches[group.layer_names[self._layer_index + 1]]
        counts = torch.bincount(picks.reshape(-1).long(), minlength=group.lookahead.num_experts)
        # Most tokens first: if not all fit, the experts most of the step needs are the ones loaded.
        order = torch.argsort(counts, descending=True, stable=True)
        experts = [e for e in order.tolist() if counts[e] > 0]
        if isinstance(next_cache, PooledLayerCache):
            rows = picks.shape[0]
            running = [(self._layer_index, e) for e in torch.unique(host_ids[:rows]).tolist()]
            demand = (counts > 0).numpy().astype(np.float64)
            next_cache.prefetch(experts, protected=running, demand=demand)
        else:
            next_cache.prefetch(experts)


def offloaded_subclass(model_routed_experts: type) -> type:
    """The offloaded layer for a model's own ``RoutedExperts`` subclass, keeping that subclass's weight loading."""
    assert issubclass(model_routed_experts, RoutedExperts)
    return type(f"Offloaded{model_routed_experts.__name__}", (OffloadedRoutedExperts, model_routed_experts),
                {"__module__": __name__, "__doc__": offloaded_subclass.__doc__})


def model_loaded(worker) -> None:
    """Set up the prefetch predictors once the model (and its routers) is loaded, before any request."""
    group = group_of_worker(worker)
    offload = group.offload if group is not None else ExpertOffloadConfig.from_serialized(
        worker_additional_config(worker))
    if offload.enabled:
        check_every_moe_layer_offloaded(worker_model(worker))
    if group is None or not group.caches:
        return
    if group.scheduler_wants_signatures:
        group.prompt_table = _prompt_table(worker, group)
    if offload.prefetch == "lookahead":
        weights = moe_router_weights(worker_model(worker), OffloadedRoutedExperts)
        missing = [name for name in group.layer_names if name not in weights]
        if missing:
            raise ExpertOffloadConfigError(
                f"expert prefetch 'lookahead' needs every MoE layer's router (gate) weight, but none was found for "
                f"{missing}; use --expert-prefetch none or predictor for this model"
            )
        group.lookahead = LookaheadPredictor([weights[name] for name in group.layer_names], group.top_k)
    elif offload.prefetch == "predictor":
        # The front end checked this file against the model (startup.check_predictor).
        group.predictor = RoutingPathPredictor.load(offload.predictor_path)


def check_every_moe_layer_offloaded(model) -> None:
    """Never serve silently without offload: every fused-MoE layer of the model must run on an expert cache.

    The front end refuses what it can recognise from the HF config (startup.check_model); this
    catches a model whose MoE layers vLLM builds some other way.
    """
    resident = [
        getattr(module, "layer_name", name) for name, module in model.named_modules()
        if isinstance(module, RoutedExperts)
        and not (isinstance(module, OffloadedRoutedExperts) and module.expert_cache is not None)
    ]
    if resident:
        raise ExpertOffloadConfigError(
            f"expert offload is enabled but {len(resident)} MoE layer(s) would stay fully resident, because vLLM "
            f"built them without the offloaded expert layer: {resident[:4]}. Serve this model without "
            f"--enable-expert-offload"
        )


def _prompt_table(worker, group: ExpertCacheGroup) -> tuple[np.ndarray, int] | None:
    """Each vocabulary token's experts per MoE layer, for the scheduler's predictions of new requests.

    Without a router or an embedding to read, the scheduler falls back to its prefix guess.
    """
    model = worker_model(worker)
    routers = moe_router_weights(model, OffloadedRoutedExperts)
    if any(name not in routers for name in group.layer_names):
        logger.warning("expert-aware scheduling: not every MoE layer's router was found; new requests are "
                       "predicted from earlier ones with the same prompt prefix only")
        return None
    norms = moe_input_norm_weights(model, OffloadedRoutedExperts)
    try:
        embeddings = vocabulary_embeddings(model, worker.vllm_config.model_config.get_vocab_size())
    except (AttributeError, NotImplementedError, TypeError) as exc:
        logger.warning("expert-aware scheduling: no token embeddings (%s); new requests are predicted from "
                       "earlier ones with the same prompt prefix only", exc)
        return None
    predictor = PromptRoutingPredictor.from_weights(
        embeddings, [routers[name] for name in group.layer_names], group.top_k,
        norm_weights=[norms.get(name) for name in group.layer_names],
    )
    return predictor.token_experts, predictor.num_experts


def begin_worker_step(worker, scheduler_output) -> None:
    group = group_of_worker(worker)
    if group is None:
        return
    group.step_tokens = step_total_tokens(scheduler_output)
    if group.recorder is not None:
        group.recorder.begin_step(group.step_tokens)
    if group.predictor is not None:
        for request in step_finished_requests(scheduler_output):
            group.predictor.history.forget(request)
        _predictor_prefetch(group, scheduler_output)
    elif group.pool is not None:
        group.pool.begin_step()  # forecast: the previous step's usage


def _predictor_prefetch(group: ExpertCacheGroup, scheduler_output) -> None:
    """Predict every layer's experts for the step's tokens and prefetch them before the first MoE layer."""
    counts = step_token_counts(scheduler_output)
    if not counts:
        return
    starts = first_positions(scheduler_output)
    requests = list(counts)
    request_ids = np.repeat(np.asarray(requests, dtype=np.str_), [counts[r] for r in requests])
    positions = np.concatenate([np.arange(starts.get(r, 0), starts.get(r, 0) + counts[r]) for r in requests])
    proba = group.predictor.predict_proba(request_ids, positions)  # [T, L, E]
    demand = step_demand(proba)  # [L, E]
    if group.pool is not None:
        group.pool.begin_step(demand)  # ExpertFlowCache prefetches from the forecast itself
        return
    top_k = np.argsort(-proba, axis=2, kind="stable")[..., : group.top_k]  # each token's predicted experts
    for layer, name in enumerate(group.layer_names):
        cache = group.caches.get(name)
        if cache is None:
            continue
        predicted = np.unique(top_k[:, layer, :])
        ranked = predicted[np.argsort(-demand[layer, predicted], kind="stable")]
        cache.prefetch(ranked[: cache.num_slots].tolist())


def end_worker_step(worker, scheduler_output, req_ids: list[str]) -> dict | None:
    group = group_of_worker(worker)
    if group is None:
        return None
    group.step_tokens = None
    if group.recorder is None:
        return None
    image_spans = None
    if group.scheduler_wants_signatures:  # images run in prefill chunks, several tokens at once
        counts = scheduler_output.num_scheduled_tokens
        image_spans = {r: spans for r, n in counts.items() if n > 1 and (spans := request_image_spans(worker, r))}
    signatures = group.recorder.end_step(scheduler_output, req_ids, image_spans)
    if group.predictor is not None and group.recorder.last_step is not None:
        group.predictor.observe(*group.recorder.last_step)
    if not signatures or not group.scheduler_wants_signatures:
        return None
    extra: dict = {SIGNATURES_ATTR: signatures, RESIDENT_ATTR: group.resident_signature()}
    if group.recorder.last_image_signatures:
        extra[IMAGE_SIGNATURES_ATTR] = group.recorder.last_image_signatures
    if group.prompt_table is not None and not group.prompt_table_sent:
        extra[PROMPT_TABLE_ATTR] = group.prompt_table
        group.prompt_table_sent = True
    return extra
