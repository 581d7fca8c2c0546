"""Read a sweep's results from its Parquet files alone (a notebook API).

Works on a sweep copied off a cluster and on one still running: the writer replaces each file
atomically, so a read sees either the previous or the new complete file. ``path`` may be a
SWEEP_DIR (it has ``results/``) or a directory holding several sweeps; their rows are
concatenated and the ``sweep`` column tells them apart. It may also be the URI of a sweep, or
of a storage root, in an object store (``s3://bucket/sweeps/demo``): the results tables are
copied to the local staging cache (trainers/storage.py) and read from there.

    from sweep.api import load
    r = load("sweeps/demo")
    r.epochs.pivot_table(index="epoch", columns="trial_id", values="perplexity")
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from sweep.results import (
    EPOCHS_FILE,
    EPOCHS_SCHEMA,
    EVALS_FILE,
    EVALS_SCHEMA,
    TASKS_FILE,
    TASKS_SCHEMA,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    results_dir,
)
from trainers.storage import Store, is_uri

TABLES: dict[str, tuple[str, pa.Schema]] = {
    "epochs": (EPOCHS_FILE, EPOCHS_SCHEMA),
    "trials": (TRIALS_FILE, TRIALS_SCHEMA),
    "evals": (EVALS_FILE, EVALS_SCHEMA),
    "tasks": (TASKS_FILE, TASKS_SCHEMA),
}


@dataclass
class Results:
    """The result tables of one or more sweeps (pandas DataFrames or Arrow tables): epochs
    and trials; evals (every set's perplexity per epoch) and tasks (zero-shot task metrics)."""

    epochs: pd.DataFrame | pa.Table
    trials: pd.DataFrame | pa.Table
    sweeps: list[Path] = field(default_factory=list)
    evals: pd.DataFrame | pa.Table | None = None
    tasks: pd.DataFrame | pa.Table | None = None


def _has_results(d: Path) -> bool:
    res = results_dir(d)
    return any((res / name).exists() for name, _ in TABLES.values())


def pull_results(uri: str) -> Path:
    """A local copy of the results of the sweep (or of every sweep of the storage root) at
    ``uri``: ``<staging>/<sweep>/results``. Raises FileNotFoundError naming the URI."""
    store = Store.open(uri)
    remote = store.remote
    if remote.kind("results") == "dir":
        remote.pull("results", store.local / remote.name / "results")
        return store.local / remote.name
    try:
        infos = remote.fs.get_file_info(pafs.FileSelector(remote.path(), recursive=False))
    except FileNotFoundError:
        infos = []
    names = {i.base_name: f"{i.base_name}/results" for i in infos
             if i.type == pafs.FileType.Directory and remote.kind(f"{i.base_name}/results")}
    if not names:
        raise FileNotFoundError(f"no results under {remote.display()}: expected results/ there "
                                "or in its sub-directories")
    local = store.local / "_root"
    shutil.rmtree(local, ignore_errors=True)  # sweeps deleted from the store go too
    for name, rel in names.items():
        remote.pull(rel, local / name / "results")
    return local


def localize(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` itself, or for an object-store URI the local copy of its results (one
    download). Entry points that read several times call it once first."""
    return pull_results(str(path)) if is_uri(str(path)) else path


def find_sweeps(path: str | os.PathLike) -> list[Path]:
    """The sweep directories under ``path``: itself when it has results, else its
    sub-directories that have them (sorted). Raises FileNotFoundError naming ``path``."""
    p = Path(localize(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {p}")
    if p.name == "results" and not _has_results(p) and _has_results(p.parent):
        p = p.parent  # the user pointed at SWEEP_DIR/results itself
    if _has_results(p):
        return [p]
    found = sorted(d for d in p.iterdir() if d.is_dir() and _has_results(d))
    if not found:
        raise FileNotFoundError(
            f"no results under {p}: expected {p}/results/{{{EPOCHS_FILE},{TRIALS_FILE}}} "
            f"or sub-directories that hold them"
        )
    return found


def parquet_files(sweep_dir: Path, table: str) -> list[Path]:
    """The Parquet files of one table of one sweep: the file, or every ``*.parquet`` in the
    directory of that name (hidden temporary files skipped). Empty when not written yet."""
    name, _ = TABLES[table]
    target = results_dir(sweep_dir) / name
    if target.is_file():
        return [target]
    if target.is_dir():
        return sorted(
            f for f in target.rglob("*.parquet") if f.is_file() and not f.name.startswith(".")
        )
    return []


def _conform(table: pa.Table, schema: pa.Schema, sweep_name: str) -> pa.Table:
    """Add missing schema columns as nulls, cast known ones to the schema's types, keep
    extra columns, and fill a null ``sweep`` with the directory's name."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
        elif table.schema.field(f.name).type != f.type:
            i = table.column_names.index(f.name)
            table = table.set_column(i, f, table.column(f.name).cast(f.type))
    i = table.column_names.index("sweep")
    filled = table.column("sweep").fill_null(sweep_name)
    table = table.set_column(i, schema.field("sweep"), filled)
    order = schema.names + [n for n in table.column_names if n not in schema.names]
    return table.select(order).replace_schema_metadata(None)


def _read_one(sweep_dir: Path, table: str) -> pa.Table | None:
    files = parquet_files(sweep_dir, table)
    if not files:
        return None
    parts = []
    for f in files:
        try:
            parts.append(pq.read_table(f))
        except FileNotFoundError:  # a part removed between listing and reading
            continue
    if not parts:
        return None
    merged = pa.concat_tables(parts, promote_options="permissive")
    return _conform(merged, TABLES[table][1], sweep_dir.name)


def read_arrow(path: str | os.PathLike, table: str) -> pa.Table:
    """One table (``epochs`` or ``trials``) over every sweep under ``path``, as Arrow; an
    empty table with the schema when nothing is written yet."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}: expected one of {sorted(TABLES)}")
    parts = [t for d in find_sweeps(path) if (t := _read_one(d, table)) is not None]
    if not parts:
        return TABLES[table][1].empty_table().replace_schema_metadata(None)
    return pa.concat_tables(parts, promote_options="permissive")


def _int_mapper(t: pa.DataType) -> pd.api.extensions.ExtensionDtype | None:
    # Integers stay integers with <NA> for nulls (epoch, best_epoch, steps), not float NaN.
    return pd.Int64Dtype() if pa.types.is_integer(t) else None


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas with nullable integer columns."""
    return table.to_pandas(types_mapper=_int_mapper)


def read_epochs(path: str | os.PathLike) -> pd.DataFrame:
    """The epochs table (one row per trial per evaluation), sorted by sweep, trial, epoch."""
    df = to_pandas(read_arrow(path, "epochs"))
    return df.sort_values(["sweep", "trial_id", "epoch"], kind="stable", ignore_index=True)


def read_trials(path: str | os.PathLike) -> pd.DataFrame:
    """The trials table (one row per trial), sorted by sweep and trial."""
    df = to_pandas(read_arrow(path, "trials"))
    return df.sort_values(["sweep", "trial_id"], kind="stable", ignore_index=True)


# The order rows of each long table are read in.
LONG_ORDER = {"evals": ["sweep", "trial_id", "epoch", "set"],
              "tasks": ["sweep", "trial_id", "epoch", "task", "metric"]}


def read_long(path: str | os.PathLike, table: str) -> pd.DataFrame:
    """The ``evals`` or ``tasks`` table, sorted by sweep, trial, epoch and set / task."""
    df = to_pandas(read_arrow(path, table))
    return df.sort_values(LONG_ORDER[table], kind="stable", ignore_index=True)


def load(path: str | os.PathLike, as_: Literal["pandas", "arrow"] = "pandas") -> Results:
    """Every table of every sweep under ``path``, as pandas DataFrames or Arrow tables."""
    path = localize(path)
    sweeps = find_sweeps(path)
    if as_ == "arrow":
        return Results(read_arrow(path, "epochs"), read_arrow(path, "trials"), sweeps,
                       read_arrow(path, "evals"), read_arrow(path, "tasks"))
    if as_ == "pandas":
        return Results(read_epochs(path), read_trials(path), sweeps, read_long(path, "evals"),
                       read_long(path, "tasks"))
    raise ValueError(f"as_ must be 'pandas' or 'arrow', not {as_!r}")
