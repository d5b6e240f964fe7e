"""Greedy generation for evaluation: transformers (batched, left-padded) and vLLM."""

from __future__ import annotations

import os
import re

from .build import Encoder
from .easy_vqa_data import render_prompt


def extract_letter(pred: str) -> str | None:
    m = re.match(r"\s*\(?([A-D])\b", pred)
    return m.group(1) if m else None


def generate_answers(model, enc: Encoder, prompts, paths, batch_size: int = 64, max_new_tokens: int = 4):
    import torch

    outs = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            b = enc.gen_batch(prompts[s : s + batch_size], paths[s : s + batch_size])
            b["pixel_values"] = b["pixel_values"].to(model.dtype)
            g = model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False, output_router_logits=False,
                               pad_token_id=enc.pad, eos_token_id=[enc.im_end, enc.pad])  # fmt: skip
            new = g[:, b["input_ids"].shape[1] :]
            outs += [enc.tok.decode(r, skip_special_tokens=True).strip() for r in new]
    return outs


def _vllm_env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def make_llm(model_dir: str, dtype: str, max_model_len: int = 256):
    _vllm_env()
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        enforce_eager=True,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": 1, "video": 0},
        dtype=dtype,
        seed=0,
    )


def vllm_generate(llm, tokenizer, texts, paths, max_tokens: int):
    from PIL import Image
    from vllm import SamplingParams

    reqs = []
    for t, p in zip(texts, paths, strict=True):
        with Image.open(p) as im:
            img = im.convert("RGB")
        reqs.append({"prompt": render_prompt(tokenizer, t), "multi_modal_data": {"image": img}})
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate(reqs, sp, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs], [list(o.outputs[0].token_ids) for o in outs]
