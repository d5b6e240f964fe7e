"""The fine-tuning loop: AdamW with warm-up and cosine decay, loss on the target tokens only."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .study_data import TrainingData


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, encoder, data: TrainingData, *, steps: int, batch: int, lr: float, warmup: int,
          vision_lr_mult: float, log: Callable[[str], None],
          every: int = 0, on_every: Callable[[int], None] | None = None) -> float:
    """Fine-tunes ``model`` in place; returns the seconds spent. ``on_every(step)`` runs every ``every`` steps
    (monitoring, checkpoints), outside the timed loop's optimizer state."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        groups.setdefault((name.startswith("model.visual."), p.ndim < 2 or "norm" in name), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if no_decay else 0.01, "lr_mult": vision_lr_mult if vision else 1.0}
         for (vision, no_decay), ps in sorted(groups.items())],
        lr=lr, betas=(0.9, 0.98),
    )  # fmt: skip
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    start = time.time()
    for step in range(steps):
        rate = cosine_lr(step, steps, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = rate * group["lr_mult"]
        samples = data.batch(batch)
        inputs = encoder.train_batch([s.prompt for s in samples], [s.target for s in samples],
                                     [s.path for s in samples])  # fmt: skip
        loss = model(**inputs, output_router_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"step {step:5d} loss {loss.item():.4f} lr {rate:.2e} t {time.time() - start:.0f}s")
        if every and on_every is not None and (step + 1) % every == 0 and step + 1 < steps:
            on_every(step + 1)
            model.train()
    return time.time() - start
