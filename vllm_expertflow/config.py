"""The one configuration object of expert offload.

It is parsed and validated once, in the front end, from ``additional_config["expert_offload"]``
(the CLI flags write into that dict). The front end then resolves the slots per MoE layer
from the model (``plan_slots``) and writes the result back as the config's one serialised
form (``to_serialized``); the engine core and the workers rebuild the object from it
(``from_serialized``, no second parse or validation) and never re-read the user's dict.
This module imports neither torch nor vLLM so the front end can validate before any model
is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

ADDITIONAL_CONFIG_KEY = "expert_offload"

# What the layer does with experts that are not resident. Only "exact" is lossless; the
# others exist for the accuracy study and change the model's outputs (core/miss_policies.py).
MISS_POLICIES = ("exact", "skip", "substitute", "reroute")
# reroute: a missing expert may be replaced by one the router scored at most this much lower (logits).
DEFAULT_REROUTE_MARGIN = 1.0

# How the scheduler composes each step when offload is on.
SCHEDULING_POLICIES = ("expertflow", "fcfs")

# Replacement policies the live cache can run: those that need no future knowledge or
# warm-up data (belady and static exist for the trace-replay simulator). "expertflow" is
# not per layer: one slot pool shared by all MoE layers (core/expert_pool.py).
CACHE_POLICIES = ("lru", "lfu", "lfru", "expertflow")
EXPERTFLOW_POLICY = "expertflow"

# What the cache loads ahead of use: nothing, the next MoE layer's experts predicted by its
# router on the current layer's input, or every layer's experts predicted per step by a
# trained routing predictor (predictor_path).
PREFETCH_MODES = ("none", "lookahead", "predictor")


class ExpertOffloadConfigError(ValueError):
    """A bad expert-offload setting; the message names the value and the valid ones."""


@dataclasses.dataclass(frozen=True)
class ExpertOffloadConfig:
    enabled: bool = False
    # Exactly one of the two sizes the cache when enabled.
    cache_slots: int | None = None  # slots per MoE layer
    cache_gb: float | None = None  # device bytes for expert slots over all MoE layers
    policy: str = "lru"
    trace_dir: str | None = None  # record routing traces here (docs/trace-format.md)
    scheduling: str = "expertflow"  # step composition: expert-aware grouping or vLLM's own FCFS
    miss_policy: str = "exact"  # lossy "skip"/"substitute"/"reroute" only for the accuracy study
    reroute_margin: float | None = None  # miss_policy "reroute" only; None: DEFAULT_REROUTE_MARGIN
    max_skip_steps: int = 2  # fairness: a running request sits out at most this many consecutive steps
    min_run_fraction: float = 0.5  # throughput: at least this share of the running requests runs every step
    # Hold requests back only if the chosen ones' excess over the slots is at most this share of
    # everyone's (None: whenever the chosen ones load less); see GroupingConfig.max_overflow_ratio.
    max_overflow_ratio: float | None = 0.25
    prefetch: str = "none"  # none | lookahead | predictor
    predictor_path: str | None = None  # a RoutingPathPredictor.save file; required iff prefetch == "predictor"
    # Resolved by the front end from cache_slots / cache_gb and the model (plan_slots); not a user setting.
    slots_per_layer: int | None = None

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> ExpertOffloadConfig:
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            return cls()
        if isinstance(raw, ExpertOffloadConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise ExpertOffloadConfigError(
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be a dict, got {type(raw).__name__}: {raw!r}"
            )
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExpertOffloadConfig:
        known = {f.name for f in dataclasses.fields(cls)} - set(_RESOLVED_FIELDS)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExpertOffloadConfigError(
                f"unknown expert_offload key(s) {unknown}; valid keys are {sorted(known)}"
            )
        config = cls(**{k: _coerce(k, v) for k, v in raw.items()})
        config.validate()
        return config

    def validate(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise ExpertOffloadConfigError(
                f"unknown expert cache policy {self.policy!r}; valid policies are {list(CACHE_POLICIES)}"
            )
        if self.scheduling not in SCHEDULING_POLICIES:
            raise ExpertOffloadConfigError(
                f"unknown expert scheduling {self.scheduling!r}; valid choices are {list(SCHEDULING_POLICIES)}"
            )
        if self.miss_policy not in MISS_POLICIES:
            raise ExpertOffloadConfigError(
                f"unknown expert miss policy {self.miss_policy!r}; valid choices are {list(MISS_POLICIES)} "
                f"(only 'exact' is lossless)"
            )
        if self.prefetch not in PREFETCH_MODES:
            raise ExpertOffloadConfigError(
                f"unknown expert prefetch {self.prefetch!r}; valid choices are {list(PREFETCH_MODES)}"
            )
        if self.prefetch == "predictor" and self.predictor_path is None:
            raise ExpertOffloadConfigError(
                "expert prefetch 'predictor' needs predictor_path (--expert-predictor PATH), a file written by "
                "scripts/train_predictor.py"
            )
        if self.predictor_path is not None and self.prefetch != "predictor":
            raise ExpertOffloadConfigError(
                f"predictor_path={self.predictor_path!r} (--expert-predictor) is only used with prefetch "
                f"'predictor' (--expert-prefetch predictor), but prefetch is {self.prefetch!r}"
            )
        if self.reroute_margin is not None:
            if self.miss_policy != "reroute":
                raise ExpertOffloadConfigError(
                    f"reroute_margin={self.reroute_margin} (--expert-reroute-margin) is only used with miss_policy "
                    f"'reroute', but miss_policy is {self.miss_policy!r}"
                )
            if not (self.reroute_margin >= 0 and math.isfinite(self.reroute_margin)):
                raise ExpertOffloadConfigError(
                    f"reroute_margin must be a finite number >= 0 (router logits), got {self.reroute_margin}"
                )
        if self.prefetch != "none" and self.miss_policy != "exact":
            raise ExpertOffloadConfigError(
                f"expert prefetch {self.prefetch!r} works with miss_policy 'exact' only (the lossy policies load "
                f"their own experts for the next step); got miss_policy={self.miss_policy!r}"
            )
        if self.max_skip_steps < 0:
            raise ExpertOffloadConfigError(f"max_skip_steps must be >= 0, got {self.max_skip_steps}")
        if not 0.0 < self.min_run_fraction <= 1.0:
            raise ExpertOffloadConfigError(f"min_run_fraction must be in (0, 1], got {self.min_run_fraction}")
        if self.max_overflow_ratio is not None and not 0.0 <= self.max_overflow_ratio <= 1.0:
            raise ExpertOffloadConfigError(
                f"max_overflow_ratio must be in [0, 1] or null (no limit), got {self.max_overflow_ratio}"
            )
        if self.cache_slots is not None and self.cache_slots < 1:
            raise ExpertOffloadConfigError(
                f"expert cache_slots must be a positive integer, got {self.cache_slots}"
            )
        if self.cache_gb is not None and not (self.cache_gb > 0 and math.isfinite(self.cache_gb)):
            raise ExpertOffloadConfigError(f"expert cache_gb must be a positive number, got {self.cache_gb}")
        if not self.enabled:
            if self.prefetch != "none":
                raise ExpertOffloadConfigError(
                    f"prefetch={self.prefetch!r} (--expert-prefetch) prefetches into the expert cache and needs "
                    f"enabled=True (--enable-expert-offload)"
                )
            if self.trace_dir is not None:
                raise ExpertOffloadConfigError(
                    f"trace_dir={self.trace_dir!r} (--expert-trace-dir) records routing from the offloaded MoE "
                    f"layer and needs enabled=True (--enable-expert-offload)"
                )
            return
        if (self.cache_slots is None) == (self.cache_gb is None):
            given = "both" if self.cache_slots is not None else "neither"
            raise ExpertOffloadConfigError(
                f"expert offload needs exactly one of cache_slots (--expert-cache-slots) or cache_gb "
                f"(--expert-cache-gb); {given} given (cache_slots={self.cache_slots}, cache_gb={self.cache_gb})"
            )

    @property
    def effective_reroute_margin(self) -> float:
        return DEFAULT_REROUTE_MARGIN if self.reroute_margin is None else self.reroute_margin

    def to_dict(self) -> dict[str, Any]:
        """The user settings that ``from_dict`` turns back into this config (None kept where it is not the default)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _RESOLVED_FIELDS and (getattr(self, f.name) is not None or f.default is not None)
        }

    def to_serialized(self) -> dict[str, Any]:
        """The one form that crosses to the engine processes: validated settings plus what the front end resolved."""
        return {**self.to_dict(), _SERIALIZED_MARK: True,
                **{name: getattr(self, name) for name in _RESOLVED_FIELDS}}

    @classmethod
    def from_serialized(cls, additional_config: Mapping[str, Any] | None) -> ExpertOffloadConfig:
        """Rebuild the config the front end validated (``to_serialized``); offload off when there is none.

        Raises if the dict did not come from the front end: then the plugin's startup checks did not run.
        """
        raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if raw is None:
            return cls()
        if isinstance(raw, ExpertOffloadConfig):
            return raw
        if not raw.get(_SERIALIZED_MARK):
            raise ExpertOffloadConfigError(
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] reached the engine without the front end's startup "
                f"checks; create the engine through vllm.LLM or vllm serve with the vllm-expertflow plugin installed"
            )
        return cls(**{k: v for k, v in raw.items() if k != _SERIALIZED_MARK})

    def resolved(self, slots_per_layer: int) -> ExpertOffloadConfig:
        return dataclasses.replace(self, slots_per_layer=slots_per_layer)

    def groups_requests(self, num_experts: int) -> bool:
        """Whether the scheduler groups requests: only when the slots cannot hold every expert."""
        return (
            self.enabled and self.scheduling == "expertflow"
            and self.slots_per_layer is not None and self.slots_per_layer < num_experts
        )

    def plan_slots(self, *, num_experts: int, top_k: int, bytes_per_expert: int, num_moe_layers: int) -> int:
        """Slots each MoE layer gets, checked against what a lossless cache needs (the front end calls it once).

        A lossless step needs every token's top_k experts resident at once, so fewer than
        top_k slots cannot work; more than num_experts slots waste memory and are clamped
        (the caller warns).
        """
        if self.cache_slots is not None:
            slots = self.cache_slots
            if slots < top_k:
                raise ExpertOffloadConfigError(
                    f"expert cache_slots={slots} is below the model's top_k={top_k}; a lossless cache needs "
                    f"at least top_k slots per MoE layer (valid: {top_k}..{num_experts})"
                )
        else:
            assert self.cache_gb is not None
            slots = int(self.cache_gb * 1024**3 // (bytes_per_expert * num_moe_layers))
            if slots < top_k:
                minimum_gb = top_k * bytes_per_expert * num_moe_layers / 1024**3
                raise ExpertOffloadConfigError(
                    f"expert cache_gb={self.cache_gb} gives {slots} slot(s) per MoE layer, below the model's "
                    f"top_k={top_k}; the minimum is {minimum_gb:.6g} GB ({top_k} slots x {num_moe_layers} MoE "
                    f"layers x {bytes_per_expert} bytes per expert)"
                )
        return min(slots, num_experts)


# Fields the front end fills in (not user settings), and the key that marks its serialised form.
_RESOLVED_FIELDS = ("slots_per_layer",)
_SERIALIZED_MARK = "validated"


def _coerce(key: str, value: Any) -> Any:
    # Values arrive from JSON, dotted CLI keys (strings) or Python; normalise once here.
    try:
        if key == "enabled":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            return bool(value)
        if key == "cache_slots":
            if value is None:
                return None
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if key == "cache_gb":
            return None if value is None else float(value)
        if key == "policy":
            return str(value).lower()
        if key in ("scheduling", "miss_policy", "prefetch"):
            return str(value).lower()
        if key == "min_run_fraction":
            return float(value)
        if key == "reroute_margin":
            return None if value in (None, "", "none") else float(value)
        if key == "max_overflow_ratio":
            return None if value in (None, "", "none") else float(value)
        if key == "max_skip_steps":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if key in ("trace_dir", "predictor_path"):
            return None if value in (None, "") else str(value)
    except (TypeError, ValueError):
        raise ExpertOffloadConfigError(f"expert_offload {key}={value!r} is not a valid {key}") from None
    return value
