"""The study model's card (README.md in the model folder), from training stats and measured evaluations."""

from __future__ import annotations

from vllm_expertflow.eval import prompts

KINDS = ("all", "yes/no", "shape", "color")


def accuracy_table(vllm_eval: dict) -> str:
    """One row per regime and form; columns: all questions, then per answer kind."""
    lines = ["| regime | form | " + " | ".join(KINDS) + " | parsable | generated tokens (mean) |",
             "|" + "---|" * (len(KINDS) + 4)]  # fmt: skip
    for regime in prompts.REGIMES:
        r = vllm_eval[regime]
        for form, label in (("open", "open answer"), ("mc", "multiple choice"), ("circular", "CircularEval")):
            cells = " | ".join(f"{r[form].get(k, float('nan')):.3f}" for k in KINDS)
            lines.append(f"| {regime} | {label} | {cells} | {r['parsable']:.3f} | {r['mean_generated_tokens']} |")
    return "\n".join(lines)


def routing_table(stats: dict) -> str:
    lines = ["| layer | usage entropy (bits; max {:.2f}) | Jaccard within type | Jaccard across types |".format(
        stats["max_entropy_bits"]), "|---|---|---|---|"]  # fmt: skip
    for layer, (h, w, a) in enumerate(zip(stats["entropy_bits"], stats["jaccard_within"], stats["jaccard_across"], strict=True)):
        lines.append(f"| {layer} | {h:.2f} | {w:.3f} | {a:.3f} |")
    return "\n".join(lines)


