"""The README's main job: offline generation on the bundled tiny MoE model with offload on.

Generates with offload off and on (a quarter of the experts per layer as slots), checks
the tokens are identical, and prints the cache statistics as a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-qwen3-moe"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--cache-slots", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from vllm_expertflow.generate import run

    off, on = run(
        args.model,
        [{"name": "offload off"},
         {"name": f"offload on, {args.cache_slots} slots", "offload": {"enabled": True, "cache_slots": args.cache_slots}}],
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
    )
    cache = on["cache"]
    print()
    print(f"model: {args.model}")
    print(f"greedy tokens identical with offload on: {on['tokens'] == off['tokens']}")
    print(f"throughput: offload off {off['generated_tokens'] / off['generate_s']:.1f} tok/s, "
          f"on {on['generated_tokens'] / on['generate_s']:.1f} tok/s")
    print()
    print(f"{'layer':<32} {'slots':>5} {'hits':>7} {'misses':>7} {'loads':>7} {'evictions':>9} {'MB loaded':>10}")
    for layer in cache["layers"]:
        print(f"{layer['layer']:<32} {layer['slots']:>5} {layer['hits']:>7} {layer['misses']:>7} {layer['loads']:>7} "
              f"{layer['evictions']:>9} {layer['bytes_loaded'] / 1e6:>10.2f}")
    print(f"{'total':<32} {'':>5} {cache['hits']:>7} {cache['misses']:>7} {cache['loads']:>7} "
          f"{cache['evictions']:>9} {cache['bytes_loaded'] / 1e6:>10.2f}")
    print(f"hit rate {cache['hit_rate']:.3f}; loads per generated token {cache['loads'] / on['generated_tokens']:.2f}")
    return 0 if on["tokens"] == off["tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
