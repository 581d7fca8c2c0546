"""Ray Tune over the grid: one driver per trial, each fitting its own TorchTrainer.

The only module that imports Ray Tune. Train V2 pattern (ray-notes.md): a Tune function
trainable (the trial "driver", holding a sliver of CPU) builds a ``TorchTrainer`` named after
the trial, whose workers report through ``TuneReportCallback``. Results reach Parquet through
one writer, a Tune callback in this process.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray
from ray import tune

from sweep.config import SweepConfig
from sweep.plan import TrialPlan
from sweep.results import END_STATUSES, ResultsWriter, improvement_pct

TUNE_DIR = "tune"
TRAIN_DIR = "train"


class ClusterTooSmall(RuntimeError):
    pass


def trial_resources(cfg: SweepConfig) -> dict[str, float]:
    r = cfg.resources
    res = {"CPU": r.workers * r.cpus_per_worker + r.driver_cpus}
    if r.gpus_per_worker:
        res["GPU"] = r.workers * r.gpus_per_worker
    for name, amount in (r.custom_per_worker or {}).items():
        res[name] = r.workers * amount
    return res


def max_concurrent_trials(
    cluster: dict[str, float], need: dict[str, float], n_trials: int, cap: int | None = None
) -> int:
    """How many trials fit at once, each fully placed (driver and all its workers)."""
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ClusterTooSmall(f"one trial needs {need}, the cluster has {have}")
    n = min(fits, n_trials)
    return min(n, cap) if cap else n


def local_cluster_cpus(cfg: SweepConfig) -> int:
    """Logical CPUs for the embedded cluster: the machine's cores (at least one trial's
    workers), plus one logical CPU that holds the trial drivers (0.01 each)."""
    r = cfg.resources
    return max(os.cpu_count() or 1, math.ceil(r.workers * r.cpus_per_worker)) + 1


def start_ray(cfg: SweepConfig, address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded local cluster.
    Returns True when this process started the cluster (and must shut it down)."""
    if ray.is_initialized():  # a caller (a notebook, a test) already connected
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # No runtime_env here: inside `ray job submit --working-dir .` the job's own runtime
        # environment (which ships this project to every node) must stay in force.
        ray.init(address=address, log_to_driver=True)
        return False
    env = {
        "env_vars": {
            "TOKENIZERS_PARALLELISM": "false",
            # The Train controller polls its workers at this interval; the default (2 s) adds
            # 3-4 s to the end of every trial (measured by `make bench`).
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"
            ),
        }
    }
    # include_dashboard left at its default: Ray's placement-group cleaner needs the State API
    # to free a stopped trial's workers (ray-notes.md, ray-project/ray#54305).
    # address="local": never attach to a cluster some other `ray start` left on this machine.
    ray.init(address="local", num_cpus=local_cluster_cpus(cfg), runtime_env=env, log_to_driver=True)
    return True


