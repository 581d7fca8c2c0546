"""A Ray Train callback that timestamps a run's start-up, loaded through ``RAY_TRAIN_CALLBACKS``.

Ray Train builds the callbacks named in ``RAY_TRAIN_CALLBACKS`` inside ``TorchTrainer.fit()``
(here: in the trial driver), ships them to the controller and to every worker. This one
appends ``{"event", "t", "pid", ...}`` JSON lines to the file named by ``BENCH_TIMELINE``, so
the benchmarks see the start-up of a real trial without any hook in the product code. All the
processes run on this one machine, so ``time.time()`` stamps are comparable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

from ray.train.v2._internal.execution.callback import (
    ControllerCallback,
    TrainContextCallback,
    WorkerCallback,
    WorkerGroupCallback,
)

ENV = "BENCH_TIMELINE"
SPEC = "bench.hooks.TimelineCallback"


def mark(path: str | None, event: str, **extra) -> None:
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **extra})
    with open(path, "a") as f:  # one short O_APPEND write per line: no interleaving
        f.write(line + "\n")


def read(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return sorted((json.loads(x) for x in f if x.strip()), key=lambda e: e["t"])
    except FileNotFoundError:
        return []


class TimelineCallback(ControllerCallback, WorkerGroupCallback, WorkerCallback, TrainContextCallback):
    def __init__(self):
        self.path = os.environ.get(ENV)
        self.reports = 0
        mark(self.path, "trainer_fit")  # TorchTrainer.fit() builds its callbacks first

    # controller
    def after_controller_start(self, train_run_context):
        mark(self.path, "controller_start")

    def after_controller_state_update(self, previous_state, current_state):
        mark(self.path, "state", state=type(current_state).__name__)

    def before_worker_group_start(self, worker_group_context):
        mark(self.path, "worker_group_start_begin")

    def after_worker_group_start(self, worker_group):
        # Env callbacks run before Ray's own (BackendSetupCallback: the process group).
        mark(self.path, "worker_actors_ready")

    def after_worker_group_training_start(self, worker_group):
        mark(self.path, "train_fn_launched")

    def after_controller_finish(self, result):
        mark(self.path, "controller_finish")

    # worker
    def after_init_train_context(self):
        created = None
        try:
            import psutil

            created = psutil.Process().create_time()
        except Exception:  # noqa: BLE001 - a stamp is optional
            pass
        mark(self.path, "worker_context", process_created=created,
             torch_imported="torch" in sys.modules)

    @contextmanager
    def on_report(self):
        self.reports += 1
        mark(self.path, "report_begin", n=self.reports)
        yield
        mark(self.path, "report_end", n=self.reports)
