"""Evaluation of the study model: accuracy per regime and form, and routing statistics.

transformers (fp32) for monitoring during training; vLLM (bf16) for the numbers the model card reports.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from vllm_expertflow.eval import prompts

from . import generation
from .study_data import TestItem, prompt_for

CIRCULAR_SHIFTS = 4


def rotate(options: tuple[str, ...], shift: int) -> tuple[str, ...]:
    return options[shift:] + options[:shift]


def prediction_correct(pred: str, item: TestItem, regime: str, options: tuple[str, ...] | None) -> bool:
    final = prompts.final_answer(pred, regime)
    if final is None:
        return False
    if options is None:
        return final.strip().lower() == item.answer
    letter = generation.extract_letter(final)
    return letter is not None and options[ord(letter) - ord("A")] == item.answer


def requests_for(items: list[TestItem], regime: str, circular: bool):
    """(item, options or None, prompt) for open questions and MC questions (4 rotations when circular)."""
    out = [(it, None, prompt_for(it.question, None, regime)) for it in items]
    for it in items:
        for shift in range(CIRCULAR_SHIFTS if circular else 1):
            options = rotate(it.options, shift)
            out.append((it, options, prompt_for(it.question, options, regime)))
    return out


def score(requests, preds, regime: str) -> dict:
    """Open accuracy, MC accuracy (first rotation), CircularEval (all rotations right), per answer kind."""
    open_ok, mc_first, mc_all = defaultdict(list), defaultdict(list), defaultdict(dict)
    parsed = 0
    for (item, options, _), pred in zip(requests, preds, strict=True):
        ok = prediction_correct(pred, item, regime, options)
        parsed += prompts.final_answer(pred, regime) is not None
        for key in ("all", item.kind):
            if options is None:
                open_ok[key].append(ok)
            else:
                if item.index not in mc_all[key]:
                    mc_first[key].append(ok)
                mc_all[key][item.index] = mc_all[key].get(item.index, True) and ok

    def acc(values) -> float:
        return round(sum(values) / len(values), 4) if values else math.nan

    return {
        "open": {k: acc(v) for k, v in sorted(open_ok.items())},
        "mc": {k: acc(v) for k, v in sorted(mc_first.items())},
        "circular": {k: acc(list(v.values())) for k, v in sorted(mc_all.items())},
        "parsable": round(parsed / len(preds), 4),
        "n_questions": len(open_ok["all"]),
    }


def evaluate_hf(model, encoder, items: list[TestItem], regime: str, batch_size: int = 48) -> dict:
    reqs = requests_for(items, regime, circular=False)
    was_training = model.training
    model.eval()
    preds = generation.generate_answers(model, encoder, [r[2] for r in reqs], [r[0].path for r in reqs], batch_size,
                                 max_new_tokens=prompts.MAX_TOKENS[regime])  # fmt: skip
    model.train(was_training)
    return score(reqs, preds, regime)


def routing_statistics(expert_sets: dict[int, list[set[int]]], kinds: list[str], num_experts: int) -> dict:
    """Per-layer usage entropy and mean Jaccard overlap of per-question expert sets within / across kinds.

    ``expert_sets[layer][q]``: the experts question ``q``'s prompt routed to in that layer.
    """
    out = {"entropy_bits": [], "max_entropy_bits": math.log2(num_experts), "jaccard_within": [],
           "jaccard_across": []}  # fmt: skip
    for layer in sorted(expert_sets):
        sets = expert_sets[layer]
        counts = torch.zeros(num_experts)
        for s in sets:
            counts[list(s)] += 1
        p = counts / counts.sum()
        out["entropy_bits"].append(round(float(-(p[p > 0] * p[p > 0].log2()).sum()), 3))
        within, across = [], []
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                jac = len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j]))
                (within if kinds[i] == kinds[j] else across).append(jac)
        out["jaccard_within"].append(round(sum(within) / max(1, len(within)), 3))
        out["jaccard_across"].append(round(sum(across) / max(1, len(across)), 3))
    return out


def question_expert_sets(model, encoder, items: list[TestItem], regime: str = "direct",
                         batch_size: int = 32) -> dict[int, list[set[int]]]:
    """Per layer, per question: the experts its open-form prompt's prefill routes to (transformers)."""
    layers = model.model.language_model.layers
    sets: dict[int, list[set[int]]] = {i: [] for i in range(len(layers))}
    current = {}

    def hook(layer_idx):
        def fn(module, inputs, output):
            _, _, chosen = output  # router_logits, scores, indices [rows * seq, k]
            rows = current["mask"].shape[0]
            chosen = chosen.reshape(rows, -1, chosen.shape[-1])
            for r in range(rows):
                sets[layer_idx].append(set(chosen[r][current["mask"][r]].reshape(-1).tolist()))

        return fn

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    model.eval()
    try:
        texts = [prompt_for(it.question, None, regime) for it in items]
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                b = encoder.gen_batch(texts[s : s + batch_size], [it.path for it in items[s : s + batch_size]])
                current["mask"] = b["attention_mask"].bool()
                b["pixel_values"] = b["pixel_values"].to(model.dtype)
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return sets


def evaluate_vllm(model_dir: str, items: list[TestItem], dtype: str = "bfloat16") -> dict:
    """Greedy accuracy through vLLM per regime: open, MC (first rotation) and CircularEval, per answer kind."""
    import time

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = generation.make_llm(model_dir, dtype, max_model_len=320)
    out = {"dtype": dtype, "questions": len(items)}
    for regime in prompts.REGIMES:
        reqs = requests_for(items, regime, circular=True)
        start = time.time()
        preds, token_ids = generation.vllm_generate(llm, tokenizer, [r[2] for r in reqs], [r[0].path for r in reqs],
                                             prompts.MAX_TOKENS[regime])  # fmt: skip
        result = score(reqs, preds, regime)
        result["seconds"] = round(time.time() - start, 1)
        result["mean_generated_tokens"] = round(sum(len(t) for t in token_ids) / len(token_ids), 1)
        result["examples"] = [{"prompt": r[2], "prediction": p} for r, p in list(zip(reqs, preds, strict=True))[:: max(1, len(reqs) // 4)]]
        out[regime] = result
    return out
