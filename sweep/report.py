"""``sweep report``: one summary row per trial, from the Parquet results alone.

Per-epoch values (baseline, final, best, epochs completed) come from the epochs rows when a
trial has any, so a running trial whose trials row is still stale shows its progress; the
trials row fills in the rest (status, stop reason, dense perplexity) and stands in for a
trial without epochs rows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import pandas as pd

from sweep.api import load, localize, read_long
from sweep.query import format_table

COLUMNS = [
    "sweep", "trial_id", "model", "method", "pattern", "layerwise", "distill", "sparsity",
    "batch_size", "lr",
    "dense_perplexity", "baseline_perplexity", "final_perplexity", "best_perplexity",
    "best_epoch", "improvement_pct", "epochs_completed", "num_epochs", "status",
    "stop_reason", "wall_s", "mem_peak_mb", "best",
]  # fmt: skip
IDENTITY = ("model", "method", "pattern", "layerwise", "distill", "sparsity", "batch_size", "lr",
            "num_epochs")
LEGEND = (
    "* lowest best perplexity at its sparsity. improv: final vs baseline (epoch 0: pruned, "
    "before training), positive is better.\n"
    "dense: the unpruned model. best @ep: lowest perplexity over trained epochs, and its epoch. "
    "Running trials show values so far."
)
TEXT = ("sweep", "trial_id", "model", "method", "pattern", "layerwise", "distill", "status",
        "stop_reason")
# Text columns, aligned left.
LEFT = {"", "sweep", "trial_id", "method", "pattern", "layerwise", "distill", "status", "stop_reason"}
# Shown only when some trial differs from the default (older sweeps have no value).
DEFAULTS = {"layerwise": "uniform", "distill": "none"}


def _num(v: Any) -> float | None:
    """A float, or None for null/NA (NaN stays NaN: a diverged evaluation)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    return float(v)


def _from_epochs(rows: pd.DataFrame) -> dict[str, Any]:
    """Baseline, final, best and progress of one trial from its epochs rows."""
    rows = rows.sort_values("epoch")
    out: dict[str, Any] = {
        k: rows[k].dropna().iloc[-1] for k in IDENTITY if k in rows and rows[k].notna().any()
    }
    base = rows[rows["epoch"] == 0]["perplexity"]
    out["baseline_perplexity"] = _num(base.iloc[0]) if len(base) else None
    trained = rows[rows["epoch"] > 0]
    if len(trained):
        out["final_perplexity"] = _num(trained["perplexity"].iloc[-1])
        finite = trained[trained["perplexity"].notna()]
        if len(finite):
            best = finite.loc[finite["perplexity"].idxmin()]
            out["best_perplexity"] = float(best["perplexity"])
            out["best_epoch"] = int(best["epoch"])
    out["epochs_completed"] = int(rows["epoch"].max())
    out["wall_s"] = _num(rows["wall_s"].max())
    out["mem_peak_mb"] = _num(rows["mem_peak_mb"].max())
    return out