def render(config, training: dict, vllm_eval: dict, routing: dict, size_mb: float, eval_command: str) -> str:
    tc, vc = config.text_config, config.vision_config
    monitor = "\n".join(
        f"| {row['step']} | {row['seconds']} | {row['direct']['open']:.3f} | {row['direct']['mc']:.3f} | "
        f"{row['rationale']['open']:.3f} | {row['rationale']['mc']:.3f} |"
        for row in training["monitor"]
    )
    example = prompts.rationale_text("circle", "red", "color", "red")
    return f"""---
license: mit
library_name: transformers
pipeline_tag: image-text-to-text
tags: [qwen3_vl_moe, toy, easy-vqa, moe, test-model]
datasets: [easy-vqa]
---

# study-qwen3-vl-moe

The default model of vllm-expertflow's accuracy study: a small `Qwen3VLMoeForConditionalGeneration` with the MoE
shape of the MoE vision-language models people run (Qwen3-VL-30B-A3B: 128 routed experts, top-8), trained on CPU
to answer easy-vqa questions in two regimes selected by the prompt. {training['parameters'] / 1e6:.2f} M
parameters, {size_mb:.1f} MB on disk (bf16). A stand-in for expert-cache experiments, not a useful VLM: it only
knows easy-vqa's synthetic images (one coloured shape on a 64x64 canvas).

## Architecture

- Text: hidden {tc.hidden_size}, **{tc.num_hidden_layers} decoder layers, all MoE: {tc.num_experts} experts, top-{
tc.num_experts_per_tok}**, moe_intermediate_size {tc.moe_intermediate_size} (fine-grained experts, as in Qwen3-MoE),
  renormalised top-k weights; {tc.num_attention_heads} attention heads of {tc.head_dim} ({tc.num_key_value_heads} KV
  heads), interleaved M-RoPE; word-level vocabulary of {tc.vocab_size}. One expert is
  3 x {tc.hidden_size} x {tc.moe_intermediate_size} x 2 B = {3 * tc.hidden_size * tc.moe_intermediate_size * 2 / 1024:.1f} KiB in bf16.
- Vision: depth {vc.depth}, hidden {vc.hidden_size}, patch {vc.patch_size}, merge {vc.spatial_merge_size}: a 64x64
  image is 16 visual tokens.
- Fused experts stored in the released Qwen3-VL-MoE layout vLLM loads (`gate_up_proj [E, H, 2I]`,
  `down_proj [E, I, H]`).

## Prompts (`vllm_expertflow/eval/prompts.py`)

Both regimes use the Qwen3-VL chat template with the image first in the user turn.

- **direct**: open questions end with `{prompts.DIRECT_OPEN_SUFFIX.strip()}` and the model answers one word;
  multiple choice (MMBench layout: `question Options:\\nA. ..\\nB. ..\\nC. ..\\nD. ..`) ends with
  `{prompts.DIRECT_MC_INSTRUCTION}` and it answers the letter.
- **rationale**: open questions end with `{prompts.RATIONALE_OPEN_SUFFIX.strip()}`, multiple choice with
  `{prompts.RATIONALE_MC_INSTRUCTION}`. The model first says what it sees and what is asked, then the final
  answer on its own line, e.g.:

  ```
  {example.replace(chr(10), chr(10) + '  ')}
  ```

  (multiple choice adds `Option B is red.` and ends `Answer: B`). **Scorers extract the first word after the last
  `{prompts.ANSWER_MARKER}`** (`prompts.final_answer`); a prediction without it is wrong.

## Accuracy (vLLM, bf16, greedy)

{vllm_eval['questions']} seeded easy-vqa **test** questions; open answer = exact match; MC = the first option
order; Circular = MMBench's CircularEval (right in all 4 rotations of the options). Measured by
`{eval_command}`.

{accuracy_table(vllm_eval)}

## Routing (input-dependent)

Over the prefill of {routing['questions']} test questions (open form, direct regime; transformers fp32): per layer,
the entropy of expert usage across questions' expert sets (uniform over {tc.num_experts} experts would be
{routing['max_entropy_bits']:.2f} bits), and the mean Jaccard overlap of two questions' expert sets, for two questions of
the same type (yes/no, shape, colour) and of different types. One question's prompt alone touches
{routing['mean_set_size']:.1f} of the {tc.num_experts} experts per layer on average.

{routing_table(routing)}

## Training

- Grown from `models/toy-qwen3-vl-moe` (upcycling, `scripts/vlm_training/upcycle.py`): each of its 8 experts
  split into 4 slices of 32 intermediate units, each slice copied to 4 replicas with 5% noise (128 experts), down
  projections x4 so top-8 of the children adds back up to the parent; router rows copied with noise; layers 1 and 2
  repeated (0, 1, 1', 2, 2', 3) with the repeats' output projections at 0.1x; vocabulary rebuilt for the rationale
  words, shared rows copied. Before fine-tuning it answered {training['monitor'][0]['direct']['open']:.3f} of the
  monitor questions directly (open), {training['monitor'][0]['rationale']['open']:.3f} in the rationale regime.
- Fine-tuning on easy-vqa's **train split** (38,575 questions on 4,000 images; package `easy-vqa`, MIT): {
training['steps']} steps x {training['batch']} samples; {training['rationale_fraction']:.0%} rationale regime (only
  images whose shape and colour the train questions reveal), {training['mc_fraction']:.0%} multiple choice; AdamW lr
  {training['lr']} (vision tower x{training['vision_lr_mult']}), {training['warmup']} warm-up steps, cosine decay; loss
  on the target and `<|im_end|>` only; no auxiliary load-balancing loss. No test data was used for training.
- Wall time: fine-tuning {training['train_seconds']} s, {training['total_seconds'] / 60:.1f} min in total (plus the 31 min that trained the toy model it grows
  from, so about 67 min from scratch), on a 2-core
  CPU machine shared with other jobs, {training['threads']} torch thread, fp32, deterministic algorithms, seed
  {training['seed']}.
- Command: `{training['command']}`, then copied here.

Monitoring during training (transformers, {48} test questions, logged only: it chose nothing):

| step | seconds | direct open | direct MC | rationale open | rationale MC |
|---|---|---|---|---|---|
{monitor}

## Rebuild

```bash
python scripts/train_study_vlm.py train --out models/study-qwen3-vl-moe
python scripts/train_study_vlm.py eval-vllm --model models/study-qwen3-vl-moe --limit 500 --update-card
```

## Limitations

Synthetic toy data only; 13 possible answers. Use it as a stand-in for MoE serving and expert-offloading
experiments, not for any real task.
"""
