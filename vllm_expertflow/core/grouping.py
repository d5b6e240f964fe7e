"""Expert-aware grouping: which requests share an engine step, so the step touches few experts.

Every expert a step routes to must sit in the layer's slot cache while the step runs; a
step whose requests agree on their experts loads less. ExpertFlow's Token Scheduler
re-splits two batches by the Hamming similarity of their tokens' expert bit-vectors
(``core/two_way_split.py``, kept for the benchmarks' comparison). Inside vLLM the batch is
the set of running requests, so ``ExpertAwareGrouper`` picks, once per step, the subset of running requests whose
expert union is small, under three guarantees the caller can rely on:

* fairness: no running request sits out more than ``max_skip_steps`` consecutive steps;
* priority: a request is never left out while a strictly less urgent one is scheduled;
* throughput: at least ``min_fraction`` of the running requests run every step.

numpy, never vLLM (torch tensors are accepted where ids come in, without importing torch);
the per-step search loops are compiled (``bit_kernels``, numba). The vLLM scheduler adapter
calls it on the CPU once per step.
Bit layout shared by everything here: a signature is ``words: [moe_layers, W] uint64``
with ``W = ceil(num_experts / 64)``; expert ``e`` of a layer is bit ``e % 64`` of word
``e // 64``, so a popcount over a layer's words counts its experts.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

_WORD_BITS = 64

if hasattr(np, "bitwise_count"):  # numpy >= 2.0
    _popcount = np.bitwise_count
else:  # pragma: no cover - older numpy: per-byte lookup table
    _BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)

    def _popcount(words: np.ndarray) -> np.ndarray:
        as_bytes = _BYTE_BITS[np.ascontiguousarray(words).view(np.uint8)]
        return as_bytes.reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint8)


@functools.cache
def _kernels() -> Any:
    """The compiled search loops (``bit_kernels``), imported on first use.

    numba costs about half a second to import, and a worker that only packs signatures never
    searches; compiling (or loading from numba's on-disk cache) happens here too, at
    scheduler start rather than on the first step that searches.
    """
    from vllm_expertflow.core import bit_kernels

    bit_kernels.compile_all()
    return bit_kernels


def _to_numpy(array: Any) -> np.ndarray:
    # The adapter holds torch tensors (possibly on the GPU); the core must not care.
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _layer_counts(words: np.ndarray) -> np.ndarray:
    """Experts set per layer: ``[..., L, W] uint64 -> [..., L] int32``."""
    bits = _popcount(words)
    # A Python loop over the few words beats a numpy reduction over a tiny last axis.
    counts = bits[..., 0].astype(np.int32)
    for w in range(1, bits.shape[-1]):
        counts += bits[..., w]
    return counts


def _total_counts(words: np.ndarray) -> np.ndarray:
    """Experts set over all layers: ``[k, L, W] or [k, L * W] uint64 -> [k] int64``."""
    # An int32 sum of the per-word counts costs half an int64 one; no row holds 2**31 bits.
    return _popcount(words.reshape(len(words), -1)).sum(axis=1, dtype=np.int32).astype(np.int64)


class ExpertSignature:
    """Which experts a request used, per MoE layer, as a packed bit matrix.

    ``words: [moe_layers, ceil(num_experts / 64)] uint64`` (see the module docstring for the
    bit layout). For a running request it is the union over the tokens of its last step; for
    a new request a prediction (e.g. ExpertFlow's routing path predictor). Packed once when
    built, so the grouper never touches a boolean matrix per step.
    """

    __slots__ = ("words", "num_experts")

    def __init__(self, words: np.ndarray, num_experts: int) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        num_words = -(-num_experts // _WORD_BITS)
        if words.dtype != np.uint64 or words.ndim != 2 or words.shape[1] != num_words:
            raise ValueError(
                f"words must be uint64 [moe_layers, {num_words}] for {num_experts} experts, "
                f"got {words.dtype} {list(words.shape)}"
            )
        self.words = words
        self.num_experts = num_experts

    @classmethod
    def from_mask(cls, mask: Any) -> ExpertSignature:
        """``mask: [moe_layers, num_experts] bool``, True where the expert was used."""
        mask = _to_numpy(mask)
        if mask.ndim != 2 or mask.dtype != np.bool_:
            raise ValueError(f"mask must be bool [moe_layers, num_experts], got {mask.dtype} {list(mask.shape)}")
        return cls(_pack(mask), mask.shape[1])

    @classmethod
    def from_topk_ids(cls, topk_ids: Any, num_experts: int) -> ExpertSignature:
        """Union over tokens of ``topk_ids: [tokens, moe_layers, top_k]`` int, global expert ids.

        Negative ids are skipped: vLLM marks experts that are not on this rank with -1.
        """
        ids = _to_numpy(topk_ids)
        return cls.from_batch_topk_ids(ids, [len(ids)], num_experts)[0]

    @classmethod
    def from_batch_topk_ids(
        cls, topk_ids: Any, tokens_per_request: Sequence[int], num_experts: int
    ) -> list[ExpertSignature]:
        """One signature per request from a whole step's routing, packed in one pass.

        ``topk_ids: [tokens, moe_layers, top_k]`` int, the step's tokens request by request in
        the order of ``tokens_per_request`` (as vLLM lays out a batch).
        """
        ids = _to_numpy(topk_ids)
        counts = np.asarray(tokens_per_request, dtype=np.int64)
        if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be int [tokens, moe_layers, top_k], got {ids.dtype} {list(ids.shape)}")
        if counts.ndim != 1 or (counts < 0).any() or counts.sum() != len(ids):
            raise ValueError(
                f"tokens_per_request must be non-negative counts summing to the {len(ids)} tokens, "
                f"got {counts.tolist()}"
            )
        if ids.size and ids.max() >= num_experts:
            raise ValueError(f"expert id {int(ids.max())} out of range 0..{num_experts - 1}")
        num_layers = ids.shape[1]
        mask = np.zeros((len(counts), num_layers, num_experts), dtype=np.bool_)
        request = np.repeat(np.arange(len(counts)), counts)[:, None, None]
        layer = np.arange(num_layers)[None, :, None]
        valid = ids >= 0
        mask[np.broadcast_to(request, ids.shape)[valid], np.broadcast_to(layer, ids.shape)[valid], ids[valid]] = True
        words = _pack(mask)
        return [cls(words[r], num_experts) for r in range(len(counts))]

    @property
    def num_layers(self) -> int:
        return self.words.shape[0]

    def to_mask(self) -> np.ndarray:
        """``[moe_layers, num_experts] bool``."""
        as_bytes = np.ascontiguousarray(self.words).astype("<u8").view(np.uint8)
        return np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, : self.num_experts].astype(np.bool_)

    def layer_counts(self) -> np.ndarray:
        """Distinct experts per layer, ``[moe_layers] int32``."""
        return _layer_counts(self.words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertSignature):
            return NotImplemented
        return self.num_experts == other.num_experts and np.array_equal(self.words, other.words)

    __hash__ = None  # type: ignore[assignment]  # mutable array inside

    def __repr__(self) -> str:
        return f"ExpertSignature(layers={self.num_layers}, experts={self.num_experts}, set={int(self.layer_counts().sum())})"


def _pack(mask: np.ndarray) -> np.ndarray:
    """``[..., E] bool -> [..., ceil(E / 64)] uint64`` in the module's bit layout."""
    num_words = -(-mask.shape[-1] // _WORD_BITS)
    packed = np.packbits(mask, axis=-1, bitorder="little")
    pad = num_words * 8 - packed.shape[-1]
    if pad:
        packed = np.concatenate([packed, np.zeros((*packed.shape[:-1], pad), dtype=np.uint8)], axis=-1)
    # Little-endian words make bit e of the byte stream bit e % 64 of word e // 64.
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def _as_words(signature: ExpertSignature | np.ndarray) -> ExpertSignature:
    if isinstance(signature, ExpertSignature):
        return signature
    return ExpertSignature.from_mask(signature)


_WORDS = operator.attrgetter("words")
_NUM_EXPERTS = operator.attrgetter("num_experts")


def _stack_words(signatures: Sequence[ExpertSignature | np.ndarray] | np.ndarray) -> tuple[np.ndarray, int]:
    """Signatures as ``[n, L, W] uint64`` (read-only) plus ``num_experts``; all must share one shape."""
    if isinstance(signatures, np.ndarray):
        if signatures.dtype != np.bool_ or signatures.ndim not in (2, 3):
            raise ValueError(
                "signatures must be bool [n, moe_layers, num_experts] or [n, bits], "
                f"got {signatures.dtype} {list(signatures.shape)}"
            )
        mask = signatures if signatures.ndim == 3 else signatures[:, None, :]
        return _pack(mask), mask.shape[2]
    try:  # the common case, all packed already: no per-item isinstance
        words = list(map(_WORDS, signatures))
    except AttributeError:
        signatures = [s if isinstance(s, ExpertSignature) else ExpertSignature.from_mask(s) for s in signatures]
        words = [s.words for s in signatures]
    if not words:
        return np.zeros((0, 1, 1), dtype=np.uint64), 1
    # ExpertSignature fixes W by num_experts, so equal experts and layer counts mean equal shapes.
    layers = set(map(len, words))
    experts = set(map(_NUM_EXPERTS, signatures))
    if len(layers) > 1 or len(experts) > 1:
        raise ValueError(
            f"signatures must all cover the same moe_layers and num_experts, got layers {sorted(layers)}, "
            f"experts {sorted(experts)}"
        )
    num_layers, num_words = words[0].shape
    try:  # joining the raw buffers costs half a concatenate of hundreds of small arrays
        stacked = np.frombuffer(b"".join(words), dtype=np.uint64)
    except (BufferError, TypeError):  # a signature whose words are a strided view
        stacked = np.concatenate(words)
    return stacked.reshape(len(words), num_layers, num_words), experts.pop()


@dataclasses.dataclass(frozen=True)
class RequestView:
    """What the grouper needs to know of one request; the adapter builds it from vLLM's Request.

    ``signature``: the experts of its last step, a prediction, or None when unknown (a new
    request); a bool ``[moe_layers, num_experts]`` array is accepted and packed on the fly.
    ``num_tokens``: tokens it wants this step (1 for decode, the chunk length for prefill).
    """

    request_id: str
    priority: int = 0  # lower is more urgent, as in vLLM
    arrival_time: float = 0.0
    signature: ExpertSignature | np.ndarray | None = None
    num_tokens: int = 1


# One C-level call per view: select reads these five fields of every running request each step.
_VIEW_FIELDS = operator.attrgetter("priority", "arrival_time", "request_id", "num_tokens", "signature")


@dataclasses.dataclass(frozen=True)
class GroupingConfig:
    # Slots per MoE layer; a step extends past min_fraction only while its union fits.
    # None: unlimited (every running request runs, as without grouping).
    capacity: int | None
    # K: a running request sits out at most K consecutive steps; 0 disables grouping.
    max_skip_steps: int = 2
    # At least ceil(min_fraction * running) requests run each step, whatever their experts.
    min_fraction: float = 0.5
    # Hold requests back only if the chosen ones' excess over the slots (distinct experts beyond
    # ``capacity``, summed over layers) is at most this fraction of everyone's. Experts beyond the
    # slots run in passes that reload experts anyway; splitting such a step over two steps then
    # loads shared experts twice, so unless holding back removes most of the excess, everyone
    # runs (as FCFS would). 0: only when the chosen ones fit; None: always hold back.
    max_overflow_ratio: float | None = 0.25

    def __post_init__(self) -> None:
        if self.capacity is not None and (not isinstance(self.capacity, (int, np.integer)) or self.capacity < 1):
            raise ValueError(f"capacity must be a slot count >= 1 or None (unlimited), got {self.capacity!r}")
        if not isinstance(self.max_skip_steps, (int, np.integer)) or self.max_skip_steps < 0:
            raise ValueError(f"max_skip_steps must be an int >= 0, got {self.max_skip_steps!r}")
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction!r}")
        if self.max_overflow_ratio is not None and not 0.0 <= self.max_overflow_ratio <= 1.0:
            raise ValueError(f"max_overflow_ratio must be in [0, 1] or None, got {self.max_overflow_ratio!r}")


# Exact greedy (one request per pick, re-scored each time) costs ~n passes over the pool; instead each
# round re-scores the pool against the grown union and grows the selection at most _GROWTH-fold
# (plus every request that adds nothing), so the first picks stay close to the seed and 256
# requests take ~3 rounds. Batches ignore what their members share, so up to _SWAP_ROUNDS rounds
# of swaps follow (a chosen request whose experts nobody else chosen uses, for a left-out one
# that adds fewer): on clustered decode traffic this matches exact greedy. Past the minimum,
# rounds add only requests that fit the slots; _MAX_EXTEND_ROUNDS bounds them.
_GROWTH = 8
_SWAP_ROUNDS = 2
_MAX_EXTEND_ROUNDS = 3
# When holding requests back did not pay, the next search waits 1, 2, 4, ... up to this many steps.
_MAX_BACKOFF_STEPS = 8


class ExpertAwareGrouper:
    """Chooses each step's requests so the step's expert working set stays small.

    Per step: requests at the skip limit, and every request more urgent than the least
    urgent priority that must run, are mandatory (without any, the longest-waiting request
    of the cutoff level seeds the step); then requests of the cutoff level join cheapest
    first (fewest experts new to the step's per-layer union; ties by priority, arrival, id)
    until ``min_fraction`` run, a few swaps trade chosen requests with experts of their own
    for cheaper left-out ones, and further requests join while the union fits ``capacity``
    slots per layer. Unknown signatures add no experts, so they join whenever their level does.

    Cache-aware: given the experts the slots hold now (``resident``), a request's cost is the
    experts it would make the step *load*, not the ones it uses: requests served by the
    resident set run together, and a group keeps running while the fairness limit lets the
    others wait, so one group's loads serve several steps instead of being evicted by the
    next group's.

    One instance per scheduler; it keeps a skip counter per request id (consecutive steps
    left out). Call ``select`` once per step and ``forget`` when a request finishes.
    """

    def __init__(self, config: GroupingConfig) -> None:
        self.config = config
        self._skips: dict[str, int] = {}
        # Waiting requests: consecutive admissions in which a later arrival was admitted before them.
        self._passed_over: dict[str, int] = {}
        self._last_step: int | None = None
        # Union of the known signatures of the last selection: what the slots hold next.
        self.last_union: ExpertSignature | None = None
        # Steps left in which everyone runs without a search, after holding back did not pay.
        self._backoff_steps = 0
        self._backoff_length = 0
        # Whether the last select searched for a group (False while backing off): searching steps cost more.
        self.last_searched = False
        if config.max_skip_steps > 0:
            _kernels()  # compile now, not in the first step that searches

    def skip_count(self, request_id: str) -> int:
        """Consecutive steps ``request_id`` has been left out (0 if unknown)."""
        return self._skips.get(request_id, 0)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's counters; unknown ids are ignored."""
        self._skips.pop(request_id, None)
        self._passed_over.pop(request_id, None)

    def passed_over_count(self, request_id: str) -> int:
        """Consecutive admissions in which a later arrival overtook waiting ``request_id`` (0 if unknown)."""
        return self._passed_over.get(request_id, 0)

    def everyone_ran(self, request_ids: Sequence[str]) -> None:
        """A step ran every running request (as FCFS would): their skip counters restart."""
        for request_id in request_ids:
            self._skips[request_id] = 0

    def note_admission(self, waiting: Sequence[RequestView], admitted: Sequence[str] | set[str]) -> None:
        """After a step: ``admitted`` of the ``waiting`` requests got in; count who was overtaken.

        A request still waiting while a later arrival of its priority or a less urgent one was
        admitted has been passed over once more; any other outcome resets its count. At
        ``max_skip_steps`` passes it goes first in ``admission_order`` (after more urgent ones).
        """
        admitted = set(admitted)
        keys = [(view.priority, view.arrival_time, view.request_id) for view in waiting if view.request_id in admitted]
        for view in waiting:
            if view.request_id in admitted:
                self._passed_over.pop(view.request_id, None)
                continue
            overtaken = any(
                priority >= view.priority and (arrival, request_id) > (view.arrival_time, view.request_id)
                for priority, arrival, request_id in keys
            )
            self._passed_over[view.request_id] = self._passed_over.get(view.request_id, 0) + 1 if overtaken else 0

    def overflows_alone(self, signature: ExpertSignature | np.ndarray | None, scale: float = 1.0) -> bool:
        """Whether one request's experts alone exceed the slots in at least half of the MoE layers.

        Such a request (a prefill of a long or image prompt) makes its step run in passes that
        reload experts whatever else shares it, and with few slots it touches most experts:
        grouping the others around it cannot save loads, only delay them. Unknown: False.
        ``scale``: expected used experts per predicted one, for a prediction that over- or
        under-claims (1 for a signature that was observed).
        """
        capacity = self.config.capacity
        if signature is None or capacity is None:
            return False
        counts = _as_words(signature).layer_counts() * scale
        return bool(2 * int((counts > capacity).sum()) >= len(counts))

    def select(
        self, running: Sequence[RequestView], step: int, resident: ExpertSignature | np.ndarray | None = None
    ) -> list[str]:
        """The request ids that run at ``step``, in the order they should get the token budget.

        ``resident``: the experts the slots hold before the step (per layer, as a signature),
        or None when unknown; they cost nothing to use.

        Running requests not in the list sit this step out. Order: most urgent priority first;
        within a priority, requests at the skip limit first, then fewest tokens (decodes before
        prefill chunks, so a chunk cannot starve chosen decodes of budget), then pick order.
        ``step`` must increase from call to call: the skip counters count calls.
        """
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase between select calls: got {step} after {self._last_step}")
        n = len(running)
        if n == 0:
            self._last_step, self.last_union, self.last_searched = step, None, False
            return []
        # One pass over the views (per-request Python work dominates the cost at this size),
        # then everything works in rank order: priority, arrival, id. Row i has rank i, so ties
        # anywhere below go to the lower row, and the result ignores the input order.
        fields = list(map(_VIEW_FIELDS, running))
        fields.sort(key=operator.itemgetter(0, 1, 2))
        priorities, _, ids, tokens, signatures = zip(*fields, strict=True)
        if len(set(ids)) != n:
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"request ids must be unique among running requests, repeated: {dupes}")
        if min(tokens) < 1:
            bad = next(i for i, t in enumerate(tokens) if t < 1)
            raise ValueError(f"num_tokens must be >= 1, got {tokens[bad]} for request {ids[bad]!r}")
        priority = np.array(priorities, dtype=np.int64)
        num_tokens = np.array(tokens, dtype=np.int64)
        skips = np.array(list(map(self._skips.get, ids, itertools.repeat(0, n))), dtype=np.int64)
        words, num_experts = self._stack(signatures)
        free = None
        if resident is not None and num_experts:
            resident_words = _as_words(resident).words
            if resident_words.shape != words.shape[1:]:
                raise ValueError(
                    f"resident has words {list(resident_words.shape)}, the running signatures "
                    f"{list(words.shape[1:])}; they must match"
                )
            free = resident_words.reshape(-1)

        chosen = _GreedySelection(words, priority, self.config.capacity, num_experts, free)
        forced = skips >= self.config.max_skip_steps
        self.last_searched = self._backoff_steps == 0
        if not self.last_searched:
            # Grouping did not pay on the last tries: everyone runs, without the search.
            self._backoff_steps -= 1
            chosen.add(np.arange(n))
        else:
            minimum = min(n, max(1, math.ceil(self.config.min_fraction * n - 1e-9)))
            # Cutoff level: the least urgent priority that must run, for the minimum or for a forced
            # request; rows are sorted by priority, so it is the minimum-th row's.
            cutoff = int(priority[minimum - 1])
            if forced.any():
                cutoff = max(cutoff, int(priority[forced].max()))
            mandatory = np.flatnonzero(forced | (priority < cutoff))
            if len(mandatory) == 0:
                # Seed: the longest-waiting request of the cutoff level; with the resident set known,
                # the one that loads least (then longest-waiting), so a resident group keeps running.
                mandatory = np.flatnonzero(priority == cutoff)
                keys = (-skips[mandatory],) if free is None else (-skips[mandatory], chosen.new_experts(mandatory))
                mandatory = mandatory[np.lexsort(keys)][:1]
            else:  # longest-waiting first, so pick order (and the budget order) favours them
                mandatory = mandatory[np.argsort(-skips[mandatory], kind="stable")]
            chosen.add(mandatory)
            chosen.num_fixed = len(mandatory)
            pool = np.flatnonzero((priority == cutoff) & ~chosen.selected)
            pool = chosen.fill(minimum, pool)
            chosen.improve(pool)
            if self._holding_back_pays(chosen):
                chosen.extend(cutoff)
                self._backoff_length = 0
            else:
                chosen.add(np.flatnonzero(~chosen.selected))
                # Try again after 1, 2, 4, ... steps: the same requests rarely start to fit at once.
                self._backoff_length = min(max(1, 2 * self._backoff_length), _MAX_BACKOFF_STEPS)
                self._backoff_steps = self._backoff_length

        picked = chosen.order
        keys = np.lexsort((np.arange(len(picked)), num_tokens[picked], ~forced[picked], priority[picked]))
        result = [ids[i] for i in picked[keys].tolist()]  # Python ints index a tuple fastest
        new_skips = np.where(chosen.selected, 0, skips + 1)
        self._skips.update(zip(ids, new_skips.tolist(), strict=True))
        self._last_step = step  # only now: a call rejected for bad input may be retried
        union = chosen.union.reshape(words.shape[1:])
        self.last_union = ExpertSignature(union, num_experts) if num_experts else None
        return result

    def _holding_back_pays(self, chosen: _GreedySelection) -> bool:
        """Whether the chosen requests' excess over the slots is small enough to leave the others out.

        Checked before ``extend``, which adds only requests that fit and so never changes the excess.
        """
        ratio = self.config.max_overflow_ratio
        if ratio is None or chosen.capacity is None or chosen.selected.all():
            return True
        excess = int(np.maximum(chosen.layer_sizes(chosen.union) - chosen.capacity, 0).sum())
        if excess == 0:
            return True
        excess_all = int(np.maximum(chosen.layer_sizes(chosen.everyone) - chosen.capacity, 0).sum())
        return excess <= ratio * excess_all

    def admission_order(
        self, waiting: Sequence[RequestView], current_union: ExpertSignature | np.ndarray | None
    ) -> list[str]:
        """Waiting request ids ranked for admission: priority first, then expert affinity.

        Within a priority level the head of the line (earliest arrival) stays first, then, in
        arrival order, every request passed over ``max_skip_steps`` times in a row
        (``note_admission``), so a request with unusual experts waits a bounded number of
        admissions; the rest follow by the experts they would add to ``current_union`` (e.g. the
        step's chosen requests and the slots' contents), fewest first, then arrival. An unknown
        signature counts as the level's mean, neither favoured nor held back.
        """
        if not waiting:
            return []
        n = len(waiting)
        known = np.array([r.signature is not None for r in waiting])
        cost = np.zeros(n, dtype=np.float64)
        if known.any():
            words, _ = _stack_words([r.signature for r in waiting if r.signature is not None])  # type: ignore[misc]
            if current_union is not None:
                union = _as_words(current_union)
                if union.words.shape != words.shape[1:]:
                    raise ValueError(
                        f"current_union has words {list(union.words.shape)}, "
                        f"the waiting signatures {list(words.shape[1:])}; they must match"
                    )
                words = words & ~union.words
            cost[known] = _total_counts(words)
        priority = np.array([r.priority for r in waiting], dtype=np.int64)
        for level in np.unique(priority[~known]):
            peers = (priority == level) & known
            cost[(priority == level) & ~known] = cost[peers].mean() if peers.any() else 0.0
        arrival_key = sorted(range(n), key=lambda i: (waiting[i].arrival_time, waiting[i].request_id))
        by_arrival = np.empty(n, dtype=np.int64)
        by_arrival[arrival_key] = np.arange(n)
        head = np.array([self._passed_over.get(r.request_id, 0) >= self.config.max_skip_steps for r in waiting])
        for level in np.unique(priority):
            members = np.flatnonzero(priority == level)
            head[members[np.argmin(by_arrival[members])]] = True
        # Heads rank by arrival alone (cost 0 for them); the rest by cost, then arrival.
        ranking = np.lexsort((by_arrival, np.where(head, 0.0, cost), ~head, priority))
        return [waiting[i].request_id for i in ranking]

    @staticmethod
    def _stack(signatures: Sequence[ExpertSignature | np.ndarray | None]) -> tuple[np.ndarray, int]:
        """``[n, L, W] uint64`` signatures, zeros for unknown ones (they add no experts)."""
        is_known = [s is not None for s in signatures]
        try:
            if all(is_known):
                return _stack_words(signatures)  # type: ignore[arg-type]
            known = list(itertools.compress(signatures, is_known))
            if not known:
                return np.zeros((len(signatures), 1, 1), dtype=np.uint64), 0
            words, num_experts = _stack_words(known)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"running requests' signatures disagree in shape: {error}") from None
        full = np.zeros((len(signatures), *words.shape[1:]), dtype=np.uint64)
        full[np.array(is_known)] = words
        return full, num_experts