def _merge(trial: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """Epochs-derived values first (fresher), the trials row where they are missing."""
    row = {k: v for k, v in trial.items() if not _missing(v)}
    for k, v in derived.items():
        if v is None:
            continue
        if k in IDENTITY:
            row.setdefault(k, v)
        elif k in ("epochs_completed", "wall_s", "mem_peak_mb") and row.get(k) is not None:
            row[k] = max(row[k], v)
        else:
            row[k] = v
    return row


def _records(path: str | os.PathLike) -> list[dict[str, Any]]:
    res = load(path)
    trials = {(r["sweep"], r["trial_id"]): r for r in res.trials.to_dict("records")}
    derived = {
        key: _from_epochs(g) for key, g in res.epochs.groupby(["sweep", "trial_id"], sort=False)
    }
    out = []
    for key in sorted(set(trials) | set(derived)):
        row = _merge(dict(trials.get(key, {})), derived.get(key, {}))
        row["sweep"], row["trial_id"] = key
        if not row.get("status"):
            row["status"] = "running" if key in derived else "pending"
        out.append(row)
    return out


def _fill_dense(df: pd.DataFrame) -> pd.DataFrame:
    """The dense perplexity is per sweep and model: share it with rows that lack it."""
    dense = df["dense_perplexity"]
    for keys in (["sweep", "model"], ["sweep"]):
        dense = dense.fillna(df.groupby(keys, dropna=False)["dense_perplexity"].transform("first"))
    df["dense_perplexity"] = dense
    return df


# Extra columns from the long tables: "set:<name>" (the final perplexity on an evaluation set
# other than the primary) and "task:<task>/<metric>" (the final model's value).
SET_PREFIX, TASK_PREFIX = "set:", "task:"


def _last_values(rows: pd.DataFrame, key: str, value: str, prefix: str) -> pd.DataFrame:
    """Per (sweep, trial_id): the value at each ``key``'s last epoch, one column per key."""
    if rows.empty:
        return pd.DataFrame()
    last = rows.sort_values("epoch", kind="stable").groupby(
        ["sweep", "trial_id", key], sort=True)[value].last()
    wide = last.unstack(key)
    wide.columns = [f"{prefix}{c}" for c in wide.columns]
    return wide.astype("float64")


def long_columns(path: str | os.PathLike) -> pd.DataFrame:
    """The report's per-set and per-task columns, indexed by (sweep, trial_id)."""
    evals, tasks = read_long(path, "evals"), read_long(path, "tasks")
    others = evals[evals["primary"].fillna(0) != 1]
    tasks = tasks.assign(name=tasks["task"] + "/" + tasks["metric"])
    parts = [p for p in (_last_values(others, "set", "perplexity", SET_PREFIX),
                         _last_values(tasks, "name", "value", TASK_PREFIX)) if not p.empty]
    return pd.concat(parts, axis=1) if parts else pd.DataFrame()


def extra_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith((SET_PREFIX, TASK_PREFIX))]


def build_report(path: str | os.PathLike) -> pd.DataFrame:
    """One row per trial over every sweep under ``path``, sorted by sweep, sparsity, batch
    size; ``best`` marks the lowest best perplexity at each (sweep, sparsity). Sweeps with
    several evaluation sets or tasks add a column per other set and per task metric."""
    df = pd.DataFrame(_records(path))
    for col in COLUMNS:
        if col not in df:
            df[col] = pd.NA if col in ("best_epoch", "epochs_completed", "num_epochs") else None
    df = df[COLUMNS].copy()
    floats = ["sparsity", "lr", "dense_perplexity", "baseline_perplexity", "final_perplexity",
              "best_perplexity", "improvement_pct", "wall_s", "mem_peak_mb"]  # fmt: skip
    df[floats] = df[floats].astype("float64")
    for col in TEXT:  # object with None for missing, whatever pandas' default string dtype
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    for col in ("batch_size", "best_epoch", "epochs_completed", "num_epochs"):
        df[col] = pd.array(df[col].tolist(), dtype="Int64")
    df = _fill_dense(df)
    base, final = df["baseline_perplexity"], df["final_perplexity"]
    df["improvement_pct"] = 100.0 * (base - final) / base
    order = ["sweep", "sparsity", "batch_size", "method", "pattern", "trial_id"]
    df = df.sort_values(order, kind="stable", na_position="last", ignore_index=True)
    df["best"] = False
    ranked = df.dropna(subset=["best_perplexity"])
    if len(ranked):
        idx = ranked.groupby(["sweep", "sparsity"])["best_perplexity"].idxmin()
        df.loc[idx.to_numpy(), "best"] = True
    extra = long_columns(path)
    if not extra.empty:
        df = df.join(extra, on=["sweep", "trial_id"])
    return df


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _f(v: Any, spec: str = ".4g") -> str:
    return "" if _missing(v) else format(float(v), spec)


def _text(v: Any) -> str:
    return "" if _missing(v) else str(v)


