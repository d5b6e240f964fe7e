"""Host-to-device bandwidth for expert-sized tensors, and the slot cache's load path against it.

    python benchmarks/gpu_expert_transfer.py [--hidden 2048 --intermediate 768 --experts 128]

Torch only (vLLM is not needed, so this runs on a bare GPU machine). Measures:
1. raw pinned-host -> device copies of one expert (w13 [2I, H] + w2 [H, I], bf16), batched;
2. ExpertSlotCache.ensure_resident on the same experts (policy bookkeeping, side stream,
   event ordering, slot-table update) through the same link;
and prints the ratio of the two bandwidths. Writes benchmarks/results/gpu_expert_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.core import ExpertSlotCache, ExpertStore, LRUPolicy  # noqa: E402
from vllm_expertflow.provenance import provenance  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_expert_transfer.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_expert_transfer needs a CUDA device; none is visible here")
    device = torch.device("cuda")
    h, i, e = args.hidden, args.intermediate, args.experts
    w13 = torch.randn(e, 2 * i, h, dtype=torch.bfloat16).pin_memory()
    w2 = torch.randn(e, h, i, dtype=torch.bfloat16).pin_memory()
    store = ExpertStore([w13, w2], pin_memory=True)
    per_expert = store.bytes_per_expert

    # 1. raw copies: args.slots experts per round into a device buffer
    dst13 = torch.empty(args.slots, 2 * i, h, dtype=torch.bfloat16, device=device)
    dst2 = torch.empty(args.slots, h, i, dtype=torch.bfloat16, device=device)
    stream = torch.cuda.Stream()

    def raw_round(offset: int) -> None:
        with torch.cuda.stream(stream):
            for s in range(args.slots):
                expert = (offset + s) % e
                dst13[s].copy_(w13[expert], non_blocking=True)
                dst2[s].copy_(w2[expert], non_blocking=True)
        stream.synchronize()

    raw_round(0)
    start = time.perf_counter()
    for r in range(args.rounds):
        raw_round(r * args.slots)
    raw_s = time.perf_counter() - start
    raw_gbps = args.rounds * args.slots * per_expert / raw_s / 1e9

    # 2. the cache: every round needs args.slots new experts (all misses)
    cache = ExpertSlotCache(store, args.slots, LRUPolicy(), device)
    cache.ensure_resident(list(range(args.slots)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for r in range(1, args.rounds + 1):
        cache.ensure_resident([(r * args.slots + s) % e for s in range(args.slots)])
    torch.cuda.synchronize()
    cache_s = time.perf_counter() - start
    cache_gbps = args.rounds * args.slots * per_expert / cache_s / 1e9

    # correctness: the slots hold the experts the map says
    for expert, slot in list(cache.map.resident().items())[:4]:
        assert torch.equal(cache.slots[0][slot].cpu(), w13[expert]) and torch.equal(cache.slots[1][slot].cpu(), w2[expert])

    result = {
        "device": torch.cuda.get_device_name(),
        "bytes_per_expert": per_expert,
        "raw_pinned_h2d_gbps": raw_gbps,
        "cache_load_gbps": cache_gbps,
        "ratio_cache_to_raw": cache_gbps / raw_gbps,
        "args": vars(args),
        "provenance": provenance(),
    }
    print(f"{result['device']}: expert {per_expert / 1e6:.2f} MB; raw pinned H2D {raw_gbps:.1f} GB/s; "
          f"cache load path {cache_gbps:.1f} GB/s; ratio {cache_gbps / raw_gbps:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
