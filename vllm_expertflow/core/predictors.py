"""Routing predictors: which experts a step's tokens will need, layer by layer, before the step runs.

A prediction only decides what the cache loads ahead of time; the model's own router still
decides the routing, so a wrong prediction costs a load, never accuracy.

Step-level predictors (``FrequencyPredictor``, ``HistoryPredictor``, ``RoutingPathPredictor``)
share one contract, driven once per engine step in execution order:

- ``predict_proba(request_ids [T] str, positions [T] int) -> [T, L, E] float32``: the
  probability that each token of the coming step routes to each expert of each MoE layer,
  from what ``observe`` has shown of earlier steps only.
- ``predict(request_ids, positions) -> [T, L, K] int32``: each token's ``top_k`` predicted
  experts per layer.
- ``observe(request_ids, positions, topk_ids [T, L, K])``: the step ran; remember its routing.
- ``reset()``: forget per-request state (learned weights and fitted statistics stay).
- ``fit(traces)``: learn from recorded traces (``docs/trace-format.md``).

What they may look at is what a trace holds before the step: the request id, the token's
position and the routing of the request's earlier steps (``RequestHistory``). None sees the
token itself, so a request's first step (its prefill) is predicted from population
statistics alone.

``LookaheadPredictor`` is the other kind (Mixtral-offloading's speculative loading): inside
a step, the next layers' routers applied to the current hidden state. It needs model
weights and hidden states, so it is not a step-level predictor and is not wired into vLLM.

How well they predict is measured in ``core/predictor_eval.py``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vllm_expertflow.core.trace import RoutingTrace

# Log2 buckets of the token's position: 0, 1, 2-3, 4-7, ..., >= 1024. Routing drifts with
# the position mostly early in a request, so coarse buckets late are enough.
POSITION_BUCKETS = 12


def position_buckets(positions: np.ndarray) -> np.ndarray:
    """``positions: [T] int`` -> ``[T] int64`` log2 bucket index in ``0..POSITION_BUCKETS-1``."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError(f"positions must be >= 0, got {int(positions.min())}")
    # The bit length of the position: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...
    bits = np.where(positions > 0, np.floor(np.log2(np.maximum(positions, 1))) + 1, 0).astype(np.int64)
    return np.minimum(bits, POSITION_BUCKETS - 1)


