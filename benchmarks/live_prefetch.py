"""Live prefetch and the expertflow global pool, measured in vLLM on the bundled tiny model.

    python benchmarks/live_prefetch.py [--model models/tiny-qwen3-moe] [--num-prompts 32] [--max-tokens 32]

At 25% and 50% of the experts as slots it runs lru, lru + lookahead, lru + predictor,
expertflow and expertflow + lookahead, and reports demand loads per generated token (the
loads a layer waits for), prefetch loads, the prefetch hit rate (prefetched experts needed
before their eviction), the cache hit rate, tok/s and whether the tokens equal offload off.
The predictor is trained first (scripts/train_predictor.py) on a trace recorded with other
prompts than the measured ones. Writes benchmarks/results/live_prefetch.md.

On a CPU machine host and "device" are the same memory, so a load is a memcpy and tok/s
says little about a GPU's PCIe stalls; the load counts are what transfers to a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vllm_expertflow.provenance import results_header  # noqa: E402


def generate(model: str, runs: list[dict], args, *, prompts_file: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [
            sys.executable,
            "-m",
            "vllm_expertflow.generate",
            "--model",
            model,
            "--runs",
            json.dumps(runs),
            "--num-prompts",
            str(args.num_prompts),
            "--max-tokens",
            str(args.max_tokens),
            "--dtype",
            args.dtype,
            "--out",
            str(out),
        ]
        if prompts_file:
            cmd += ["--prompts-file", prompts_file]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise SystemExit(f"generation failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def train_predictor(model: str, args, work: Path, num_experts: int) -> Path:
    """Record a routing trace on other prompts than the measured ones and train the predictor on it."""
    from vllm_expertflow.tiny_models import sample_prompts

    prompts = work / "train-prompts.json"
    prompts.write_text(json.dumps(sample_prompts(args.num_prompts * 2, seed=101)))
    trace = work / "trace"
    offload = {"enabled": True, "cache_slots": num_experts // 2, "trace_dir": str(trace)}
    generate(model, [{"name": "trace", "offload": offload}], args, prompts_file=str(prompts))
    path = work / "predictor.pt"
    proc = subprocess.run(
        [sys.executable, "scripts/train_predictor.py", "--trace", str(trace), "--out", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"predictor training failed:\n{proc.stderr[-4000:]}")
    return path


def settings(slots: int, predictor: Path) -> list[dict]:
    base = {"enabled": True, "cache_slots": slots}
    return [
        {"name": "lru", "offload": base},
        {"name": "lru + lookahead", "offload": {**base, "prefetch": "lookahead"}},
        {"name": "lru + predictor", "offload": {**base, "prefetch": "predictor", "predictor_path": str(predictor)}},
        {"name": "expertflow", "offload": {**base, "policy": "expertflow"}},
        {"name": "expertflow + lookahead", "offload": {**base, "policy": "expertflow", "prefetch": "lookahead"}},
    ]


def row(capacity: str, result: dict, reference: list) -> str:
    cache = result["cache"]
    tokens = result["generated_tokens"]
    demand = cache["loads"] - cache["prefetch_loads"]
    prefetch_rate = f"{cache['prefetch_hits'] / cache['prefetch_loads']:.1%}" if cache["prefetch_loads"] else "-"
    identical = "yes" if result["tokens"] == reference else "NO"
    return (
        f"| {capacity} | {result['name']} | {demand / tokens:.2f} | {cache['prefetch_loads']} | "
        f"{prefetch_rate} | {cache['hit_rate']:.1%} | {tokens / result['generate_s']:.1f} | {identical} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-qwen3-moe"))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="fp32 keeps greedy decoding free of ties")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "live_prefetch.md"))
    args = parser.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    text_config = config.get("text_config", config)
    num_experts = text_config.get("num_experts") or text_config["num_local_experts"]
    capacities = {"25%": num_experts // 4, "50%": num_experts // 2}

    lines = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=2 + len(capacities), desc="live prefetch") as progress:
        [reference] = generate(args.model, [{"name": "offload off"}], args)
        progress.update()
        predictor = train_predictor(args.model, args, Path(tmp), num_experts)
        progress.update()
        for label, slots in capacities.items():
            for result in generate(args.model, settings(slots, predictor), args):
                lines.append(row(f"{label} ({slots} slots)", result, reference["tokens"]))
            progress.update()

    table = "\n".join(
        [
            "| capacity | setting | demand loads / token | prefetch loads | prefetch hit rate | hit rate | tok/s | "
            "tokens = offload off |",
            "|---|---|---|---|---|---|---|---|",
            *lines,
        ]
    )
    text = (
        f"# Live prefetch and the expertflow pool\n\n{results_header()}\n\nOn `{Path(args.model).name}`"
        f" ({num_experts} experts per layer, {args.num_prompts} prompts x {args.max_tokens} tokens, {args.dtype}, "
        f"offload off: {reference['generated_tokens'] / reference['generate_s']:.1f} tok/s). Demand loads are the "
        f"loads a layer waits for (misses); prefetch hit rate: prefetched experts needed before eviction. The "
        f"predictor was trained on a trace of other prompts. CPU run: tok/s includes every copy as a memcpy and "
        f"follows the machine's load (header); the load counts are deterministic.\n\n"
        f"{table}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
