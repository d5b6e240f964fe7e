"""Expert cache policies on recorded routing: loads and demand misses against Belady's optimum.

    python benchmarks/cache_policies.py                        # record traces through vLLM, then replay
    python benchmarks/cache_policies.py --trace DIR [--trace DIR]  # replay traces recorded before

Recording runs ``python -m vllm_expertflow.generate`` in a subprocess for the bundled text
model (models/tiny-qwen3-moe) and, if the directory exists, the vision-language model
models/toy-qwen3-vl-moe (with ``--images``), with every expert resident (``cache_slots`` =
experts) and a routing trace written (docs/trace-format.md).

Each trace's requests are split at random into a training share and ``--held-out-fraction``
held out. The learned routing-path predictor (and the history predictor's statistics) are
fitted on the training requests; every policy is replayed on the held-out requests only,
so no predictor has seen the routing it is scored on. The held-out requests are replayed
as recorded (all at once: ``batch all``) and, for each size in ``--batch-sizes``, regrouped
into batches of that many requests run one after another: each token's routing depends
on its own request only, so this is the routing a server running that batch size would
see (up to reduction-order numerics), and small batches are where offloading is used.

Policies: lru, lfu, lfru, static (its ranking counts the whole replayed trace: an
in-sample, optimistic static cache), belady (offline optimum), expertflow (learned
predictor, prefetch, adaptive eviction), and three ablations: expertflow with the history
predictor, expertflow without prefetch, and expertflow evicting by the demand ranking alone
(``eviction="demand"``, not falling back to LRU). Budget modes: per-layer (all), global (lru, belady,
expertflow). Capacities: 10%..100% of the experts per layer (and 25%), at least top_k.

Outputs under ``--out-dir`` (default benchmarks/results): cache_policies.md (tables of
loads, demand misses and ratios to Belady; the targets), cache_policies.csv (every run),
cache_policies_<trace>.png (loads, demand misses and loads / Belady against capacity).

Targets checked: expertflow's loads at most 1.15x Belady's at 25% and 50% capacity, and at
least 20% fewer loads than lru wherever lru is above 1.3x Belady's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllm_expertflow.core.predictor_eval import evaluate_predictor, split_requests  # noqa: E402
from vllm_expertflow.core.predictors import (  # noqa: E402
    DemandForecast,
    FrequencyPredictor,
    HistoryPredictor,
    RoutingPathPredictor,
    multi_hot,
)
from vllm_expertflow.core.simulate import simulate  # noqa: E402
from vllm_expertflow.core.trace import RoutingTrace, read_trace  # noqa: E402
from vllm_expertflow.provenance import results_header  # noqa: E402

TEXT_MODEL = REPO / "models" / "tiny-qwen3-moe"
VLM_MODEL = REPO / "models" / "toy-qwen3-vl-moe"
FRACTIONS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TARGET_FRACTIONS = (0.25, 0.5)
TARGET_RATIO = 1.15  # expertflow loads / Belady loads at the target capacities
LRU_BAD = 1.3  # where lru's loads exceed this multiple of Belady's ...
LRU_CUT = 0.8  # ... expertflow must load at most this share of lru's

# One colour per policy in the plots; the budget mode sets the line style (global: dashed).
COLORS = {
    "belady": "black",
    "lru": "tab:orange",
    "lfu": "tab:olive",
    "lfru": "tab:red",
    "static": "tab:purple",
    "expertflow": "tab:blue",
    "expertflow (history)": "tab:cyan",
    "expertflow (no prefetch)": "tab:green",
    "expertflow (oracle step)": "tab:gray",
    "expertflow (demand eviction)": "tab:brown",
}
# (row label, policy, budget mode, predictor key, policy kwargs); predictor keys index the forecasts.
RUNS: tuple[tuple[str, str, str, str | None, dict[str, Any]], ...] = (
    ("belady", "belady", "per-layer", None, {}),
    ("lru", "lru", "per-layer", None, {}),
    ("lfu", "lfu", "per-layer", None, {}),
    ("lfru", "lfru", "per-layer", None, {}),
    ("static", "static", "per-layer", None, {}),
    ("expertflow", "expertflow", "per-layer", "learned", {}),
    ("expertflow (history)", "expertflow", "per-layer", "history", {}),
    ("expertflow (no prefetch)", "expertflow", "per-layer", "learned", {"prefetch": False}),
    ("expertflow (demand eviction)", "expertflow", "per-layer", "learned", {"eviction": "demand"}),
    ("expertflow (oracle step)", "expertflow", "per-layer", "oracle", {}),
    ("belady", "belady", "global", None, {}),
    ("lru", "lru", "global", None, {}),
    ("expertflow", "expertflow", "global", "learned", {}),
    ("expertflow (history)", "expertflow", "global", "history", {}),
    ("expertflow (no prefetch)", "expertflow", "global", "learned", {"prefetch": False}),
    ("expertflow (demand eviction)", "expertflow", "global", "learned", {"eviction": "demand"}),
    ("expertflow (oracle step)", "expertflow", "global", "oracle", {}),
)


def model_experts(model: Path) -> int:
    """Experts per MoE layer from a checkpoint's config.json (text models and VLMs' text_config)."""
    config = json.loads((model / "config.json").read_text())
    for section in (config, config.get("text_config", {})):
        for key in ("num_experts", "num_local_experts"):
            if key in section:
                return int(section[key])
    raise ValueError(f"{model}/config.json names no expert count (num_experts or num_local_experts)")


def record_trace(model: Path, trace_dir: Path, num_prompts: int, max_tokens: int, images: bool) -> None:
    """Generate through vLLM with every expert resident and the routing trace written to ``trace_dir``."""
    offload = {"enabled": True, "cache_slots": model_experts(model), "trace_dir": str(trace_dir)}
    command = [
        sys.executable, "-m", "vllm_expertflow.generate", "--model", str(model),
        "--runs", json.dumps([{"name": "trace", "offload": offload}]),
        "--num-prompts", str(num_prompts), "--max-tokens", str(max_tokens),
    ]  # fmt: skip
    if images:
        command.append("--images")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"recording {model.name}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"recording {model} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-1], flush=True)


def rebatch(trace: RoutingTrace, requests_per_batch: int) -> RoutingTrace:
    """The trace's requests in batches of ``requests_per_batch``, one batch after another.

    Requests keep their order of first appearance and, within a batch, their recorded steps.
    """
    if requests_per_batch < 1:
        raise ValueError(f"requests per batch must be >= 1, got {requests_per_batch}")
    order = list(dict.fromkeys(trace.request_id.tolist()))
    parts = []
    next_step = 0
    for first in range(0, len(order), requests_per_batch):
        keep = np.isin(trace.request_id, order[first : first + requests_per_batch])
        _, steps = np.unique(trace.step_id[keep], return_inverse=True)
        parts.append((keep, steps.reshape(-1) + next_step))
        next_step += int(steps.max()) + 1
    return RoutingTrace(
        topk_ids=np.concatenate([trace.topk_ids[keep] for keep, _ in parts]),
        step_id=np.concatenate([steps for _, steps in parts]).astype(np.int32),
        request_id=np.concatenate([trace.request_id[keep] for keep, _ in parts]),
        position=np.concatenate([trace.position[keep] for keep, _ in parts]),
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        layer_names=list(trace.layer_names),
        bytes_per_expert=trace.bytes_per_expert,
    )


def capacities(num_experts: int, top_k: int) -> list[int]:
    return sorted({max(top_k, round(f * num_experts)) for f in FRACTIONS})


def target_capacity(num_experts: int, top_k: int, fraction: float) -> int:
    return max(top_k, round(fraction * num_experts))


def mean_metrics(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    layers = list(scores.values())
    return {key: float(np.mean([s[key] for s in layers])) for key in ("precision", "recall", "token_recall")}


def replay(
    name: str, held_out: RoutingTrace, batches: Sequence[int | None], predictors: dict[str, Any], progress: tqdm
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every policy at every capacity on each workload; returns (rows, accuracy rows)."""
    rows, accuracy = [], []
    for batch in batches:
        workload = held_out if batch is None else rebatch(held_out, batch)
        label = "all" if batch is None else str(batch)
        forecasts = {key: DemandForecast.of(p, workload) for key, p in predictors.items()}
        # Not a predictor: each step's own needs, known exactly before it runs. The best any
        # one-step forecast can give expertflow; Belady also knows every later step.
        forecasts["oracle"] = DemandForecast(
            "oracle", np.stack([multi_hot(step, workload.num_experts).max(axis=0) for step in workload.iter_steps()])
            .astype(np.float64)
        )
        for key, predictor in predictors.items():
            accuracy.append(
                {
                    "trace": name,
                    "batch": label,
                    "predictor": key,
                    **mean_metrics(evaluate_predictor(predictor, workload)),
                }
            )
        belady: dict[tuple[str, int], int] = {}
        for capacity in capacities(workload.num_experts, workload.top_k):
            for row_name, policy, mode, predictor_key, kwargs in RUNS:
                start = time.perf_counter()
                result = simulate(
                    workload,
                    policy,
                    capacity,
                    budget_mode=mode,
                    policy_kwargs=kwargs,
                    predictor=forecasts[predictor_key] if predictor_key else None,
                )
                if policy == "belady":
                    belady[mode, capacity] = result.loads
                rows.append(
                    {
                        "trace": name,
                        "batch": label,
                        "experts": workload.num_experts,
                        "top_k": workload.top_k,
                        "requests": len(set(workload.request_id)),
                        "steps": workload.num_steps,
                        "tokens": workload.num_tokens,
                        "policy": row_name,
                        "mode": mode,
                        "capacity": capacity,
                        "capacity_pct": round(100 * capacity / workload.num_experts),
                        "loads": result.loads,
                        "demand_misses": result.demand_misses,
                        "prefetch_loads": result.prefetch_loads,
                        "prefetch_hits": result.prefetch_hits,
                        "hit_rate": round(result.hit_rate, 4),
                        "belady_loads": belady[mode, capacity],
                        "ratio": result.loads / max(belady[mode, capacity], 1),
                        "demand_ratio": result.demand_misses / max(belady[mode, capacity], 1),
                        "ratio_per_layer_belady": result.loads / max(belady["per-layer", capacity], 1),
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                )
                progress.update(1)
    return rows, accuracy


def markdown(rows: list[dict[str, Any]], accuracy: list[dict[str, Any]], layer_scores: dict, setup: str) -> str:
    out = ["# Expert cache policies against Belady's optimum", "", setup, ""]
    out += ["## Routing predictors on held-out requests", ""]
    for name, scores in layer_scores.items():
        out += [f"Per layer, `{name}`, held-out requests as recorded (step-set precision / recall, token recall):", ""]
        predictors = list(scores)
        out.append("| layer | " + " | ".join(f"{p} P | {p} R | {p} tok" for p in predictors) + " |")
        out.append("|---|" + "---:|" * (3 * len(predictors)))
        for layer in next(iter(scores.values())):
            cells = " | ".join(
                f"{scores[p][layer]['precision']:.3f} | {scores[p][layer]['recall']:.3f} | "
                f"{scores[p][layer]['token_recall']:.3f}"
                for p in predictors
            )
            out.append(f"| {layer} | {cells} |")
        out.append("")
    out += ["Mean over layers, per workload:", "", "| trace | batch | predictor | precision | recall | token recall |"]
    out.append("|---|---|---|---:|---:|---:|")
    for a in accuracy:
        out.append(
            f"| {a['trace']} | {a['batch']} | {a['predictor']} | {a['precision']:.3f} | {a['recall']:.3f} | "
            f"{a['token_recall']:.3f} |"
        )
    out.append("")
    for (trace, batch), group in _groups(rows):
        first = group[0]
        out += [
            f"## `{trace}`, batch {batch} ({first['requests']} requests, {first['steps']} steps, "
            f"{first['tokens']} tokens)",
            "",
            "Loads as a multiple of Belady's in the same budget mode (demand misses in brackets where they differ):",
            "",
        ]
        caps = sorted({r["capacity"] for r in group})
        out.append("| policy | mode | " + " | ".join(f"{c} ({_pct(group, c)}%)" for c in caps) + " |")
        out.append("|---|---|" + "---:|" * len(caps))
        for label, mode in dict.fromkeys((r["policy"], r["mode"]) for r in group):
            cells = []
            for c in caps:
                r = _find(group, label, mode, c)
                cell = f"{r['ratio']:.3f}"
                if r["prefetch_loads"]:
                    cell += f" ({r['demand_ratio']:.3f})"
                cells.append(cell)
            out.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
        out += ["", "At 25% and 50% capacity:", ""]
        out.append(
            "| policy | mode | slots | loads | demand misses | prefetch loads | prefetch hits | hit rate | "
            "/ Belady (same mode) | / Belady (per-layer) |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for fraction in TARGET_FRACTIONS:
            capacity = target_capacity(_experts(group), _top_k(group), fraction)
            for r in (r for r in group if r["capacity"] == capacity):
                out.append(
                    f"| {r['policy']} | {r['mode']} | {capacity} | {r['loads']} | {r['demand_misses']} | "
                    f"{r['prefetch_loads']} | {r['prefetch_hits']} | {r['hit_rate']:.3f} | {r['ratio']:.3f} | "
                    f"{r['ratio_per_layer_belady']:.3f} |"
                )
        out.append("")
    out += ["## Targets", ""] + targets(rows) + [""]
    return "\n".join(out)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Lines saying, per trace, workload and mode, whether expertflow met each target."""
    lines = [
        f"1. expertflow loads <= {TARGET_RATIO}x Belady's (same budget mode) at 25% and 50% capacity; for global mode "
        "also against per-layer Belady (same memory, the demand-only per-layer optimum).",
        f"2. expertflow loads <= {LRU_CUT}x lru's wherever lru (same mode) is above {LRU_BAD}x Belady's.",
        "",
        "Ratios are expertflow's (learned predictor, prefetch); the no-prefetch ablation's are given for comparison, "
        "and those of `expertflow (oracle step)`, fed each step's exact needs before it runs: what a perfect "
        "one-step routing predictor would give this policy.",
        "",
        "| trace | batch | mode | 25%: / Belady | 50%: / Belady | global vs per-layer Belady 25% / 50% | "
        "no prefetch 25% / 50% | oracle step 25% / 50% | target 1 | lru > 1.3x at | worst expertflow / lru there | "
        "target 2 |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for (trace, batch), group in _groups(rows):
        for mode in ("per-layer", "global"):
            ratios = []
            for fraction in TARGET_FRACTIONS:
                capacity = target_capacity(_experts(group), _top_k(group), fraction)
                ratios.append(_find(group, "expertflow", mode, capacity))
            met1 = all(r["ratio"] <= TARGET_RATIO for r in ratios)
            ablation = " / ".join(
                f"{_find(group, 'expertflow (no prefetch)', mode, r['capacity'])['ratio']:.3f}" for r in ratios
            )
            oracle = " / ".join(
                f"{_find(group, 'expertflow (oracle step)', mode, r['capacity'])['ratio']:.3f}" for r in ratios
            )
            cross = " / ".join(f"{r['ratio_per_layer_belady']:.3f}" for r in ratios) if mode == "global" else "-"
            bad = [r for r in group if r["policy"] == "lru" and r["mode"] == mode and r["ratio"] > LRU_BAD]
            worst = max(
                (_find(group, "expertflow", mode, r["capacity"])["loads"] / r["loads"] for r in bad), default=None
            )
            met2 = "n/a" if worst is None else ("met" if worst <= LRU_CUT else "missed")
            lines.append(
                f"| {trace} | {batch} | {mode} | {ratios[0]['ratio']:.3f} | {ratios[1]['ratio']:.3f} | {cross} | "
                f"{ablation} | {oracle} | "
                f"{'met' if met1 else 'missed'} | {', '.join(str(r['capacity']) for r in bad) or '-'} | "
                f"{'-' if worst is None else f'{worst:.3f}'} | {met2} |"
            )
    return lines


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        groups = [(batch, group) for (t, batch), group in _groups(rows) if t == trace]
        fig, axes = plt.subplots(len(groups), 3, figsize=(16, 4.2 * len(groups)), squeeze=False)
        for (batch, group), ax_row in zip(groups, axes, strict=True):
            for label, mode in dict.fromkeys((r["policy"], r["mode"]) for r in group):
                series = sorted(
                    (r for r in group if r["policy"] == label and r["mode"] == mode), key=lambda r: r["capacity"]
                )
                x = [r["capacity_pct"] for r in series]
                style = {
                    "color": COLORS.get(label, "grey"),
                    "linestyle": "--" if mode == "global" else "-",
                    "marker": "s" if mode == "global" else "o",
                    "markersize": 3,
                }
                name = f"{label} ({mode})"
                ax_row[0].plot(x, [r["loads"] for r in series], label=name, **style)
                ax_row[1].plot(x, [r["demand_misses"] for r in series], label=name, **style)
                ax_row[2].plot(x, [r["ratio"] for r in series], label=name, **style)
            titles = ("loads (demand + prefetch)", "demand misses", "loads / Belady (same mode)")
            for ax, title in zip(ax_row, titles, strict=True):
                ax.set_title(f"{trace}, batch {batch}: {title}", fontsize=9)
                ax.set_xlabel("capacity (% of experts per layer)")
                ax.grid(alpha=0.3)
            ax_row[0].set_yscale("log")
            ax_row[1].set_yscale("symlog")
            ax_row[2].axhline(TARGET_RATIO, color="grey", linewidth=0.8, linestyle=":")
        axes[0][2].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"cache_policies_{trace}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(path)
    return paths


def _groups(rows: list[dict[str, Any]]) -> Iterable[tuple[tuple[str, str], list[dict[str, Any]]]]:
    keys = dict.fromkeys((r["trace"], r["batch"]) for r in rows)
    for key in keys:
        yield key, [r for r in rows if (r["trace"], r["batch"]) == key]


def _find(group: list[dict[str, Any]], label: str, mode: str, capacity: int) -> dict[str, Any]:
    return next(r for r in group if r["policy"] == label and r["mode"] == mode and r["capacity"] == capacity)


def _pct(group: list[dict[str, Any]], capacity: int) -> int:
    return next(r["capacity_pct"] for r in group if r["capacity"] == capacity)


def _experts(group: list[dict[str, Any]]) -> int:
    return group[0]["experts"]


def _top_k(group: list[dict[str, Any]]) -> int:
    return group[0]["top_k"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", action="append", help="replay this recorded trace instead of recording (repeatable)")
    parser.add_argument("--num-prompts", type=int, default=128, help="prompts per recorded trace")
    parser.add_argument("--max-tokens", type=int, default=48, help="generated tokens per prompt")
    parser.add_argument("--record-dir", help="keep recorded traces here (default: a temporary directory)")
    parser.add_argument("--held-out-fraction", type=float, default=0.25, help="share of requests replayed")
    parser.add_argument(
        "--batch-sizes", default="8,1", help="comma-separated requests per batch for regrouped replays (besides 'all')"
    )
    parser.add_argument("--epochs", type=int, default=10, help="learned predictor training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches: list[int | None] = [None, *(int(b) for b in args.batch_sizes.split(",") if b.strip())]

    if args.trace:
        sources = [(Path(t).name, Path(t)) for t in args.trace]
        recorded = "replayed traces given with --trace"
    else:
        record_dir = Path(args.record_dir or tempfile.mkdtemp(prefix="cache-policies-"))
        sources = []
        for model, images in ((TEXT_MODEL, False), (VLM_MODEL, True)):
            if not model.is_dir():
                print(f"skipping {model.name}: {model} does not exist", flush=True)
                continue
            trace_dir = record_dir / model.name
            record_trace(model, trace_dir, args.num_prompts, args.max_tokens, images)
            sources.append((model.name, trace_dir))
        recorded = (
            f"recorded through vLLM (CPU): `python -m vllm_expertflow.generate --model M --num-prompts "
            f"{args.num_prompts} --max-tokens {args.max_tokens}` (+ `--images` for the VLM), every expert resident, "
            f"greedy decoding"
        )

    rows: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    layer_scores: dict[str, dict[str, Any]] = {}
    setup_lines = []
    jobs = []
    for name, path in sources:
        trace = read_trace(path)
        train, held_out = split_requests(trace, args.held_out_fraction, seed=args.seed)
        shape = (trace.num_layers, trace.num_experts, trace.top_k)
        history, frequency = HistoryPredictor(*shape), FrequencyPredictor(*shape)
        history.fit([train])
        frequency.fit([train])
        learned = RoutingPathPredictor(*shape, seed=args.seed)
        start = time.perf_counter()
        losses = learned.fit([train], epochs=args.epochs, seed=args.seed)
        train_s = time.perf_counter() - start
        predictors = {"frequency": frequency, "history": history, "learned": learned}
        layer_scores[name] = {key: evaluate_predictor(p, held_out) for key, p in predictors.items()}
        setup_lines.append(
            f"- `{name}`: {trace.num_layers} MoE layers x {trace.num_experts} experts, top_k {trace.top_k}; "
            f"{len(set(trace.request_id))} requests, {trace.num_tokens} tokens, {trace.num_steps} steps. Trained on "
            f"{len(set(train.request_id))} requests ({train.num_tokens} tokens; learned predictor BCE "
            f"{losses[0]:.3f} -> {losses[-1]:.3f} in {train_s:.0f}s), replayed on {len(set(held_out.request_id))} "
            f"held-out requests ({held_out.num_tokens} tokens)."
        )
        jobs.append((name, held_out, predictors))
    total = sum(
        len(batches) * len(capacities(held_out.num_experts, held_out.top_k)) * len(RUNS) for _, held_out, _ in jobs
    )
    with tqdm(total=total, desc="replays", unit="run") as progress:
        for name, held_out, predictors in jobs:
            trace_rows, trace_accuracy = replay(name, held_out, batches, predictors, progress)
            rows += trace_rows
            accuracy += trace_accuracy

    setup = "\n".join(
        [
            f"Written by `python benchmarks/cache_policies.py` ({' '.join(sys.argv[1:]) or 'defaults'}). Traces "
            f"{recorded}.",
            "",
            *setup_lines,
            "",
            f"Requests split at random (seed {args.seed}); {args.held_out_fraction:.0%} held out and replayed, the rest "
            f"train the predictors. Workloads: the held-out requests as recorded (`batch all`) and regrouped into batches "
            f"of {args.batch_sizes} requests run one after another (a token's routing depends on its own request only). "
            "`static` ranks experts by counts over the whole replayed trace (in-sample, optimistic). Global-mode Belady "
            "pools the budget under Belady's rule with a top_k floor per layer: a reference point, not a proven bound. "
            "expertflow's prefetches are assumed to arrive before use (issued a step ahead); only demand misses stall. "
            "expertflow's knobs (half_life 2 passes, demand_weight 0.5, prefetch_threshold 0.9) were chosen on an "
            "earlier recording of the text model, and its adaptive eviction's regret_half_life (16 settled "
            "disagreements) on this recording of the text model; none on the VLM.",
        ]
    )
    (out_dir / "cache_policies.md").write_text(results_header() + "\n\n" + markdown(rows, accuracy, layer_scores, setup))
    with open(out_dir / "cache_policies.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots = plot(rows, out_dir)
    print("\n".join(targets(rows)))
    print(f"wrote {out_dir / 'cache_policies.md'}, {out_dir / 'cache_policies.csv'}, " + ", ".join(map(str, plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
