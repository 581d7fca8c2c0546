"""``sweep plot``: perplexity against sparsity per batch size, and per-trial curves.

Left: the final perplexity (last evaluated epoch; so far, for a running trial) against
sparsity, one line per batch size, with the pruned model before training (epoch 0) and the
dense model for reference. Right: perplexity over epochs, one line per trial. Built from the
Parquet results alone with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from sweep.api import find_sweeps, localize, read_epochs
from sweep.report import build_report

DPI = 150
RUNNING = ("pending", "running")


def _finite(values: Iterable[float]) -> list[float]:
    return [
        float(v) for v in values if v is not None and v is not pd.NA and math.isfinite(v) and v > 0
    ]


def _scale_y(ax: Axes, values: Iterable[float]) -> None:
    """Log scale when the values span more than a decade, with plain-number tick labels."""
    vals = _finite(values)
    if vals and max(vals) / min(vals) > 10:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda y, _: f"{y:g}" if _mantissa(y) in (2, 5) else "")
        )
        ax.tick_params(axis="y", which="both", labelsize=9)


def _mantissa(y: float) -> int:
    return round(y / 10 ** math.floor(math.log10(y))) if y > 0 else 0


def _series_label(key: tuple, parts: list[str]) -> str:
    """'batch 4', prefixed by sweep / method / pattern when the plot holds several."""
    named = dict(zip(["sweep", "method", "pattern", "batch_size"], key, strict=True))
    words = [str(named[p]) for p in parts if p != "batch_size" and named[p] is not None]
    return " ".join([*words, f"batch {named['batch_size']}"])


def _dense_lines(ax: Axes, report: pd.DataFrame) -> list[float]:
    """A dashed line per distinct dense perplexity (one per sweep and model)."""
    dense = report.dropna(subset=["dense_perplexity"]).groupby("dense_perplexity", sort=True)
    several = dense.ngroups > 1
    for value, g in dense:
        who = f" ({', '.join(sorted(set(g['sweep'])))})" if several else ""
        ax.axhline(
            value, color="black", ls="--", lw=1.2, label=f"dense (unpruned){who}: {value:.4g}"
        )
    return list(dense.groups)


def _plot_sparsity(ax: Axes, report: pd.DataFrame) -> None:
    """Final perplexity against sparsity, one line per (sweep, method, pattern) batch size."""
    keys = ["sweep", "method", "pattern", "batch_size"]
    varying = [k for k in keys if report[k].nunique(dropna=False) > 1 or k == "batch_size"]
    trained = report[
        (report["epochs_completed"].fillna(0) >= 1) & report["final_perplexity"].notna()
    ]
    plotted: list[float] = []
    for key, g in trained.groupby(keys, dropna=False, sort=True):
        g = g.sort_values("sparsity")
        line = ax.plot(
            g["sparsity"],
            g["final_perplexity"],
            marker="o",
            lw=1.8,
            ms=6,
            label=_series_label(key, varying),
        )[0]
        running = g[g["status"].isin(RUNNING)]
        ax.plot(
            running["sparsity"],
            running["final_perplexity"],
            ls="none",
            marker="o",
            ms=9,
            mfc="white",
            mec=line.get_color(),
            mew=1.8,
        )
        plotted += g["final_perplexity"].tolist()
    base = report.groupby(["sweep", "method", "pattern", "sparsity"], dropna=False, sort=True)
    base = base["baseline_perplexity"].mean().dropna().reset_index()
    for i, (_, g) in enumerate(base.groupby(["sweep", "method", "pattern"], dropna=False)):
        ax.plot(
            g["sparsity"],
            g["baseline_perplexity"],
            color="grey",
            ls=":",
            marker="s",
            ms=5,
            label="pruned, before training (epoch 0)" if i == 0 else None,
        )
    plotted += base["baseline_perplexity"].tolist() + _dense_lines(ax, report)
    if (trained["status"].isin(RUNNING)).any():
        ax.plot(
            [], [], ls="none", marker="o", mfc="white", mec="grey", label="hollow: still running"
        )
    sparsities = sorted(report["sparsity"].dropna().unique())
    ax.set_xticks(sparsities, [f"{s:g}" for s in sparsities])
    if len(sparsities) == 1:
        ax.set_xlim(sparsities[0] - 0.1, sparsities[0] + 0.1)
    _scale_y(ax, plotted)
    ax.set_title(
        "Final perplexity vs sparsity" + (" (no trained epochs yet)" if trained.empty else "")
    )
    ax.set_xlabel("sparsity (fraction of weights zeroed per pruned layer)")
    ax.set_ylabel("final perplexity (last evaluated epoch)")


def _plot_epochs(ax: Axes, epochs: pd.DataFrame, report: pd.DataFrame) -> None:
    """Perplexity over epochs, one line per trial (epoch 0 = pruned, before training)."""
    several = epochs["sweep"].nunique() > 1
    plotted = _dense_lines(ax, report)
    for (sweep, tid), g in epochs.groupby(["sweep", "trial_id"], sort=True):
        g = g.sort_values("epoch")
        ax.plot(
            g["epoch"].astype(float),
            g["perplexity"],
            marker="o",
            lw=1.6,
            ms=5,
            label=f"{sweep}/{tid}" if several else tid,
        )
        plotted += g["perplexity"].tolist()
    last = int(epochs["epoch"].max()) if len(epochs) else 1
    ax.set_xlim(-0.25, max(last, 1) + 0.25)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _scale_y(ax, plotted)
    ax.set_title(
        "Perplexity over epochs, per trial" + (" (none evaluated yet)" if epochs.empty else "")
    )
    ax.set_xlabel("epoch (0 = pruned, before training)")
    ax.set_ylabel("perplexity")


def _legend(ax: Axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) > 8:  # many trials: put the legend beside the axes
        ax.legend(
            fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(handles) // 20
        )
    else:
        ax.legend(fontsize=8, loc="best", framealpha=0.9)


def plot_sweep(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Render the two panels for the sweep(s) at ``path`` into ``out`` (PNG, or any format
    matplotlib knows by suffix); the file is replaced atomically. Returns ``out``."""
    out = Path(out)
    path = localize(path)  # an object-store URI: its results downloaded once, here
    names = [d.name for d in find_sweeps(path)]
    report, epochs = build_report(path), read_epochs(path)
    fig = Figure(figsize=(14, 5.6), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    _plot_sparsity(left, report)
    _plot_epochs(right, epochs, report)
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        _legend(ax)
    title = ", ".join(names) if len(names) <= 3 else f"{len(names)} sweeps"
    fig.suptitle(f"Sweep {title}: perplexity after pruning and recovery training", fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, dpi=DPI, format=out.suffix.lstrip(".").lower() or "png")
    os.replace(tmp, out)
    return out


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sweep plot``."""
    parser.add_argument("sweep_dir", help="a SWEEP_DIR, a directory holding several sweeps, or either one's object-store URI")
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE.png",
        type=Path,
        default=None,
        help="where to write the figure (default: SWEEP_DIR/plot.png)",
    )


def run_plot_cli(args: argparse.Namespace) -> int:
    """Write the plot and print its path; 2 with the message on stderr without results."""
    try:
        out = args.output or Path(args.sweep_dir) / "plot.png"
        written = plot_sweep(args.sweep_dir, out)
    except FileNotFoundError as e:
        print(f"sweep plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
