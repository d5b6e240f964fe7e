"""Model construction shared by both training scripts: the word-level tokenizer, the image processor, the
Qwen3-VL-MoE config, batching (``Encoder``), and saving in the expert layout vLLM loads."""

from __future__ import annotations

import math
import random
import re
import sys
from pathlib import Path

from vllm_expertflow.eval import prompts

from .easy_vqa_data import LETTERS, render_prompt

SEED = 1234
IMAGE_SIZE = 64
PATCH = 8
MERGE = 2
TEMPORAL_PATCH = 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 // MERGE**2  # 16 visual tokens per 64x64 image

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
NON_SPECIAL_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# Qwen3-VL instruct chat template without tool calling: string or list content, images and videos as
# <|vision_start|><|image_pad|><|vision_end|>, optional system turn, generation prompt "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as exc:  # pragma: no cover
        print(f"warning: deterministic algorithms unavailable: {exc!r}", file=sys.stderr)


def corpus_texts(questions, vocabulary, extra_texts=()) -> list[str]:
    """Every string the tokenizer must cover: rendered open and MC prompts with all answers and letters.

    ``extra_texts`` (another model's prompts and targets) come last, so without them the vocabulary and its
    ids are those of the bundled toy model."""
    texts = []
    chat_bits = ["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_start|>system\n",
                 "You are a helpful assistant."]  # fmt: skip
    texts += chat_bits
    for q in sorted(set(questions)):
        texts.append(prompts.open_prompt(q, "direct"))
        texts.append(prompts.mc_prompt(q, sorted(vocabulary)[:4], "direct"))
    for a in vocabulary:
        texts += [a, " " + a, f"A. {a}\n", a.capitalize()]
    for letter in LETTERS + "E":
        texts += [letter, f"{letter}. x\n", f"({letter})"]
    texts += [prompts.DIRECT_MC_INSTRUCTION, prompts.DIRECT_OPEN_SUFFIX, "Picture 1: ", "Video 1: ", "\n\n", " "]
    texts += list(extra_texts)
    # every word with and without a leading space, so a question reworded by a harness stays in vocabulary
    words = sorted({w for t in texts for w in re.findall(r"[A-Za-z']+", t)})
    texts += [w for w in words] + [" " + w for w in words]
    return texts