def warm_train_services() -> None:
    """Start Ray Train's shared AutoscalingCoordinator actor now, while the sweep prepares,
    instead of inside the first trial: every TorchTrainer registers its resources with it,
    and its process start-up (1.2 s here) otherwise lands on the first trial's fixed cost.
    Best effort: the actor is a detached singleton that Ray Train creates anyway."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()  # asynchronous: returns a handle at once
    except Exception:  # noqa: BLE001 - an optimisation; Train creates it when needed
        pass


# ---------------------------------------------------------------------------------------------
# The trial driver

# "actor": Ray Train's own layout, the controller in an actor of its own (a new process).
CONTROLLER_ENV = "SWEEP_TRAIN_CONTROLLER"


def inline_controller_trainer():
    """A ``TorchTrainer`` whose Train controller runs inside the calling process (the Tune
    trial driver, already a dedicated actor with Ray Train and torch imported) instead of
    in a new actor process: that process's start-up and imports were the largest part of a
    trial's fixed cost (3.9 s of 11.8 s, `make bench`).

    Everything else is Ray Train's: the same controller class, worker group, placement
    group, failure policy, checkpoint manager and callbacks. The controller still dies with
    the trial driver (it is in it), as the actor did (its owner). Pinned to Ray 2.60's
    ``_initialize_and_run_controller``; ``SWEEP_TRAIN_CONTROLLER=actor`` restores the stock
    path, and the tests run both."""
    import asyncio

    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.controller import TrainController

    class InlineControllerTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller = TrainController(**controller_init_kwargs)
            asyncio.run(controller.run())
            return controller.get_result()

    return InlineControllerTorchTrainer


def trial_driver(config: dict, ctx: dict) -> None:
    """One trial: a TorchTrainer with ``workers`` FSDP2 ranks running trainers.worker."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.entry import train_loop

    plan = config["trial"]
    tid = plan["trial_id"]
    res = ctx["resources"]
    gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **(res["custom_per_worker"] or {})}
    if gpu:
        per_worker["GPU"] = res["gpus_per_worker"]
    sweep_dir, store = Path(ctx["sweep_dir"]), ctx["store"]
    loop_config = {
        **ctx["worker"],
        "store": store,
        "plan": plan,
        "mask_path": ctx["masks"][tid],
        "target_sparsity": ctx["target_sparsity"][tid],
        "log_path": str(sweep_dir / "logs" / f"{tid}.log"),
        "export_dir": str(sweep_dir / "export" / tid) if ctx["export_best"] else None,
    }
    trainer_cls = TorchTrainer if os.environ.get(CONTROLLER_ENV) == "actor" else inline_controller_trainer()
    trainer = trainer_cls(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=plan["workers"], use_gpu=gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=f"train-{tid}",
            **store.ray_storage(sweep_dir / TRAIN_DIR),
            failure_config=FailureConfig(
                max_failures=ctx["worker_max_failures"],
                # A starved worker group must fail, not retry forever (ray-notes.md).
                controller_failure_limit=3,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=ctx["keep_last"]),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# The one writer of results


def _tid(trial) -> str:
    return trial.config["trial"]["trial_id"]


class ResultsCallback(tune.Callback):
    """Turns Tune events into Parquet rows keyed by (trial_id, epoch) and trial_id.

    Pickled into tuner.pkl with the run config, so the writer is rebuilt lazily."""

    def __init__(self, sweep_dir: str, sweep: str, model: str, dense: float | None,
                 plans: list[dict], scheduler_name: str = "trial", store=None):
        from sweep.storage import Store

        self.sweep_dir, self.sweep, self.model, self.dense = sweep_dir, sweep, model, dense
        self.store = store or Store(Path(sweep_dir).parent)
        self.scheduler_name = scheduler_name
        self.plans = {p["trial_id"]: p for p in plans}
        self._writer: ResultsWriter | None = None

    def __getstate__(self):
        return {**self.__dict__, "_writer": None}

    def relocate(self, sweep_dir: str, store) -> None:
        """Write to this run's SWEEP_DIR: the pickled one may be another machine's (a sweep
        resumed from an object store, or a moved directory)."""
        self.sweep_dir, self.store, self._writer = sweep_dir, store, None

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            self._writer = ResultsWriter(self.sweep_dir, on_write=self.store.push)
        return self._writer

    def setup(self, **info) -> None:
        for tid, p in self.plans.items():
            existing = self.writer.trial(tid)
            if existing is None:
                self.writer.upsert_trial(self._trial_base(p, status="pending"))

    def _trial_base(self, p: dict, **extra) -> dict:
        return {
            "sweep": self.sweep, "trial_id": p["trial_id"], "model": self.model,
            "method": p["method"], "pattern": p["pattern"], "sparsity": p["sparsity"],
            "batch_size": p["batch_size"], "lr": p["lr"], "steps_per_epoch": p["steps_per_epoch"],
            "num_epochs": p["num_epochs"], "workers": p["workers"], "epochs_completed": 0,
            "dense_perplexity": self.dense, **extra,
        }

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        tid = _tid(trial)
        self.writer.upsert_trial({"trial_id": tid, "status": "running", "stop_reason": None,
                                  "updated_at": _now()})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("kind") != "eval":
            return
        tid = _tid(trial)
        p = self.plans[tid]
        epoch = int(result["epoch"])
        baseline = result.get("baseline_perplexity")
        ppl = result["perplexity"]
        self.writer.drop_epochs_after(tid, epoch)  # a restart from an earlier checkpoint
        self.writer.upsert_epoch({
            "sweep": self.sweep, "trial_id": tid, "method": p["method"], "pattern": p["pattern"],
            "sparsity": p["sparsity"], "batch_size": p["batch_size"], "epoch": epoch,
            "perplexity": ppl, "improvement_pct": improvement_pct(baseline, ppl),
            "loss": result.get("loss"), "lr": result.get("lr"), "steps": result.get("steps"),
            "samples": result.get("samples"), "tokens": result.get("tokens"),
            "sparsity_actual": result.get("sparsity_actual"), "wall_s": result.get("wall_s"),
            "tokens_per_s": result.get("tokens_per_s"), "mem_peak_mb": result.get("mem_peak_mb"),
            "eval_tokens": result.get("eval_tokens"), "node_id": result.get("node_id"),
            "timestamp": _now(),
        })
        rows = self.writer.epochs_of(tid)
        finite = [r for r in rows if r["perplexity"] is not None and math.isfinite(r["perplexity"])]
        best = min(finite, key=lambda r: r["perplexity"]) if finite else None
        last = rows[-1]
        export = Path(self.sweep_dir) / "export" / tid
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
        tid = _tid(trial)
        row = self.writer.trial(tid) or {}
        if row.get("status") in END_STATUSES:
            return
        done = row.get("epochs_completed") or 0
        if done < self.plans[tid]["num_epochs"]:
            # Ended before its last epoch without a reason of its own: the scheduler stopped it.
            update = {"status": "early_stopped",
                      "stop_reason": f"stopped by the {self.scheduler_name} scheduler after epoch {done}"}
        else:
            update = {"status": "completed", "stop_reason": None}
        self.writer.upsert_trial({"trial_id": tid, **update, "updated_at": _now()})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        tid = _tid(trial)
        cause = _error_text(trial)
        self.writer.upsert_trial({"trial_id": tid, "status": "errored", "stop_reason": cause,
                                  "updated_at": _now()})


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
    from ray.util.placement_group import PlacementGroup, placement_group_table

    try:
        state = placement_group_table().get(pg_hex, {}).get("state")
        if state in (None, "REMOVED"):
            return False
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
        return True
    except Exception:  # best effort: never fail a sweep over cleanup
        return False


def logger_callbacks(cfg: SweepConfig) -> list:
    """Experiment trackers the config names, through Ray Tune's own logger callbacks (they read
    their credentials from the environment: WANDB_API_KEY, MLFLOW_TRACKING_URI). TensorBoard
    files are always written by Tune's default loggers."""
    out = []
    if "wandb" in cfg.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=cfg.name))
    if "mlflow" in cfg.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(experiment_name=cfg.name))
    return out


