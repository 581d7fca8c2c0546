"""Every private Ray API the project uses is still where sweep/ray_private.py expects it.

A Ray upgrade that moves one fails here, naming it, instead of silently costing start-up time
(the autoscaling coordinator) or breaking resume deep inside a sweep (the Tuner's callbacks)."""

from __future__ import annotations

import inspect

from ray import tune

from sweep import ray_private


def test_no_private_ray_api_has_moved():
    assert ray_private.problems() == []


def test_the_inline_controller_overrides_the_method_ray_calls():
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    trainer_cls = ray_private.inline_controller_trainer()
    assert issubclass(trainer_cls, TorchTrainer)
    override = trainer_cls._initialize_and_run_controller
    assert override is not DataParallelTrainer._initialize_and_run_controller
    # fit() still reaches the method by this name: if Ray renamed it, the override would be dead.
    assert "_initialize_and_run_controller" in inspect.getsource(DataParallelTrainer)


def test_a_tuners_run_callbacks_are_reachable(tmp_path):
    class Marker(tune.Callback):
        pass

    marker = Marker()
    tuner = tune.Tuner(lambda config: None,
                       run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[marker]))
    assert marker in ray_private.tuner_run_callbacks(tuner)


def test_the_coordinator_prestart_needs_no_arguments():
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    params = inspect.signature(get_or_create_autoscaling_coordinator).parameters.values()
    assert all(p.default is not inspect.Parameter.empty for p in params)
