#!/usr/bin/env python
"""Build the study model ``models/study-qwen3-vl-moe`` on CPU: a Qwen3-VL-MoE shaped like the MoE-VLMs people
run (128 experts, top-8, 6 MoE layers), answering easy-vqa directly or with a short rationale.

It is grown from the bundled toy model (``scripts/vlm_training/upcycle.py`` says how) and fine-tuned on easy-vqa's
train split in both regimes (``vllm_expertflow/eval/prompts.py``) and both forms (open, multiple choice).

    python scripts/train_study_vlm.py train --out models/study-qwen3-vl-moe     # about an hour on 2 cores
    python scripts/train_study_vlm.py eval-vllm --model models/study-qwen3-vl-moe --limit 500 --update-card

Run from the repository root (``nice -n 19`` on shared machines). Deterministic given ``--seed`` and
``--threads`` (``torch.use_deterministic_algorithms``); other thread counts or torch versions may differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_training import build, card, evaluate, loop, study_data, upcycle  # noqa: E402

TOY_MODEL = Path(__file__).resolve().parents[1] / "models" / "toy-qwen3-vl-moe"


def cmd_train(args) -> None:
    build.setup_torch(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "training_log.txt"
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)
        log_path.write_text("\n".join(log_lines) + "\n")

    t_start = time.time()
    old_model, old_processor = build.load_for_eval(str(args.base), "float32")
    data = study_data.TrainingData(args.seed, args.rationale_fraction, args.mc_fraction)
    tokenizer = build.build_tokenizer(
        data.questions, data.vocabulary,
        extra_texts=study_data.extra_tokenizer_texts(data.questions, data.vocabulary, data.colors),
    )  # fmt: skip
    processor = build.build_processor(tokenizer)
    config = build.build_config(tokenizer)
    upcycle.study_text_shape(config.text_config, args.experts, args.top_k, args.moe_intermediate)
    model = build.new_model(config, seed=args.seed)
    model.set_experts_implementation(args.experts_implementation)
    copied = upcycle.upcycle(old_model, old_processor.tokenizer, model, tokenizer, seed=args.seed)
    del old_model
    n_params = sum(p.numel() for p in model.parameters())
    log(f"study model: {n_params / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}, {copied}")
    encoder = build.Encoder(tokenizer, processor.image_processor)
    monitor_items = study_data.test_items(args.monitor_limit, seed=1)
    history = []

    def monitor(step: int) -> None:
        t = time.time()
        row = {"step": step, "seconds": round(t - t_train)}
        for regime in ("direct", "rationale"):
            r = evaluate.evaluate_hf(model, encoder, monitor_items, regime)
            row[regime] = {"open": r["open"]["all"], "mc": r["mc"]["all"], "parsable": r["parsable"]}
        history.append(row)
        log(f"monitor {json.dumps(row)} ({time.time() - t:.0f}s)")
        if step:
            build.save_checkpoint(model, processor, out_dir, "bfloat16")
            log(f"checkpoint saved at step {step}")

    t_train = time.time()
    if args.monitor_every:
        monitor(0)
    seconds = loop.train(model, encoder, data, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                         vision_lr_mult=args.vision_lr_mult, log=log, every=args.monitor_every,
                         on_every=monitor)  # fmt: skip
    log(f"fine-tuning: {args.steps} steps in {seconds:.0f}s")
    model.eval()
    build.save_checkpoint(model, processor, out_dir, "bfloat16")
    stats = {
        "parameters": n_params,
        "upcycled_from": str(args.base),
        "upcycling": copied,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "vision_lr_mult": args.vision_lr_mult,
        "rationale_fraction": args.rationale_fraction,
        "mc_fraction": args.mc_fraction,
        "threads": args.threads,
        "seed": args.seed,
        "train_seconds": round(seconds),
        "total_seconds": round(time.time() - t_start),
        "monitor": history,
        "command": " ".join(["python"] + sys.argv),
    }
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=1))
    log(f"saved {out_dir} ({build.dir_size_mb(out_dir):.2f} MB) in {time.time() - t_start:.0f}s")


def cmd_eval(args) -> None:
    """vLLM accuracy per regime (bf16) and routing statistics (transformers); writes evaluation.json and the card."""
    import torch
    from transformers import AutoConfig

    model_dir = Path(args.model)
    items = study_data.test_items(args.limit, seed=0)
    result = {"vllm": evaluate.evaluate_vllm(str(model_dir), items, args.dtype)}
    for regime in ("direct", "rationale"):
        r = result["vllm"][regime]
        print(f"{regime}: open {r['open']} | circular {r['circular']} | parsable {r['parsable']}", flush=True)
    result["command"] = " ".join(["python"] + sys.argv)
    out_json = Path(args.json) if args.json else model_dir / "evaluation.json"
    if args.routing_limit == 0:
        out_json.write_text(json.dumps(result, indent=1))
        return
    build.setup_torch(args.threads)
    torch.use_deterministic_algorithms(False)
    model, processor = build.load_for_eval(str(model_dir), "float32")
    model.set_experts_implementation("grouped_mm")
    encoder = build.Encoder(processor.tokenizer, processor.image_processor)
    routing_items = study_data.test_items(args.routing_limit, seed=2)
    sets = evaluate.question_expert_sets(model, encoder, routing_items)
    routing = evaluate.routing_statistics(sets, [it.kind for it in routing_items], model.config.text_config.num_experts)
    routing["questions"] = len(routing_items)
    routing["mean_set_size"] = sum(len(s) for layer in sets.values() for s in layer) / sum(
        len(layer) for layer in sets.values()
    )
    result["routing"] = routing
    print(f"routing: {routing}", flush=True)
    out_json.write_text(json.dumps(result, indent=1))
    if args.update_card:
        training = json.loads((model_dir / "training_stats.json").read_text())
        config = AutoConfig.from_pretrained(model_dir)
        text = card.render(config, training, result["vllm"], routing, build.dir_size_mb(model_dir), result["command"])
        (model_dir / "README.md").write_text(text)
        print(f"wrote {model_dir / 'README.md'}")


def cmd_card(args) -> None:
    """Re-render the model card from training_stats.json and evaluation.json (no evaluation)."""
    from transformers import AutoConfig

    model_dir = Path(args.model)
    training = json.loads((model_dir / "training_stats.json").read_text())
    result = json.loads((model_dir / "evaluation.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    text = card.render(config, training, result["vllm"], result["routing"], build.dir_size_mb(model_dir),
                       result["command"])  # fmt: skip
    (model_dir / "README.md").write_text(text)
    print(f"wrote {model_dir / 'README.md'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="upcycle the toy model and fine-tune it in both regimes")
    tr.add_argument("--out", default="models/study-qwen3-vl-moe")
    tr.add_argument("--base", default=str(TOY_MODEL), help="the trained toy model to grow from")
    tr.add_argument("--experts", type=int, default=128)
    tr.add_argument("--top-k", type=int, default=8)
    tr.add_argument("--moe-intermediate", type=int, default=32)
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--warmup", type=int, default=50)
    tr.add_argument("--vision-lr-mult", type=float, default=0.3)
    tr.add_argument("--rationale-fraction", type=float, default=0.5)
    tr.add_argument("--mc-fraction", type=float, default=0.4)
    tr.add_argument("--monitor-every", type=int, default=200)
    tr.add_argument("--monitor-limit", type=int, default=48)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--seed", type=int, default=build.SEED)
    tr.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "eager"])
    tr.set_defaults(fn=cmd_train)
    ev = sub.add_parser("eval-vllm", help="accuracy through vLLM per regime, routing statistics, model card")
    ev.add_argument("--model", default="models/study-qwen3-vl-moe")
    ev.add_argument("--limit", type=int, default=500)
    ev.add_argument("--routing-limit", type=int, default=300, help="0: skip the routing statistics")
    ev.add_argument("--json", help="where to write the results (default: MODEL/evaluation.json)")
    ev.add_argument("--dtype", default="bfloat16")
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--update-card", action="store_true")
    ev.set_defaults(fn=cmd_eval)
    cd = sub.add_parser("card", help="re-render the model card from the saved stats and evaluation")
    cd.add_argument("--model", default="models/study-qwen3-vl-moe")
    cd.set_defaults(fn=cmd_card)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