def build_scheduler(cfg: SweepConfig):
    es = cfg.early_stop
    if es.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr="epoch", metric="perplexity", mode="min", max_t=cfg.train.num_epochs,
            grace_period=es.grace_period, reduction_factor=es.reduction_factor,
            # Trials reaching max_t finish on their own; stopping them would only leak resources.
            stop_last_trials=False,
        )
    return None


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text().strip().splitlines()
            return text[-1][:500] if text else "error"
    except OSError:
        pass
    return "errored (see the trial's log)"


def _now():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------------------------------------
# The grid


def make_trainable(cfg: SweepConfig, ctx: dict):
    """The trial driver with its per-sweep context and its sliver of CPU."""
    return tune.with_resources(
        tune.with_parameters(trial_driver, ctx=ctx), {"cpu": cfg.resources.driver_cpus}
    )


def restore_tuner(cfg: SweepConfig, sweep_dir: Path, ctx: dict):
    """The sweep's Tune experiment if one can be continued (finished trials kept, unfinished
    and errored ones resumed), else None."""
    where = ctx["store"].ray_storage(sweep_dir / TUNE_DIR)
    path, fs = where["storage_path"], where.get("storage_filesystem")
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return None
    tuner = tune.Tuner.restore(
        path, make_trainable(cfg, ctx), resume_unfinished=True, resume_errored=True,
        storage_filesystem=fs,
    )
    for callback in tuner._local_tuner.get_run_config().callbacks or []:
        if isinstance(callback, ResultsCallback):
            callback.relocate(str(sweep_dir), ctx["store"])
    return tuner


def build_tuner(cfg: SweepConfig, sweep_dir: Path, plans: list[TrialPlan], ctx: dict, dense: float | None):
    n = max_concurrent_trials(
        ray.cluster_resources(), trial_resources(cfg), len(plans), cfg.resources.max_concurrent_trials
    )
    trainable = make_trainable(cfg, ctx)
    callback = ResultsCallback(
        str(sweep_dir), cfg.name, ctx["model_name"], dense, [p.to_dict() for p in plans],
        scheduler_name=cfg.early_stop.scheduler.upper(), store=ctx["store"],
    )
    scheduler = build_scheduler(cfg)
    # The metric is perplexity, lower is better; a scheduler carries it itself (Tune refuses
    # it twice), otherwise the Tuner does, so ResultGrid.get_best_result() works.
    metric = {} if scheduler is not None else {"metric": "perplexity", "mode": "min"}
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([p.to_dict() for p in plans])},
        tune_config=tune.TuneConfig(
            **metric,
            max_concurrent_trials=n,
            scheduler=scheduler,
            trial_name_creator=_tid,
            trial_dirname_creator=_tid,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            **ctx["store"].ray_storage(sweep_dir),
            callbacks=[callback, PlacementGroupReaper(), *logger_callbacks(cfg)],
            failure_config=tune.FailureConfig(max_failures=cfg.failure.trial_max_failures),
            verbose=1,
        ),
    )
    return tuner, n
