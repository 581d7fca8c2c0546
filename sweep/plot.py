"""``sweep plot``: perplexity against sparsity per batch size, and per-trial curves.

Left: the final perplexity (last evaluated epoch; so far, for a running trial) against
sparsity, one line per batch size, with the pruned model before training (epoch 0) and the
dense model for reference. Right: perplexity over epochs, one line per trial. ``--eval-set NAME``
plots another evaluation set than the primary (from the ``evals`` table). A sweep with
zero-shot tasks gets a third panel: a task metric over the models measured (epoch 0, the
best, the final one), per trial, with the dense model's value. Built from the Parquet results
alone with matplotlib's Agg canvas (no display, no pyplot state).
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

from sweep.api import find_sweeps, localize, read_epochs, read_long
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


def for_set(report: pd.DataFrame, epochs: pd.DataFrame, evals: pd.DataFrame,
            name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The report and epochs with one evaluation set's perplexities in place of the primary's
    (final, baseline, dense). ValueError naming the sets when ``name`` is not one."""
    rows = evals[evals["set"] == name]
    if rows.empty:
        known = sorted(evals["set"].dropna().unique())
        raise ValueError(f"no evaluation set {name!r} in the evals table"
                         + (f" (sets: {', '.join(known)})" if known else " (it is empty)"))
    rows = rows.sort_values("epoch", kind="stable")
    by_trial = rows.groupby(["sweep", "trial_id"])
    per = pd.DataFrame({
        "final_perplexity": by_trial.apply(lambda g: g[g["epoch"] > 0]["perplexity"].iloc[-1]
                                           if (g["epoch"] > 0).any() else float("nan")),
        "baseline_perplexity": by_trial.apply(lambda g: g[g["epoch"] == 0]["perplexity"].iloc[0]
                                              if (g["epoch"] == 0).any() else float("nan")),
        "dense_perplexity": by_trial["dense_perplexity"].first(),
    })
    report = report.drop(columns=list(per.columns)).join(per, on=["sweep", "trial_id"])
    keep = [c for c in epochs.columns if c != "perplexity"]
    epochs = rows[["sweep", "trial_id", "epoch", "perplexity"]].merge(
        epochs[keep], on=["sweep", "trial_id", "epoch"], how="left")
    return report, epochs


def _task_metric(tasks: pd.DataFrame, wanted: str | None) -> tuple[str, str]:
    """(task, metric) to plot: ``wanted`` ("task" or "task/metric"), else the first task's
    acc (or its first metric)."""
    pairs = tasks[["task", "metric"]].drop_duplicates().sort_values(["task", "metric"])
    if wanted:
        task, _, metric = wanted.partition("/")
        hit = pairs[(pairs["task"] == task) & ((pairs["metric"] == metric) if metric else True)]
        if hit.empty:
            known = ", ".join(f"{t}/{m}" for t, m in pairs.itertuples(index=False))
            raise ValueError(f"no task metric {wanted!r} in the tasks table ({known})")
        pairs = hit
    task = pairs["task"].iloc[0]
    metrics = list(pairs[pairs["task"] == task]["metric"])
    return task, "acc" if "acc" in metrics else metrics[0]


def _plot_tasks(ax: Axes, tasks: pd.DataFrame, task: str, metric: str) -> None:
    """One task metric over the epochs of the models measured, one line per trial, and the
    dense model's value as a dashed line."""
    rows = tasks[(tasks["task"] == task) & (tasks["metric"] == metric)]
    several = rows["sweep"].nunique() > 1
    for value in sorted(rows["dense_value"].dropna().unique()):
        ax.axhline(value, color="black", ls="--", lw=1.2, label=f"dense (unpruned): {value:.4g}")
    for (sweep, tid), g in rows.groupby(["sweep", "trial_id"], sort=True):
        g = g.sort_values("epoch")
        ax.errorbar(g["epoch"].astype(float), g["value"], yerr=g["stderr"].fillna(0).astype(float),
                    marker="o", lw=1.6, ms=5, capsize=3, label=f"{sweep}/{tid}" if several else tid)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{task} {metric} (zero-shot, lm-eval)")
    ax.set_xlabel("epoch of the model measured (0 = pruned, before training)")
    ax.set_ylabel(f"{metric} (+/- stderr)")


def plot_sweep(path: str | os.PathLike, out: str | os.PathLike, eval_set: str | None = None,
               task: str | None = None) -> Path:
    """Render the panels for the sweep(s) at ``path`` into ``out`` (PNG, or any format
    matplotlib knows by suffix); the file is replaced atomically. Returns ``out``.
    ``eval_set``: plot that evaluation set instead of the primary; ``task``: the task (or
    "task/metric") of the tasks panel (default: the first task's acc). ValueError for a set
    or task the results do not have."""
    out = Path(out)
    path = localize(path)  # an object-store URI: its results downloaded once, here
    names = [d.name for d in find_sweeps(path)]
    report, epochs = build_report(path), read_epochs(path)
    if eval_set is not None:
        report, epochs = for_set(report, epochs, read_long(path, "evals"), eval_set)
    tasks = read_long(path, "tasks")
    if task is not None and tasks.empty:
        raise ValueError(f"no task metric {task!r}: the tasks table is empty")
    fig = Figure(figsize=(21 if len(tasks) else 14, 5.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3 if len(tasks) else 2)
    left, right = axes[0], axes[1]
    _plot_sparsity(left, report)
    _plot_epochs(right, epochs, report)
    if len(tasks):
        _plot_tasks(axes[2], tasks, *_task_metric(tasks, task))
    if eval_set is not None:
        for ax in (left, right):
            ax.set_title(f"{ax.get_title()} [{eval_set}]")
    for ax in axes:
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
    parser.add_argument("--eval-set", dest="eval_set", default=None, metavar="NAME",
                        help="plot this evaluation set (the evals table) instead of the primary")
    parser.add_argument("--task", default=None, metavar="TASK[/METRIC]",
                        help="the task metric of the tasks panel (default: the first task's acc)")


def run_plot_cli(args: argparse.Namespace) -> int:
    """Write the plot and print its path; 2 with the message on stderr without results."""
    try:
        out = args.output or Path(args.sweep_dir) / "plot.png"
        written = plot_sweep(args.sweep_dir, out, getattr(args, "eval_set", None),
                             getattr(args, "task", None))
    except (FileNotFoundError, ValueError) as e:
        print(f"sweep plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