def multi_hot(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``topk_ids: [T, L, K]`` expert ids -> ``[T, L, E] float32``, 1 where a token routed to the expert."""
    topk_ids = np.asarray(topk_ids)
    out = np.zeros((*topk_ids.shape[:2], num_experts), dtype=np.float32)
    np.put_along_axis(out, topk_ids.astype(np.int64), 1.0, axis=2)
    return out


class RequestHistory:
    """Per-request summaries of earlier steps' routing: every step-level predictor's input.

    For each request it keeps ``[L, E]`` float32 arrays:
    ``last``: multi-hot of the request's latest token at its latest step (a decode token's
    previous token); ``ema``: the mean routing of each step, averaged with weight
    ``ema_decay`` on the past (the request's expert affinity); ``first``: the mean routing of
    the request's first step (its prefill, or its first chunk), a summary of the prompt.
    """

    def __init__(self, num_layers: int, num_experts: int, ema_decay: float = 0.7) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.ema_decay = ema_decay
        self._state: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # id -> (last, ema, first)

    def reset(self) -> None:
        self._state.clear()

    def forget(self, request_id: str) -> None:
        """Drop a finished request (live use: a trace never says when a request ends)."""
        self._state.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._state

    def gather(self, request_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per token: ``known [T] bool`` and ``last, ema, first: [T, L, E] float32`` (zeros when unknown)."""
        shape = (len(request_ids), self.num_layers, self.num_experts)
        known = np.zeros(len(request_ids), dtype=bool)
        last, ema, first = (np.zeros(shape, dtype=np.float32) for _ in range(3))
        for i, request in enumerate(request_ids):
            state = self._state.get(str(request))
            if state is not None:
                known[i] = True
                last[i], ema[i], first[i] = state
        return known, last, ema, first

    def observe(self, request_ids: Sequence[str], positions: np.ndarray, topk_ids: np.ndarray) -> None:
        """Fold one step's routing (``topk_ids: [T, L, K]``) into its requests' summaries."""
        requests = np.asarray([str(r) for r in request_ids])
        if requests.size == 0:
            return
        hot = multi_hot(topk_ids, self.num_experts)
        positions = np.asarray(positions)
        names, inverse = np.unique(requests, return_inverse=True)
        for index, name in enumerate(names):
            rows = np.flatnonzero(inverse == index)
            mean = hot[rows].mean(axis=0)
            last = hot[rows[np.argmax(positions[rows])]]
            state = self._state.get(str(name))
            if state is None:
                self._state[str(name)] = (last, mean, mean)
            else:
                _, ema, first = state
                self._state[str(name)] = (last, self.ema_decay * ema + (1.0 - self.ema_decay) * mean, first)


class StepPredictor:
    """Base of the step-level predictors; see the module docstring for the contract."""

    name = ""

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"need num_layers >= 1, num_experts >= 1 and top_k in 1..num_experts; got num_layers={num_layers}, "
                f"num_experts={num_experts}, top_k={top_k}"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.history = RequestHistory(num_layers, num_experts)
        # Routing counts per layer over everything fitted or observed; starts uniform (1 each).
        self._counts = np.ones((num_layers, num_experts), dtype=np.float64)

    def check_trace(self, trace: RoutingTrace) -> None:
        """Raise if ``trace`` has another shape of routing than this predictor was built for."""
        if (trace.num_layers, trace.num_experts, trace.top_k) != (self.num_layers, self.num_experts, self.top_k):
            raise ValueError(
                f"{self.name} predictor is for {self.num_layers} layers x {self.num_experts} experts, top_k "
                f"{self.top_k}, but the trace has {trace.num_layers} x {trace.num_experts}, top_k {trace.top_k}"
            )

    def reset(self) -> None:
        self.history.reset()

    def fit(self, traces: Iterable[RoutingTrace]) -> None:
        """Base statistics: each layer's expert frequency over the traces."""
        for trace in traces:
            self.check_trace(trace)
            self._counts += multi_hot(trace.topk_ids, self.num_experts).sum(axis=0)

    def frequency(self) -> np.ndarray:
        """``[L, E]``: the share of routings each expert got, per layer (rows sum to 1)."""
        return self._counts / self._counts.sum(axis=1, keepdims=True)

    def predict_proba(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[T, L, K] int32``: each token's ``top_k`` most probable experts per layer (ties: lower id)."""
        proba = self.predict_proba(request_ids, positions)
        return np.argsort(-proba, axis=2, kind="stable")[..., : self.top_k].astype(np.int32)

    def observe(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray, topk_ids: np.ndarray) -> None:
        topk_ids = np.asarray(topk_ids)
        self._counts += multi_hot(topk_ids, self.num_experts).sum(axis=0)
        self.history.observe(request_ids, np.asarray(positions), topk_ids)


class FrequencyPredictor(StepPredictor):
    """Trivial baseline: every token gets each layer's most frequent experts (what a static cache assumes)."""

    name = "frequency"

    def predict_proba(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        # k * share is the expected routings per token; clipped, it reads as a probability.
        proba = np.minimum(self.top_k * self.frequency(), 1.0).astype(np.float32)
        return np.broadcast_to(proba, (len(request_ids), *proba.shape)).copy()


class HistoryPredictor(StepPredictor):
    """A token routes as its request's previous token did; a new request gets the frequency top-k.

    Probabilities are calibrated online: an expert of the previous step recurs with the
    measured per-layer repeat rate, and the rest of the ``top_k`` expected routings are
    spread over the other experts by frequency. ``predict`` returns the previous step's
    experts exactly.
    """

    name = "history"

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        super().__init__(num_layers, num_experts, top_k)
        # Per layer: how many previous-step experts recurred, out of how many were carried over.
        # Starts at 1 / 2: an uninformed prior worth two observations.
        self._repeated = np.ones(num_layers)
        self._carried = np.full(num_layers, 2.0)

    def repeat_rate(self) -> np.ndarray:
        """``[L]``: the probability that an expert of a request's previous token is routed again."""
        return self._repeated / self._carried

    def fit(self, traces: Iterable[RoutingTrace]) -> None:
        for trace in traces:
            super().fit([trace])
            self.history.reset()
            for start, end in trace.step_bounds():
                self._count_repeats(trace.request_id[start:end], trace.topk_ids[start:end])
                self.history.observe(trace.request_id[start:end], trace.position[start:end], trace.topk_ids[start:end])
            self.history.reset()

    def observe(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray, topk_ids: np.ndarray) -> None:
        self._count_repeats(request_ids, np.asarray(topk_ids))
        super().observe(request_ids, positions, topk_ids)

    def _count_repeats(self, request_ids: Sequence[str], topk_ids: np.ndarray) -> None:
        known, last, _, _ = self.history.gather(request_ids)
        if known.any():
            hot = multi_hot(topk_ids[known], self.num_experts)
            self._repeated += (hot * last[known]).sum(axis=(0, 2))
            self._carried += last[known].sum(axis=(0, 2))

    def predict_proba(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        known, last, _, _ = self.history.gather(request_ids)
        share = self.frequency()[None]  # [1, L, E]
        unknown = np.minimum(self.top_k * share, 1.0)
        repeat = self.repeat_rate()[None, :, None]
        # Expected routings left for the other experts, spread over them by frequency.
        others = share * (1.0 - last)
        others = others / np.maximum(others.sum(axis=2, keepdims=True), 1e-12)
        carried = np.minimum(last * repeat + (1.0 - last) * self.top_k * (1.0 - repeat) * others, 1.0)
        return np.where(known[:, None, None], carried, unknown).astype(np.float32)

    def predict(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        known, last, _, _ = self.history.gather(request_ids)
        ranked = super().predict(request_ids, positions)
        # Previous-step experts first, whatever the calibrated rate says about frequent others.
        carried = np.argsort(-last, axis=2, kind="stable")[..., : self.top_k].astype(np.int32)
        return np.where(known[:, None, None], carried, ranked)


class RoutingPathNet(nn.Module):
    """``x: [T, F]`` features (``RoutingPathPredictor.features``) -> ``[T, L * E]`` routing logits.

    A learned per-(layer, expert) weight on the request's previous-token, average and
    prefill routing, plus an MLP over all features for what crosses experts and layers
    (co-routing, layer-to-layer paths, position). The direct weights start where
    ``HistoryPredictor`` stands (previous experts likely, the rest at the base rate) and
    the MLP's output starts at zero, so training begins from the history baseline instead
    of relearning an identity map from a few thousand tokens.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, hidden: int) -> None:
        super().__init__()
        self.width = num_layers * num_experts
        self.mlp = nn.Sequential(
            nn.Linear(1 + 3 * self.width + POSITION_BUCKETS, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, self.width),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        base_rate = top_k / num_experts
        nn.init.constant_(self.mlp[-1].bias, float(np.log(base_rate / (1.0 - base_rate))) if base_rate < 1 else 0.0)
        # Rows: previous token, average over steps, prefill; logit units.
        self.direct = nn.Parameter(torch.tensor([[4.0], [2.0], [0.0]]).repeat(1, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = x[:, 1 : 1 + 3 * self.width].reshape(-1, 3, self.width)
        return self.mlp(x) + (routing * self.direct).sum(dim=1)


class RoutingPathPredictor(StepPredictor):
    """A small learned routing-path predictor in the spirit of ExpertFlow's RPP (an MLP, not a T5).

    One forward pass per step predicts every layer's experts for every token of the step
    (``[T, L, E]``), trained with per-layer, per-expert binary cross-entropy
    (``RoutingPathNet``: direct weights on the request's routing history plus an MLP,
    about 51k parameters for 4 layers x 16 experts, 3.2M for 48 x 128). Features, all
    known before the step's first MoE layer (see ``RequestHistory``): whether the request
    was seen before, its previous token's routing, its routing average over earlier steps,
    its first step's (prefill's) mean routing, and the token's log2 position bucket. It does
    not see the token id or the hidden state (ExpertFlow's RPP reads the input tokens), so
    a request's prefill is predicted from the position alone.
    """

    name = "learned"

    def __init__(
        self, num_layers: int, num_experts: int, top_k: int, *, hidden: int = 128, ema_decay: float = 0.7, seed: int = 0
    ) -> None:
        super().__init__(num_layers, num_experts, top_k)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.history = RequestHistory(num_layers, num_experts, ema_decay)
        torch.manual_seed(seed)
        self.model = RoutingPathNet(num_layers, num_experts, top_k, hidden)
        self.model.eval()

    def features(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[T, 1 + 3 * L * E + POSITION_BUCKETS] float32``, from the request history as it stands."""
        known, last, ema, first = self.history.gather(request_ids)
        count = len(request_ids)
        buckets = np.zeros((count, POSITION_BUCKETS), dtype=np.float32)
        buckets[np.arange(count), position_buckets(np.asarray(positions))] = 1.0
        flat = [a.reshape(count, -1) for a in (last, ema, first)]
        return np.concatenate([known[:, None].astype(np.float32), *flat, buckets], axis=1)

    def predict_proba(self, request_ids: Sequence[str], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        if len(request_ids) == 0:
            return np.zeros((0, self.num_layers, self.num_experts), dtype=np.float32)
        x = torch.from_numpy(self.features(request_ids, positions))
        with torch.no_grad():
            logits = self.model(x)
        return torch.sigmoid(logits).numpy().reshape(len(request_ids), self.num_layers, self.num_experts)

    def dataset(self, traces: Iterable[RoutingTrace]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay ``traces`` step by step: ``x [N, F]`` features before each step, ``y [N, L * E]`` routing."""
        xs, ys = [], []
        for trace in traces:
            self.check_trace(trace)
            self.history.reset()
            for start, end in trace.step_bounds():
                requests, positions, ids = (
                    trace.request_id[start:end],
                    trace.position[start:end],
                    trace.topk_ids[start:end],
                )
                xs.append(self.features(requests, positions))
                ys.append(multi_hot(ids, self.num_experts).reshape(end - start, -1))
                self.history.observe(requests, positions, ids)
        self.history.reset()
        if not xs:
            raise ValueError("no tokens to learn from: every trace given to fit is empty")
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def fit(
        self,
        traces: Iterable[RoutingTrace],
        *,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> list[float]:
        """Train on ``traces``; returns the mean BCE loss of each epoch."""
        traces = list(traces)
        super().fit(traces)
        x, y = self.dataset(traces)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        losses = []
        self.model.train()
        # A model this small trains fastest on one thread; more only contend on a shared CPU.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=generator)
                total = 0.0
                for batch in order.split(batch_size):
                    loss = loss_fn(self.model(x[batch]), y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                losses.append(total / len(x))
        finally:
            torch.set_num_threads(threads)
            self.model.eval()
        return losses

    def save(self, path: str | os.PathLike[str]) -> None:
        config = {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden": self.hidden,
            "ema_decay": self.history.ema_decay,
        }
        torch.save({"kind": self.name, "config": config, "state_dict": self.model.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingPathPredictor:
        # weights_only: a predictor file is data, and unpickling arbitrary objects could run code.
        try:
            saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is not a saved routing predictor (RoutingPathPredictor.save): {e}") from None
        if not isinstance(saved, dict) or saved.get("kind") != cls.name:
            raise ValueError(f"{path} is not a saved {cls.name} routing predictor (RoutingPathPredictor.save)")
        predictor = cls(**saved["config"])
        predictor.model.load_state_dict(saved["state_dict"])
        return predictor


class LookaheadPredictor:
    """Speculative routing: the next layers' routers applied to the current layer's hidden state.

    Residual streams change little from one layer to the next, so layer ``l + d``'s router on
    layer ``l``'s input approximates layer ``l + d``'s routing (Mixtral-offloading's
    speculative loading). ``router_weights[l]: [E, H]``, the gate of MoE layer ``l``
    (``logits = hidden @ W.T``).
    """

    def __init__(self, router_weights: Sequence[torch.Tensor], top_k: int) -> None:
        if not router_weights:
            raise ValueError("router_weights is empty; give one [num_experts, hidden] gate matrix per MoE layer")
        shape = tuple(router_weights[0].shape)
        for layer, weight in enumerate(router_weights):
            if weight.ndim != 2 or tuple(weight.shape) != shape:
                raise ValueError(f"router_weights[{layer}] has shape {tuple(weight.shape)}; every gate must be {shape}")
        if not 1 <= top_k <= shape[0]:
            raise ValueError(f"top_k must be in 1..{shape[0]} (experts per layer), got {top_k}")
        self.weights = [w.detach().float() for w in router_weights]
        self.num_layers = len(router_weights)
        self.num_experts, self.hidden_size = shape
        self.top_k = top_k

    def predict_proba(self, hidden_states: torch.Tensor, layer: int) -> torch.Tensor:
        """``hidden_states: [T, H]`` -> ``[T, E] float32``, softmax of ``layer``'s router on them."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if hidden_states.ndim != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [num_tokens, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        return torch.softmax(hidden_states.float() @ self.weights[layer].T, dim=-1)

    def predict(self, hidden_states: torch.Tensor, from_layer: int, lookahead: int = 1) -> torch.Tensor:
        """``[T, n, K] int32``: layers ``from_layer + 1 .. from_layer + lookahead``'s top_k on ``hidden_states``.

        ``n`` is ``lookahead`` cut at the last layer (0 past it).
        """
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 layers, got {lookahead}")
        layers = range(from_layer + 1, min(from_layer + 1 + lookahead, self.num_layers))
        if not 0 <= from_layer < self.num_layers:
            raise ValueError(f"from_layer {from_layer} out of range 0..{self.num_layers - 1}")
        picks = [torch.topk(self.predict_proba(hidden_states, layer), self.top_k, dim=-1).indices for layer in layers]
        if not picks:
            return torch.zeros((hidden_states.shape[0], 0, self.top_k), dtype=torch.int32)
        return torch.stack(picks, dim=1).to(torch.int32)


class PromptRoutingPredictor:
    """A new request's experts before its first step: every MoE layer's router on its prompt tokens' embeddings.

    ExpertFlow predicts routing from the input before the first MoE layer. A request that has
    not run yet has no hidden states, only token ids, so each vocabulary token's experts are
    computed once: layer ``l``'s router applied to the token's embedding, scaled by the
    layer's MoE input norm weight (the RMS scale does not change a top-k). Exact for what a
    token alone would route to at the first MoE layer; deeper layers drift as attention mixes
    the tokens (``benchmarks/token_scheduling.py`` reports the precision). Image placeholders
    carry no content here: the scheduler leaves their positions out and predicts them from the
    routing of earlier requests with the same image.

    ``token_experts: [vocab, moe_layers, top_k]`` int, global expert ids.
    """

    def __init__(self, token_experts: np.ndarray, num_experts: int) -> None:
        token_experts = np.asarray(token_experts)
        if token_experts.ndim != 3 or not np.issubdtype(token_experts.dtype, np.integer):
            raise ValueError(
                f"token_experts must be int [vocab, moe_layers, top_k], got {token_experts.dtype} "
                f"{list(token_experts.shape)}"
            )
        if token_experts.size and not 0 <= int(token_experts.min()) <= int(token_experts.max()) < num_experts:
            raise ValueError(f"token_experts holds ids outside 0..{num_experts - 1}")
        self.token_experts = token_experts
        self.num_experts = num_experts

    @property
    def vocab_size(self) -> int:
        return self.token_experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.token_experts.shape[1]

    @classmethod
    def from_weights(
        cls,
        embeddings: torch.Tensor,
        router_weights: Sequence[torch.Tensor],
        top_k: int,
        norm_weights: Sequence[torch.Tensor | None] | None = None,
        chunk: int = 8192,
    ) -> PromptRoutingPredictor:
        """``embeddings: [vocab, H]``; ``router_weights[l]: [E, H]`` (``logits = x @ W.T``);
        ``norm_weights[l]: [H]``, the elementwise weight of the RMS norm before MoE layer ``l`` (None: ones)."""
        if not router_weights:
            raise ValueError("router_weights is empty; give one [num_experts, hidden] gate matrix per MoE layer")
        num_experts, hidden = router_weights[0].shape
        if embeddings.ndim != 2 or embeddings.shape[1] != hidden:
            raise ValueError(f"embeddings must be [vocab, {hidden}], got {tuple(embeddings.shape)}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (experts per layer), got {top_k}")
        norms = list(norm_weights) if norm_weights is not None else [None] * len(router_weights)
        if len(norms) != len(router_weights):
            raise ValueError(f"{len(norms)} norm weights for {len(router_weights)} router weights")
        dtype = np.uint8 if num_experts <= 256 else np.int32
        table = np.empty((embeddings.shape[0], len(router_weights), top_k), dtype=dtype)
        with torch.no_grad():
            for start in range(0, embeddings.shape[0], chunk):
                rows = embeddings[start : start + chunk].float()
                for layer, (weight, norm) in enumerate(zip(router_weights, norms, strict=True)):
                    x = rows if norm is None else rows * norm.float().to(rows.device)
                    logits = x @ weight.float().to(rows.device).T
                    picks = torch.topk(logits, top_k, dim=-1).indices
                    table[start : start + chunk, layer] = picks.cpu().numpy().astype(dtype)
        return cls(table, num_experts)

    def predict(self, token_ids: Sequence[int] | np.ndarray):
        """The union of the tokens' experts per layer (``ExpertSignature``); ids outside the vocabulary are skipped."""
        from vllm_expertflow.core.grouping import ExpertSignature

        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        ids = np.unique(ids[(ids >= 0) & (ids < self.vocab_size)])
        picks = self.token_experts[ids].transpose(1, 0, 2).reshape(self.num_layers, -1)  # [L, tokens * K]
        mask = np.zeros((self.num_layers, self.num_experts), dtype=np.bool_)
        if picks.size:
            np.put_along_axis(mask, picks.astype(np.int64), True, axis=1)
        return ExpertSignature.from_mask(mask)


def signature_precision_recall(predicted, actual) -> tuple[float, float]:
    """How well a predicted expert set matched the used one, pooled over layers: ``(precision, recall)``.

    Both are ``ExpertSignature`` s of one shape; an empty prediction has precision 1 (it claimed
    nothing wrong) and recall 0 unless nothing was used.
    """
    from vllm_expertflow.core.grouping import ExpertSignature

    hit = int(ExpertSignature(predicted.words & actual.words, actual.num_experts).layer_counts().sum())
    claimed = int(predicted.layer_counts().sum())
    used = int(actual.layer_counts().sum())
    return (hit / claimed if claimed else 1.0), (hit / used if used else 1.0)


PREDICTORS: dict[str, type[StepPredictor]] = {
    cls.name: cls for cls in (FrequencyPredictor, HistoryPredictor, RoutingPathPredictor)
}


def make_predictor(spec: str | StepPredictor, trace: RoutingTrace) -> StepPredictor:
    """A predictor for ``trace``: a name (``frequency``, ``history``), a saved learned predictor's path, or one built.

    Named predictors start empty and learn online from the steps they observe.
    """
    if isinstance(spec, StepPredictor):
        predictor = spec
    elif spec in ("frequency", "history"):
        predictor = PREDICTORS[spec](trace.num_layers, trace.num_experts, trace.top_k)
    elif os.path.isfile(spec):
        predictor = RoutingPathPredictor.load(spec)
    else:
        raise ValueError(
            f"unknown predictor {spec!r}; valid choices are 'frequency', 'history', or the path of a file written by "
            f"RoutingPathPredictor.save (scripts/train_predictor.py)"
        )
    predictor.check_trace(trace)
    return predictor


def step_demand(proba: np.ndarray) -> np.ndarray:
    """``proba: [T, L, E]`` per-token probabilities -> ``[L, E]``: P(the step needs the expert at all).

    Treats the step's tokens as independent: ``1 - prod_tokens(1 - p)``.
    """
    return 1.0 - np.prod(1.0 - np.asarray(proba, dtype=np.float64), axis=0)


@dataclasses.dataclass(frozen=True)
class DemandForecast:
    """A step-level predictor's demand forecast for every step of one trace, computed once.

    The forecast depends on the trace alone, never on a cache, so one forecast serves a
    replay at every capacity and budget mode (``simulate(..., predictor=forecast)``).
    """

    predictor: str  # the predictor's name
    demand: np.ndarray  # [num_steps, L, E] float64: P(step needs (layer, expert)), from earlier steps only

    @classmethod
    def of(cls, predictor: StepPredictor, trace: RoutingTrace) -> DemandForecast:
        """Replay ``trace`` through ``predictor`` (its request state reset before and after)."""
        predictor.check_trace(trace)
        predictor.reset()
        demand = np.zeros((trace.num_steps, trace.num_layers, trace.num_experts))
        for index, (start, end) in enumerate(trace.step_bounds()):
            requests, positions = trace.request_id[start:end], trace.position[start:end]
            demand[index] = step_demand(predictor.predict_proba(requests, positions))
            predictor.observe(requests, positions, trace.topk_ids[start:end])
        predictor.reset()
        return cls(predictor.name, demand)