def build_tokenizer(questions, vocabulary, extra_texts=()):
    """Word-level tokenizer (byte-level pre-tokenisation, so text round-trips exactly) with Qwen3-VL's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Single bytes too, so whitespace/punctuation never maps to <unk>.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.WordLevelTrainer(vocab_size=100000, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(corpus_texts(questions, vocabulary, extra_texts) + sorted(alphabet), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<|im_end|>", "<|endoftext|>")],
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(NON_SPECIAL_ADDED)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # min/max pixels both keep a 64x64 image as is (grid 1x8x8 patches -> 16 tokens after the 2x2 merge);
    # other sizes are rescaled to about 64x64 pixels.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_processor(tokenizer):
    from transformers import Qwen3VLProcessor

    video_processor = None
    try:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        video_processor = Qwen3VLVideoProcessor(
            size={"shortest_edge": 32 * 32 * 2, "longest_edge": IMAGE_SIZE * IMAGE_SIZE * 8},
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL_PATCH,
            merge_size=MERGE,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    except Exception as exc:  # torchvision missing or broken: keep an image-only processor
        print(f"warning: no video processor ({exc!r}); saving an image-only processor", file=sys.stderr)
    return Qwen3VLProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, initializer_range: float = 0.02):
    from transformers import Qwen3VLMoeConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    hidden = 192
    moe_inter = 128
    # vLLM's loader transposes the fused experts; with 2I == H or I == H a wrong layout would load silently.
    assert 2 * moe_inter != hidden and moe_inter != hidden and hidden % 32 == 0
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=1024,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        },
        attention_bias=False,
        decoder_sparse_step=1,
        moe_intermediate_size=moe_inter,
        num_experts_per_tok=2,
        num_experts=8,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
        # Not a transformers field, but vLLM's Qwen3-MoE block reads it (the released configs carry it);
        # transformers' router always renormalises the top-k weights, so True matches.
        norm_topk_prob=True,
        mlp_only_layers=[],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    vision_config = dict(
        depth=2,
        hidden_size=96,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=384,
        num_heads=3,
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=hidden,
        num_position_embeddings=(IMAGE_SIZE // PATCH) ** 2,
        deepstack_visual_indexes=[0],
        initializer_range=initializer_range,
    )
    config = Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    return config


def new_model(config, seed: int = SEED):
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(config)
    model.set_experts_implementation("eager")
    return model


# ---------------------------------------------------------------------------------------------
# Saving in the vLLM layout
# ---------------------------------------------------------------------------------------------


def to_released_layout(state_dict: dict) -> dict:
    """transformers' internal fused-expert layout -> the released Qwen3-VL-MoE layout vLLM loads.

    ``gate_up_proj [E, 2I, H] -> [E, H, 2I]`` and ``down_proj [E, H, I] -> [E, I, H]``.
    """
    out = {}
    for name, t in state_dict.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            t = t.transpose(1, 2)
        out[name] = t.contiguous()
    return out


def save_checkpoint(model, processor, out_dir: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cfg = model.config
    cfg.text_config.output_router_logits = False
    cfg.dtype = dtype
    cfg.text_config.dtype = dtype
    cfg.vision_config.dtype = dtype
    cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    cfg.save_pretrained(out_dir)
    sd = {k: v.detach().to(torch_dtype) for k, v in model.state_dict().items()}
    sd = to_released_layout(sd)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tok = processor.tokenizer
    gen = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    gen.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # Also as a standalone file: some loaders read chat_template.jinja, older ones tokenizer_config.json.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def load_for_eval(model_dir, dtype: str = "float32"):
    import torch
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
    model.set_experts_implementation("eager")
    model.eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


class Encoder:
    """Token ids of rendered prompts (image placeholder expanded) and pixel patches of easy-vqa images."""

    def __init__(self, tokenizer, image_processor):
        self.tok = tokenizer
        self.ip = image_processor
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.newline = tokenizer.encode("\n", add_special_tokens=False)
        self._pixels: dict[str, object] = {}
        self._prompt_cache: dict[str, list[int]] = {}
        self._answer_cache: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        ids = self._prompt_cache.get(text)
        if ids is None:
            raw = self.tok.encode(render_prompt(self.tok, text), add_special_tokens=False)
            ids = []
            for t in raw:
                ids.extend([t] * IMAGE_TOKENS if t == self.image_pad else [t])
            if len(self._prompt_cache) < 200_000:
                self._prompt_cache[text] = ids
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._answer_cache.get(answer)
        if ids is None:
            ids = self.tok.encode(answer, add_special_tokens=False) + [self.im_end]
            self._answer_cache[answer] = ids
        return ids

    def pixels(self, path: str):
        """[64, 3*2*8*8] patches of one image (cached)."""
        pv = self._pixels.get(path)
        if pv is None:
            from PIL import Image

            with Image.open(path) as im:
                out = self.ip(images=[im.convert("RGB")], return_tensors="pt")
            grid = out["image_grid_thw"][0].tolist()
            assert grid == [1, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH], (path, grid)
            pv = out["pixel_values"]
            self._pixels[path] = pv
        return pv

    def image_inputs(self, paths):
        import torch

        pv = torch.cat([self.pixels(p) for p in paths])
        grid = torch.tensor([[1, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH]] * len(paths), dtype=torch.long)
        return pv, grid

    def train_batch(self, prompts, answers, paths):
        """Right-padded batch; labels only on the answer tokens and <|im_end|>."""
        import torch

        seqs, labs = [], []
        for p, a in zip(prompts, answers, strict=True):
            pi, ai = self.prompt_ids(p), self.answer_ids(a)
            seqs.append(pi + ai)
            labs.append([-100] * len(pi) + ai)
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        lab = torch.full((len(seqs), n), -100, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, lb) in enumerate(zip(seqs, labs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(lb)] = torch.tensor(lb)
            att[i, : len(s)] = 1
        pv, grid = self.image_inputs(paths)
        return {"input_ids": ids, "attention_mask": att, "labels": lab, "pixel_values": pv, "image_grid_thw": grid,
                "mm_token_type_ids": self.mm_types(ids)}  # fmt: skip

    def gen_batch(self, prompts, paths):
        """Left-padded prompts for generation."""
        import torch

        seqs = [self.prompt_ids(p) for p in prompts]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s) :] = torch.tensor(s)
            att[i, n - len(s) :] = 1
        pv, grid = self.image_inputs(paths)
        return {"input_ids": ids, "attention_mask": att, "pixel_values": pv, "image_grid_thw": grid,
                "mm_token_type_ids": self.mm_types(ids)}  # fmt: skip

    def mm_types(self, ids):
        """M-RoPE needs the modality of each token: 1 for image placeholders, 0 for text."""
        return (ids == self.image_pad).int()
