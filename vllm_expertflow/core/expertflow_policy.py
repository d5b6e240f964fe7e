"""ExpertFlow's expert cache engine: which ``(layer, expert)`` keys a slot budget holds, by predicted demand.

The live slot pool (``core/expert_pool.py``) and the trace replay (``core/simulate.py``)
run this same class, so a replay of a recorded routing trace makes the live pool's loads.

Policy ``expertflow`` (``ExpertFlowCache``, ExpertFlow's expert cache engine) is not a
``ReplacementPolicy``: it reads a routing predictor (``core/predictors.py``), prefetches and,
in global mode, moves slots across layers (PLEC). Each step it:

1. asks the predictor, before the step, for every token's per-layer expert probabilities
   (from earlier steps only) and turns them into the probability that the step needs each
   (layer, expert): ``1 - prod_tokens(1 - p)``;
2. prefetches the keys at or above ``prefetch_threshold`` that are not resident, into
   free slots or in place of a resident key whose next use is expected later and which the
   step is unlikely to need (predicted demand at most ``1 - prefetch_threshold`` where its
   layer has not run yet), never in place of another predicted key, and only in layers whose
   expected demand (the sum of the probabilities) fits one pass;
3. replays the step layer by layer as the other policies do; a needed expert that is not
   resident is a demand miss and loads at once.

Eviction (``eviction="adaptive"``, the default) picks between two rules per layer (one
score for the pool in global mode): the demand ranking below and LRU. Where they pick
different victims, the first of the two keys needed again shows which pick was wrong,
whether or not it was followed; the cache follows the rule with fewer recent wrong picks
(decayed, half-life ``regret_half_life`` settled pairs) and the demand ranking on a tie.
So a misleading forecast costs about LRU's loads, not more, and a good one keeps its gains.

The demand ranking follows Belady's rule on estimates: the victim is the key whose next use is
expected farthest ahead, in layer runs from now (``ExpertFlowCache._next_use``). A key is
needed each step with probability ``p``, a blend (``demand_weight``) of the predicted demand
and its decayed use rate (the share of the layer's recent passes that needed it,
half-life ``half_life`` passes: LFRU's signal), so its next use is about ``1 / p`` steps
away; a layer that has not run yet this step may need it sooner, with its predicted
demand. An expert the current step needs in a later pass of the same layer is kept over
any other, the nearest pass first. Across layers (global mode) the same estimate ranks
every key, so the pool follows predicted demand: PLEC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vllm_expertflow.core.slot_map import LayerCacheStats

BUDGET_MODES = ("per-layer", "global")
EXPERTFLOW_OPTIONS = ("prefetch", "prefetch_threshold", "half_life", "demand_weight", "eviction", "regret_half_life")
# ExpertFlowCache's eviction rules: "adaptive" follows whichever of the other two has been
# choosing the better victims lately; "demand" and "lru" are that choice's two experts alone.
EVICTION_RULES = ("adaptive", "demand", "lru")


class ExpertFlowCache:
    """ExpertFlow's expert cache engine over ``(layer, expert)`` keys: bookkeeping only, no tensors.

    Budget: ``per-layer`` gives each layer ``capacity`` slots; ``global`` (PLEC) shares
    ``capacity * num_layers`` slots, so a layer with more predicted demand holds more
    experts, and never takes another layer below ``min_per_layer`` (top_k) residents.
    Drive it once per step: :meth:`begin_step` with the predicted demand, then
    :meth:`admit` per layer and pass in execution order. The replay loop
    ``_replay_expertflow`` shows the order; a live cache would copy the returned keys.

    Options: ``prefetch`` (False: demand loading, eviction unchanged),
    ``prefetch_threshold`` (the predicted probability that a step needs a key at which it
    is prefetched), ``half_life`` (passes after which a use counts half in the use rate:
    small is recency, large is frequency), ``demand_weight`` (the predicted demand's share
    against the use rate in the per-step need probability), ``eviction`` (``adaptive``:
    the demand ranking or LRU, whichever has picked the better victims lately, see
    :meth:`_choose_victim`; ``demand`` or ``lru``: that rule alone), ``regret_half_life``
    (settled disagreements after which a wrong pick counts half). The defaults were chosen
    on recordings of the bundled text model (benchmarks/cache_policies.py).

    It tracks which experts are resident, not which slot holds them: a live cache would
    pair it with a slot table as ``SlotMap`` does for the replacement policies.
    """

    def __init__(
        self,
        num_experts: int,
        num_layers: int,
        capacity: int,
        *,
        budget_mode: str = "per-layer",
        min_per_layer: int = 1,
        bytes_per_expert: int = 0,
        prefetch: bool = True,
        prefetch_threshold: float = 0.9,
        half_life: float = 2.0,
        demand_weight: float = 0.5,
        eviction: str = "adaptive",
        regret_half_life: float = 16.0,
    ) -> None:
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"unknown budget mode {budget_mode!r}; valid modes are {list(BUDGET_MODES)}")
        if not min_per_layer <= capacity <= num_experts:
            raise ValueError(f"capacity must be in {min_per_layer}..{num_experts} slots per layer, got {capacity}")
        if not 0.0 < prefetch_threshold <= 1.0:
            raise ValueError(f"prefetch_threshold must be a probability in (0, 1], got {prefetch_threshold}")
        if not half_life > 0:
            raise ValueError(f"half_life must be a positive number of passes, got {half_life}")
        if not 0.0 <= demand_weight <= 1.0:
            raise ValueError(f"demand_weight must be in [0, 1], got {demand_weight}")
        if eviction not in EVICTION_RULES:
            raise ValueError(f"unknown eviction rule {eviction!r}; valid rules are {list(EVICTION_RULES)}")
        if not regret_half_life > 0:
            raise ValueError(
                f"regret_half_life must be a positive number of settled disagreements, got {regret_half_life}"
            )
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.budget_mode = budget_mode
        self.num_slots = capacity * num_layers
        self.layer_slots = capacity if budget_mode == "per-layer" else num_experts
        self.min_per_layer = min_per_layer
        self.bytes_per_expert = bytes_per_expert
        self.prefetch = prefetch
        self.prefetch_threshold = prefetch_threshold
        self.stats = [LayerCacheStats() for _ in range(num_layers)]
        self._resident: list[set[int]] = [set() for _ in range(num_layers)]
        self._is_resident = np.zeros((num_layers, num_experts), dtype=bool)  # the sets as a mask, for _victim
        self._demand = np.zeros((num_layers, num_experts))  # this step's predicted P(needed)
        self._decay = 2.0 ** (-1.0 / half_life)
        # Use rate: decayed uses per key over decayed passes per layer, both as of the layer's pass clock.
        self._uses = np.zeros((num_layers, num_experts))
        self._passes = np.zeros(num_layers)
        self._last_use = np.zeros((num_layers, num_experts), dtype=np.int64)  # global pass tick; tie-break
        self._tick = 0
        self._current_layer = -1  # the layer whose pass runs; -1 before the step's first layer
        self.demand_weight = demand_weight
        self._unused_prefetch: set[tuple[int, int]] = set()
        self.eviction = eviction
        self.regret_half_life = regret_half_life
        self._regret_decay = 2.0 ** (-1.0 / regret_half_life)
        # The lru expert's clock: last use or load (a prefetch counts as recent, as in the live LRU cache).
        self._recent = np.zeros((num_layers, num_experts), dtype=np.int64)
        # Decayed (lru's wrong picks - demand's wrong picks) over settled disagreements, per layer
        # (one pool: row 0 only). >= 0 follows the demand ranking: a new cache trusts its forecast
        # until it is shown wrong.
        self._trust = np.zeros(num_layers)
        # Unsettled disagreements: pair id -> (demand's victim, lru's victim, layer scored), and each key's pair.
        # A key is in at most one pair: a long-running pool holds at most layers * experts / 2 of them.
        self._disagreements: dict[int, tuple[tuple[int, int], tuple[int, int], int]] = {}
        self._disagreement_of: dict[tuple[int, int], int] = {}
        self._next_disagreement = 0
        # Evictions per rule followed: how often the forecast was trusted.
        self.followed = {"demand": 0, "lru": 0}

    def resident(self, layer: int) -> set[int]:
        return set(self._resident[layer])

    def max_pass_experts(self, layer: int) -> int:
        """The most distinct experts one pass of ``layer`` may need (the pass planner's capacity)."""
        if self.budget_mode == "per-layer":
            return self.layer_slots
        return min(self.num_experts, self.num_slots - (self.num_layers - 1) * self.min_per_layer)

    def begin_step(self, demand: np.ndarray) -> list[tuple[int, int]]:
        """Take the step's predicted demand ``[L, E]`` (P(the step needs the key)); returns the keys prefetched."""
        demand = np.asarray(demand, dtype=np.float64)
        if demand.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"demand must be [{self.num_layers}, {self.num_experts}], got {demand.shape}")
        self._demand = demand
        self._current_layer = -1
        if not self.prefetch:
            return []
        # A layer expected to need more experts than one pass holds will run in passes whose
        # order depends on the actual routing, and a pass evicts what the next one would use:
        # prefetching there mostly wastes loads, so only layers expected to fit one pass prefetch.
        expected = demand.sum(axis=1)
        fits = expected <= np.array([self.max_pass_experts(layer) for layer in range(self.num_layers)])
        if self.budget_mode == "global":
            # Likewise, keys prefetched for a late layer are evicted by the earlier layers' own
            # demand unless the step's expected working set up to that layer fits the pool.
            fits &= np.cumsum(expected) <= self.num_slots
        wanted = np.argwhere((demand >= self.prefetch_threshold) & fits[:, None])
        # Most likely first; on ties the earlier layer, which runs first.
        order = sorted(((-demand[layer, expert], layer, expert) for layer, expert in wanted.tolist()))
        keys = [(layer, expert) for _, layer, expert in order]
        return self._prefetch_keys(keys, set(keys))

    def prefetch_layer(
        self,
        layer: int,
        experts: Sequence[int],
        *,
        protected: Sequence[tuple[int, int]] = (),
        demand: np.ndarray | None = None,
    ) -> list[tuple[int, int]]:
        """Prefetch ``experts`` of ``layer`` (most wanted first) mid-step; returns the keys loaded.

        For a forecast made inside the step (lookahead: the next layer's router on the
        current hidden state). ``demand: [E]`` replaces the layer's predicted demand for the
        rest of the step, so eviction ranks by the fresher forecast. A prefetch takes a slot
        only from a key expected to be needed later than the prefetched one and never from
        ``protected`` keys (a running layer's experts); unlike :meth:`begin_step` it may take
        one a later layer is likely to need this step.
        """
        if demand is not None:
            self._demand[layer] = np.asarray(demand, dtype=np.float64)
        keys = [(layer, int(e)) for e in dict.fromkeys(int(e) for e in experts)][: self.max_pass_experts(layer)]
        # The keys are for the layer that runs next, so unlike a step-ahead prefetch this one may
        # displace a key a later layer is likely to need: it trades that risk for a stall now.
        return self._prefetch_keys(keys, set(keys) | set(protected), keep_likely=False)

    def _prefetch_keys(
        self, keys: Sequence[tuple[int, int]], protected: set[tuple[int, int]], *, keep_likely: bool = True
    ) -> list[tuple[int, int]]:
        fetched = []
        for layer, expert in keys:
            if expert in self._resident[layer]:
                continue
            if not self._has_room(layer):
                victim = self._victim(layer, protected, {})
                if victim is None or self._next_use(*victim, {}) <= self._next_use(layer, expert, {}):
                    continue
                if keep_likely and self._may_need_this_step(*victim):
                    # Evicting it costs a load with that probability, while the prefetch itself
                    # saves none (the key would load on demand anyway, with a better-informed victim).
                    continue
                self._evict(victim)
            self._load(layer, expert)
            self.stats[layer].prefetch_loads += 1
            self._unused_prefetch.add((layer, expert))
            fetched.append((layer, expert))
        return fetched

    def admit(
        self, layer: int, needed: Sequence[int], later: Sequence[Sequence[int]] = (), *, count_demand: bool = True
    ) -> list[int]:
        """Make ``needed`` resident for one pass of ``layer``; returns the experts demand-loaded.

        ``later``: the expert sets of the same step's later passes of this layer, known once
        its router has run; they are kept over everything else, the nearest pass first.
        ``count_demand=False`` leaves hits and misses alone (the caller counted this demand).
        """
        needed = list(dict.fromkeys(int(e) for e in needed))
        if len(needed) > self.max_pass_experts(layer):
            raise ValueError(
                f"{len(needed)} distinct experts needed at once but layer {layer} may hold {self.max_pass_experts(layer)}"
            )
        stats = self.stats[layer]
        stats.passes += 1
        self._tick += 1
        self._current_layer = layer
        soon: dict[int, int] = {}
        for distance, experts in enumerate(later, start=1):
            for expert in experts:
                soon.setdefault(int(expert), distance)
        protected = {(layer, expert) for expert in needed}
        self._settle(layer, needed)
        loaded = []
        for expert in needed:
            if expert in self._resident[layer]:
                stats.hits += count_demand
                if (layer, expert) in self._unused_prefetch:
                    self._unused_prefetch.discard((layer, expert))
                    stats.prefetch_hits += 1
                continue
            stats.misses += count_demand
            if not self._has_room(layer):
                victim = self._choose_victim(layer, protected, soon)
                if victim is None:
                    raise RuntimeError(f"no evictable expert for layer {layer}: every resident one is needed now")
                self._evict(victim)
            self._load(layer, expert)
            loaded.append(expert)
        # Update the use rate: every key of this layer decays by one pass, the needed ones gain a use.
        self._uses[layer] *= self._decay
        self._passes[layer] = self._passes[layer] * self._decay + 1.0
        self._uses[layer, needed] += 1.0
        self._last_use[layer, needed] = self._tick
        self._recent[layer, needed] = self._tick
        return loaded

    def _choose_victim(
        self, layer: int, protected: set[tuple[int, int]], soon: Mapping[int, int]
    ) -> tuple[int, int] | None:
        """The victim of a demand miss under ``eviction``; ``adaptive`` keeps score of where its experts disagree.

        The forecast's ranking is only as good as the forecast, and how good that is depends
        on the workload (one request's decode steps are harder to predict than a batch's
        union), so no fixed blend suits every trace. Whenever the demand ranking and LRU pick
        different victims, the pair is remembered; the first of the two keys to be needed
        again shows which pick was wrong (Belady: the better victim is the one needed later),
        whichever pick was followed. The layer (the pool, in global mode) follows the rule with
        fewer wrong picks, each counting half after ``regret_half_life`` later settled pairs.
        """
        if self.eviction == "demand":
            return self._victim(layer, protected, soon)
        by_demand, by_lru = self._victims(layer, protected, soon)
        if self.eviction == "lru" or by_demand is None:
            return by_lru
        if by_demand == by_lru:
            self.followed["demand"] += 1
            return by_demand
        # Per layer, each layer is its own cache with its own forecast quality; one pool makes one
        # decision across layers, so it keeps one score (row 0).
        scope = layer if self.budget_mode == "per-layer" else 0
        # A key already in an unsettled pair is the same counterfactual again (a key neither
        # rule took stays resident and is proposed again): scoring it twice would overweight it.
        if by_demand not in self._disagreement_of and by_lru not in self._disagreement_of:
            pair = self._next_disagreement
            self._next_disagreement += 1
            self._disagreements[pair] = (by_demand, by_lru, scope)
            self._disagreement_of[by_demand] = self._disagreement_of[by_lru] = pair
        if self._trust[scope] >= 0:
            self.followed["demand"] += 1
            return by_demand
        self.followed["lru"] += 1
        return by_lru

    def _settle(self, layer: int, needed: Sequence[int]) -> None:
        """Score the disagreements a key of this pass settles: the rule that picked it as victim was wrong."""
        if not self._disagreement_of:
            return
        now = {(layer, expert) for expert in needed}
        for expert in needed:
            pair = self._disagreement_of.pop((layer, expert), None)
            if pair is None:
                continue
            by_demand, by_lru, scope = self._disagreements.pop(pair)
            other = by_lru if (layer, expert) == by_demand else by_demand
            self._disagreement_of.pop(other, None)
            if other in now:
                continue  # both needed at once: neither pick was the better one
            # Demand's victim came back first: demand erred (and the other way round).
            self._trust[scope] = self._trust[scope] * self._regret_decay + (-1.0 if other == by_lru else 1.0)

    def _may_need_this_step(self, layer: int, expert: int) -> bool:
        """Whether a layer still to run this step needs the key with probability above ``1 - prefetch_threshold``."""
        return layer > self._current_layer and self._demand[layer, expert] > 1.0 - self.prefetch_threshold

    def _has_room(self, layer: int) -> bool:
        if len(self._resident[layer]) >= self.layer_slots:
            return False
        return sum(len(r) for r in self._resident) < self.num_slots

    def _next_use(self, layer: int, expert: int, soon: Mapping[int, int]) -> float:
        """Expected layer runs until ``(layer, expert)`` is needed, seen from the current layer; evict the farthest.

        The step's own later passes of the current layer come first, nearest first. A layer
        that has not run yet this step needs the key now with its predicted demand; after
        that, each step needs it with probability ``p``, a blend of the predicted demand
        and the key's use rate, and the wait until then is geometric (``1 / p`` steps).
        """
        if expert in soon:
            return soon[expert] * 1e-6
        num_layers = self.num_layers
        rate = self._uses[layer, expert] / self._passes[layer] if self._passes[layer] else 0.0
        weight = self.demand_weight
        p = min(max(weight * self._demand[layer, expert] + (1.0 - weight) * rate, 1e-3), 1.0)
        ahead = layer - self._current_layer
        if ahead > 0:
            return ahead + (1.0 - self._demand[layer, expert]) * num_layers / p
        return ahead + num_layers / p

    def _victim(self, layer: int, protected: set[tuple[int, int]], soon: Mapping[int, int]) -> tuple[int, int] | None:
        """The demand ranking's victim: farthest expected next use (``_next_use``), then least recently used."""
        return self._victims(layer, protected, soon, lru=False)[0]

    def _victims(
        self, layer: int, protected: set[tuple[int, int]], soon: Mapping[int, int], *, lru: bool = True
    ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """The victims of the demand ranking and (with ``lru``) of LRU among the same candidates.

        Both keep the keys in ``soon`` (the step's later passes of this layer) over every
        other, the nearest pass longest. Across layers it is vectorised: the live pool asks
        this once per load, over hundreds of residents.
        """
        if self.budget_mode == "per-layer" or len(self._resident[layer]) >= self.layer_slots:
            # One layer's few residents: a plain loop is cheaper than numpy's per-call overhead.
            best: tuple[float, int, int] | None = None
            oldest: tuple[int, int, int] | None = None
            for expert in self._resident[layer]:
                if (layer, expert) in protected:
                    continue
                rank = (-self._next_use(layer, expert, soon), int(self._last_use[layer, expert]), expert)
                if best is None or rank < best:
                    best = rank
                if lru:
                    age = (
                        (1, -soon[expert], expert) if expert in soon else (0, int(self._recent[layer, expert]), expert)
                    )
                    if oldest is None or age < oldest:
                        oldest = age
            return (
                None if best is None else (layer, best[2]),
                None if oldest is None else (layer, oldest[2]),
            )
        candidates = self._is_resident.copy()
        # A layer may evict its own keys below the floor, never another layer's.
        at_floor = np.array([len(r) <= self.min_per_layer for r in self._resident])
        at_floor[layer] = False
        candidates[at_floor] = False
        for owner, expert in protected:
            candidates[owner, expert] = False
        owners, experts = np.nonzero(candidates)
        if owners.size == 0:
            return None, None
        next_use = self._next_use_of(owners, experts)
        later = np.zeros(owners.size)  # the pass of this step that needs the key; 0: none
        if soon:
            for index in np.flatnonzero((owners == layer) & np.isin(experts, list(soon))):
                later[index] = soon[int(experts[index])]
                next_use[index] = later[index] * 1e-6
        # Farthest expected next use first; on ties the least recently used, then the lowest key.
        first = np.lexsort((experts, owners, self._last_use[owners, experts], -next_use))[0]
        by_demand = (int(owners[first]), int(experts[first]))
        if not lru:
            return by_demand, None
        # Keys no later pass needs first, the least recently used of them; else the farthest pass's.
        first = np.lexsort((experts, owners, self._recent[owners, experts], -later, later > 0))[0]
        return by_demand, (int(owners[first]), int(experts[first]))

    def _next_use_of(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """``_next_use`` of many keys at once (without ``soon``), with the same arithmetic."""
        passes = self._passes[layers]
        uses = self._uses[layers, experts]
        rate = np.divide(uses, passes, out=np.zeros_like(uses), where=passes != 0)
        demand = self._demand[layers, experts]
        weight = self.demand_weight
        p = np.minimum(np.maximum(weight * demand + (1.0 - weight) * rate, 1e-3), 1.0)
        ahead = (layers - self._current_layer).astype(np.float64)
        return np.where(ahead > 0, ahead + (1.0 - demand) * self.num_layers / p, ahead + self.num_layers / p)

    def _load(self, layer: int, expert: int) -> None:
        self._resident[layer].add(expert)
        self._is_resident[layer, expert] = True
        self._recent[layer, expert] = self._tick
        self.stats[layer].loads += 1
        self.stats[layer].bytes_loaded += self.bytes_per_expert

    def _evict(self, key: tuple[int, int]) -> None:
        layer, expert = key
        self._resident[layer].discard(expert)
        self._is_resident[layer, expert] = False
        self._unused_prefetch.discard(key)
        self.stats[layer].evictions += 1
