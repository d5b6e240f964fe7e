#!/usr/bin/env python
"""Write docs/RESULTS.md from an accuracy sweep (``python -m vllm_expertflow.eval.sweep``).

    python scripts/make_results.py --sweep runs/study-full --out docs/RESULTS.md

Reads ``<sweep>/cells.csv``, ``categories.csv`` and ``sweep.json``, draws the plots into ``docs/results/`` and
writes the tables plus an answer to the research question whose every number comes from the CSV: the
sentences are templates filled here, and a difference is called an effect only where its paired 95% CI
excludes zero.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.eval import plots as sweep_plots  # noqa: E402
from vllm_expertflow.eval.stats import excludes_zero  # noqa: E402
from vllm_expertflow.eval.sweep import markdown_tables  # noqa: E402

TEXT_COLUMNS = ("regime", "cell", "status", "kind", "budget_mode", "scheduling", "miss_policy", "reused_from", "note",
                "lossless")
FORMATS = (("vqav2", "VQAv2", "vqav2_acc"), ("mmbench", "MMBench CircularEval", "mmbench_circular_acc"))


def step_composition_sentence(expertflow_cells: Sequence[dict[str, Any]]) -> str:
    """What the ExpertFlow scheduler did to the steps, from its recorded stats (cells.csv), never inferred."""
    if any(r.get("grouped_steps") is None for r in expertflow_cells):
        return ("The sweep did not record the scheduler's stats for every ExpertFlow cell, so how its steps "
                "differed from FCFS's is not stated.")
    off = [r for r in expertflow_cells if not r["grouped_steps"]]
    never_held = [r for r in expertflow_cells if r["grouped_steps"] and not r["steps_with_held_requests"]]
    held = [r for r in expertflow_cells if r["steps_with_held_requests"]]
    parts = []
    if off:
        parts.append(f"grouping was off in {plural(len(off), 'cell')} ({', '.join(r['cell'] for r in off)}: the "
                     f"slots held every expert or no step had two running requests)")
    if never_held:
        steps = int(sum(r["grouped_steps"] for r in never_held))
        parts.append(f"the grouper ran in {plural(len(never_held), 'cell')} but held no request back in any of its "
                     f"{steps} grouped steps, so those steps were FCFS's")
    if held:
        steps = int(sum(r["steps_with_held_requests"] for r in held))
        total = int(sum(r["grouped_steps"] for r in held))
        parts.append(f"it held requests back in {steps} of {total} grouped steps in {plural(len(held), 'cell')} "
                     f"({', '.join(r['cell'] for r in held)})")
    return "Recorded scheduler stats: " + "; ".join(parts) + "."


def read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key not in TEXT_COLUMNS:
                row[key] = float(value) if value not in ("", None) else None
        row["lossless"] = row.get("lossless") == "True"
    return rows


def pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def ci(row: dict[str, Any], key: str) -> str:
    diff, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if diff is None:
        return "n/a"
    return f"{100 * diff:+.1f} points (95% CI {100 * lo:+.1f} .. {100 * hi:+.1f})"


def is_effect(row: dict[str, Any], key: str) -> bool:
    return excludes_zero(row.get(f"{key}_lo"), row.get(f"{key}_hi"))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def span(values: Sequence[float], scale: float = 100.0, unit: str = " points") -> str:
    if not values:
        return "n/a"
    if min(values) == max(values):
        return f"{scale * values[0]:+.1f}{unit}"
    return f"mean {scale * statistics.fmean(values):+.1f}{unit} (range {scale * min(values):+.1f} .. {scale * max(values):+.1f})"


def setting(r: dict[str, Any]) -> str:
    if r["kind"] == "budget":
        return (f"{r['memory_budget_pct']:g}% budget, {r['expert_share']:g} to experts ({int(r['slots'])} slots, "
                f"{int(r['kv_blocks'])} KV blocks), {r['miss_policy']}")
    return f"{r['budget_mode']} {int(r['slots'])} slots ({r['capacity_pct']:.3g}%), {r['miss_policy']}"


def answer_section(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> list[str]:
    """The written answer, per regime: template sentences filled from the rows."""
    out: list[str] = []
    ok = [r for r in rows if r["status"] == "ok"]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        mine = [r for r in ok if r["regime"] == regime]
        off = next((r for r in mine if r["kind"] == "off"), None)
        out += [f"### {regime} prompts", ""]
        if off is None or len(mine) < 2:
            out += ["Not enough finished cells (offload off and at least one offload cell) to answer yet.", ""]
            continue
        out.append(f"Offload off: VQAv2 {pts(off['vqav2_acc'])}%, MMBench CircularEval "
                   f"{pts(off['mmbench_circular_acc'])}% ({int(off['n_vqav2'] or 0)} and "
                   f"{int(off['n_mmbench_questions'] or 0)} questions), {off['generated_tokens'] or 0:.0f} tokens "
                   f"generated.")
        out.append("")
        pairs = [r for r in mine if r["scheduling"] == "expertflow" and r.get("vqav2_diff_vs_fcfs") is not None]
        # --- what scheduling did to accuracy ---
        effects = [(r, name, key) for r in pairs for fmt, name, _ in FORMATS
                   for key in [f"{fmt}_diff_vs_fcfs"] if is_effect(r, key)]
        if not pairs:
            out.append("- **Scheduling:** no expertflow/fcfs pair at equal settings finished.")
        elif effects:
            out.append(f"- **Scheduling changed accuracy** in {len(effects)} of {2 * len(pairs)} comparisons "
                       f"(expertflow minus fcfs at equal settings, CI excluding zero):")
            for r, name, key in effects:
                fmt = key.split("_")[0]
                out.append(f"  - {setting(r)}: {name} {ci(r, key)}, McNemar p = "
                           f"{r.get(f'{fmt}_mcnemar_p_vs_fcfs') or float('nan'):.3g}.")
        else:
            largest = max(pairs, key=lambda r: max(abs(r.get("vqav2_diff_vs_fcfs") or 0),
                                                   abs(r.get("mmbench_diff_vs_fcfs") or 0)))
            out.append(f"- **Scheduling: no accuracy effect found.** In all {plural(len(pairs), 'pair')} (expertflow "
                       f"vs fcfs at equal settings) both formats' 95% CIs include zero; the largest difference is at "
                       f"{setting(largest)}: VQAv2 {ci(largest, 'vqav2_diff_vs_fcfs')}, MMBench "
                       f"{ci(largest, 'mmbench_diff_vs_fcfs')}.")
        # --- through which channel ---
        lossy_pairs = [r for r in pairs if not r["lossless"]]
        exact_pairs = [r for r in pairs if r["lossless"]]
        fcfs_of = {(r["kind"], r["budget_mode"], r["slots"], r["miss_policy"], r.get("memory_budget_pct"),
                    r.get("expert_share")): r for r in mine if r["scheduling"] == "fcfs"}

        def partner(r, fcfs_of=fcfs_of):
            return fcfs_of.get((r["kind"], r["budget_mode"], r["slots"], r["miss_policy"], r.get("memory_budget_pct"),
                                r.get("expert_share")))

        if lossy_pairs:
            hit = [r["hit_rate"] - partner(r)["hit_rate"] for r in lossy_pairs
                   if partner(r) and r["hit_rate"] is not None and partner(r)["hit_rate"] is not None]
            same = sum(1 for r in lossy_pairs if partner(r) and r["loads"] == partner(r)["loads"]
                       and r["hits"] == partner(r)["hits"])
            out.append(f"- **Channel: hit rate under lossy policies.** Expertflow minus fcfs hit rate: {span(hit)} "
                       f"over {plural(len(lossy_pairs), 'lossy pair')}"
                       + (f"; in {same} of them both made exactly the same loads and hits." if same else "."))
            out.append("  " + step_composition_sentence(lossy_pairs))
        if exact_pairs:
            agree = [r["agree_vs_fcfs"] for r in exact_pairs if r.get("agree_vs_fcfs") is not None]
            out.append(f"- **Channel: batch numerics (exact, lossless).** Expertflow answered "
                       f"{pts(min(agree)) if agree else 'n/a'}% .. {pts(max(agree)) if agree else 'n/a'}% of items "
                       f"exactly as fcfs over {plural(len(exact_pairs), 'exact pair')}: with every expert computed, a "
                       f"difference can only come from how rows are batched.")
        control = next((r for r in mine if r["kind"] == "control"), None)
        if control is not None:
            out.append(f"- **Numerics control:** offload off with max_num_seqs=1 answered {pts(control['agree_all'])}% "
                       f"of items as offload off with vLLM's batching (VQAv2 {ci(control, 'vqav2_diff_vs_off')}, MMBench "
                       f"{ci(control, 'mmbench_diff_vs_off')}).")
        # --- cache size and lossy policies ---
        lossy = [r for r in mine if r["kind"] == "capacity" and not r["lossless"]]
        hurt = [(r, name) for r in lossy for fmt, name, _ in FORMATS if is_effect(r, f"{fmt}_diff_vs_off")]
        if lossy:
            # Ties go to the smallest cache, where a lossy policy has the most to drop.
            worst = min(lossy, key=lambda r: (r["agree_all"] if r["agree_all"] is not None else 1.0, r["slots"]))
            out.append(f"- **Cache size under lossy policies:** {len(hurt)} of {2 * len(lossy)} comparisons with "
                       f"offload off show an effect; the largest departure is {worst['cell']} ({setting(worst)}, "
                       f"{worst['scheduling']}): {pts(worst['agree_all'])}% of answers unchanged, VQAv2 "
                       f"{ci(worst, 'vqav2_diff_vs_off')}, MMBench {ci(worst, 'mmbench_diff_vs_off')}, hit rate "
                       f"{pts(worst['hit_rate'])}%.")
        # --- what a lossy policy saves: loads and modeled TPOT against exact at equal settings ---
        exact_of = {(r["kind"], r["budget_mode"], r["slots"], r["scheduling"], r.get("memory_budget_pct"),
                     r.get("expert_share")): r for r in mine if r["kind"] in ("capacity", "budget") and r["lossless"]}
        for policy in sorted({r["miss_policy"] for r in lossy}):
            ratios, tpot, agree = [], [], []
            for r in (r for r in lossy if r["miss_policy"] == policy and r["slots"] < r["num_experts"]):
                e = exact_of.get((r["kind"], r["budget_mode"], r["slots"], r["scheduling"], r.get("memory_budget_pct"),
                                  r.get("expert_share")))
                if e and e["loads_per_token"] and r["loads_per_token"] is not None:
                    ratios.append(r["loads_per_token"] / e["loads_per_token"])
                    if e.get("modeled_tpot_ms_p50") and r.get("modeled_tpot_ms_p50"):
                        tpot.append(r["modeled_tpot_ms_p50"] / e["modeled_tpot_ms_p50"])
                    agree.append(r["agree_all"])
            if ratios:
                out.append(f"- **{policy} vs exact** below full capacity ({plural(len(ratios), 'pair')}): "
                           f"{statistics.geometric_mean([max(x, 1e-9) for x in ratios]):.2f}x the loads per token"
                           + (f", {statistics.geometric_mean(tpot):.2f}x the modeled TPOT p50" if tpot else "")
                           + f", {pts(min(a for a in agree if a is not None))}% or more of answers unchanged.")
        # --- memory budget ---
        budget = [r for r in mine if r["kind"] == "budget" and r.get("modeled_tokens_per_s")]
        if budget:
            fastest = max(budget, key=lambda r: r["modeled_tokens_per_s"])
            slowest = min(budget, key=lambda r: r["modeled_tokens_per_s"])
            shown = sum(1 for r in budget for fmt, _, _ in FORMATS if is_effect(r, f"{fmt}_diff_vs_off"))
            out.append(f"- **Memory budget splits:** modeled throughput from {slowest['modeled_tokens_per_s']:.0f} "
                       f"tokens/s ({setting(slowest)}, {slowest['scheduling']}) to "
                       f"{fastest['modeled_tokens_per_s']:.0f} ({setting(fastest)}, {fastest['scheduling']}); "
                       f"{shown} of {2 * len(budget)} accuracy comparisons with offload off show an effect.")
        glob = [r for r in mine if r["kind"] == "capacity" and r["budget_mode"] == "global"]
        if glob:
            per_layer = {(r["slots"], r["scheduling"], r["miss_policy"]): r for r in mine
                         if r["kind"] == "capacity" and r["budget_mode"] == "per-layer"}
            ratios = [r["loads_per_token"] / p["loads_per_token"] for r in glob
                      for p in [per_layer.get((r["slots"], r["scheduling"], r["miss_policy"]))]
                      if p and r["loads_per_token"] and p["loads_per_token"]]
            if ratios:
                out.append(f"- **Budget mode:** the global pool loaded {statistics.geometric_mean(ratios):.2f}x "
                           f"(range {min(ratios):.2f} .. {max(ratios):.2f}) the per-layer cache's experts per "
                           f"token at the same memory, over {plural(len(ratios), 'cell')}.")
        out.append("")
    return out


def read_provenance(sweep: Path) -> list[dict[str, Any]]:
    """Commit, dirty flag and machine load of every finished cell (``metrics.json``; reused cells keep their
    source's)."""
    out = []
    for path in sorted((sweep / "cells").glob("*/metrics.json")):
        m = json.loads(path.read_text())
        out.append({k: m.get(k) for k in ("cell", "commit", "dirty", "loadavg_1m", "cpus")})
    return out


def provenance_line(cells: list[dict[str, Any]]) -> str:
    if not cells:
        return "- Produced by: no finished cell."
    commits = Counter(f"{c['commit']}{' (uncommitted changes)' if c['dirty'] else ''}" for c in cells)
    loads = [c["loadavg_1m"] for c in cells if c.get("loadavg_1m") is not None]
    made = ", ".join(f"`{k}` ({plural(v, 'cell')})" for k, v in commits.most_common())
    load = (f"; machine load (1-minute average when a cell finished) {min(loads):g}-{max(loads):g} on "
            f"{cells[0].get('cpus')} CPUs") if loads else ""
    return f"- Produced by: commit {made}{load}."


def render(rows: list[dict[str, Any]], manifest: dict[str, Any], plots: list[str], timing: list[dict],
           provenance: list[dict[str, Any]] | None = None) -> str:
    key = manifest.get("run_key", {})
    modeled = manifest.get("modeled", {})
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["# Results: accuracy of an MoE vision-language model under expert offloading", "",
             "<!-- Generated by scripts/make_results.py from a sweep's cells.csv; do not edit by hand. -->", "",
             "Research question: what does ExpertFlow's token scheduling policy do to downstream accuracy (VQAv2, "
             "MMBench) of MoE vision-language models across expert cache sizes and memory budgets?", "",
             "## Setup", "",
             f"- Model: `{_repo_relative(key.get('model'))}` ({manifest.get('num_experts')} experts per MoE layer, top_k "
             f"{manifest.get('top_k')}, {manifest.get('moe_layers')} MoE layers), dtype {key.get('dtype')}, greedy, "
             f"at most {key.get('max_tokens')} new tokens per regime, stop {key.get('stop')}.",
             f"- Data: {manifest.get('data_source')}: VQAv2 `{Path(str(key.get('vqa'))).name}`, MMBench "
             f"`{Path(str(key.get('mmbench'))).name}`, {key.get('limit') or 'all'} questions per format.",
             f"- Grid `{manifest.get('grid')}`: {len(ok)} of {plural(len(rows), 'cell')} finished.",
             f"- Modeled TPOT: each engine step costs {modeled.get('compute_ms_per_layer', 0) * 48:.3g} ms per 48 "
             f"layers of compute (scaled to this model's MoE layers) plus each expert load as a "
             f"{modeled.get('expert_mb')} MB copy (a Qwen3-30B-A3B bf16 expert) at {modeled.get('link_gbps')} GB/s.",
             "- Statistics: paired bootstrap (2000 resamples) 95% CIs over items for every accuracy difference; "
             "McNemar's exact test for expertflow vs fcfs (VQAv2 items count as correct at soft score 1). `*` marks a "
             "CI that excludes zero; only those are called effects."]
    if timing:
        t = timing[-1]
        lines.append(f"- Last sweep invocation: {t.get('runs')} engine run(s) in {t.get('wall_s')} s wall "
                     f"({t.get('finished')}).")
    if manifest.get("argv"):
        lines.append(f"- Command: `python -m vllm_expertflow.eval.sweep {' '.join(manifest['argv'][1:])}`")
    if provenance is not None:
        lines.append(provenance_line(provenance))
    lines += ["", "## Answer", ""]
    lines += answer_section(rows, manifest)
    lines += ["## All cells", "", markdown_tables(rows), ""]
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _repo_relative(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep directory (holds cells.csv, categories.csv, sweep.json)")
    parser.add_argument("--out", default="docs/RESULTS.md")
    parser.add_argument("--assets", help="where the plots are written (default: <out dir>/results)")
    args = parser.parse_args(argv)
    sweep = Path(args.sweep)
    if not (sweep / "cells.csv").exists():
        parser.error(f"{sweep / 'cells.csv'} does not exist; run the sweep first")
    rows = read_rows(sweep / "cells.csv")
    manifest = json.loads((sweep / "sweep.json").read_text()) if (sweep / "sweep.json").exists() else {}
    timing = []
    if (sweep / "timing.jsonl").exists():
        timing = [json.loads(line) for line in (sweep / "timing.jsonl").read_text().splitlines() if line.strip()]
    out = Path(args.out)
    assets = Path(args.assets) if args.assets else out.parent / "results"
    assets.mkdir(parents=True, exist_ok=True)
    written = sweep_plots.plot_all(rows, sweep / "categories.csv", assets)
    plots = [str(p.resolve().relative_to(out.parent.resolve())) for p in written]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, manifest, plots, timing, read_provenance(sweep)))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
