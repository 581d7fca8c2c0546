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
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from trainers.core import TrialCore
from trainers.distill import teacher_memory_mb
from trainers.fence import Fenced, adopt_attempt, check_fence
from trainers.metrics import EvalReport
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


class LocalHooks:
    """One process, no Ray: reports are kept in a list, checkpoints in ``checkpoint_dir``."""

    def __init__(self, checkpoint_dir: Path | None = None):
        self.reports: list[dict] = []
        self.checkpoint_dir = checkpoint_dir

    def report(self, core: TrialCore, metrics: dict, save: bool) -> None:
        self.reports.append(metrics)
        if save and self.checkpoint_dir and core.spec.checkpoint.enabled:
            tmp = self.checkpoint_dir.with_name(f".{self.checkpoint_dir.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            core.save(tmp, asdict(core.st))
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            os.replace(tmp, self.checkpoint_dir)

    def restore(self, core: TrialCore) -> bool:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return False
        core.restore(self.checkpoint_dir)
        return True

    def push(self, path: str | None) -> None:
        pass


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
        log(format_summary(st.baseline, st.history[-1]["perplexity"], st.best, st.best_epoch))
        hooks.push(spec.log_path)
    except Fenced as e:
        # An orphan of a killed or superseded driver: end quietly, nothing more is written.
        log(f"stopped without writing: {e}")
    finally:
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
    """Epoch 0: the pruned model before any training step."""
    st, plan, dense = core.st, core.plan, core.spec.prepared.dense_perplexity
    summary = core.measure_sparsity()
    ev = core.evaluate()
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
        + f", {ev['windows']} windows, {ev['tokens']} tokens, {ev['seconds']:.1f} s\n"
        + format_sparsity(summary, plan.sparsity, len(core.names))
        + format_recipe(core)
    )
    export_best(core, hooks)  # the pruned model is the best until training beats it
    check_stop(core, None, ev["perplexity"])
    hooks.report(core, eval_report(core, 0, ev, loss=None, tokens_per_s=None, epoch_steps=0,
                                   sparsity_min=summary["min"], sparsity_max=summary["max"]),
                 save=False)


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
    )
    st.history.append({"epoch": st.epoch, "perplexity": ppl, "loss": loss})
    st.epoch_loss_sum, st.epoch_loss_steps, st.epoch_train_s = 0.0, 0, 0.0
    if improved:
        export_best(core, hooks)
    check_stop(core, loss, ppl)
    if st.stopped:
        log(f"stopping: {st.stopped} ({st.stop_reason})")
    fence(core, hooks)
    hooks.report(core, eval_report(core, st.epoch, ev, loss=loss,
                                   tokens_per_s=tokens / max(train_s, 1e-9), epoch_steps=steps),
                 save=True)


def _injected_failure(trial_id: str, step: int) -> None:
    """Test hook: SWEEP_INJECT_FAILURE="<trial_id>:<step>" makes that trial's workers raise
    after that step, every attempt (a trial that keeps failing)."""
    spec = os.environ.get("SWEEP_INJECT_FAILURE")
    if spec and spec == f"{trial_id}:{step}":
        raise RuntimeError(f"injected failure in {trial_id} at step {step}")
