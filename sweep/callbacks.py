"""Ray Tune callbacks in the sweep's driver process: the one writer of results, the freeing of a
stopped trial's placement group, TensorBoard files stepped by epoch, and the experiment trackers
a config names."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.logger import TBXLoggerCallback
from ray.util.placement_group import PlacementGroup, placement_group_table

from sweep.config import SweepConfig
from sweep.layout import SweepLayout
from sweep.results import END_STATUSES, ResultsWriter, improvement_pct
from trainers.fence import Fenced, superseded
from trainers.metrics import EvalReport, columns_from
from trainers.spec import TrialPlan
from trainers.storage import Store


def trial_key(trial) -> str:
    """The trial's id, the Tune grid's only parameter."""
    return trial.config["trial_id"]


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


class ResultsCallback(tune.Callback):
    """Turns Tune events into Parquet rows keyed by (trial_id, epoch) and trial_id.

    Pickled into tuner.pkl with the run config, so the writer is rebuilt lazily.

    ``attempt`` (set by ``sweep.tuner`` for each driver start) fences it: reports of another
    attempt's workers are ignored, and once a newer attempt runs the sweep it writes nothing
    and stops the Tune run (``Fenced`` from ``on_step_begin``)."""

    attempt = 0  # the driver attempt (trainers/fence.py); 0: not fenced
    # The dense model on every set and task (prep/dense.json's "sets" and "tasks") and the
    # primary set's name; class defaults for a callback pickled before they existed.
    dense_sets: dict = {}
    dense_tasks: list = []
    primary: str | None = None
    FENCE_CHECK_S = 5.0  # how often a running sweep looks for a newer attempt between writes

    def __init__(self, sweep_dir: str, sweep: str, model: str, dense: float | None,
                 plans: list[TrialPlan], scheduler_name: str = "trial", store: Store | None = None,
                 calibration: dict[str, str | None] | None = None):
        self.sweep_dir, self.sweep, self.model, self.dense = sweep_dir, sweep, model, dense
        self.calibration = calibration or {}  # trial id -> its calibration (JSON), if it used one
        self.store = store or Store(Path(sweep_dir).parent)
        self.scheduler_name = scheduler_name
        self.plans = {p.trial_id: p for p in plans}
        self._writer: ResultsWriter | None = None

    def __getstate__(self):
        return {**self.__dict__, "_writer": None}

    def relocate(self, sweep_dir: str, store: Store, attempt: int | None = None) -> None:
        """Write to this run's SWEEP_DIR: the pickled one may be another machine's (a sweep
        resumed from an object store, or a moved directory); ``attempt``: this driver's."""
        self.sweep_dir, self.store, self._writer = sweep_dir, store, None
        if attempt is not None:
            self.attempt = attempt

    def set_dense(self, dense: dict | None, primary: str | None) -> None:
        """The dense model's values of every set and task, copied onto the evals and tasks
        rows (``dense_perplexity``, ``dense_value``), and the primary set's name."""
        dense = dense or {}
        sets = dense.get("sets") or ({primary: dense} if primary and "perplexity" in dense else {})
        self.dense_sets = {name: ev.get("perplexity") for name, ev in sets.items()}
        self.dense_tasks = list(dense.get("tasks") or [])
        self.primary = primary

    def superseded(self) -> str | None:
        """Why this driver must stop writing (a newer attempt runs the sweep), or None."""
        return superseded(self.attempt, SweepLayout.of(self.sweep_dir).attempts, self.store)

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            self._writer = ResultsWriter(
                self.sweep_dir, on_write=self.store.push, attempt=self.attempt or None,
                fenced=self.superseded if self.attempt else None,
            )
        return self._writer

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self.attempt:
            return
        now = time.monotonic()
        if now - getattr(self, "_fence_checked", 0.0) < self.FENCE_CHECK_S:
            return
        self._fence_checked = now
        if self.writer.stopped():
            raise Fenced(self.writer.fenced_reason)

    def setup(self, **info) -> None:
        for tid, p in self.plans.items():
            if self.writer.trial(tid) is None:
                self.writer.upsert_trial(self._trial_base(p, status="pending"))

    def _trial_base(self, p: TrialPlan, **extra) -> dict:
        return {
            "sweep": self.sweep, "trial_id": p.trial_id, "model": self.model,
            "method": p.method, "pattern": p.pattern, "layerwise": p.layerwise,
            "distill": p.distill, "calibration": self.calibration.get(p.trial_id),
            "sparsity": p.sparsity,
            "batch_size": p.batch_size, "lr": p.lr, "steps_per_epoch": p.steps_per_epoch,
            "num_epochs": p.num_epochs, "workers": p.workers, "epochs_completed": 0,
            "dense_perplexity": self.dense, **extra,
        }

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.writer.upsert_trial({"trial_id": trial_key(trial), "status": "running",
                                  "stop_reason": None, "updated_at": _now()})

    def epoch_row(self, plan: TrialPlan, result: dict) -> dict:
        """An ``epochs`` row from a trial's report (trainers.metrics.EPOCH_COLUMNS)."""
        return {
            **{name: getattr(plan, name) for name in columns_from("plan")},
            **{name: result.get(name) for name in columns_from("report")},
            "epoch": int(result["epoch"]),
            "sweep": self.sweep,
            "improvement_pct": improvement_pct(result.get("baseline_perplexity"), result["perplexity"]),
            "timestamp": _now(),
        }

    def eval_rows(self, tid: str, result: dict) -> list[dict]:
        """``evals`` rows (one per set) from a report's ``evals``; improvement against the
        set's own baseline (epoch 0)."""
        epoch, now = int(result["epoch"]), _now()
        base = {r["set"]: r["perplexity"] for r in self.writer.long_rows("evals", tid)
                if r["epoch"] == 0}
        rows = []
        for name, ev in (result.get("evals") or {}).items():
            baseline = ev["perplexity"] if epoch == 0 else base.get(name)
            rows.append({
                "sweep": self.sweep, "trial_id": tid, "epoch": epoch, "set": name,
                "perplexity": ev["perplexity"], "dense_perplexity": self.dense_sets.get(name),
                "improvement_pct": improvement_pct(baseline, ev["perplexity"]),
                "tokens": ev.get("tokens"), "windows": ev.get("windows"),
                "seconds": ev.get("seconds"),
                "primary": None if self.primary is None else int(name == self.primary),
                "driver_attempt": result.get("driver_attempt"), "timestamp": now,
            })
        return rows

    def task_rows(self, tid: str, result: dict) -> list[dict]:
        """``tasks`` rows from a report's ``tasks`` (each row names the epoch of its model)."""
        dense = {(r["task"], r["metric"]): r["value"] for r in self.dense_tasks}
        now = _now()
        return [{
            "sweep": self.sweep, "trial_id": tid, "epoch": int(r["epoch"]), "task": r["task"],
            "metric": r["metric"], "value": r["value"], "stderr": r.get("stderr"),
            "dense_value": dense.get((r["task"], r["metric"])), "samples": r.get("samples"),
            "num_fewshot": r.get("num_fewshot"), "seconds": r.get("seconds"),
            "driver_attempt": result.get("driver_attempt"), "timestamp": now,
        } for r in result.get("tasks") or []]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("kind") != "eval":
            return
        if self.attempt and result.get("driver_attempt") not in (None, self.attempt):
            return  # an orphaned worker of another driver attempt (trainers/fence.py)
        tid = trial_key(trial)
        row = self.epoch_row(self.plans[tid], result)
        baseline = result.get("baseline_perplexity")
        self.writer.drop_epochs_after(tid, row["epoch"])  # a restart from an earlier checkpoint
        self.writer.upsert_epoch(row)
        self.writer.upsert_long("evals", self.eval_rows(tid, result))
        self.writer.upsert_long("tasks", self.task_rows(tid, result))
        rows = self.writer.epochs_of(tid)
        finite = [r for r in rows if r["perplexity"] is not None and math.isfinite(r["perplexity"])]
        best = min(finite, key=lambda r: r["perplexity"]) if finite else None
        last = rows[-1]
        export = SweepLayout.of(self.sweep_dir).export(tid)
        exported = self.store.exists(export)
        self.writer.upsert_trial({
            "trial_id": tid, "epochs_completed": last["epoch"], "baseline_perplexity": baseline,
            "final_perplexity": last["perplexity"],
            "best_perplexity": best["perplexity"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "improvement_pct": improvement_pct(baseline, last["perplexity"]),
            "sparsity_actual": result.get("sparsity_actual"),
            "best_checkpoint": self.store.display(export) if exported else None,
            "export_dir": self.store.display(export) if exported else None,
            "wall_s": result.get("wall_s"),
            "mem_peak_mb": max((r["mem_peak_mb"] or 0) for r in rows) or None,
            "updated_at": _now(),
            # A trial that stopped itself (diverged, plateau) says so in its last report.
            **({"status": result["status"], "stop_reason": result.get("stop_reason")}
               if result.get("status") else {}),
        })

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        tid = trial_key(trial)
        row = self.writer.trial(tid) or {}
        if row.get("status") in END_STATUSES:
            return
        done = row.get("epochs_completed") or 0
        if done < self.plans[tid].num_epochs:
            # Ended before its last epoch without a reason of its own: the scheduler stopped it.
            update = {"status": "early_stopped",
                      "stop_reason": f"stopped by the {self.scheduler_name} scheduler after epoch {done}"}
        else:
            update = {"status": "completed", "stop_reason": None}
        self.writer.upsert_trial({"trial_id": tid, **update, "updated_at": _now()})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.writer.upsert_trial({"trial_id": trial_key(trial), "status": "errored",
                                  "stop_reason": _error_text(trial), "updated_at": _now()})


class PlacementGroupReaper(tune.Callback):
    """Frees a stopped trial's worker placement group.

    When Tune stops a trial (ASHA), the trial actor is killed and its nested Train run's
    placement group is only removed by Ray's cleaner, which needs the State API of
    ray[default] (ray-project/ray#54305); without it later trials starve. Rank 0 reports its
    placement group id with every result, and this callback removes it once the trial ends."""

    def __init__(self) -> None:
        self.pg_ids: dict[str, str] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("pg_id"):
            self.pg_ids[trial.trial_id] = result["pg_id"]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._reap(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._reap(trial)

    def _reap(self, trial) -> None:
        pg_hex = self.pg_ids.pop(trial.trial_id, None)
        if pg_hex:
            remove_placement_group_if_alive(pg_hex)


def remove_placement_group_if_alive(pg_hex: str) -> bool:
    try:
        state = placement_group_table().get(pg_hex, {}).get("state")
        if state in (None, "REMOVED"):
            return False
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
        return True
    except Exception:  # noqa: BLE001 - best effort: never fail a sweep over cleanup
        return False


class EpochTensorBoard(TBXLoggerCallback):
    """Each trial's TensorBoard file (SWEEP_DIR/tune/<trial>/events.out.tfevents.*) with the
    trial's epoch as the step, so curves of different batch sizes line up (Tune's own logger
    steps by its report counter, which mid-epoch checkpoint reports also advance); perplexity
    and loss again under ``by_tokens/`` against the training tokens seen. Being a
    ``TBXLoggerCallback``, it replaces Tune's default one (Tune adds its own only when none is
    given; the CSV and JSON loggers stay Tune's)."""

    SCALARS = tuple(f.name for f in dataclasses.fields(EvalReport)
                    if f.name not in ("epoch", "kind", "status", "stop_reason"))
    BY_TOKENS = ("perplexity", "loss")

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if result.get("kind") != "eval" or result.get("epoch") is None:
            return  # a mid-epoch checkpoint report repeats the last evaluation
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        writer = self._trial_writer[trial]
        epoch = int(result["epoch"])
        written = {}
        for name in self.SCALARS:
            value = result.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(name, value, global_step=epoch)
                written[name] = value
        for name, ev in (result.get("evals") or {}).items():
            if isinstance(ev.get("perplexity"), float) and math.isfinite(ev["perplexity"]):
                writer.add_scalar(f"evals/{name}/perplexity", ev["perplexity"], global_step=epoch)
        for r in result.get("tasks") or []:  # the best model's rows carry their own epoch
            writer.add_scalar(f"tasks/{r['task']}/{r['metric']}", r["value"], global_step=r["epoch"])
        tokens = result.get("tokens")
        if isinstance(tokens, int):
            for name in self.BY_TOKENS:
                if name in written:
                    writer.add_scalar(f"by_tokens/{name}", written[name], global_step=tokens)
        self._trial_result[trial] = written  # the hparams summary at the trial's end
        writer.flush()


def logger_callbacks(cfg: SweepConfig) -> list:
    """TensorBoard by epoch (``EpochTensorBoard``), and the experiment trackers the config
    names, through Ray Tune's own logger callbacks (they read their credentials from the
    environment: WANDB_API_KEY, MLFLOW_TRACKING_URI). Trackers are imported only when named:
    each pulls in its tracker's package."""
    out: list = [EpochTensorBoard()]
    if "wandb" in cfg.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=cfg.name))
    if "mlflow" in cfg.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(experiment_name=cfg.name))
    return out


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text().strip().splitlines()
            return text[-1][:500] if text else "error"
    except OSError:
        pass
    return "errored (see the trial's log)"
