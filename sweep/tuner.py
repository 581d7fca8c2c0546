"""The Ray Tune experiment over the grid: build it, or restore an interrupted one.

One trial per grid point; the grid's only parameter is the trial id, and each trial driver
looks its typed ``TrialSpec`` up in the shared ``DriverContext``. Results reach Parquet through
one writer, ``sweep.callbacks.ResultsCallback``, in this process.
"""

from __future__ import annotations

import ray
from ray import tune

from sweep.callbacks import PlacementGroupReaper, ResultsCallback, logger_callbacks, trial_key
from sweep.cluster import max_concurrent_trials, trial_resources
from sweep.config import SweepConfig, primary_set
from sweep.driver import DriverContext, trial_driver
from sweep.ray_private import tuner_run_callbacks
from trainers.spec import TrialPlan


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


def make_trainable(cfg: SweepConfig, ctx: DriverContext):
    """The trial driver with its per-sweep context and its sliver of CPU."""
    return tune.with_resources(
        tune.with_parameters(trial_driver, ctx=ctx), {"cpu": cfg.resources.driver_cpus}
    )


def restore_tuner(cfg: SweepConfig, ctx: DriverContext, dense_detail: dict | None = None):
    """The sweep's Tune experiment if one can be continued (finished trials kept, unfinished
    and errored ones resumed), else None."""
    where = ctx.store.ray_storage(ctx.layout.tune)
    path, fs = where["storage_path"], where.get("storage_filesystem")
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return None
    tuner = tune.Tuner.restore(
        path, make_trainable(cfg, ctx), resume_unfinished=True, resume_errored=True,
        storage_filesystem=fs,
    )
    for callback in tuner_run_callbacks(tuner):
        if isinstance(callback, ResultsCallback):
            callback.relocate(str(ctx.layout.root), ctx.store, ctx.attempt)
            callback.set_dense(dense_detail, primary_set(cfg.eval))
    return tuner


def build_tuner(cfg: SweepConfig, plans: list[TrialPlan], ctx: DriverContext, model_name: str,
                dense: float | None, calibration: dict[str, str | None] | None = None,
                dense_detail: dict | None = None):
    n = max_concurrent_trials(
        ray.cluster_resources(), trial_resources(cfg), len(plans), cfg.resources.max_concurrent_trials
    )
    callback = ResultsCallback(
        str(ctx.layout.root), cfg.name, model_name, dense, plans,
        scheduler_name=cfg.early_stop.scheduler.upper(), store=ctx.store, calibration=calibration,
    )
    callback.attempt = ctx.attempt
    callback.set_dense(dense_detail, primary_set(cfg.eval))
    scheduler = build_scheduler(cfg)
    # The metric is perplexity, lower is better; a scheduler carries it itself (Tune refuses
    # it twice), otherwise the Tuner does, so ResultGrid.get_best_result() works.
    metric = {} if scheduler is not None else {"metric": "perplexity", "mode": "min"}
    layout = ctx.layout
    tuner = tune.Tuner(
        make_trainable(cfg, ctx),
        param_space={"trial_id": tune.grid_search([p.trial_id for p in plans])},
        tune_config=tune.TuneConfig(
            **metric,
            max_concurrent_trials=n,
            scheduler=scheduler,
            trial_name_creator=trial_key,
            trial_dirname_creator=trial_key,
        ),
        run_config=tune.RunConfig(
            name=layout.tune.name,
            **ctx.store.ray_storage(layout.root),
            callbacks=[callback, PlacementGroupReaper(), *logger_callbacks(cfg)],
            failure_config=tune.FailureConfig(max_failures=cfg.failure.trial_max_failures),
            # No status tables or result dumps from Tune (what it still prints lands in
            # logs/ray.log): the console shows the trial blocks and a live status of its own
            # (sweep.console).
            verbose=0,
        ),
    )
    return tuner, n
