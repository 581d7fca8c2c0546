"""Benchmark: what early stopping saves on a grid, and whether it keeps the best trial.

``configs/tiny-early-stop.yaml`` (6 trials, 2 at a time, 3 epochs) runs twice, side by side
in one process tree: as shipped (ASHA + plateau + divergence), and with every stop switched
off. Compute is counted two ways: trial-epochs trained (sum of ``epochs_completed``), and
worker-seconds held (each trial's Tune running time x its workers).

    .venv/bin/python -m bench.early_stop      (also: make bench, as the last benchmark)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from bench.common import OUT_DIR, ROOT, Row, format_table, ratio, repeats, run_job, timed_row

CONFIG = ROOT / "configs" / "tiny-early-stop.yaml"


def _summary(res: dict) -> dict:
    trials = res["trials"]
    workers = {p["trial_id"]: p["workers"] for p in res["plans"]}
    held = {tid: max((r.get("time_total_s") or 0.0) for r in rows) if rows else 0.0
            for tid, rows in res["tune"].items()}
    best = min(trials, key=lambda t: t["best_perplexity"])
    return {
        "trial_epochs": sum(int(t["epochs_completed"]) for t in trials),
        "worker_s": sum(held.get(t, 0.0) * workers[t] for t in workers),
        "statuses": {t["trial_id"]: t["status"] for t in trials},
        "best_trial": best["trial_id"],
        "best_perplexity": best["best_perplexity"],
        "wall_s": res["stamps"]["run_sweep_end"] - res["stamps"]["run_sweep_begin"],
    }


def bench_early_stop(ctx) -> list[Row]:
    base = yaml.safe_load(CONFIG.read_text())
    off = json.loads(json.dumps(base))
    off["name"] = "no-early-stop"
    off["early_stop"] = {"scheduler": "none", "plateau_patience": None, "diverge_factor": None}
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    for i in range(repeats(ctx)):  # alternated: both see the same load
        for label, cfg in (("with", base), ("without", off)):
            storage = Path(ctx["tmp"]) / f"early-{label}-{i}"
            storage.mkdir(parents=True, exist_ok=True)
            res = run_job("sweep", {"config": cfg, "storage": str(storage)}, timeout=900)
            if res["rc"] != 0:
                raise RuntimeError(f"the sweep {label} early stopping ended with rc={res['rc']}")
            runs[label].append(_summary(res))
    w, wo = runs["with"][-1], runs["without"][-1]
    same = all(a["best_trial"] == b["best_trial"]
               for a, b in zip(runs["with"], runs["without"], strict=True))
    epochs = {k: sorted({r["trial_epochs"] for r in v}) for k, v in runs.items()}
    note = (f"best trial with: {w['best_trial']} ({w['best_perplexity']:.2f}), without: "
            f"{wo['best_trial']} ({wo['best_perplexity']:.2f}) -> "
            f"{'same' if same else 'DIFFERENT'} in every run; trial-epochs seen {epochs}; "
            f"stopped: {sorted(t for t, s in w['statuses'].items() if s != 'completed')}")
    return [
        Row("early_stop", "early stopping: trial-epochs", "with", w["trial_epochs"], "without",
            wo["trial_epochs"], ratio(w["trial_epochs"], wo["trial_epochs"]), goal="< 1 (info)",
            note=note, details=runs),
        timed_row("early_stop", "early stopping: worker-seconds", "with",
                  [r["worker_s"] for r in runs["with"]], "without",
                  [r["worker_s"] for r in runs["without"]], unit="s", goal="< 1 (info)"),
        timed_row("early_stop", "early stopping: sweep wall", "with",
                  [r["wall_s"] for r in runs["with"]], "without",
                  [r["wall_s"] for r in runs["without"]], unit="s", goal="< 1 (info)"),
    ]


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-es-") as tmp:
        rows = bench_early_stop({"tmp": tmp, "quick": False})
    print(format_table(rows))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "early_stop.json").write_text(json.dumps([r.to_dict() for r in rows], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
