"""The accuracy study's plots, from ``cells.csv`` rows (strings or numbers) and ``categories.csv``.

``plot_all`` writes what a reader looks at first: accuracy with 95% CI bands against capacity per scheduling
and miss policy; accuracy against modeled throughput for the memory-budget splits; MMBench accuracy per
category; hit rate and loads per token against capacity.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLOTS = ("accuracy_vs_capacity.png", "accuracy_vs_throughput.png", "mmbench_categories.png",
         "hit_rate_vs_capacity.png")
ACCURACIES = (("vqav2_acc", "vqav2_diff_vs_off", "VQAv2 %"), ("mmbench_circular_acc", "mmbench_diff_vs_off",
                                                             "MMBench CircularEval %"))
COLORS = {"fcfs": "tab:blue", "expertflow": "tab:orange"}
STYLES = {"exact": "-", "skip": "--", "substitute": ":", "reroute": "-."}
MARKERS = {"exact": "o", "skip": "s", "substitute": "^", "reroute": "D"}


def num(v: Any) -> float | None:
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ok(rows: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and r.get("kind") == kind]


def _regimes(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["regime"] for r in rows))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_capacity(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Per regime and format: accuracy vs capacity per (scheduling, miss policy), per-layer budget, CI bands.

    The band is offload-off's accuracy plus the paired 95% CI of the cell's difference from it.
    """
    cells = [r for r in _ok(rows, "capacity") if r.get("budget_mode") == "per-layer"]
    if not cells:
        return None
    plt = _plt()
    regimes = _regimes(cells)
    fig, axes = plt.subplots(len(regimes), 2, figsize=(12, 4.2 * len(regimes)), squeeze=False)
    for row_axes, regime in zip(axes, regimes, strict=True):
        off = next((r for r in _ok(rows, "off") if r["regime"] == regime), None)
        for ax, (key, diff_key, title) in zip(row_axes, ACCURACIES, strict=True):
            series: dict[tuple[str, str], list[dict]] = {}
            for r in cells:
                if r["regime"] == regime:
                    series.setdefault((r["scheduling"], r["miss_policy"]), []).append(r)
            for (sched, miss), rs in sorted(series.items()):
                rs = sorted((r for r in rs if num(r.get(key)) is not None), key=lambda r: num(r["capacity_pct"]))
                xs = [num(r["capacity_pct"]) for r in rs]
                ax.plot(xs, [100 * num(r[key]) for r in rs], STYLES.get(miss, "-"), marker=MARKERS.get(miss, "o"),
                        color=COLORS.get(sched), label=f"{sched} / {miss}")
                base = num(off.get(key)) if off else None
                band = [(num(r.get(f"{diff_key}_lo")), num(r.get(f"{diff_key}_hi"))) for r in rs]
                if base is not None and all(lo is not None for lo, _ in band):
                    ax.fill_between(xs, [100 * (base + lo) for lo, _ in band], [100 * (base + hi) for _, hi in band],
                                    color=COLORS.get(sched), alpha=0.12)
            if off is not None and num(off.get(key)) is not None:
                ax.axhline(100 * num(off[key]), color="black", linestyle="-.", linewidth=1, label="offload off")
            ax.set_title(f"{regime}: {title}")
            ax.set_xlabel("expert cache capacity (% of experts per MoE layer)")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.suptitle("Accuracy vs expert cache capacity (per-layer budget; bands: 95% paired-bootstrap CI vs offload off)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_throughput(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Memory-budget splits: accuracy against modeled throughput, per regime; labels give the experts' share."""
    cells = [r for r in _ok(rows, "budget") if num(r.get("modeled_tokens_per_s")) is not None]
    if not cells:
        return None
    plt = _plt()
    regimes = _regimes(cells)
    budgets = sorted({num(r["memory_budget_pct"]) for r in cells})
    markers = dict(zip(budgets, "osD^vP*X", strict=False))
    fig, axes = plt.subplots(len(regimes), 2, figsize=(12, 4.2 * len(regimes)), squeeze=False)
    for row_axes, regime in zip(axes, regimes, strict=True):
        off = next((r for r in _ok(rows, "off") if r["regime"] == regime), None)
        for ax, (key, _, title) in zip(row_axes, ACCURACIES, strict=True):
            for r in (r for r in cells if r["regime"] == regime and num(r.get(key)) is not None):
                x, y = num(r["modeled_tokens_per_s"]), 100 * num(r[key])
                ax.scatter(x, y, marker=markers[num(r["memory_budget_pct"])], color=COLORS.get(r["scheduling"]),
                           facecolors="none" if r["miss_policy"] != "exact" else None)
                ax.annotate(f"{num(r['expert_share']):g}", (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            if off is not None and num(off.get(key)) is not None:
                ax.axhline(100 * num(off[key]), color="black", linestyle="-.", linewidth=1)
            ax.set_title(f"{regime}: {title}")
            ax.set_xlabel("modeled throughput (generated tokens/s)")
            ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], marker=m, linestyle="", color="gray", label=f"budget {b:g}% of experts")
                   for b, m in markers.items()]
        handles += [plt.Line2D([], [], marker="o", linestyle="", color=c, label=s) for s, c in COLORS.items()]
        handles += [plt.Line2D([], [], marker="o", linestyle="", color="gray", markerfacecolor="none",
                               label="lossy miss policy")]
        row_axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle("Memory budget split between expert slots and KV blocks (labels: the experts' share)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mmbench_categories(rows: Sequence[dict[str, Any]], categories_csv: Path, path: Path) -> Path | None:
    """MMBench CircularEval accuracy per category: offload off and each (scheduling, miss policy) at the
    smallest per-layer capacity, per regime."""
    if not Path(categories_csv).exists():
        return None
    with open(categories_csv, newline="") as f:
        records = [r for r in csv.DictReader(f) if r["format"] == "mmbench"]
    if not records:
        return None
    capacity = [r for r in _ok(rows, "capacity") if r.get("budget_mode") == "per-layer"]
    plt = _plt()
    regimes = _regimes([r for r in rows if r.get("status") == "ok"])
    fig, axes = plt.subplots(len(regimes), 1, figsize=(11, 3.8 * len(regimes)), squeeze=False)
    for (ax,), regime in zip(axes, regimes, strict=True):
        shown = [r["cell"] for r in _ok(rows, "off") if r["regime"] == regime]
        mine = [r for r in capacity if r["regime"] == regime]
        if mine:
            smallest = min(num(r["slots"]) for r in mine)
            shown += [r["cell"] for r in mine if num(r["slots"]) == smallest]
        categories = sorted({r["category"] for r in records if r["cell"] in shown})
        width = 0.8 / max(1, len(shown))
        for i, cell in enumerate(shown):
            acc = {r["category"]: num(r["acc"]) for r in records if r["cell"] == cell}
            ax.bar([c + i * width for c in range(len(categories))], [100 * (acc.get(c) or 0) for c in categories],
                   width, label=cell)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, fontsize=8)
        ax.set_ylabel("CircularEval %")
        ax.set_title(f"{regime}: MMBench-format accuracy per category")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hit_rate_vs_capacity(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    cells = [r for r in _ok(rows, "capacity") if r.get("budget_mode") == "per-layer"]
    if not cells:
        return None
    plt = _plt()
    regimes = _regimes(cells)
    fig, axes = plt.subplots(len(regimes), 2, figsize=(12, 4 * len(regimes)), squeeze=False)
    for row_axes, regime in zip(axes, regimes, strict=True):
        for ax, (key, scale, title) in zip(row_axes, (("hit_rate", 100, "expert cache hit rate %"),
                                                      ("loads_per_token", 1, "expert loads per generated token")),
                                           strict=True):
            series: dict[tuple[str, str], list[dict]] = {}
            for r in cells:
                if r["regime"] == regime and num(r.get(key)) is not None:
                    series.setdefault((r["scheduling"], r["miss_policy"]), []).append(r)
            for (sched, miss), rs in sorted(series.items()):
                rs.sort(key=lambda r: num(r["capacity_pct"]))
                ax.plot([num(r["capacity_pct"]) for r in rs], [scale * num(r[key]) for r in rs],
                        STYLES.get(miss, "-"), marker=MARKERS.get(miss, "o"), color=COLORS.get(sched),
                        label=f"{sched} / {miss}")
            ax.set_title(f"{regime}: {title}")
            ax.set_xlabel("expert cache capacity (% of experts per MoE layer)")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows: Sequence[dict[str, Any]], categories_csv: Path, out: Path) -> list[Path]:
    """Every plot the rows support, written into ``out``; returns the paths written."""
    out = Path(out)
    written = [
        accuracy_vs_capacity(rows, out / PLOTS[0]),
        accuracy_vs_throughput(rows, out / PLOTS[1]),
        mmbench_categories(rows, categories_csv, out / PLOTS[2]),
        hit_rate_vs_capacity(rows, out / PLOTS[3]),
    ]
    return [p for p in written if p is not None]
