"""Tiny random MoE checkpoints built offline from transformers configs.

Used by the tests, the benchmarks and the README's demo: nothing can be downloaded on
the CPU machines. Sizes follow vLLM's CPU constraints (hidden % 32 == 0, attention head
size 32) and avoid ``2 * moe_intermediate == hidden`` and ``moe_intermediate == hidden``, where
a fused-expert layout mix-up would still load silently.

Router weights are scaled up and skewed per expert so routing is decisive and not
uniform, as in trained models; a cache study on uniform routing would say little.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# A small closed vocabulary: the prompts the tests and benchmarks generate use these words.
WORDS = (
    "the a an of to in on at for with and or but is are was were be been this that these those it they we you "
    "he she what which who when where why how many much more most some any all no not yes red green blue yellow "
    "black white gray circle square triangle rectangle shape color image picture left right top bottom big small "
    "one two three four five six seven eight nine ten expert cache slot layer token model router memory device "
    "host copy load store hit miss evict policy predict schedule batch step request answer question option "
    "letter word phrase single using given choices directly there here dog cat bird car tree house sky sun moon "
    "water fire earth wind river mountain city road book table chair door window light dark fast slow hot cold"
).split()
SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MODEL_SHAPES = ("qwen3_moe", "mixtral", "qwen2_moe", "dense")


def build_tokenizer(extra_special_tokens: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + list(extra_special_tokens or [])
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[2:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(shape: str, vocab_size: int):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=3,
        bos_token_id=None,
        pad_token_id=1,
    )
    if shape == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=96, num_experts=16,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if shape == "mixtral":
        return MixtralConfig(**common, head_dim=32, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    if shape == "qwen2_moe":
        # The shared-expert shape: one always-on expert beside the routed ones.
        return Qwen2MoeConfig(
            **common, intermediate_size=256, moe_intermediate_size=96, shared_expert_intermediate_size=160,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if shape == "dense":
        return Qwen3Config(**common, head_dim=32, intermediate_size=256)
    raise ValueError(f"unknown tiny model shape {shape!r}; valid shapes are {list(MODEL_SHAPES)}")


def _skew_routers(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if "gate" in leaf[-2:] and param.dim() == 2 and "shared_expert_gate" not in name and "proj" not in name:
            num_experts = param.shape[0]
            popularity = torch.linspace(1.6, 0.4, num_experts)[torch.randperm(num_experts, generator=generator)]
            with torch.no_grad():
                param.normal_(0.0, 1.0, generator=generator)
                param.mul_(popularity[:, None] / param.shape[1] ** 0.5 * 3.0)


def build_tiny_moe(shape: str, out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random tiny MoE checkpoint with tokenizer to ``out_dir`` (skipped if present)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    marker = out / "expertflow-tiny.json"
    recipe = {"shape": shape, "seed": seed, "dtype": str(dtype), "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    tokenizer = build_tokenizer()
    config = _config(shape, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _skew_routers(model, generator)
    model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(recipe))
    return out


def sample_prompts(count: int, *, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """Deterministic prompts of varied lengths drawn from the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=generator))
        ids = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        prompts.append(" ".join(WORDS[i] for i in ids))
    return prompts


def synthetic_image(index: int, size: int = 64):
    """A deterministic picture of a coloured shape on a plain background (no data download)."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(10_000 + index)
    colours = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (20, 20, 20), (150, 150, 150)]
    background, fill = (colours[int(i)] for i in torch.randperm(len(colours), generator=generator)[:2])
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    x0, y0 = (int(v) for v in torch.randint(4, size // 2, (2,), generator=generator))
    x1, y1 = (int(v) for v in torch.randint(size // 2 + 4, size - 4, (2,), generator=generator))
    shape = index % 3
    if shape == 0:
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == 1:
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return image


IMAGE_QUESTIONS = (
    "What shape is in the image?",
    "What color is the shape?",
    "Is there a circle in the image?",
    "Does the image contain a blue shape?",
    "What is the color of the background?",
)


def sample_image_requests(model: str | os.PathLike, count: int, *, seed: int = 0) -> list[dict]:
    """vLLM requests for a vision-language checkpoint: chat-formatted image questions of varied lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    requests = []
    for i in range(count):
        question = IMAGE_QUESTIONS[(i + seed) % len(IMAGE_QUESTIONS)]
        if i % 4 == 3:  # a few longer prompts, so prefill lengths vary
            question = question + " Answer the question using a single word or phrase."
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        requests.append({"prompt": prompt, "multi_modal_data": {"image": synthetic_image(seed * 1000 + i)}})
    return requests
