"""The one definition of what a trial reports and of the result columns that follow from it.

Rank 0 reports an ``EvalReport`` after every evaluation (epoch 0 is the baseline). The sweep's
results callback turns each report into a row of the ``epochs`` table, whose columns are
``EPOCH_COLUMNS``: the Parquet schema (``sweep.results``), the callback's mapping and the README's
schema table all follow from this list. A new metric is one field here and, if it belongs in the
table, one column.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

ColumnType = Literal["string", "int", "float", "timestamp"]
# Where a column's value comes from: the trial's plan, rank 0's report, or the sweep's driver.
Source = Literal["plan", "report", "driver"]


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    source: Source
    doc: str = ""


@dataclass(frozen=True)
class EvalReport:
    """What rank 0 reports after each evaluation (``kind`` tells it from a mid-epoch step
    report, which carries only epoch, perplexity and steps)."""

    epoch: int  # 0 = the baseline: pruned, before any training step
    perplexity: float
    eval_tokens: int  # tokens scored by the evaluation
    eval_s: float
    steps: int  # optimizer steps so far (cumulative)
    samples: int  # training sequences so far (cumulative)
    tokens: int  # training tokens so far (cumulative)
    sparsity_actual: float | None  # measured zeros / weights over the pruned layers
    baseline_perplexity: float | None
    best_perplexity: float | None
    best_epoch: int | None
    wall_s: float  # seconds since the trial started (this attempt)
    mem_peak_mb: float  # peak memory on rank 0 (CUDA allocator or process RSS)
    lr: float
    loss: float | None  # mean training loss over the epoch (None at epoch 0)
    tokens_per_s: float | None  # training tokens per second over the epoch
    epoch_steps: int  # optimizer steps in this epoch (this attempt and those before it)
    status: str | None = None  # set when the trial stopped itself: diverged / early_stopped
    stop_reason: str | None = None
    sparsity_min: float | None = None  # per-layer extremes, at the baseline
    sparsity_max: float | None = None
    driver_attempt: int = 0  # the driver attempt that launched the trial (trainers/fence.py)
    kind: str = "eval"
    # Every evaluation set, the primary included: {set: {perplexity, tokens, windows, seconds}}
    # (the ``evals`` table); ``perplexity`` above is the primary set's.
    evals: dict | None = None
    # Zero-shot task rows measured with this report: [{epoch, task, metric, value, stderr,
    # samples, num_fewshot, seconds}] (the ``tasks`` table); the final report also carries the
    # best model's rows, under their own epoch. None: no tasks measured.
    tasks: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# What the Ray adapter adds to every report: who and where.
IDENTITY_FIELDS = ("trial_name", "node_id", "pg_id")

EPOCH_COLUMNS: tuple[Column, ...] = (
    Column("sweep", "string", "driver", "the sweep's name"),
    Column("trial_id", "string", "plan"),
    Column("method", "string", "plan"),
    Column("pattern", "string", "plan", "N:M pattern, null when unstructured"),
    Column("layerwise", "string", "plan", "how the sparsity is spread over blocks: uniform, owl"),
    Column("distill", "string", "plan", "the recovery objective: none (CE), logits, squarehead"),
    Column("sparsity", "float", "plan", "the target"),
    Column("batch_size", "int", "plan"),
    Column("epoch", "int", "report", "0 = the baseline: pruned, before any training step"),
    Column("perplexity", "float", "report"),
    Column("improvement_pct", "float", "driver", "100 * (baseline - perplexity) / baseline"),
    Column("loss", "float", "report", "mean training loss over the epoch (null at epoch 0)"),
    Column("lr", "float", "report"),
    Column("steps", "int", "report", "optimizer steps so far (cumulative)"),
    Column("samples", "int", "report", "training sequences so far (cumulative)"),
    Column("tokens", "int", "report", "training tokens so far (cumulative)"),
    Column("sparsity_actual", "float", "report", "measured zeros / weights over the pruned layers"),
    Column("wall_s", "float", "report", "seconds since the trial started (this attempt)"),
    Column("tokens_per_s", "float", "report", "training tokens per second over the epoch"),
    Column("mem_peak_mb", "float", "report", "peak memory on rank 0 (CUDA allocator or process RSS)"),
    Column("eval_tokens", "int", "report", "tokens scored by the evaluation"),
    Column("node_id", "string", "report", "the Ray node of rank 0"),
    Column("driver_attempt", "int", "report",
           "the driver start (1 = first run, +1 per resume) whose workers produced the row"),
    Column("timestamp", "timestamp", "driver"),
)


# The long tables: one row per (trial, epoch, set) and per (trial, epoch, task, metric), from
# a report's ``evals`` and ``tasks``. The sweep's plan columns join them to the epochs table.
EVAL_COLUMNS: tuple[Column, ...] = (
    Column("sweep", "string", "driver", "the sweep's name"),
    Column("trial_id", "string", "plan"),
    Column("epoch", "int", "report", "0 = the baseline: pruned, before any training step"),
    Column("set", "string", "report", "the evaluation set (eval.sets; eval.text's one set)"),
    Column("perplexity", "float", "report"),
    Column("dense_perplexity", "float", "driver", "the unpruned model on this set (once per sweep)"),
    Column("improvement_pct", "float", "driver", "100 * (this set's baseline - perplexity) / baseline"),
    Column("tokens", "int", "report", "tokens scored"),
    Column("windows", "int", "report", "windows evaluated"),
    Column("seconds", "float", "report", "time of this set's evaluation"),
    Column("primary", "int", "driver", "1 for the primary set (the epochs table's perplexity)"),
    Column("driver_attempt", "int", "report", "the driver start whose workers produced the row"),
    Column("timestamp", "timestamp", "driver"),
)

TASK_COLUMNS: tuple[Column, ...] = (
    Column("sweep", "string", "driver", "the sweep's name"),
    Column("trial_id", "string", "plan"),
    Column("epoch", "int", "report", "the model measured: 0 pruned, k after k epochs"),
    Column("task", "string", "report", "the lm-eval task (or group)"),
    Column("metric", "string", "report", "acc, acc_norm, ... ('metric,filter' for a filter)"),
    Column("value", "float", "report"),
    Column("stderr", "float", "report", "the harness's standard error (null when not computed)"),
    Column("dense_value", "float", "driver", "the unpruned model's value (once per sweep)"),
    Column("samples", "int", "report", "documents scored"),
    Column("num_fewshot", "int", "report"),
    Column("seconds", "float", "report", "time of the measurement (all tasks of it)"),
    Column("driver_attempt", "int", "report", "the driver start whose workers produced the row"),
    Column("timestamp", "timestamp", "driver"),
)


def columns_from(source: Source, columns: tuple[Column, ...] = EPOCH_COLUMNS) -> tuple[str, ...]:
    return tuple(c.name for c in columns if c.source == source)
