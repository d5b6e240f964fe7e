"""Fast checks of the bundled toy model ``models/toy-qwen3-vl-moe`` (transformers only, no vLLM).

The checkpoint is built by ``scripts/train_toy_vlm.py train``; these tests check what the rest of the project
relies on: it loads, it is small, its fused expert tensors are in the layout vLLM's Qwen3-VL-MoE loader expects,
its processor and chat template work, it answers easy-vqa test questions in both prompt forms, and its routing is
not uniform.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
easy_vqa = pytest.importorskip("easy_vqa")
pytest.importorskip("transformers.models.qwen3_vl_moe")

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "toy-qwen3-vl-moe"
MAX_MB = 25.0
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
N_QUESTIONS = 20
MIN_ACCURACY = 0.9


def _questions(n: int = N_QUESTIONS, seed: int = 7):
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    vocab = sorted(easy_vqa.get_answers())
    rng = random.Random(seed)
    out = []
    for i in sorted(rng.sample(range(len(texts)), n)):
        distractors = rng.sample([a for a in vocab if a != answers[i]], 3)
        options = [answers[i], *distractors]
        rng.shuffle(options)
        out.append((texts[i], answers[i], paths[image_ids[i]], options))
    return out


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    return model, processor


def _generate(model, processor, prompts, paths, max_new_tokens=4):
    from PIL import Image

    tok = processor.tokenizer
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    tok.padding_side = "left"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    return [tok.decode(r, skip_special_tokens=True).strip() for r in new], batch


def test_checkpoint_files_and_size():
    assert MODEL_DIR.is_dir(), f"{MODEL_DIR} missing: run scripts/train_toy_vlm.py train"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "processor_config.json", "chat_template.jinja", "generation_config.json"):  # fmt: skip
        assert (MODEL_DIR / name).is_file(), name
    size_mb = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file()) / 1e6
    assert size_mb <= MAX_MB, f"checkpoint is {size_mb:.1f} MB > {MAX_MB} MB"


def test_config_shape():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    tc, vc = cfg["text_config"], cfg["vision_config"]
    hidden, inter = tc["hidden_size"], tc["moe_intermediate_size"]
    # vLLM transposes fused experts on load; these keep a wrong layout from loading silently
    assert 2 * inter != hidden and inter != hidden
    assert hidden % 32 == 0  # CPU fused MoE
    assert tc["head_dim"] in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # CPU attention
    assert tc["mlp_only_layers"] == [] and tc["decoder_sparse_step"] == 1  # every layer MoE
    assert tc["norm_topk_prob"] is True  # read by vLLM's Qwen3-MoE block
    assert vc["patch_size"] == 8 and vc["spatial_merge_size"] == 2
    assert not tc.get("output_router_logits", False)


def test_expert_tensors_in_vllm_layout():
    from safetensors import safe_open

    cfg = json.loads((MODEL_DIR / "config.json").read_text())["text_config"]
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    seen = 0
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            if key.endswith("mlp.experts.gate_up_proj"):
                assert shape == (n_exp, hidden, 2 * inter), (key, shape)  # released layout [E, H, 2I]
                seen += 1
            elif key.endswith("mlp.experts.down_proj"):
                assert shape == (n_exp, inter, hidden), (key, shape)  # released layout [E, I, H]
                seen += 1
    assert seen == 2 * cfg["num_hidden_layers"]


def test_tokenizer_and_chat_template(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    for special in (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, special
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is present?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what shape is present?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    sample = "is there not a red shape in the image?" + VQA_SUFFIX
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample
    assert tok.unk_token_id not in tok.encode(sample, add_special_tokens=False)


def test_open_answers_mostly_right(loaded):
    model, processor = loaded
    qs = _questions()
    preds, _ = _generate(model, processor, [q + VQA_SUFFIX for q, _, _, _ in qs], [p for _, _, p, _ in qs])
    acc = sum(p.lower() == a for p, (_, a, _, _) in zip(preds, qs, strict=True)) / len(qs)
    assert acc >= MIN_ACCURACY, list(zip([a for _, a, _, _ in qs], preds, strict=True))


def test_multiple_choice_mostly_right(loaded):
    model, processor = loaded
    qs = _questions()
    prompts = [
        "\n".join([f"{q} Options:"] + [f"{'ABCD'[k]}. {o}" for k, o in enumerate(opts)]) + "\n" + MC_INSTRUCTION
        for q, _, _, opts in qs
    ]
    preds, _ = _generate(model, processor, prompts, [p for _, _, p, _ in qs])
    gold = ["ABCD"[opts.index(a)] for _, a, _, opts in qs]
    acc = sum(p[:1] == g for p, g in zip(preds, gold, strict=True)) / len(qs)
    assert acc >= MIN_ACCURACY, list(zip(gold, preds, strict=True))


def test_routing_not_uniform(loaded):
    model, processor = loaded
    layers = model.model.language_model.layers
    n_exp = model.config.text_config.num_experts
    counts = [torch.zeros(n_exp, dtype=torch.long) for _ in layers]
    handles = []
    for i, layer in enumerate(layers):

        def hook(module, inputs, output, i=i):
            counts[i] += torch.bincount(output[2].reshape(-1), minlength=n_exp)

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        qs = _questions(8, seed=11)
        _generate(model, processor, [q + VQA_SUFFIX for q, _, _, _ in qs], [p for _, _, p, _ in qs], max_new_tokens=1)
    finally:
        for h in handles:
            h.remove()
    for i, c in enumerate(counts):
        share = c.double() / c.sum()
        # uniform would be 1/n_exp each; a trained model without an auxiliary loss is far from it
        assert share.max() > 1.5 / n_exp, (i, share.tolist())
