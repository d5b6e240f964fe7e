"""Model construction: the study model's shape, grown from the trained toy model (upcycling).

The toy model (4 MoE layers, 8 experts of intermediate 128, top-2) already answers easy-vqa. The study model
(6 MoE layers, 128 experts of intermediate 32, top-8) starts as close to its function as the new shape allows,
so fine-tuning only has to learn the new regime and re-sharpen routing:

* Experts, fine-grained split: a SwiGLU expert is a sum over its intermediate units, so parent expert ``e``
  equals the sum of 4 slices of 32 units. Each slice is copied into 4 replicas (16 children per parent), with
  a little noise so replicas can specialise. Children's down projections are scaled by 4: top-8 over
  children picks about 8 of a parent's 16 (2 per slice on average) with weight 1/8 each, which adds back up
  to the parent's output. Router rows are the parent's row plus noise, so a token's children rank as its
  parents did, while the replica it takes depends on the input.
* Depth: 6 layers from 4 by repeating layers 1 and 2 (order 0, 1, 1', 2, 2', 3); a repeat's output
  projections (attention ``o_proj``, experts' down) start at 0.1x, so it first adds a small correction.
* Vocabulary: rebuilt to cover the rationale regime; rows of words both vocabularies share are copied, new
  words start random.
"""

from __future__ import annotations

import torch

LAYER_SOURCES = (0, 1, 1, 2, 2, 3)
REPEAT_OUTPUT_SCALE = 0.1
SLICES = 4
EXPERT_NOISE = 0.05
ROUTER_NOISE = 0.5


def study_text_shape(text_config, num_experts: int = 128, top_k: int = 8, moe_intermediate: int = 32,
                     num_layers: int = len(LAYER_SOURCES)) -> None:
    """Set the study model's MoE shape on a toy-model text config (in place)."""
    text_config.num_hidden_layers = num_layers
    text_config.num_experts = num_experts
    text_config.num_experts_per_tok = top_k
    text_config.moe_intermediate_size = moe_intermediate
    text_config.mlp_only_layers = []
    text_config.decoder_sparse_step = 1


def _noisy(t: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    return t * (1 + rel * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def split_experts(gate_up: torch.Tensor, down: torch.Tensor, num_experts: int, gen: torch.Generator):
    """Parent experts in transformers' layout (``gate_up [E, 2I, H]``, ``down [E, H, I]``) -> children.

    Returns ``gate_up [E', 2I', H]``, ``down [E', H, I']`` with ``I' = I / SLICES`` and ``E' = num_experts``;
    child ``e * per_parent + replica * SLICES + s`` is slice ``s`` of parent ``e``.
    """
    parents, two_i, _ = gate_up.shape
    inter = two_i // 2
    assert inter % SLICES == 0 and num_experts % (parents * SLICES) == 0, (gate_up.shape, num_experts)
    width = inter // SLICES
    replicas = num_experts // (parents * SLICES)
    new_gate_up, new_down = [], []
    for e in range(parents):
        for _ in range(replicas):
            for s in range(SLICES):
                rows = slice(s * width, (s + 1) * width)
                gu = torch.cat([gate_up[e, rows], gate_up[e, inter + s * width : inter + (s + 1) * width]])
                new_gate_up.append(_noisy(gu, EXPERT_NOISE, gen))
                new_down.append(_noisy(down[e, :, rows] * SLICES, EXPERT_NOISE, gen))
    return torch.stack(new_gate_up), torch.stack(new_down)


def split_router(weight: torch.Tensor, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """Parent router rows ``[E, H]`` -> children's ``[E', H]``: each parent row repeated, plus noise."""
    parents = weight.shape[0]
    rows = weight.repeat_interleave(num_experts // parents, dim=0)
    return rows + ROUTER_NOISE * weight.std() * torch.randn(rows.shape, generator=gen, dtype=rows.dtype)


def upcycle(old_model, old_tokenizer, new_model, new_tokenizer, seed: int) -> dict:
    """Fill ``new_model`` (the study shape, same hidden size) from ``old_model``; returns what was copied."""
    gen = torch.Generator().manual_seed(seed)
    old_sd = old_model.state_dict()
    new_sd = new_model.state_dict()
    num_experts = new_model.config.text_config.num_experts
    out = {}
    old_vocab = old_tokenizer.get_vocab()
    shared_words = 0
    for name, target in new_sd.items():
        if name.startswith("model.language_model.layers."):
            continue
        source = old_sd[name]
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            fresh = torch.randn(target.shape, generator=gen) * 0.02
            for word, new_id in new_tokenizer.get_vocab().items():
                old_id = old_vocab.get(word)
                if old_id is not None and new_id < fresh.shape[0] and old_id < source.shape[0]:
                    fresh[new_id] = source[old_id]
                    shared_words += 1
            out[name] = fresh
        else:
            assert source.shape == target.shape, (name, source.shape, target.shape)
            out[name] = source.clone()
    seen = set()
    for new_idx, old_idx in enumerate(LAYER_SOURCES):
        repeat = old_idx in seen
        seen.add(old_idx)
        old_prefix = f"model.language_model.layers.{old_idx}."
        new_prefix = f"model.language_model.layers.{new_idx}."
        for name in [n for n in new_sd if n.startswith(new_prefix)]:
            suffix = name[len(new_prefix) :]
            source = old_sd[old_prefix + suffix]
            if suffix == "mlp.experts.gate_up_proj":
                gate_up, down = split_experts(source, old_sd[old_prefix + "mlp.experts.down_proj"], num_experts, gen)
                out[name] = gate_up
                out[new_prefix + "mlp.experts.down_proj"] = down * (REPEAT_OUTPUT_SCALE if repeat else 1.0)
            elif suffix == "mlp.experts.down_proj":
                continue
            elif suffix == "mlp.gate.weight":
                out[name] = split_router(source, num_experts, gen)
            else:
                scale = REPEAT_OUTPUT_SCALE if repeat and suffix == "self_attn.o_proj.weight" else 1.0
                out[name] = source.clone() * scale
    missing = set(new_sd) - set(out)
    assert not missing, missing
    for name, t in out.items():
        assert t.shape == new_sd[name].shape, (name, t.shape, new_sd[name].shape)
    new_model.load_state_dict(out)
    return {"shared_words": shared_words // 2, "layer_sources": list(LAYER_SOURCES)}
