"""A realistic fake sweep written through the real ``ResultsWriter`` (no Ray, no torch).

Default grid: sparsity 0.5 and 0.7 x batch size 4 and 8, three epochs (0 = baseline):

- ``s0.5-b4``  completed, epochs 0..2
- ``s0.5-b8``  early_stopped after epoch 1
- ``s0.7-b4``  completed, epochs 0..2
- ``s0.7-b8``  running: epochs 0 and 1 written, its trials row still says epoch 0 (stale)

At 0.7 the running trial has the lowest perplexity so far, so the best-per-sparsity marker
has to come from the epochs rows. Perplexities span more than a decade (dense 20.9,
0.7 baseline 312), like SmolLM2-135M on WikiText-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sweep.results import ResultsWriter, improvement_pct

MODEL = "HuggingFaceTB/SmolLM2-135M"
DENSE_PPL = 20.93
BASELINE_PPL = {0.5: 35.71, 0.7: 312.4}
# Perplexity after each trained epoch, per (sparsity, batch size).
TRAINED_PPL = {
    (0.5, 4): [27.12, 25.48],
    (0.5, 8): [28.55],
    (0.7, 4): [88.31, 74.86],
    (0.7, 8): [71.95],
}
STATUS = {(0.5, 8): ("early_stopped", "no improvement >= 5% over the last epoch")}
RUNNING = {(0.7, 8)}
NUM_EPOCHS = 2
BASE_SAMPLES = 10_000
SEQ_LEN = 512
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=timezone.utc)


@dataclass
class FakeSweep:
    dir: Path
    epoch_rows: list[dict]
    trial_rows: list[dict]


def _epoch_row(
    name: str, tid: str, s: float, b: int, epoch: int, ppl: float, baseline: float
) -> dict:
    steps_per_epoch = math.ceil(BASE_SAMPLES / b)
    samples = epoch * steps_per_epoch * b
    wall_s = 40.0 + epoch * (900.0 + 3000.0 / b)
    return {
        "sweep": name,
        "trial_id": tid,
        "method": "magnitude",
        "pattern": None,
        "sparsity": s,
        "batch_size": b,
        "epoch": epoch,
        "perplexity": ppl,
        "improvement_pct": improvement_pct(baseline, ppl),
        "loss": None if epoch == 0 else math.log(ppl) + 0.05,
        "lr": 5e-6 * math.sqrt(b),
        "steps": epoch * steps_per_epoch,
        "samples": samples,
        "tokens": samples * SEQ_LEN,
        "sparsity_actual": s + 0.0004,
        "wall_s": wall_s,
        "tokens_per_s": None if epoch == 0 else steps_per_epoch * b * SEQ_LEN / 900.0,
        "mem_peak_mb": 1800.0 + 110.0 * b,
        "eval_tokens": 286_720,
        "timestamp": T0 + timedelta(seconds=wall_s),
    }


def _trial_row(name: str, tid: str, s: float, b: int, rows: list[dict]) -> dict:
    """The trials row as the driver keeps it; a running trial's row is left stale at epoch 0."""
    if (s, b) in RUNNING:
        rows = rows[:1]
        status, reason = "running", None
    else:
        status, reason = STATUS.get((s, b), ("completed", None))
    trained = rows[1:]
    best = min(trained, key=lambda r: r["perplexity"]) if trained else None
    final = rows[-1]["perplexity"] if trained else None
    return {
        "sweep": name,
        "trial_id": tid,
        "model": MODEL,
        "method": "magnitude",
        "pattern": None,
        "sparsity": s,
        "batch_size": b,
        "lr": 5e-6 * math.sqrt(b),
        "steps_per_epoch": math.ceil(BASE_SAMPLES / b),
        "num_epochs": NUM_EPOCHS,
        "workers": 2,
        "epochs_completed": len(trained),
        "dense_perplexity": DENSE_PPL,
        "baseline_perplexity": rows[0]["perplexity"],
        "final_perplexity": final,
        "best_perplexity": best["perplexity"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "improvement_pct": improvement_pct(rows[0]["perplexity"], final),
        "sparsity_actual": s + 0.0004,
        "status": status,
        "stop_reason": reason,
        "best_checkpoint": f"checkpoints/{tid}/epoch_{best['epoch']}" if best else None,
        "export_dir": None,
        "wall_s": rows[-1]["wall_s"],
        "mem_peak_mb": rows[-1]["mem_peak_mb"],
        "updated_at": rows[-1]["timestamp"],
    }


def write_fake_sweep(
    root: Path,
    name: str = "fake",
    grid: list[tuple[float, int]] | None = None,
    max_epoch: int | None = None,
    scale: float = 1.0,
) -> FakeSweep:
    """Write ``root/name/results/{epochs,trials}.parquet`` through ``ResultsWriter``.

    ``grid`` picks (sparsity, batch size) points; ``max_epoch`` truncates every trial (0 =
    baselines only, all trials running); ``scale`` multiplies every perplexity (a second
    sweep with different numbers)."""
    sweep_dir = Path(root) / name
    writer = ResultsWriter(sweep_dir)
    epoch_rows, trial_rows = [], []
    for s, b in grid or list(TRAINED_PPL):
        tid = f"s{s:g}-b{b}"
        ppls = [BASELINE_PPL[s], *TRAINED_PPL[(s, b)]][
            : None if max_epoch is None else max_epoch + 1
        ]
        rows = [
            _epoch_row(name, tid, s, b, e, p * scale, ppls[0] * scale) for e, p in enumerate(ppls)
        ]
        trial = _trial_row(name, tid, s, b, rows)
        if max_epoch is not None and len(rows) < NUM_EPOCHS + 1:
            trial.update(status="running", stop_reason=None)
        writer.upsert_trial(trial)
        for r in rows:
            writer.upsert_epoch(r)
        epoch_rows += rows
        trial_rows.append(trial)
    return FakeSweep(sweep_dir, epoch_rows, trial_rows)