class _GreedySelection:
    """The growing selection of one ``select`` call and its expert union (flat ``[L * W]`` words).

    Rows are in rank order (priority, arrival, id), so every tie goes to the lower row.
    ``order`` lists the chosen rows in pick order; its first ``num_fixed`` (the mandatory
    requests, or the seed) are never swapped out.
    """

    def __init__(
        self,
        words: np.ndarray,
        priority: np.ndarray,
        capacity: int | None,
        num_experts: int,
        free: np.ndarray | None = None,
    ) -> None:
        n, self.num_layers, self.num_words = words.shape
        self.flat = words.reshape(n, -1)  # [n, L * W]: whole-signature ops on 2-D arrays are cheapest
        self.priority = priority
        self.capacity = capacity if capacity is not None and capacity < num_experts else None
        self.selected = np.zeros(n, dtype=bool)
        self.order = np.zeros(0, dtype=np.int64)
        self.num_fixed = 0
        self.union = np.zeros(self.flat.shape[1], dtype=np.uint64)
        # Experts already in the slots: using them loads nothing (all zeros: cache-blind).
        self.free = np.zeros_like(self.union) if free is None else free.astype(np.uint64)

    @functools.cached_property
    def everyone(self) -> np.ndarray:
        """Union of all rows, flat ``[L * W]``."""
        return np.bitwise_or.reduce(self.flat, axis=0)

    @functools.cached_property
    def load(self) -> np.ndarray:
        """What each row would load into an empty step (its experts outside the slots): ``[n, L * W] uint64``.

        Every search score is a popcount of loads. Only a search needs it, so a step without
        one does not pay for it.
        """
        return self.flat & (self.everyone & ~self.free)

    def add(self, rows: np.ndarray) -> None:
        """Add ``rows``, none of them selected yet."""
        if len(rows) == 0:
            return
        self.selected[rows] = True
        self.order = np.concatenate([self.order, rows])
        if len(self.order) == len(self.flat):  # everyone now: no gather
            self.union = self.everyone.copy()
        else:
            _kernels().or_rows_into(self.union, self.flat, rows)

    def layer_sizes(self, flat_union: np.ndarray) -> np.ndarray:
        """Distinct experts per layer of a flat union: ``[L * W] -> [L] int64``."""
        return _kernels().layer_counts(flat_union, self.num_layers)

    def new_experts(self, rows: np.ndarray) -> np.ndarray:
        """Experts each row would make the step load: outside the union and the resident set."""
        return _kernels().count_outside(self.load, rows, self.union)

    def fill(self, minimum: int, pool: np.ndarray) -> np.ndarray:
        """Add rows of ``pool`` (one priority level) until ``minimum`` run, cheapest first, slots ignored.

        Returns what is left of the pool. The cutoff level always holds enough requests:
        select() chose it that way.
        """
        if len(self.order) >= minimum:
            return pool
        picked, pool = _kernels().fill_rounds(self.load, self.order, pool, minimum, _GROWTH)
        self.add(picked)
        return pool

    def improve(self, pool: np.ndarray) -> None:
        """Swap chosen requests that alone bring many experts for left-out ones of ``pool`` bringing fewer.

        Only loads count (``bit_kernels.swap_rounds``): a chosen request's own experts are its
        loads no other chosen one has; the objective is the experts the step loads.
        """
        if len(self.order) == self.num_fixed or len(pool) == 0:
            return
        order, _, swapped = _kernels().swap_rounds(self.load, self.order, pool, self.num_fixed, _SWAP_ROUNDS)
        if swapped:
            self.order = order
            self.union = np.bitwise_or.reduce(self.flat[self.order], axis=0)
            self.selected[:] = False
            self.selected[self.order] = True

    def extend(self, cutoff: int) -> None:
        """Past the minimum, add requests while the union fits the slots, one priority level at a time.

        A layer already over capacity (forced or minimum requests) may not grow further, but
        requests that add nothing to it still fit (``bit_kernels.extend_rounds``). A level not
        exhausted ends the extension: its leftovers are more urgent than anything after it.
        """
        rounds = 0
        for level in np.unique(self.priority[self.priority >= cutoff]):
            rows = np.flatnonzero((self.priority == level) & ~self.selected)  # ascending: rank order
            if self.capacity is None:
                self.add(rows)
                continue
            if len(rows) == 0:
                continue
            added, used, stop = _kernels().extend_rounds(
                self.flat, self.load, self.union, rows, self.num_layers, self.capacity, _MAX_EXTEND_ROUNDS - rounds
            )
            self.add(added)
            rounds += used
            if stop:
                return
