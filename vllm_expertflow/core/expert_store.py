"""Host tier: every expert of one MoE layer, in host memory.

On CUDA the tensors are pinned so the copy stream can move an expert to its slot
asynchronously; on CPU host and device are the same memory and nothing is pinned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ExpertStore:
    """All experts of one MoE layer.

    weights: tensors that each hold one weight kind for every expert, ``[num_experts, ...]``
    (for vLLM's fused MoE: ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``, possibly prepacked).
    Expert ``e``'s parameters are the slices ``w[e]`` of each tensor.
    """

    def __init__(self, weights: Sequence[torch.Tensor], *, pin_memory: bool = False) -> None:
        if not weights:
            raise ValueError("an expert store needs at least one weight tensor")
        num_experts = weights[0].shape[0]
        for w in weights:
            if w.shape[0] != num_experts:
                raise ValueError(
                    f"every weight tensor must have the expert count as its first dim; got shapes "
                    f"{[tuple(t.shape) for t in weights]}"
                )
            if w.device.type != "cpu":
                raise ValueError(f"the expert store lives in host memory; got a tensor on {w.device}")
        self.weights = [w.pin_memory() if pin_memory and not w.is_pinned() else w for w in weights]
        self.num_experts = num_experts
        self.bytes_per_expert = sum(w[0].numel() * w.element_size() for w in self.weights)

    def expert(self, expert_id: int) -> list[torch.Tensor]:
        return [w[expert_id] for w in self.weights]
