"""The trial loop: baseline -> [train epoch -> evaluate -> stop? -> report]*, on a ``TrialCore``.

It reads top to bottom and knows nothing of Ray: reporting, checkpoint upload and restore go
through ``Hooks``, which ``trainers.worker`` implements for Ray Train and ``LocalHooks`` for one
plain process (tests, benchmarks). Every rank runs the same loop; rank 0 logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from trainers.core import TrialCore
from trainers.distill import teacher_memory_mb
from trainers.fence import Fenced, adopt_attempt, check_fence
from trainers.metrics import EvalReport
from trainers.saving import SavingHooks
from trainers.stopping import divergence, plateau
from trainers.trial_log import (
    TrialLog,
    format_memory,
    format_sparsity,
    format_summary,
    memory_mb,
    reset_peak,
    trend,
)


class Hooks(Protocol):
    def report(self, core: TrialCore, metrics: dict, save: bool) -> None:
        """Every rank calls it; with ``save`` the training state is checkpointed with it."""

    def restore(self, core: TrialCore) -> bool:
        """Load the latest checkpoint into ``core`` if there is one."""

    def push(self, path: str | None) -> None:
        """A finished file or directory may be copied elsewhere (an object store)."""

    def poll(self, core: TrialCore) -> None:
        """After each training step (every rank): send a checkpoint whose write finished."""

    def flush(self, core: TrialCore) -> None:
        """Send the checkpoint still being written (at the trial's end; every rank)."""

    def close(self, core: TrialCore) -> None:
        """The trial ended on this rank, well or not: drop what was not sent."""


class LocalHooks(SavingHooks):
    """One process, no Ray: reports are kept in a list (as Tune would see them), the latest
    checkpoint in ``checkpoint_dir``: each is written to a temporary sibling and renamed into
    place once complete and sent (``trainers.saving``), so a crash mid-write leaves the
    previous one. Ranks of one trial may share the directory (rank 0 renames)."""

    def __init__(self, checkpoint_dir: Path | None = None):
        self.reports: list[dict] = []
        self.checkpoints: list[int] = []  # the step of each checkpoint sent
        self.checkpoint_dir = checkpoint_dir

    def report(self, core: TrialCore, metrics: dict, save: bool) -> None:
        if save and self.checkpoint_dir and core.spec.checkpoint.enabled:
            self.save_point(core, metrics)
        else:
            self.send(core, metrics, None)

    def fresh_dir(self, core: TrialCore) -> Path:
        tmp = self.checkpoint_dir.with_name(f".{self.checkpoint_dir.name}.tmp")
        if core.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(core)  # no rank writes before it is empty, nor before the last rename
        return tmp

    def send(self, core: TrialCore, metrics: dict, checkpoint: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint is not None:
            self.checkpoints.append(metrics["steps"])
            _barrier(core)  # every rank's files are in (a dense save ends without agreeing)
            if core.rank == 0:
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
                os.replace(checkpoint, self.checkpoint_dir)

    def restore(self, core: TrialCore) -> bool:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return False
        core.restore(self.checkpoint_dir)
        return True

    def push(self, path: str | None) -> None:
        pass


def _barrier(core: TrialCore) -> None:
    if core.world > 1:
        dist.barrier()


PROGRESS_BYTES = 128  # the progress record, padded with spaces (valid JSON whitespace)


class Progress:
    """Rank 0 keeps ``TrialSpec.progress_path`` at the current step, so a person (or a test) can
    see how far a trial got, and how much a crash cost, without Ray. It is written every step,
    so it must be cheap: one fixed-width ``pwrite`` over the same bytes instead of
    write-temporary-and-rename (README, Benchmarks: trial efficiency). A reader gets the whole
    record: it is far smaller than a page and written in one call."""

    def __init__(self, path: str | None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644) if path else None

    def __call__(self, epoch: int, step: int) -> None:
        if self.fd is not None:
            record = json.dumps({"epoch": epoch, "step": step, "time": time.time()})
            os.pwrite(self.fd, record.encode().ljust(PROGRESS_BYTES), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_trial(core: TrialCore, hooks: Hooks) -> None:
    """The whole trial on this rank, resuming from the latest checkpoint when there is one."""
    spec = core.spec
    log = TrialLog(spec.plan.trial_id, spec.log_path, enabled=core.rank == 0)
    progress = Progress(spec.progress_path if core.rank == 0 else None)
    core.build()
    if hooks.restore(core):
        log(f"resumed from checkpoint: epoch {core.st.epoch}, step {core.st.step}")
    st = core.st
    try:
        adopt_attempt(core)
        if st.baseline is None:
            baseline(core, hooks, log)
        while st.epoch < spec.plan.num_epochs and not st.stopped:
            epoch(core, hooks, log, progress)
        hooks.flush(core)
        log(format_summary(st.baseline, st.history[-1]["perplexity"], st.best, st.best_epoch))
        hooks.push(spec.log_path)
    except Fenced as e:
        # An orphan of a killed or superseded driver: end quietly, nothing more is written.
        log(f"stopped without writing: {e}")
    finally:
        hooks.close(core)
        progress.close()


def eval_report(core: TrialCore, epoch: int, ev: dict, **extra) -> dict:
    st, plan = core.st, core.plan
    _, mem_peak, _ = memory_mb(core.device)
    return EvalReport(
        epoch=epoch, perplexity=ev["perplexity"], eval_tokens=ev["tokens"], eval_s=ev["seconds"],
        steps=st.step, samples=st.step * plan.batch_size,
        tokens=st.step * plan.batch_size * core.spec.seq_len,
        sparsity_actual=st.sparsity_actual, baseline_perplexity=st.baseline,
        best_perplexity=st.best, best_epoch=st.best_epoch,
        wall_s=time.perf_counter() - core.t_start, mem_peak_mb=mem_peak, lr=plan.lr,
        status=st.stopped, stop_reason=st.stop_reason, driver_attempt=core.spec.attempt,
        **extra,
    ).to_dict()


def fence(core: TrialCore, hooks: Hooks) -> None:
    """Before a write: stop (``Fenced``) when a newer driver attempt runs the sweep."""
    check_fence(core, getattr(hooks, "store", None))


def export_best(core: TrialCore, hooks: Hooks) -> None:
    if core.spec.export_dir:
        fence(core, hooks)
        core.export(Path(core.spec.export_dir))
        hooks.push(core.spec.export_dir)


def baseline(core: TrialCore, hooks: Hooks, log: TrialLog) -> None:
    """Epoch 0: the pruned model before any training step. Its perplexity is the same for
    every trial of the recipe, so preparation measured it once (``Prepared.baseline``); it is
    evaluated here only when that measurement does not fit this trial (or there is none). Its
    seconds (``eval_s``, the evals table's) are then the preparation's."""
    st, plan, dense = core.st, core.plan, core.spec.prepared.dense_perplexity
    summary = core.measure_sparsity()
    evals = core.shared_baseline()
    if evals is None:
        ev = core.evaluate()
        evals = core.evaluate_sets(ev)
        when = f"{ev['seconds']:.1f} s"
    else:
        ev = evals[core.spec.prepared.primary_set]
        when = f"measured once in preparation ({ev['seconds']:.1f} s)"
    st.baseline = st.best = ev["perplexity"]
    st.best_epoch = 0
    st.history = [{"epoch": 0, "perplexity": ev["perplexity"], "loss": None}]
    pattern = f" {plan.pattern}" if plan.pattern else ""
    log(
        f"── baseline ── {plan.method}{pattern} sparsity {plan.sparsity}, batch "
        f"{plan.batch_size} ({plan.batch_size // core.world} per worker x {core.world} "
        f"workers, accumulation {plan.grad_accum}), lr {plan.lr:.3e}, "
        f"{plan.steps_per_epoch} steps/epoch x {plan.num_epochs} epochs\n"
        + (f"dense perplexity {dense:.2f}\n" if dense else "")
        + f"pruned perplexity (epoch 0) {ev['perplexity']:.2f}"
        + (f" ({trend(ev['perplexity'], dense)} vs dense)" if dense else "")
        + f", {ev['windows']} windows, {ev['tokens']} tokens, {when}\n"
        + format_sets(evals, core.spec.prepared.primary_set)
        + format_sparsity(summary, plan.sparsity, len(core.names))
        + format_recipe(core)
    )
    export_best(core, hooks)  # the pruned model is the best until training beats it
    check_stop(core, None, ev["perplexity"])
    tasks = measure_tasks(core, hooks, log, final=False)
    hooks.report(core, eval_report(core, 0, ev, loss=None, tokens_per_s=None, epoch_steps=0,
                                   sparsity_min=summary["min"], sparsity_max=summary["max"],
                                   evals=evals, tasks=tasks),
                 save=False)


def format_sets(evals: dict[str, dict], primary: str) -> str:
    """The sets other than the primary, one line (empty with one set)."""
    others = [f"{name} {ev['perplexity']:.2f} ({ev['windows']} windows, {ev['seconds']:.1f} s)"
              for name, ev in evals.items() if name != primary]
    return f"other sets: {', '.join(others)}\n" if others else ""


def measure_tasks(core: TrialCore, hooks: Hooks, log: TrialLog, final: bool) -> list | None:
    """Zero-shot task rows due now, tagged with the epoch of the model measured: the current
    model at the baseline, at every epoch (``tasks_every: epoch``) or at the last one; and
    at the last one also the best model when it was not measured already (read from its
    export, ``checkpoint.export_best``). Every rank takes part (a collective); rank 0 gets
    the rows, the others None."""
    spec, st = core.spec, core.st
    if spec.tasks is None or not (st.epoch == 0 or final or spec.tasks_every == "epoch"):
        return None
    rows = _tagged(core.measure_tasks, st.epoch)
    best = st.best_epoch
    if (final and spec.tasks_every != "epoch" and best not in (None, 0, st.epoch)
            and spec.export_dir):
        if core.world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 exported (and pushed) it before any rank reads it
        store = getattr(hooks, "store", None)
        if store is not None and not Path(spec.export_dir).is_dir():
            store.ensure(Path(spec.export_dir))  # a node that did not export it
        # Every rank measures (a collective); only rank 0 has rows to add.
        best_rows = _tagged(lambda: core.measure_tasks(spec.export_dir), best)
        rows = None if rows is None else rows + (best_rows or [])
    if rows is not None:
        log("tasks: " + ", ".join(
            f"{r['task']} {r['metric']} {r['value']:.4f}"
            + (f" +/- {r['stderr']:.4f}" if r["stderr"] is not None else "")
            + (f" (best, epoch {r['epoch']})" if r["epoch"] != st.epoch else "")
            for r in rows) + f", {sum({r['epoch']: r['seconds'] for r in rows}.values()):.1f} s")
    return rows


def _tagged(measure, epoch: int) -> list | None:
    t0 = time.perf_counter()
    rows = measure()
    seconds = time.perf_counter() - t0
    return None if rows is None else [{**r, "epoch": epoch, "seconds": seconds} for r in rows]


def format_recipe(core: TrialCore) -> str:
    """The layer-wise targets (OWL) and the recovery objective with the teacher's memory."""
    lines = []
    blocks = core.recipe.get("block_sparsities")
    if blocks:
        lines.append(f"layer-wise targets ({core.plan.layerwise}, per block): "
                     + " ".join(f"{s:.3f}" for s in blocks))
    if core.teacher is not None:
        d = core.spec.train.distill
        weights = (f"alpha {d.alpha}, temperature {d.temperature}" if core.plan.distill == "logits"
                   else f"ce_weight {d.ce_weight}")
        lines.append(f"recovery by distillation: {core.plan.distill} ({weights}); parameters on this "
                     f"rank: teacher {teacher_memory_mb(core.teacher):.1f} MB (frozen, no optimizer "
                     f"state), student {teacher_memory_mb(core.model):.1f} MB")
    return "".join(f"\n{line}" for line in lines)


def train_epoch(core: TrialCore, hooks: Hooks, progress: Progress) -> tuple[float, float]:
    """Train to the end of the next epoch (resuming mid-epoch after a restart). Returns (mean
    loss over all ranks and steps of the epoch, training seconds)."""
    st, plan = core.st, core.plan
    end = (st.epoch + 1) * plan.steps_per_epoch
    every = core.spec.checkpoint.every_steps
    while st.step < end:
        core.step()
        hooks.poll(core)
        _injected_failure(plan.trial_id, st.step)
        progress(st.epoch, st.step)
        if every and st.step % every == 0 and st.step < end:
            last = st.history[-1]
            fence(core, hooks)
            hooks.report(core, {"kind": "step", "epoch": st.epoch,
                                "perplexity": last["perplexity"], "steps": st.step}, save=True)
    return core.epoch_loss(), st.epoch_train_s


def check_stop(core: TrialCore, loss: float | None, perplexity: float) -> None:
    """The trial's own stop rules (divergence, plateau); ASHA is the scheduler's."""
    es, st = core.spec.early_stop, core.st
    reason = divergence(loss, perplexity, st.baseline, es.diverge_factor)
    if reason:
        st.stopped, st.stop_reason = "diverged", reason
        return
    reason = plateau([h["perplexity"] for h in st.history], es.plateau_patience,
                     es.plateau_min_rel_improvement)
    if reason:
        st.stopped, st.stop_reason = "early_stopped", reason


def epoch(core: TrialCore, hooks: Hooks, log: TrialLog, progress: Progress) -> None:
    st, plan = core.st, core.plan
    reset_peak(core.device)
    mem_before, _, label = memory_mb(core.device)
    steps_before = st.step - st.epoch_loss_steps  # the epoch's first step, across restarts
    loss, train_s = train_epoch(core, hooks, progress)
    mem_after, mem_peak, _ = memory_mb(core.device)
    st.epoch += 1
    ev = core.evaluate()
    evals = core.evaluate_sets(ev)
    ppl = ev["perplexity"]
    core.measure_sparsity()
    improved = math.isfinite(ppl) and ppl < st.best
    if improved:
        st.best, st.best_epoch = ppl, st.epoch
    steps = st.step - steps_before
    tokens = steps * plan.batch_size * core.spec.seq_len
    log(
        f"── epoch {st.epoch}/{plan.num_epochs} ──\n"
        f"loss {loss:.4f} (mean over {steps} batches), {steps * plan.batch_size} samples, "
        f"{tokens} tokens, {tokens / max(train_s, 1e-9):.1f} tok/s, {train_s:.1f} s\n"
        + format_memory(mem_before, mem_after, mem_peak, label)
        + f"\nEpoch {st.epoch}: {ppl:.2f} ({trend(ppl, st.baseline)} vs baseline "
        f"{st.baseline:.2f}), best {st.best:.2f} at epoch {st.best_epoch}, eval {ev['seconds']:.1f} s"
        + ("\n" + format_sets(evals, core.spec.prepared.primary_set).rstrip("\n")
           if len(evals) > 1 else "")
    )
    st.history.append({"epoch": st.epoch, "perplexity": ppl, "loss": loss})
    st.epoch_loss_sum, st.epoch_loss_steps, st.epoch_train_s = 0.0, 0, 0.0
    if improved:
        export_best(core, hooks)
    check_stop(core, loss, ppl)
    if st.stopped:
        log(f"stopping: {st.stopped} ({st.stop_reason})")
    tasks = measure_tasks(core, hooks, log, final=st.epoch >= plan.num_epochs or bool(st.stopped))
    fence(core, hooks)
    hooks.report(core, eval_report(core, st.epoch, ev, loss=loss,
                                   tokens_per_s=tokens / max(train_s, 1e-9), epoch_steps=steps,
                                   evals=evals, tasks=tasks),
                 save=True)


def _injected_failure(trial_id: str, step: int) -> None:
    """Test hook: SWEEP_INJECT_FAILURE="<trial_id>:<step>" makes that trial's workers raise
    after that step, every attempt (a trial that keeps failing)."""
    spec = os.environ.get("SWEEP_INJECT_FAILURE")
    if spec and spec == f"{trial_id}:{step}":
        raise RuntimeError(f"injected failure in {trial_id} at step {step}")
