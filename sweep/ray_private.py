"""Every private Ray API this project uses, in one module, pinned to Ray 2.60.

Each use saves time or fixes a bug that Ray's public API leaves open (docs/design.md says why).
``problems()`` checks that each one is still where this module expects it; the unit tests call
it, so a Ray upgrade that moves one fails there with a message naming it, not somewhere deep in
a sweep. At run time a missing optimisation is reported as a warning, never swallowed silently.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

logger = logging.getLogger(__name__)

# 1. The Train controller inside the trial driver (saves a process start per trial).
CONTROLLER_HOOK = "ray.train.v2.api.data_parallel_trainer.DataParallelTrainer._initialize_and_run_controller"
CONTROLLER_CLASS = "ray.train.v2._internal.execution.controller.TrainController"
# 2. Train's shared autoscaling coordinator started while the sweep prepares.
COORDINATOR = ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator."
               "get_or_create_autoscaling_coordinator")
# 3. A restored Tuner's run config, to re-point the results callback pickled in tuner.pkl.
TUNER_RUN_CONFIG = "ray.tune.Tuner._local_tuner.get_run_config"
# 4. Tune's TensorBoard logger's per-trial writers, which sweep.callbacks.EpochTensorBoard
#    reuses to step TensorBoard by epoch instead of Tune's report counter.
TBX_WRITERS = "ray.tune.logger.tensorboardx.TBXLoggerCallback._trial_writer / _trial_result"
# 5. The cluster's autoscaling config, to tell a cluster that can never hold a trial from one
#    whose autoscaler may add the nodes it needs (Ray Data asks the same question this way).
CLUSTER_CONFIG = "ray._private.state.GlobalState.get_cluster_config"


def inline_controller_trainer() -> type:
    """A ``TorchTrainer`` whose Train controller runs inside the calling process (the Tune
    trial driver, already a dedicated actor with Ray Train and torch imported) instead of in a
    new actor process, whose start-up was the largest part of a trial's fixed cost.

    Everything else is Ray Train's: the same controller class, worker group, placement group,
    failure policy, checkpoint manager and callbacks. The controller dies with the trial driver
    (it is in it), as the actor did (its owner). ``SWEEP_TRAIN_CONTROLLER=actor`` restores the
    stock path (sweep.driver), and the tests run both."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.controller import TrainController

    class InlineControllerTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller = TrainController(**controller_init_kwargs)
            asyncio.run(controller.run())
            return controller.get_result()

    return InlineControllerTorchTrainer


def start_autoscaling_coordinator() -> bool:
    """Start Ray Train's shared AutoscalingCoordinator actor now, while the sweep prepares,
    instead of inside the first trial: every TorchTrainer registers its resources with it, and
    its process start-up otherwise lands on the first trial. Ray Train creates it anyway when
    this fails, so a failure costs time only; it is logged as a warning."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError as e:
        logger.warning("Ray's private %s moved (%s): each sweep's first trial starts slower",
                       COORDINATOR, e)
        return False
    try:
        get_or_create_autoscaling_coordinator()  # asynchronous: returns a handle at once
    except Exception as e:  # noqa: BLE001 - an optimisation; Train creates it when needed
        logger.warning("could not pre-start Ray Train's autoscaling coordinator: %s", e)
        return False
    return True


def cluster_autoscales() -> bool | None:
    """Whether the connected cluster's autoscaler may add nodes: True when a node group can
    grow (``max_count`` -1 or above ``min_count``), False when the reported config says none
    can, None when no config is reported (clusters started by ``ray start`` or an older
    autoscaler report none; a missing private API is logged and counts as unknown)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - unknown: the caller waits, bounded, instead
        logger.warning("cannot read the cluster's autoscaling config (%s): %s", CLUSTER_CONFIG, e)
        return None
    groups = [g for g in (config.node_group_configs if config is not None else [])
              if g.resources and g.max_count != 0]
    if not groups:
        return None
    return any(g.max_count == -1 or g.max_count > g.min_count for g in groups)


def tuner_run_callbacks(tuner: Any) -> list:
    """The callbacks of a Tuner's run config (a restored Tuner exposes them only privately)."""
    return list(tuner._local_tuner.get_run_config().callbacks or [])


def problems() -> list[str]:
    """What no longer matches the private APIs above (empty when all is well)."""
    found: list[str] = []
    try:
        from ray.train.v2._internal.execution.controller import TrainController
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError as e:
        return [f"{CONTROLLER_CLASS}: cannot import ({e})"]
    hook = getattr(DataParallelTrainer, "_initialize_and_run_controller", None)
    if hook is None:
        found.append(f"{CONTROLLER_HOOK}: gone; the inline controller is never used")
    elif list(inspect.signature(hook).parameters) != ["self", "controller_init_kwargs"]:
        found.append(f"{CONTROLLER_HOOK}: signature changed to {inspect.signature(hook)}")
    if not inspect.iscoroutinefunction(getattr(TrainController, "run", None)):
        found.append(f"{CONTROLLER_CLASS}.run: no longer a coroutine")
    if not callable(getattr(TrainController, "get_result", None)):
        found.append(f"{CONTROLLER_CLASS}.get_result: gone")
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError as e:
        found.append(f"{COORDINATOR}: cannot import ({e})")
    else:
        required = [p for p in inspect.signature(get_or_create_autoscaling_coordinator).parameters.values()
                    if p.default is inspect.Parameter.empty]
        if required:
            found.append(f"{COORDINATOR}: now needs arguments {[p.name for p in required]}")
    from ray.tune import Tuner
    from ray.tune.impl.tuner_internal import TunerInternal

    if "_local_tuner" not in inspect.getsource(Tuner.__init__):
        found.append(f"{TUNER_RUN_CONFIG}: Tuner no longer keeps _local_tuner")
    if not callable(getattr(TunerInternal, "get_run_config", None)):
        found.append(f"{TUNER_RUN_CONFIG}: TunerInternal.get_run_config is gone")
    from ray.tune.logger import TBXLoggerCallback

    source = inspect.getsource(TBXLoggerCallback)
    if "self._trial_writer" not in source or "self._trial_result" not in source:
        found.append(f"{TBX_WRITERS}: TBXLoggerCallback no longer keeps them")
    from ray._private.state import GlobalState

    if not callable(getattr(GlobalState, "get_cluster_config", None)):
        found.append(f"{CLUSTER_CONFIG}: gone; an infeasible trial waits placement_timeout_s")
    return found
