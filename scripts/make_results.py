#!/usr/bin/env python
"""Write docs/RESULTS.md from an accuracy sweep (``python -m vllm_expertflow.eval.sweep``).

    python scripts/make_results.py --sweep runs/sweep-reduced --out docs/RESULTS.md

Reads ``<sweep>/cells.csv`` and ``<sweep>/sweep.json``, copies the sweep's PNG plots next to the
output (``docs/results/*.png``) and writes the tables plus an answer to the research question
whose every number and every yes/no comes from the CSV: the sentences are templates filled here.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.eval.sweep import BASELINE, markdown_table  # noqa: E402

NUMERIC = ("capacity_pct", "slots", "num_experts", "top_k", "vqav2_acc", "mmbench_circular_acc", "mmbench_row_acc",
           "agree_vqav2", "agree_mmbench", "agree_all", "hit_rate", "hits", "misses", "loads", "bytes_loaded",
           "generated_tokens", "loads_per_token", "tokens_per_s", "generate_s", "init_s", "expert_mib_device",
           "expert_mib_all", "n_vqav2", "n_mmbench_rows", "n_mmbench_questions", "grouped_steps",
           "steps_with_held_requests")
PLOTS = ("accuracy_vs_capacity.png", "hit_rate_vs_capacity.png", "throughput_vs_capacity.png")
ACCURACIES = (("vqav2_acc", "VQAv2"), ("mmbench_circular_acc", "MMBench CircularEval"))


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
        for key in NUMERIC:
            value = row.get(key, "")
            row[key] = float(value) if value not in ("", None) else None
        row["lossless"] = row.get("lossless") == "True"
    return rows


def pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def signed(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def span(values: Sequence[float]) -> str:
    """'+a' for one value, 'mean +m (min .. max)' otherwise; values are fractions, printed in points."""
    if not values:
        return "n/a"
    if len(values) == 1 or min(values) == max(values):
        return f"{100 * values[0]:+.1f}"
    return f"mean {100 * statistics.fmean(values):+.1f} (range {100 * min(values):+.1f} .. {100 * max(values):+.1f})"


def ratio_span(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"x{values[0]:.2f}"
    return f"x{statistics.geometric_mean(values):.2f} (range x{min(values):.2f} .. x{max(values):.2f})"


def _repo_relative(path: str | None) -> str | None:
    """A path inside this repository as written from its root (the same on every machine)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cap(x: float | None) -> str:
    return "-" if x is None else f"{x:g}%"


