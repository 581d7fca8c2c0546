"""The results tables and their one writer.

The epochs table's columns follow from the trial's report (``trainers.metrics``); the trials
table is the driver's own and is defined here. ``ResultsWriter`` keeps each table keyed
(``(trial_id, epoch)`` for epochs, ``trial_id`` for trials), so a resumed or restarted sweep
overwrites rows instead of duplicating them, and rewrites each Parquet file atomically
(temporary file, fsync, rename): a crash at any moment leaves the previous complete file.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.files import atomic_write
from trainers.metrics import EPOCH_COLUMNS, EVAL_COLUMNS, TASK_COLUMNS

# Bump when a column is renamed or removed (adding columns keeps the version); the README's
# "Result schema" section documents each version.
SCHEMA_VERSION = 1

ARROW_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(),
               "timestamp": pa.timestamp("us", tz="UTC")}

# The epochs table follows from the trial's report (trainers.metrics): one row per
# (trial_id, epoch).
EPOCHS_SCHEMA = pa.schema([(c.name, ARROW_TYPES[c.type]) for c in EPOCH_COLUMNS])
# The long tables: one row per (trial_id, epoch, set) and per (trial_id, epoch, task, metric).
EVALS_SCHEMA = pa.schema([(c.name, ARROW_TYPES[c.type]) for c in EVAL_COLUMNS])
TASKS_SCHEMA = pa.schema([(c.name, ARROW_TYPES[c.type]) for c in TASK_COLUMNS])

TRIALS_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_id", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("pattern", pa.string()),
        ("layerwise", pa.string()),  # uniform, owl
        ("distill", pa.string()),  # the recovery objective: none (CE), logits, squarehead
        ("calibration", pa.string()),  # JSON: text, samples, seq_len, seed (null: none used)
        ("sparsity", pa.float64()),
        ("batch_size", pa.int64()),
        ("lr", pa.float64()),
        ("steps_per_epoch", pa.int64()),
        ("num_epochs", pa.int64()),
        ("workers", pa.int64()),
        ("epochs_completed", pa.int64()),
        ("dense_perplexity", pa.float64()),
        ("baseline_perplexity", pa.float64()),
        ("final_perplexity", pa.float64()),
        ("best_perplexity", pa.float64()),
        ("best_epoch", pa.int64()),
        ("improvement_pct", pa.float64()),  # of the final perplexity against the baseline
        ("sparsity_actual", pa.float64()),
        ("status", pa.string()),  # pending, running, completed, early_stopped, diverged, errored
        ("stop_reason", pa.string()),
        ("best_checkpoint", pa.string()),
        ("export_dir", pa.string()),
        ("wall_s", pa.float64()),
        ("mem_peak_mb", pa.float64()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("driver_attempt", pa.int64()),  # the driver start that last wrote the row
    ]
)

STATUSES = ("pending", "running", "completed", "early_stopped", "diverged", "errored")
END_STATUSES = ("completed", "early_stopped", "diverged", "errored")

EPOCHS_FILE = "epochs.parquet"
TRIALS_FILE = "trials.parquet"
EVALS_FILE = "evals.parquet"
TASKS_FILE = "tasks.parquet"

# The per-epoch tables beside epochs: file, schema, and the columns that key a row.
LONG_TABLES = {
    "evals": (EVALS_FILE, EVALS_SCHEMA, ("trial_id", "epoch", "set")),
    "tasks": (TASKS_FILE, TASKS_SCHEMA, ("trial_id", "epoch", "task", "metric")),
}


def results_dir(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / "results"


def improvement_pct(baseline: float | None, perplexity: float | None) -> float | None:
    if baseline is None or perplexity is None or not math.isfinite(baseline) or baseline == 0:
        return None
    return 100.0 * (baseline - perplexity) / baseline


def _conform(row: dict, schema: pa.Schema) -> dict:
    """Keep the schema's columns (missing ones null); NaN floats stay NaN (a diverged trial)."""
    return {name: row.get(name) for name in schema.names}


