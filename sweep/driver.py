"""The trial driver: the Tune function trainable that fits one trial's ``TorchTrainer``.

Ray Tune cannot schedule a ``TorchTrainer`` directly any more; the supported pattern is a Tune
function trainable per trial that builds and fits its own trainer, named stably after the trial
so that a resumed trial finds its checkpoints (docs/design.md, "Tune + Train"). The driver
holds a sliver of CPU; its workers report to Tune through ``TuneReportCallback``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ray import train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from sweep.cluster import worker_resources
from sweep.config import FailureConfig, ResourcesConfig
from sweep.layout import SweepLayout
from sweep.ray_private import inline_controller_trainer
from trainers.entry import train_loop
from trainers.spec import TrialSpec
from trainers.storage import Store

# "actor": Ray Train's own layout, the controller in an actor of its own (a new process).
CONTROLLER_ENV = "SWEEP_TRAIN_CONTROLLER"


@dataclass(frozen=True)
class DriverContext:
    """What every trial driver of a sweep shares (put in Ray's object store once)."""

    specs: dict[str, TrialSpec]  # by trial id
    store: Store
    layout: SweepLayout
    resources: ResourcesConfig
    failure: FailureConfig
    keep_last: int  # checkpoints kept per trial
    attempt: int = 0  # this driver start's attempt number (sweep/lease.py), fencing old writers


def trial_driver(config: dict, ctx: DriverContext) -> None:
    """One trial (``config["trial_id"]`` from the Tune grid): a TorchTrainer with
    ``plan.workers`` FSDP2 ranks running ``trainers.entry.train_loop``."""
    spec = ctx.specs[config["trial_id"]]
    gpu = ctx.resources.gpus_per_worker > 0
    trainer_cls = TorchTrainer if os.environ.get(CONTROLLER_ENV) == "actor" else inline_controller_trainer()
    trainer = trainer_cls(
        train_loop,
        train_loop_config={"spec": spec, "store": ctx.store},
        scaling_config=train.ScalingConfig(
            num_workers=spec.plan.workers, use_gpu=gpu,
            resources_per_worker=worker_resources(ctx.resources),
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=train.RunConfig(
            name=ctx.layout.train_run_name(spec.plan.trial_id),
            **ctx.store.ray_storage(ctx.layout.train),
            failure_config=train.FailureConfig(
                max_failures=ctx.failure.worker_max_failures,
                # A starved worker group must fail, not retry forever (docs/design.md).
                controller_failure_limit=3,
            ),
            checkpoint_config=train.CheckpointConfig(num_to_keep=ctx.keep_last),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
