"""The Ray Train adapter of the trial loop: one FSDP2 rank inside a Ray Train worker.

All it adds to ``trainers.loop`` is Ray: the rank and device from Ray Train's context, reports
and checkpoints through ``ray.train.report`` (every rank writes its shard to a local directory
that Ray Train uploads as one checkpoint; when and in which format: ``trainers.saving``), the
restore from ``ray.train.get_checkpoint``, who and where the report comes from, and the store
pulls and pushes of an object-store sweep.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist
from ray.train import Checkpoint

from trainers.core import TrialCore, silence_transformers
from trainers.loop import run_trial
from trainers.saving import SavingHooks
from trainers.spec import TrialSpec
from trainers.storage import Store


class RayHooks(SavingHooks):
    def __init__(self, store: Store | None, world: int):
        self.store, self.world = store, world

    def report(self, core: TrialCore, metrics: dict, save: bool) -> None:
        if self.world > 1:
            dist.barrier()
        if metrics.get("kind") == "eval":
            self.push(core.spec.log_path)
        if save and core.spec.checkpoint.enabled:
            self.save_point(core, metrics)
        else:
            self.send(core, metrics, None)

    def fresh_dir(self, core: TrialCore) -> Path:
        return Path(tempfile.mkdtemp(prefix="ckpt-"))

    def send(self, core: TrialCore, metrics: dict, checkpoint: Path | None) -> None:
        """``ray.train.report``. A checkpoint written in the step loop is uploaded before the
        loop goes on, as before; one written in the background is uploaded in the background
        too (Ray Train registers it once every rank's upload is done, and deletes the local
        copy): the loop's next report waits for it, at most one save point later."""
        metrics = {**metrics, **identity(core.plan.trial_id)}
        if checkpoint is None:
            ray.train.report(metrics)
        elif core.checkpointer is None:
            try:
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint))
            finally:
                shutil.rmtree(checkpoint, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True)

    def discard(self, directory: Path) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    def restore(self, core: TrialCore) -> bool:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            core.restore(Path(d))
        return True

    def push(self, path: str | None) -> None:
        """Rank 0 copies a finished file or directory to a URI store (a no-op otherwise)."""
        if self.store and path and ray.train.get_context().get_world_rank() == 0:
            self.store.push(Path(path))


def identity(trial_id: str) -> dict:
    """Who reports: the trial, rank 0's node, and the placement group a stopped trial's
    resources must be freed from (sweep.callbacks.PlacementGroupReaper)."""
    pg = ray.util.get_current_placement_group()
    return {
        "trial_name": trial_id,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pg_id": pg.id.hex() if pg is not None else None,
    }


def localize(spec: TrialSpec, store: Store | None) -> TrialSpec:
    """The spec with its prepared files present on this node: pulled once from an object
    store by a worker on a node that did not prepare the sweep."""
    if store is None:
        return spec
    prep = spec.prepared
    pulled = {key: str(store.ensure(Path(getattr(prep, key))))
              for key in ("model_dir", "masks", "train_tokens", "eval_windows")}
    pulled["eval_sets"] = tuple((name, str(store.ensure(Path(path))))
                                for name, path in prep.eval_sets)
    for key in ("weights", "recipe", "baseline"):  # files only some recipes have
        if getattr(prep, key):
            pulled[key] = str(store.ensure(Path(getattr(prep, key))))
    return dataclasses.replace(spec, prepared=dataclasses.replace(prep, **pulled))


def run(spec: TrialSpec, store: Store | None) -> None:
    """One rank of one trial (called by ``trainers.entry.train_loop``)."""
    ctx = ray.train.get_context()
    silence_transformers()
    core = TrialCore(localize(spec, store), ctx.get_world_rank(), ctx.get_world_size(),
                     ray.train.torch.get_device())
    run_trial(core, RayHooks(store, ctx.get_world_size()))