def answer_section(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> list[str]:
    """The written answer: template sentences filled from the rows."""
    ok = [r for r in rows if r["status"] == "ok" and r["cell"] != BASELINE]
    base = next((r for r in rows if r["cell"] == BASELINE and r["status"] == "ok"), None)
    na = [r for r in rows if r["status"] == "not available"]
    failed = [r for r in rows if r["status"] in ("failed", "pending")]
    out: list[str] = []
    if base is None or not ok:
        return ["Not enough finished cells (a baseline and at least one offload cell) to answer yet."]

    n_vqa, n_q = int(base["n_vqav2"] or 0), int(base["n_mmbench_questions"] or 0)
    exact = [r for r in ok if r["miss_policy"] == "exact"]
    lossy = [r for r in ok if r["miss_policy"] != "exact"]

    def delta(r: dict, key: str) -> float | None:
        return None if r[key] is None or base[key] is None else r[key] - base[key]

    def pairs() -> list[tuple[dict, dict]]:
        by_key = {(r["budget_mode"], r["capacity_pct"], r["miss_policy"], r["scheduling"]): r for r in ok}
        found = []
        for (mode, c, miss, sched), r in sorted(by_key.items(), key=lambda kv: (kv[0][2], -kv[0][1])):
            if sched == "expertflow" and (mode, c, miss, "fcfs") in by_key:
                found.append((by_key[(mode, c, miss, "fcfs")], r))
        return found

    # --- short answer ------------------------------------------------------------------------
    out.append("### Short answer")
    out.append("")
    ef_exact = [r for r in exact if r["scheduling"] == "expertflow"]
    if ef_exact:
        identical = [r for r in ef_exact if r["agree_all"] == 1.0]
        if len(identical) == len(ef_exact):
            caps = ", ".join(f"{r['budget_mode']} {cap(r['capacity_pct'])}" for r in ef_exact)
            out.append(f"- **Lossless (exact) miss policy: no accuracy effect.** In all "
                       f"{plural(len(ef_exact), 'cell')} with ExpertFlow scheduling and the exact miss policy, "
                       f"every answer was identical to the offload-off baseline (capacities {caps}).")
        else:
            worst = min(ef_exact, key=lambda r: r["agree_all"] or 0)
            out.append(f"- **Lossless (exact) miss policy: answers changed in {len(ef_exact) - len(identical)} of "
                       f"{plural(len(ef_exact), 'ExpertFlow cell')}** although every routed expert was computed; "
                       f"the lowest agreement with offload-off was {pts(worst['agree_all'])}% ({worst['cell']}), "
                       f"with accuracy changes of {signed(delta(worst, 'vqav2_acc'))} points VQAv2 and "
                       f"{signed(delta(worst, 'mmbench_circular_acc'))} points MMBench CircularEval. With every "
                       f"expert computed, such differences can only come from the numerics of how rows are batched "
                       f"(dtype {manifest.get('run_key', {}).get('dtype', '?')}).")
    lossy_pairs = [(f, e) for f, e in pairs() if f["miss_policy"] != "exact"]
    if lossy_pairs:
        parts = []
        for key, name in ACCURACIES:
            diffs = [e[key] - f[key] for f, e in lossy_pairs if e[key] is not None and f[key] is not None]
            parts.append(f"{name} accuracy by {span(diffs)} points")
        agree = [e["agree_all"] - f["agree_all"] for f, e in lossy_pairs
                 if e["agree_all"] is not None and f["agree_all"] is not None]
        out.append(f"- **Lossy miss policies (skip/substitute):** ExpertFlow scheduling instead of FCFS at the same "
                   f"capacity and miss policy ({plural(len(lossy_pairs), 'pair')}) changed {' and '.join(parts)}, "
                   f"and the share of answers identical to offload-off by {span(agree)} points.")
        out.append("  " + step_composition_sentence([e for _, e in pairs()]))
    elif lossy:
        out.append("- Lossy cells ran, but without an FCFS/ExpertFlow pair at the same capacity and policy.")
    else:
        out.append("- No lossy (skip/substitute) cells in this sweep: the question was only asked of the lossless "
                   "cache.")
    if lossy:
        worst = min(lossy, key=lambda r: r["agree_all"] if r["agree_all"] is not None else 1.0)
        out.append(f"- **Cache size:** the largest departure from offload-off among lossy cells is {worst['cell']}: "
                   f"{pts(worst['agree_all'])}% of answers unchanged, VQAv2 {signed(delta(worst, 'vqav2_acc'))} "
                   f"points, MMBench CircularEval {signed(delta(worst, 'mmbench_circular_acc'))} points.")
    global_ok = [r for r in ok if r["budget_mode"] == "global"]
    if global_ok:
        same = [r for r in global_ok if r["agree_all"] == 1.0]
        per_layer = {(r["capacity_pct"], r["scheduling"], r["miss_policy"]): r for r in ok
                     if r["budget_mode"] == "per-layer"}
        load_ratios = [r["loads_per_token"] / p["loads_per_token"] for r in global_ok
                       for p in [per_layer.get((r["capacity_pct"], r["scheduling"], r["miss_policy"]))]
                       if p is not None and r["loads_per_token"] and p["loads_per_token"]]
        text = (f"- **Memory budget mode:** the global budget (one slot pool shared by all MoE layers, policy "
                f"expertflow) answered every item as offload-off in {len(same)} of "
                f"{plural(len(global_ok), 'cell')}; its expert loads per generated token were "
                f"{ratio_span(load_ratios)} those of the per-layer budget at the same memory.")
        if na:
            text += (f" It runs lossless only, so its {plural(len(na), 'lossy cell')} were not run (listed as "
                     f"'not available'): how a shared budget changes *lossy* accuracy stays open.")
        out.append(text)
    elif na:
        modes = sorted({r["budget_mode"] for r in na})
        out.append(f"- **Memory budget mode:** {', '.join(modes)} budgets are not available for these cells; "
                   f"those {plural(len(na), 'cell')} were not run (listed as 'not available'), so this sweep cannot "
                   f"say how a shared cross-layer budget changes accuracy.")
    else:
        out.append("- **Memory budget mode:** this grid ran per-layer budgets only, so it cannot say how a shared "
                   "cross-layer budget changes accuracy.")
    out.append("")

    # --- details -----------------------------------------------------------------------------
    out.append("### Details")
    out.append("")
    if exact:
        agree = [r["agree_all"] for r in exact if r["agree_all"] is not None]
        n_same = sum(1 for a in agree if a == 1.0)
        out.append(f"**Exact (lossless).** {n_same} of {len(exact)} exact cells (both schedulings) answered every "
                   f"item exactly as offload-off (agreement {pts(min(agree))}% .. {pts(max(agree))}%).")
        for key, name in ACCURACIES:
            d = [delta(r, key) for r in exact if delta(r, key) is not None]
            if d:
                out.append(f"{name} accuracy change vs offload-off: {span(d)} points.")
        out.append("")
    for policy in ("skip", "substitute"):
        cells = sorted([r for r in lossy if r["miss_policy"] == policy], key=lambda r: -r["capacity_pct"])
        if not cells:
            continue
        out.append(f"**{policy} (lossy).** By capacity (both schedulings), change vs offload-off in points:")
        out.append("")
        out.append("| capacity | slots | scheduling | VQAv2 | MMBench circ | answers unchanged % | hit rate % |")
        out.append("|---|---|---|---|---|---|---|")
        for r in cells:
            out.append(f"| {cap(r['capacity_pct'])} | {int(r['slots'])} | {r['scheduling']} | "
                       f"{signed(delta(r, 'vqav2_acc'))} | {signed(delta(r, 'mmbench_circular_acc'))} | "
                       f"{pts(r['agree_all'])} | {pts(r['hit_rate'])} |")
        out.append("")
        trends = []
        for sched in sorted({r["scheduling"] for r in cells}):
            mine = [r for r in cells if r["scheduling"] == sched]
            if len(mine) > 1:
                high, low = mine[0], mine[-1]
                trends.append(f"with {sched}, from {cap(high['capacity_pct'])} to {cap(low['capacity_pct'])} "
                              f"capacity the share of unchanged answers went from {pts(high['agree_all'])}% to "
                              f"{pts(low['agree_all'])}% and the hit rate from {pts(high['hit_rate'])}% to "
                              f"{pts(low['hit_rate'])}%")
        if trends:
            text = "; ".join(trends) + "."
            out.append(text[0].upper() + text[1:])
            out.append("")
    if lossy:
        out.append("How the lossy policies work (`vllm_expertflow/core/slot_cache.py`, `run_lossy`): a missing expert "
                   "is dropped (skip) or replaced by the best-scored resident one (substitute) instead of being "
                   "loaded, for every token with at least one resident expert; a token with none waits for its "
                   "experts and runs exactly; after each step the step's most demanded experts are loaded for the "
                   "next. So accuracy depends on what the slots hold when a step begins, which the scheduling "
                   "policy changes only through the steps it composes.")
        out.append("")
    all_pairs = pairs()
    if all_pairs:
        hits = [e["hit_rate"] - f["hit_rate"] for f, e in all_pairs
                if e["hit_rate"] is not None and f["hit_rate"] is not None]
        loads = [e["loads_per_token"] / f["loads_per_token"] for f, e in all_pairs
                 if e["loads_per_token"] and f["loads_per_token"]]
        speed = [e["tokens_per_s"] / f["tokens_per_s"] for f, e in all_pairs if e["tokens_per_s"] and f["tokens_per_s"]]
        out.append(f"**ExpertFlow vs FCFS scheduling** ({plural(len(all_pairs), 'pair')} at equal capacity and miss "
                   f"policy): hit rate {span(hits)} points; expert loads per generated token {ratio_span(loads)}; "
                   f"throughput {ratio_span(speed)} "
                   f"(ratios ExpertFlow / FCFS; throughput is one run each on a shared CPU).")
        out.append("")
    mem = [r for r in ok if r["expert_mib_device"] is not None]
    if mem:
        lo, hi = min(mem, key=lambda r: r["expert_mib_device"]), max(mem, key=lambda r: r["expert_mib_device"])
        out.append(f"**Memory.** Per-layer budgets ran from {lo['expert_mib_device']:.2f} MiB ({int(lo['slots'])} "
                   f"slots per layer) to {hi['expert_mib_device']:.2f} MiB ({int(hi['slots'])} slots) of device "
                   f"memory for experts, of {hi['expert_mib_all']:.2f} MiB for all experts.")
        out.append("")
    out.append("**How much to trust this.** ")
    caveats = [f"{plural(n_vqa, 'VQAv2 question')} and {plural(n_q, 'MMBench question')} "
               f"({int(base['n_mmbench_rows'] or 0)} rows with rotations): one question moves VQAv2 accuracy by up "
               f"to {100 / max(n_vqa, 1):.1f} points and CircularEval accuracy by {100 / max(n_q, 1):.1f} points."]
    if base["vqav2_acc"] is not None and base["vqav2_acc"] < 0.05:
        caveats.append(f"The offload-off model itself scores {pts(base['vqav2_acc'])}% on VQAv2, so accuracy "
                       f"differences carry little information here; the agreement column is the informative one.")
    caveats.append("Greedy decoding, one run per cell; accuracy is deterministic for a given batch, throughput is "
                   "not.")
    if failed:
        caveats.append(f"{len(failed)} cell(s) did not finish: {', '.join(r['cell'] for r in failed)}.")
    out[-1] += " ".join(caveats)
    out.append("")
    return out


def render(rows: list[dict[str, Any]], manifest: dict[str, Any], plots: list[str], timing: list[dict]) -> str:
    key = manifest.get("run_key", {})
    ok = [r for r in rows if r["status"] == "ok"]
    runnable = [r for r in rows if r["cell"] != BASELINE and r["status"] != "not available"]
    lines = ["# Results: accuracy of an MoE vision-language model under expert offloading", "",
             "<!-- Generated by scripts/make_results.py from a sweep's cells.csv; do not edit by hand. -->", "",
             "Research question: what does ExpertFlow's token scheduling policy do to downstream accuracy (VQAv2, "
             "MMBench) of MoE vision-language models across expert cache sizes and memory budgets?", "",
             "## Setup", "",
             f"- Model: `{_repo_relative(key.get('model'))}` ({manifest.get('num_experts')} experts per MoE layer, top_k "
             f"{manifest.get('top_k')}), dtype {key.get('dtype')}, greedy decoding, at most "
             f"{key.get('max_tokens')} new tokens, stop {key.get('stop')}.",
             f"- Data: {manifest.get('data_source')}: VQAv2 `{Path(str(key.get('vqa'))).name}`, MMBench "
             f"`{Path(str(key.get('mmbench'))).name}`, limit {key.get('limit')}.",
             f"- Grid `{manifest.get('grid')}`: {plural(len(rows) - 1, 'cell')} + offload-off baseline; "
             f"{len([r for r in ok if r['cell'] != BASELINE])} of {len(runnable)} runnable cells finished"
             f"{', baseline finished' if any(r['cell'] == BASELINE for r in ok) else ', baseline missing'}"
             f"{f', {len(rows) - 1 - len(runnable)} not available' if len(rows) - 1 > len(runnable) else ''}. "
             f"Cache replacement policy {key.get('cache_policy')}.",
             ]
    if timing:
        t = timing[-1]
        lines.append(f"- Last sweep invocation: {t.get('runs')} engine run(s) in {t.get('wall_s')} s wall "
                     f"({t.get('finished')}).")
    if manifest.get("argv"):
        lines.append(f"- Command: `python -m vllm_expertflow.eval.sweep {' '.join(manifest['argv'][1:])}`")
    lines += ["", "Columns: accuracy in %, `agree` = answers identical to the offload-off baseline (all items), "
              "`hit rate` = expert-cache hits / (hits + misses), `loads/token` = expert loads per generated token, "
              "`tok/s` = generated tokens per second (one run, shared 2-core CPU).", "",
              "## Answer", ""]
    lines += answer_section(rows, manifest)
    lines += ["## All cells", "", markdown_table(rows), ""]
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep directory (holds cells.csv, sweep.json, *.png)")
    parser.add_argument("--out", default="docs/RESULTS.md")
    parser.add_argument("--assets", help="where the plots are copied (default: <out dir>/results)")
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
    plots = []
    for name in PLOTS:
        if (sweep / name).exists():
            assets.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sweep / name, assets / name)
            plots.append(str((assets / name).resolve().relative_to(out.parent.resolve())))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, manifest, plots, timing))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
