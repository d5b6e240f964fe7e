"""Offline throughput with expert offload off and on at 100%, 50% and 25% capacity, in one run.

    python benchmarks/offline_throughput.py [--model DIR] [--num-prompts 64] [--max-tokens 64]

Plain vLLM (plugin not loaded, ``VLLM_PLUGINS=""``) runs in a process of its own; the
plugin's settings (offload off, then on at each capacity) run one engine after another in a
second process. Each repeat starts both processes, alternating which goes first, so a slow
spell on a shared machine does not land on one side only; the plugin's own overhead is
reported as the median of the per-repeat ratios of plain vLLM to "plugin, offload off"
with their range, which says how much of a single difference is noise. The median
generation time over --repeats is reported per setting. Prints a markdown table and
writes it with the raw numbers to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vllm_expertflow.provenance import provenance, results_header  # noqa: E402


def generate(model: str, runs: list[dict], args, plain: bool) -> list[dict]:
    env = dict(os.environ)
    if plain:
        env["VLLM_PLUGINS"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "vllm_expertflow.generate", "--model", model, "--runs", json.dumps(runs),
               "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"generation failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-qwen3-moe"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "offline_throughput"))
    args = parser.parse_args()

    config = json.loads((Path(args.model) / "config.json").read_text())
    num_experts = config.get("num_experts") or config.get("num_local_experts")
    settings = [("plain vLLM", None, True), ("plugin, offload off", None, False)] + [
        (f"offload {pct}% ({max(num_experts * pct // 100, config['num_experts_per_tok'])} slots)",
         {"enabled": True, "cache_slots": max(num_experts * pct // 100, config["num_experts_per_tok"])}, False)
        for pct in (100, 50, 25)
    ]
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    with tqdm(total=args.repeats * 2, desc="engine processes") as progress:
        plugin_runs = [{"name": name, "offload": offload} for name, offload, is_plain in settings if not is_plain]
        for repeat in range(args.repeats):
            for plain in (True, False) if repeat % 2 == 0 else (False, True):
                if plain:
                    samples[settings[0][0]] += generate(args.model, [{"name": settings[0][0]}], args, plain=True)
                else:
                    for result in generate(args.model, plugin_runs, args, plain=False):
                        samples[result["name"]].append(result)
                progress.update()

    reference = samples[settings[0][0]][0]["tokens"]
    baseline = statistics.median(r["generated_tokens"] / r["generate_s"] for r in samples["plugin, offload off"])
    rows = []
    for name, _, _ in settings:
        runs = samples[name]
        tok_s = statistics.median(r["generated_tokens"] / r["generate_s"] for r in runs)
        cache = runs[0]["cache"]
        generated = runs[0]["generated_tokens"]
        rows.append({
            "setting": name,
            "tok_s": tok_s,
            "ratio_to_offload_off": tok_s / baseline,
            "identical_tokens": all(r["tokens"] == reference for r in runs),
            "hit_rate": cache["hit_rate"] if cache else None,
            "loads_per_token": cache["loads"] / generated if cache else None,
            "bytes_loaded_per_token": cache["bytes_loaded"] / generated if cache else None,
        })

    def tok_s_of(run: dict) -> float:
        return run["generated_tokens"] / run["generate_s"]

    pair_ratios = sorted(tok_s_of(p) / tok_s_of(o) for p, o in zip(samples[settings[0][0]],
                                                                    samples["plugin, offload off"], strict=True))
    overhead = (f"Plain vLLM / plugin with offload off, tok/s per repeat: median {statistics.median(pair_ratios):.3f}, "
                f"range {pair_ratios[0]:.3f}-{pair_ratios[-1]:.3f} over {len(pair_ratios)} repeats.")
    header = "| setting | tok/s | ratio to offload off | identical tokens | hit rate | loads/token | bytes loaded/token |"
    lines = [header, "|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        def fmt(value, spec):
            return "-" if value is None else format(value, spec)
        lines.append(f"| {row['setting']} | {row['tok_s']:.1f} | {row['ratio_to_offload_off']:.3f} | "
                     f"{row['identical_tokens']} | {fmt(row['hit_rate'], '.3f')} | {fmt(row['loads_per_token'], '.2f')} "
                     f"| {fmt(row['bytes_loaded_per_token'], ',.0f')} |")
    table = "\n".join(lines)
    print()
    print(f"model {args.model}: {args.num_prompts} prompts x {args.max_tokens} tokens, median of {args.repeats}")
    print(table)
    print(overhead)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(
        f"{results_header()}\n\nmodel `{Path(args.model).name}`: {args.num_prompts} prompts x {args.max_tokens} "
        f"tokens, median of {args.repeats} runs\n\n{table}\n\n{overhead}\n")
    out.with_suffix(".json").write_text(
        json.dumps({"provenance": provenance(), "args": vars(args), "rows": rows, "plain_to_plugin_off_ratios": pair_ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
