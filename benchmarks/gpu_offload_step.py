"""Decode steps of a Qwen3-30B-A3B-shaped MoE stack, experts resident vs offloaded, on one GPU.

    python benchmarks/gpu_offload_step.py [--layers 8 --experts 128 --hidden 2048 --intermediate 768 --top-k 8]

Torch only (vLLM cannot run on the lent GPU machine), so the stack is the core's view of a
model: per MoE layer a router, top-k, SwiGLU experts and a residual. Every setting runs
the same steps from the same inputs:

- ``resident``: every expert on the device (no offload): the reference output and time floor;
- ``lru``: per-layer ``ExpertSlotCache`` (LRU), demand loads only;
- ``lru+lookahead``: as the plugin's ``--expert-prefetch lookahead``: before layer l's experts
  run, layer l+1's router is applied to layer l's input and its experts are prefetched on
  the copy stream, overlapping layer l's compute;
- ``pool+lookahead``: the ``expertflow`` global pool (one budget for all layers) with the same
  lookahead.

Requests keep their topic across steps (input = the request's base vector + noise), so
routing has the step-to-step locality of decoding. Reports ms per step, expert loads and
MB copied per step, the copy time those bytes need at the measured pinned-H2D bandwidth,
the share of it hidden behind compute, and the largest relative difference from the
resident output (expected: 0 when a layer fits in one pass; bf16 rounding when a layer runs
in passes, whose matrix products see other row counts). Writes
benchmarks/results/gpu_offload_step.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.core import ExpertSlotCache, ExpertStore, LRUPolicy  # noqa: E402
from vllm_expertflow.core.expert_pool import ExpertPool, PooledLayerCache  # noqa: E402
from vllm_expertflow.provenance import provenance, results_header  # noqa: E402


def grouped_swiglu(x, weights, topk_weights, ids):
    """Tokens sorted by expert, one SwiGLU per expert present; deterministic (no atomics)."""
    w13, w2 = weights
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0])
    present = torch.nonzero(counts).squeeze(1)
    experts, sizes = present.tolist(), counts[present].tolist()
    rows = x.index_select(0, order // top_k)
    out_rows = torch.empty_like(rows)
    start = 0
    for expert, size in zip(experts, sizes, strict=True):
        gate, up = (rows[start : start + size] @ w13[expert].T).chunk(2, dim=-1)
        out_rows[start : start + size] = (F.silu(gate) * up) @ w2[expert].T
        start += size
    unsorted = torch.empty_like(out_rows)
    unsorted[order] = out_rows * topk_weights.reshape(-1)[order].unsqueeze(1).to(out_rows.dtype)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1)


class RoutedStack:
    """Routers and host expert stores of ``layers`` MoE layers; weights made on the device, kept pinned on the host."""

    def __init__(self, args, device: torch.device) -> None:
        generator = torch.Generator(device=device).manual_seed(0)
        h, i, e = args.hidden, args.intermediate, args.experts
        self.top_k = args.top_k
        self.routers, self.stores, self.resident = [], [], []
        for _ in tqdm(range(args.layers), desc="weights", leave=False):
            w13 = torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16, generator=generator) * h**-0.5
            w2 = torch.randn(e, h, i, device=device, dtype=torch.bfloat16, generator=generator) * i**-0.5
            popularity = torch.linspace(1.6, 0.4, e, device=device)[torch.randperm(e, device=device, generator=generator)]
            router = torch.randn(e, h, device=device, generator=generator) * popularity[:, None] * 3.0 * h**-0.5
            self.routers.append(router.to(torch.bfloat16))
            self.resident.append([w13, w2])
            pin = device.type == "cuda"
            host = [torch.empty(w.shape, dtype=w.dtype, pin_memory=pin).copy_(w) for w in (w13, w2)]
            self.stores.append(ExpertStore(host, pin_memory=pin))

    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = hidden @ self.routers[layer].T
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def step(self, x: torch.Tensor, caches=None, lookahead: bool = False) -> torch.Tensor:
        """One decode step through every layer. As the plugin's MoE layer does, a layer reads its
        routing (and the lookahead's prediction with it) back to the host once."""
        num_experts = self.routers[0].shape[0]
        for layer in range(len(self.routers)):
            hidden = F.rms_norm(x, (x.shape[-1],))
            weights, ids = self.route(layer, hidden)
            experts = None
            if lookahead and layer + 1 < len(self.routers):
                _, predicted = self.route(layer + 1, hidden)
                both = torch.cat([ids.reshape(-1), predicted.reshape(-1)]).cpu()
                host_ids = both[: ids.numel()].view(ids.shape)
                counts = torch.bincount(both[ids.numel() :], minlength=num_experts)
                order = torch.argsort(counts, descending=True, stable=True)
                experts = [e for e in order.tolist() if counts[e] > 0]
            elif caches is not None:
                host_ids = ids.cpu()
            if caches is None:  # resident (+ the lookahead's own cost, predictions unused)
                x = x + grouped_swiglu(hidden, self.resident[layer], weights, ids)
                continue
            if experts is not None:
                following = caches[layer + 1]
                if isinstance(following, PooledLayerCache):
                    running = [(layer, e) for e in torch.unique(host_ids).tolist()]
                    following.prefetch(experts, protected=running, demand=(counts > 0).double().numpy())
                else:
                    following.prefetch(experts)
            x = x + caches[layer].run(hidden, weights, ids, grouped_swiglu, host_topk_ids=host_ids.numpy())
        return x


def make_caches(stack: RoutedStack, setting: str, slots: int, device: torch.device):
    if setting.startswith("lru"):
        return None, [ExpertSlotCache(store, slots, LRUPolicy(), device) for store in stack.stores]
    pool = ExpertPool(stack.stores[0], len(stack.stores), slots, stack.top_k, device)
    return pool, [pool.add_layer(layer, store) for layer, store in enumerate(stack.stores)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_h2d_gbps(stack: RoutedStack, device: torch.device) -> float:
    """Raw copies of (up to 32) experts from the pinned store on a side stream: the link's ceiling here."""
    store = stack.stores[0]
    experts = min(32, store.num_experts)
    destination = [torch.empty((experts, *w.shape[1:]), dtype=w.dtype, device=device) for w in store.weights]
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    best = 0.0
    for _ in range(4):
        sync(device)
        start = time.perf_counter()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for slot in range(experts):
                for buffer, source in zip(destination, store.expert(slot), strict=True):
                    buffer[slot].copy_(source, non_blocking=True)
        if stream is not None:
            stream.synchronize()
        best = max(best, experts * store.bytes_per_expert / (time.perf_counter() - start) / 1e9)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batches", default="1,8,32", help="decode batch sizes (running requests)")
    parser.add_argument("--capacities", default="0.25,0.5", help="slots per layer as fractions of the experts")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_offload_step"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_offload_step needs a CUDA device (or --device cpu for a dry run); none is visible here")
    batches = [int(b) for b in args.batches.split(",")]
    capacities = [float(c) for c in args.capacities.split(",")]
    for fraction in capacities:
        if not args.top_k / args.experts <= fraction <= 1:
            raise SystemExit(f"--capacities {fraction}: must be between top_k/experts ({args.top_k / args.experts}) and 1")

    torch.manual_seed(0)
    stack = RoutedStack(args, device)
    link_gbps = pinned_h2d_gbps(stack, device)
    bytes_per_expert = stack.stores[0].bytes_per_expert
    rows = []
    settings = [(b, None, s) for b in batches for s in ("resident", "resident+lookahead")] + [
        (b, c, s) for b in batches for c in capacities for s in ("lru", "lru+lookahead", "pool+lookahead")
    ]
    references: dict[int, list[torch.Tensor]] = {}
    for batch, fraction, setting in tqdm(settings, desc="settings"):
        generator = torch.Generator(device=device).manual_seed(batch)
        base = torch.randn(batch, args.hidden, device=device, generator=generator)
        inputs = [
            (base + 0.3 * torch.randn(batch, args.hidden, device=device, generator=generator)).to(torch.bfloat16)
            for _ in range(args.warmup + args.steps)
        ]
        slots = None if fraction is None else max(args.top_k, round(fraction * args.experts))
        pool, caches = (None, None) if slots is None else make_caches(stack, setting, slots, device)
        times, outputs = [], []
        for index, x in enumerate(inputs):
            sync(device)
            start = time.perf_counter()
            if pool is not None:
                pool.begin_step()
            out = stack.step(x, caches, lookahead=setting.endswith("lookahead"))
            sync(device)
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
            outputs.append(out)
            if index == args.warmup - 1 and caches is not None:
                loads_before = sum(c.stats.loads for c in caches)
                prefetch_before = sum(c.stats.prefetch_loads for c in caches)
                prefetch_hits_before = sum(c.stats.prefetch_hits for c in caches)
        ms = statistics.median(times) * 1e3
        if caches is None:
            references.setdefault(batch, outputs)
            row = dict(batch=batch, capacity="100% (resident)", setting=setting, ms_per_step=ms, loads_per_step=0.0,
                       prefetch_loads_per_step=0.0, prefetch_hit_rate=None, mb_per_step=0.0, copy_ms=0.0,
                       hidden_share=None, max_rel_diff=0.0)
        else:
            loads = (sum(c.stats.loads for c in caches) - loads_before) / args.steps
            prefetched = (sum(c.stats.prefetch_loads for c in caches) - prefetch_before) / args.steps
            prefetch_hits = (sum(c.stats.prefetch_hits for c in caches) - prefetch_hits_before) / args.steps
            copy_ms = loads * bytes_per_expert / (link_gbps * 1e9) * 1e3
            floor = next(r["ms_per_step"] for r in rows if r["batch"] == batch and r["setting"] == "resident")
            diff = max(
                float((o.float() - r.float()).norm() / r.float().norm())
                for o, r in zip(outputs, references[batch], strict=True)
            )
            row = dict(batch=batch, capacity=f"{fraction:.0%} ({slots} slots)", setting=setting, ms_per_step=ms,
                       loads_per_step=loads, prefetch_loads_per_step=prefetched,
                       prefetch_hit_rate=prefetch_hits / prefetched if prefetched else None, mb_per_step=loads * bytes_per_expert / 1e6,
                       copy_ms=copy_ms, hidden_share=(1 - (ms - floor) / copy_ms) if copy_ms > 0 else None,
                       max_rel_diff=diff)
        rows.append(row)
        del caches, pool
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    header = (
        f"{name}; {args.layers} MoE layers x {args.experts} experts (hidden {args.hidden}, expert intermediate "
        f"{args.intermediate}, top-{args.top_k}, bf16), expert {bytes_per_expert / 1e6:.2f} MB; pinned H2D "
        f"{link_gbps:.1f} GB/s (raw copies on a side stream); median of {args.steps} steps after {args.warmup} warm-up"
    )
    lines = [
        header, "",
        "| batch | capacity | setting | ms/step | ratio to resident | loads/step (prefetched) | prefetches used | MB/step | copy ms at link rate | copy time hidden | max rel diff vs resident |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor = next(x["ms_per_step"] for x in rows if x["batch"] == r["batch"] and x["setting"] == "resident")
        hidden = "-" if r["hidden_share"] is None else f"{r['hidden_share']:.0%}"
        used = "-" if r["prefetch_hit_rate"] is None else f"{r['prefetch_hit_rate']:.0%}"
        lines.append(
            f"| {r['batch']} | {r['capacity']} | {r['setting']} | {r['ms_per_step']:.2f} | {r['ms_per_step'] / floor:.2f} | "
            f"{r['loads_per_step']:.1f} ({r['prefetch_loads_per_step']:.1f}) | {used} | {r['mb_per_step']:.0f} | {r['copy_ms']:.2f} | "
            f"{hidden} | {r['max_rel_diff']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(results_header() + "\n\n" + table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"provenance": provenance(), "device": name, "link_gbps": link_gbps, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
