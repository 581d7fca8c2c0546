"""The function Ray Train runs on each worker, in a module that imports nothing.

The trial driver (a Tune actor) and Ray Train pickle the train function by reference, so the
driver imports the function's module. Pointing them here rather than at ``trainers.worker``
keeps torch.distributed.checkpoint, DTensor and the rest of the training stack out of the
driver process, on every trial's start-up path; the worker imports it when the function runs,
as it had to anyway (docs/design.md, "Start-up").
"""

from __future__ import annotations


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``): one rank of one trial.
    ``config``: ``{"spec": TrialSpec, "store": Store | None}``."""
    from trainers.worker import run

    run(config["spec"], config["store"])
