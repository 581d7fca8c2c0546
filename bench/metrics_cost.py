"""Benchmark: what the extra metrics cost a trial, against its training time.

metrics_cost  ``configs/demo-metrics.yaml`` (SmolLM2-135M, two evaluation sets, the local
              zero-shot task) over sparsity 0.5/0.6/0.7 (three trials, the repetitions):
              per trial, the seconds of each evaluation set (all its evaluations: epoch 0 and
              every epoch, from the ``evals`` table) and of the tasks (every measurement, from
              the ``tasks`` table), each as a fraction of the trial's training seconds (per
              epoch, new tokens / the epoch's tokens per second, from ``epochs``); the median
              over the trials with min and max. ``--quick``: ``configs/tiny-metrics.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import OUT_DIR, ROOT, Row, stats
from bench.e2e import SWEEP, _timed


def _table(sweep_dir: Path, name: str) -> list[dict]:
    return pq.read_table(sweep_dir / "results" / f"{name}.parquet").to_pylist()


def train_seconds(epochs: list[dict]) -> dict[str, float]:
    """Training seconds per trial: each epoch's new tokens over its tokens per second."""
    out: dict[str, float] = {}
    by_trial: dict[str, list[dict]] = {}
    for r in epochs:
        by_trial.setdefault(r["trial_id"], []).append(r)
    for tid, rows in by_trial.items():
        rows.sort(key=lambda r: r["epoch"])
        total, before = 0.0, 0
        for r in rows:
            if r["epoch"] > 0 and r.get("tokens_per_s"):
                total += (r["tokens"] - before) / r["tokens_per_s"]
            before = r["tokens"] or 0
        out[tid] = total
    return out


def bench_metrics_cost(ctx) -> list[Row]:
    quick = ctx["quick"]
    config = ROOT / "configs" / ("tiny-metrics.yaml" if quick else "demo-metrics.yaml")
    storage = Path(ctx["tmp"]) / "metrics-cost"
    logs = OUT_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    extra = [] if quick else ["--sparsity", "0.5", "0.6", "0.7"]
    wall = _timed([sys.executable, "-c", SWEEP, "run", str(config), "--storage", str(storage),
                   "--name", "metrics-cost", *extra], logs / "metrics-cost.log", timeout=3600)
    sweep_dir = storage / "metrics-cost"
    train = train_seconds(_table(sweep_dir, "epochs"))
    evals, tasks = _table(sweep_dir, "evals"), _table(sweep_dir, "tasks")
    sets = sorted({r["set"] for r in evals})
    rows = []
    for name in sets:
        per_trial = {tid: sum(r["seconds"] or 0.0 for r in evals
                              if r["trial_id"] == tid and r["set"] == name) for tid in train}
        primary = any(r["primary"] for r in evals if r["set"] == name)
        rows.append(_row(f"evaluation set {name!r}{' (primary)' if primary else ''}", per_trial,
                         train, "every evaluation: epoch 0 and after each epoch"))
    if tasks:
        measured = {(r["trial_id"], r["epoch"], r["task"]): r["seconds"] or 0.0 for r in tasks}
        per_trial = {tid: sum(s for (t, _, _), s in measured.items() if t == tid) for tid in train}
        epochs = sorted({e for (_, e, _) in measured})
        rows.append(_row(f"zero-shot tasks ({', '.join(sorted({k[2] for k in measured}))})",
                         per_trial, train, f"measured at epochs {epochs}"))
    for r in rows:
        r.details["sweep_wall_s"] = wall
    return rows


def _row(what: str, cost: dict[str, float], train: dict[str, float], note: str) -> Row:
    fractions = [cost[t] / train[t] for t in train if train[t] > 0]
    f, c, t = stats(fractions), stats(list(cost.values())), stats(list(train.values()))
    return Row("metrics_cost", f"metrics cost: {what} / training", what.split(" (")[0],
               c["median"], "training", t["median"], f["median"], unit="s",
               goal="(info)",
               note=f"{note}; fraction per trial: median {f['median']:.3f} (min {f['min']:.3f}, "
                    f"max {f['max']:.3f}, {f['n']} trials)",
               details={"fraction": f, "per_trial_s": cost, "train_s": train},
               a_stats=c, b_stats=t)