def _duration(seconds: Any) -> str:
    if _missing(seconds):
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def report_cells(r: dict[str, Any]) -> dict[str, str]:
    """The formatted cells of one report row, keyed by column header."""
    done, total = r["epochs_completed"], r["num_epochs"]
    final = r["final_perplexity"]
    # NaN after a trained epoch is a real result (diverged), not a missing value.
    diverged = not _missing(done) and done >= 1 and isinstance(final, float) and math.isnan(final)
    improv = _f(r["improvement_pct"], "+.1f")
    return {
        "": "*" if r["best"] else "",
        "sweep": _text(r["sweep"]),
        "trial_id": _text(r["trial_id"]),
        "method": _text(r["method"]),
        "pattern": _text(r["pattern"]),
        "layerwise": _text(r.get("layerwise")),
        "distill": _text(r.get("distill")),
        "sparsity": _f(r["sparsity"], "g"),
        "batch": _text(r["batch_size"]),
        "lr": _f(r["lr"], ".3g"),
        "dense": _f(r["dense_perplexity"]),
        "baseline": _f(r["baseline_perplexity"]),
        "final": "nan" if diverged else _f(final),
        "best": _f(r["best_perplexity"]),
        "@ep": _text(r["best_epoch"]),
        "improv": improv + "%" if improv else "",
        **{c[len(SET_PREFIX):]: _f(v) for c, v in r.items() if c.startswith(SET_PREFIX)},
        **{c[len(TASK_PREFIX):]: _f(v, ".3f") for c, v in r.items() if c.startswith(TASK_PREFIX)},
        "epochs": (_text(done) or "0") + ("" if _missing(total) else f"/{total}"),
        "status": _text(r["status"]),
        "stop_reason": _text(r["stop_reason"]),
        "wall": _duration(r["wall_s"]),
        "mem_mb": _f(r["mem_peak_mb"], ".0f"),
    }


def hidden_columns(df: pd.DataFrame) -> dict[str, bool]:
    """Columns that say nothing for these trials: one sweep, no pattern, no stop reason, every
    trial at the default layer-wise rule and objective."""
    return {
        "sweep": df["sweep"].nunique() <= 1,
        "pattern": df["pattern"].isna().all(),
        "stop_reason": df["stop_reason"].isna().all(),
        **{c: c not in df or df[c].fillna(d).eq(d).all() for c, d in DEFAULTS.items()},
    }


def format_report(df: pd.DataFrame) -> str:
    """The report as an aligned text table with a legend line; the sweep, pattern and
    stop_reason columns only when they say something."""
    if df.empty:
        return "no trials yet\n" + LEGEND
    hide = hidden_columns(df)
    rows = [report_cells(r) for r in df.to_dict("records")]
    columns = [c for c in rows[0] if not hide.get(c, False)]
    table = format_table(
        columns,
        [[r[c] for c in columns] for r in rows],
        footer=False,
        right=[c not in LEFT for c in columns],
    )
    return table + "\n" + LEGEND + _extra_legend(df)


def _extra_legend(df: pd.DataFrame) -> str:
    sets = [c[len(SET_PREFIX):] for c in df.columns if c.startswith(SET_PREFIX)]
    tasks = [c for c in df.columns if c.startswith(TASK_PREFIX)]
    out = ""
    if sets:
        out += (f"\n{', '.join(sets)}: final perplexity on that evaluation set (the other "
                "columns use the primary set); sweep query: the evals table.")
    if tasks:
        out += ("\ntask/metric: the final model's zero-shot value (lm-eval); epoch 0, the best "
                "model and the dense model: the tasks table.")
    return out


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sweep report``."""
    parser.add_argument("sweep_dir", help="a SWEEP_DIR, a directory holding several sweeps, or either one's object-store URI")
    parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format"
    )
    parser.add_argument(
        "--html",
        metavar="FILE",
        default=None,
        help="also write a self-contained HTML page (table, interactive charts, config, "
        "environment) that opens offline",
    )


def run_report_cli(args: argparse.Namespace) -> int:
    """Print the report (and with ``--html`` write the page, saying so: on stdout after a
    table, on stderr after csv/json so stdout stays parseable); 2 with the message on stderr
    when there are no results."""
    try:
        path = localize(args.sweep_dir)  # an object-store URI: downloaded once for both
        df = build_report(path)
    except FileNotFoundError as e:
        print(f"sweep report: {e}", file=sys.stderr)
        return 2
    if args.format == "csv":
        print(df.to_csv(index=False).rstrip("\n"))
    elif args.format == "json":
        print(df.to_json(orient="records", indent=1))
    else:
        print(format_report(df))
    if getattr(args, "html", None):
        from sweep.html_report import write_html_report

        written = write_html_report(path, args.html, report=df)
        print(f"wrote {written}", file=sys.stdout if args.format == "table" else sys.stderr)
    return 0
