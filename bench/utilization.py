"""Benchmark 4: how much of a small sweep's wall time is trial compute.

A 2x2 tiny grid (sparsity 0.5/0.8 x batch 2/4, 1 worker per trial, 2 epochs) through
``run_sweep``. Compute of a trial = its training seconds (epoch tokens / the epoch's
``tokens_per_s``) + its evaluation seconds (``eval_s``, epochs 0..2), from Tune's per-result
records (the same values the Parquet rows come from). Utilization =
(sum of compute / concurrent trials) / wall, with wall = the whole ``run_sweep`` call (Ray
start, prepare, grid, shutdown); the grid-only wall is in the JSON.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Row, repeats, run_job, stats, timed_row, tiny_sweep_dict


def trial_compute(rows: list[dict], seq_len: int, batch: int) -> dict:
    train = sum((r.get("epoch_steps") or 0) * batch * seq_len / r["tokens_per_s"]
                for r in rows if r.get("tokens_per_s"))
    ev = sum(r.get("eval_s") or 0.0 for r in rows)
    busy = max((r.get("time_total_s") or 0.0) for r in rows) if rows else 0.0
    return {"train_s": train, "eval_s": ev, "compute_s": train + ev, "tune_time_total_s": busy}


def _one(ctx, storage: Path, cfg: dict) -> dict:
    res = run_job("sweep", {"config": cfg, "storage": str(storage)}, timeout=480)
    if res["rc"] != 0:
        raise RuntimeError(f"the 2x2 sweep ended with rc={res['rc']} (log: {res['_log']})")
    plans = {p["trial_id"]: p for p in res["plans"]}
    per_trial = {tid: trial_compute(res["tune"].get(tid, []), cfg["data"]["seq_len"],
                                    plans[tid]["batch_size"]) for tid in plans}
    conc = res["concurrency"]
    s = res["stamps"]
    complete = [e["t"] for e in res["events"] if e["event"] == "trial_complete"]
    return {"per_trial": per_trial, "concurrency": conc,
            "sweep_wall_s": s["run_sweep_end"] - s["run_sweep_begin"],
            "grid_wall_s": (max(complete) - s["tuner_fit_begin"]) if complete else None,
            "sum_compute_s": sum(t["compute_s"] for t in per_trial.values()),
            "sum_tune_time_total_s": sum(t["tune_time_total_s"] for t in per_trial.values()),
            "ray_init_s": s.get("ray_init_end", 0) - s.get("ray_init_begin", 0),
            "prepare_s": s.get("prep_end", 0) - s.get("ray_init_end", 0)}


def bench_utilization(ctx) -> list[Row]:
    base = 200 if ctx["quick"] else 400  # samples per epoch: 100/200 steps at batch 4/2
    runs = []
    for i in range(repeats(ctx)):
        storage = Path(ctx["tmp"]) / f"grid-{i}"
        storage.mkdir(parents=True, exist_ok=True)
        cfg = tiny_sweep_dict("grid", [0.5, 0.8], [2, 4], workers=1, base_samples=base, epochs=2)
        runs.append(_one(ctx, storage, cfg))
    conc = runs[0]["concurrency"]
    compute = [r["sum_compute_s"] / r["concurrency"] for r in runs]
    wall = [r["sweep_wall_s"] for r in runs]
    grid = stats([c / r["grid_wall_s"] for c, r in zip(compute, runs, strict=True)
                  if r["grid_wall_s"]])
    busy = stats([r["sum_tune_time_total_s"] / r["concurrency"] / r["sweep_wall_s"] for r in runs])
    return [timed_row(
        "utilization", f"sweep utilization (2x2, {conc} at once)", "compute/conc", compute,
        "sweep wall", wall, unit="s", goal="ideal 1.0 (info)",
        note=(f"grid only (tuner.fit start -> last trial done): {grid['median']:.2f} of it; "
              f"Tune busy time/conc {busy['median']:.2f} of the wall (medians of {len(runs)})"
              if grid["n"] else ""),
        details={"runs": runs}),
    ]