def write_table_atomic(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist([_conform(r, schema) for r in rows], schema=schema)
    table = table.replace_schema_metadata({b"schema_version": str(SCHEMA_VERSION).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


class ResultsWriter:
    """Upserts rows by key and rewrites each table atomically. One per sweep, in the driver."""

    def __init__(self, sweep_dir: str | os.PathLike, on_write=None,
                 attempt: int | None = None, fenced=None):
        """``on_write(path)`` runs after each table is rewritten (a URI store pushes it).

        Fencing (trainers/fence.py): ``attempt`` is the driver attempt writing (stamped on
        trials rows as ``driver_attempt``); ``fenced()``, when given, is asked before every
        write and returns a reason once a newer attempt runs the sweep, after which this
        writer writes nothing (a superseded driver must not rewrite the tables under the new
        one). An epochs row is never replaced by one from an older attempt."""
        self.dir = results_dir(sweep_dir)
        self._on_write = on_write
        self.attempt, self._fenced = attempt, fenced
        self.fenced_reason: str | None = None
        self._lock = threading.Lock()
        self._epochs: dict[tuple[str, int], dict] = {
            (r["trial_id"], r["epoch"]): r for r in read_rows(self.dir / EPOCHS_FILE)
        }
        self._trials: dict[str, dict] = {r["trial_id"]: r for r in read_rows(self.dir / TRIALS_FILE)}
        # evals and tasks, keyed like epochs plus their set / (task, metric).
        self._long: dict[str, dict[tuple, dict]] = {
            name: {tuple(r[k] for k in key): r for r in read_rows(self.dir / file)}
            for name, (file, _, key) in LONG_TABLES.items()
        }

    # -- reads -----------------------------------------------------------------------------
    def trial(self, trial_id: str) -> dict | None:
        row = self._trials.get(trial_id)
        return dict(row) if row else None

    def epochs_of(self, trial_id: str) -> list[dict]:
        rows = [dict(r) for (t, _), r in self._epochs.items() if t == trial_id]
        return sorted(rows, key=lambda r: r["epoch"])

    # -- writes ----------------------------------------------------------------------------
    def stopped(self) -> bool:
        """True once this writer was fenced off (checked now, and remembered)."""
        if self.fenced_reason is None and self._fenced is not None:
            self.fenced_reason = self._fenced()
        return self.fenced_reason is not None

    def upsert_epoch(self, row: dict[str, Any]) -> bool:
        """False (nothing written) when fenced, or when the stored row comes from a newer
        driver attempt than ``row`` (a late write of an orphaned worker's report)."""
        with self._lock:
            if self.stopped():
                return False
            key = (row["trial_id"], int(row["epoch"]))
            old = self._epochs.get(key, {})
            if (old.get("driver_attempt") or 0) > (row.get("driver_attempt") or 0):
                return False
            self._epochs[key] = {**old, **row}
            self._flush_epochs()
            return True

    def long_rows(self, table: str, trial_id: str) -> list[dict]:
        """One trial's rows of ``evals`` or ``tasks``, by epoch."""
        rows = [dict(r) for k, r in self._long[table].items() if k[0] == trial_id]
        return sorted(rows, key=lambda r: r["epoch"])

    def upsert_long(self, table: str, rows: list[dict[str, Any]]) -> bool:
        """Upsert rows of ``evals`` or ``tasks`` (one report's), with the epochs table's rule:
        a stored row of a newer driver attempt is kept. False when fenced."""
        if not rows:
            return True
        file, schema, key = LONG_TABLES[table]
        with self._lock:
            if self.stopped():
                return False
            store = self._long[table]
            for row in rows:
                k = tuple(row[c] for c in key)
                old = store.get(k, {})
                if (old.get("driver_attempt") or 0) > (row.get("driver_attempt") or 0):
                    continue
                store[k] = {**old, **row}
            self._flush_long(table)
            return True

    def drop_epochs_after(self, trial_id: str, epoch: int) -> None:
        """Forget rows past ``epoch`` (a trial restarted from an earlier checkpoint), in the
        epochs table and in evals and tasks."""
        with self._lock:
            if self.stopped():
                return
            stale = [k for k in self._epochs if k[0] == trial_id and k[1] > epoch]
            for k in stale:
                del self._epochs[k]
            if stale:
                self._flush_epochs()
            for table, store in self._long.items():
                stale = [k for k in store if k[0] == trial_id and k[1] > epoch]
                for k in stale:
                    del store[k]
                if stale:
                    self._flush_long(table)

    def upsert_trial(self, row: dict[str, Any]) -> None:
        with self._lock:
            if self.stopped():
                return
            if self.attempt is not None:
                row = {**row, "driver_attempt": self.attempt}
            tid = row["trial_id"]
            self._trials[tid] = {**self._trials.get(tid, {}), **row}
            write_table_atomic(
                sorted(self._trials.values(), key=lambda r: r["trial_id"]),
                TRIALS_SCHEMA,
                self.dir / TRIALS_FILE,
            )
            if self._on_write:
                self._on_write(self.dir / TRIALS_FILE)

    def _flush_long(self, table: str) -> None:
        file, schema, key = LONG_TABLES[table]
        rows = sorted(self._long[table].values(),
                      key=lambda r: tuple("" if r[c] is None else r[c] for c in key))
        write_table_atomic(rows, schema, self.dir / file)
        if self._on_write:
            self._on_write(self.dir / file)

    def _flush_epochs(self) -> None:
        rows = sorted(self._epochs.values(), key=lambda r: (r["trial_id"], r["epoch"]))
        write_table_atomic(rows, EPOCHS_SCHEMA, self.dir / EPOCHS_FILE)
        if self._on_write:
            self._on_write(self.dir / EPOCHS_FILE)
