"""Lossy miss policies: what a step does with routed experts that are not resident (accuracy study only).

``exact`` (the default, in ``slot_cache``) waits for every miss and is lossless. The policies here change
the model's outputs and exist to measure how much:

* ``skip``: a missing expert is dropped and the token's remaining routing weights are rescaled to the
  original total.
* ``substitute``: a missing expert is replaced by the resident expert the router scored highest among
  those the token does not use, with the replaced expert's weight (skipped when there is none).
* ``reroute``: batch-aware routing in the spirit of OEA (arXiv 2511.02237) and cache-conditional routing
  (arXiv 2412.00099): a missing expert is replaced by an expert that is resident, or loaded for this
  step anyway, if the router scored it within ``margin`` of the expert it replaces (router logits: a
  margin ``m`` accepts an expert whose routing probability is at least ``exp(-m)`` times the replaced
  one's); otherwise the missing expert is loaded (and becomes a candidate for the other tokens). Its
  loss is bounded by the margin; ``margin=0`` accepts no replacement, so it is lossless.

Accounting, the same in every mode: each step counts every distinct expert its tokens were routed to
once, as a hit when it was resident at the step's start and as a miss otherwise, whether the miss was
then loaded, dropped or replaced; ``loads`` counts copies. So hits + misses is the step's expert demand
and lossy hit rates compare with exact ones (a lossless step that fits its slots counts the same way).
"""

from __future__ import annotations

import torch

from vllm_expertflow.core.slot_map import LayerCacheStats

LOSSY_MISS_POLICIES = ("skip", "substitute", "reroute")
# The policies that read every expert's router score, not only the top-k.
NEEDS_ROUTER_SCORES = ("substitute", "reroute")
DEFAULT_REROUTE_MARGIN = 1.0


def reroute(
    topk_ids: torch.Tensor, router_logits: torch.Tensor, resident: torch.Tensor, margin: float
) -> tuple[torch.Tensor, list[int]]:
    """The ``reroute`` policy's routing: ``(ids, experts to load)``.

    topk_ids: [num_tokens, top_k] int, global expert ids; router_logits: [num_tokens, num_experts] float
    (the scores the top-k was chosen by); resident: [num_experts] bool, resident at the step's start.
    Returns ids of the same shape whose every expert is resident or in the returned load list, and no
    expert twice in a row. Greedy: each missing entry takes the best-scored candidate whose score is above
    its own minus ``margin``; while some cannot, the expert most of them still want is loaded, becomes a candidate, and the rest
    are tried again. Tokens keep their routing weights (the replacement takes the replaced one's).
    """
    if margin < 0:
        raise ValueError(f"reroute margin must be >= 0, got {margin}")
    ids = topk_ids.long().clone()
    logits = router_logits.float()
    candidates = resident.clone().bool()
    chosen_score = logits.gather(1, ids)
    missing = ~candidates[ids]
    loads: list[int] = []
    while bool(missing.any()):
        rows = torch.nonzero(missing.any(dim=1)).squeeze(1)
        sub_ids, sub_missing = ids[rows], missing[rows]
        scores = logits[rows].masked_fill(~candidates, float("-inf"))
        for column in range(ids.shape[1]):
            wanted = sub_missing[:, column]
            if not bool(wanted.any()):
                continue
            # Never an expert the token already uses (its other choices, earlier replacements).
            best_score, best = scores.scatter(1, sub_ids, float("-inf")).max(dim=1)
            # Strictly within: margin 0 accepts nothing, so it is the exact policy (bf16 logits tie often).
            take = wanted & torch.isfinite(best_score) & (best_score > chosen_score[rows, column] - margin)
            sub_ids[take, column] = best[take]
            sub_missing[take, column] = False
        ids[rows], missing[rows] = sub_ids, sub_missing
        if not bool(missing.any()):
            break
        expert = int(torch.bincount(ids[missing], minlength=logits.shape[1]).argmax())
        loads.append(expert)
        candidates[expert] = True
        missing &= ids != expert  # those entries now run on the loaded expert itself
    return ids.to(topk_ids.dtype), loads


def drop_or_substitute(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    resident: torch.Tensor,
    miss_policy: str,
    router_scores: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``skip`` / ``substitute`` routing of tokens that each have a resident expert: ``(ids, weights)``.

    Every returned id is resident. A dropped entry points at one of the row's resident experts with
    weight zero (the kernel needs a valid id), and the row's kept weights are rescaled to its original
    total.
    """
    ids = topk_ids.long()
    available = resident[ids]
    weights = topk_weights
    if miss_policy == "substitute" and not bool(available.all()):
        ids = ids.clone()
        scores = router_scores.float().clone()
        # Candidates: resident experts the token does not already use.
        scores[:, ~resident.to(scores.device)] = float("-inf")
        scores.scatter_(1, topk_ids.long(), float("-inf"))
        for column in range(ids.shape[1]):
            missing = ~available[:, column]
            if not bool(missing.any()):
                continue
            best_score, best = scores.max(dim=1)
            take = missing & torch.isfinite(best_score)
            ids[take, column] = best[take]
            available[take, column] = True
            scores[take, best[take]] = float("-inf")  # no expert twice for one token
    if not bool(available.all()):
        kept = topk_weights * available
        scale = topk_weights.sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp_min(1e-20)
        weights = (kept * scale).to(topk_weights.dtype)
        first_available = available.float().argmax(dim=1, keepdim=True)
        ids = torch.where(available, ids, ids.gather(1, first_available))
    return ids.to(topk_ids.dtype), weights


class LossyRunMixin:
    """``run_lossy`` for a layer cache (``ExpertSlotCache``, ``PooledLayerCache``).

    The cache provides ``stats``, ``resident_mask()`` ([num_experts] bool, host), ``pass_capacity``,
    ``_run_exact(hidden, weights, ids, kernel, count_demand=...)`` (lossless, in passes when needed) and
    ``_load_for_next_steps(experts)`` (background loads, counted as loads only).
    """

    stats: LayerCacheStats
    pass_capacity: int

    def run_lossy(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_kernel,
        miss_policy: str,
        router_scores: torch.Tensor | None = None,
        reroute_margin: float = DEFAULT_REROUTE_MARGIN,
    ) -> torch.Tensor:
        """Run without waiting for (all) misses: LOSSY, for the accuracy study only, never the default.

        hidden_states: [num_tokens, hidden]; topk_weights: [num_tokens, top_k] float; topk_ids:
        [num_tokens, top_k] int, global expert ids; router_scores: [num_tokens, num_experts] (substitute,
        reroute). See the module docstring for the policies. Under skip and substitute a token none of
        whose experts is resident waits for its experts and runs exactly (dropping all of them would leave
        it no expert output at all); the other tokens run on what the slots held when the step began, and
        after the step its most demanded experts are loaded for the next steps (counted as loads: the step
        did not wait for them), so the cache follows the demand it did not load for.
        """
        if miss_policy not in LOSSY_MISS_POLICIES:
            raise ValueError(f"unknown lossy miss policy {miss_policy!r}; valid: {list(LOSSY_MISS_POLICIES)}")
        if miss_policy in NEEDS_ROUTER_SCORES and router_scores is None:
            raise ValueError(f"miss_policy {miss_policy!r} needs router_scores [num_tokens, num_experts]")
        self.stats.steps += 1
        resident = self.resident_mask()
        host_ids = topk_ids.to("cpu").long()
        demanded = torch.unique(host_ids)
        hits = int(resident[demanded].sum())
        self.stats.hits += hits
        self.stats.misses += len(demanded) - hits
        if miss_policy == "reroute":
            ids, _ = reroute(host_ids, router_scores.to("cpu"), resident, reroute_margin)
            return self._run_exact(
                hidden_states, topk_weights, ids.to(topk_ids.device, topk_ids.dtype), expert_kernel, count_demand=False
            )
        covered = resident[host_ids].any(dim=1)  # tokens with at least one resident expert
        output = None
        for mask, lossy in ((covered, True), (~covered, False)):
            # The covered tokens first: their kernel must read the slots as they were.
            if not bool(mask.any()):
                continue
            rows = torch.nonzero(mask).squeeze(1)
            whole = bool(mask.all())
            ids = host_ids if whole else host_ids.index_select(0, rows)
            weights = topk_weights if whole else topk_weights.index_select(0, rows.to(topk_weights.device))
            hidden = hidden_states if whole else hidden_states.index_select(0, rows.to(hidden_states.device))
            if lossy:
                scores = None
                if router_scores is not None:
                    scores = router_scores if whole else router_scores.index_select(0, rows.to(router_scores.device))
                    scores = scores.to("cpu")
                ids, weights = drop_or_substitute(ids, weights.to("cpu"), resident, miss_policy, scores)
                weights = weights.to(topk_weights.device)
            group_output = self._run_exact(
                hidden, weights, ids.to(topk_ids.device, topk_ids.dtype), expert_kernel, count_demand=False
            )
            if whole:
                output = group_output
                break
            if output is None:
                output = group_output.new_empty((hidden_states.shape[0], *group_output.shape[1:]))
            output.index_copy_(0, rows.to(output.device), group_output)
        demand = torch.bincount(host_ids.reshape(-1), minlength=resident.shape[0])
        upcoming = torch.argsort(demand, descending=True, stable=True)[: self.pass_capacity]
        self._load_for_next_steps([e for e in upcoming.tolist() if demand[e] > 0])
        return output
