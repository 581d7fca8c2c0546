"""Step rules and the trial plan: pure functions, no Ray, no torch.

The batch-size rule keeps the sample budget of an epoch fixed whatever the batch size:
steps per epoch = ceil(base_samples / batch_size), and the learning rate grows with the
square root of the batch (the scaling argued for adaptive optimizers, Malladi et al. 2022).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable

from sweep.config import SweepConfig, to_dict
from sweep.layout import SweepLayout
from trainers.spec import Prepared, TrialPlan, TrialSpec, parse_pattern, pattern_label


def steps_per_epoch(base_samples: int, batch_size: int) -> int:
    if batch_size < 1 or base_samples < 1:
        raise ValueError("base_samples and batch_size must be >= 1")
    return math.ceil(base_samples / batch_size)


def scaled_lr(base_lr: float, batch_size: int, rule: str = "sqrt") -> float:
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "linear":
        return base_lr * batch_size
    if rule == "constant":
        return base_lr
    raise ValueError(f"unknown lr rule {rule!r}")


def grad_accum_steps(batch_size: int, workers: int, micro_batch_size: int | None) -> int:
    """Forward/backward passes per optimizer step on each worker."""
    if batch_size % workers:
        raise ValueError(f"batch size {batch_size} cannot be split across {workers} workers")
    per_worker = batch_size // workers
    if micro_batch_size is None or micro_batch_size >= per_worker:
        return 1
    return math.ceil(per_worker / micro_batch_size)


# How a recovery objective appears in trial ids ("none" is plain next-token cross-entropy).
DISTILL_LABELS = {"none": "ce", "logits": "logits", "squarehead": "squarehead"}


def trial_id(sparsity: float, batch_size: int, method: str | None = None,
             pattern: str | None = None, layerwise: str | None = None,
             distill: str | None = None) -> str:
    """A stable, readable trial name: the same grid point always gets the same id, so resume,
    re-runs and result rows line up. ``s0.5-b4``, ``wanda-2of4-s0.5-b4`` or
    ``sparsegpt-owl-s0.7-b4-squarehead``; a part is named only when the sweep varies it or
    sets it away from its default, so existing sweeps keep their ids."""
    parts = []
    if method is not None:
        parts.append(method)
    if pattern_label(pattern):
        parts.append(pattern_label(pattern))
    if layerwise is not None:
        parts.append(layerwise)
    parts.append(f"s{sparsity:.12g}")
    parts.append(f"b{batch_size}")
    if distill is not None:
        parts.append(DISTILL_LABELS[distill])
    return "-".join(parts)


def expand(cfg: SweepConfig) -> list[TrialPlan]:
    """The grid, in a stable order: method x pattern x layer-wise rule x objective x sparsity x
    batch size.

    An N:M pattern fixes the sparsity at 1 - N/M: for pattern trials the sparsity axis
    collapses to that value (one trial per method, pattern and batch size)."""
    g, pr = cfg.grid, cfg.prune
    methods = g.method or (pr.method,)
    patterns = g.pattern or (pr.pattern,)
    rules = g.layerwise or (pr.layerwise,)
    objectives = g.distill or (cfg.train.distill.kind,)
    name_method = g.method is not None
    name_pattern = g.pattern is not None or pr.pattern is not None
    name_rule = g.layerwise is not None or pr.layerwise != "uniform"
    name_objective = g.distill is not None or cfg.train.distill.kind != "none"
    plans: list[TrialPlan] = []
    seen: set[str] = set()
    for method, pattern, rule, objective, sparsity, batch in itertools.product(
        methods, patterns, rules, objectives, g.sparsity, g.batch_size
    ):
        nm = parse_pattern(pattern)
        pattern = f"{nm[0]}:{nm[1]}" if nm else None
        if nm is not None:
            sparsity = 1.0 - nm[0] / nm[1]
        tid = trial_id(sparsity, batch, method if name_method else None,
                       pattern if name_pattern else None, rule if name_rule else None,
                       objective if name_objective else None)
        if tid in seen:
            continue
        seen.add(tid)
        plans.append(
            TrialPlan(
                trial_id=tid,
                sparsity=float(sparsity),
                batch_size=int(batch),
                method=method,
                pattern=pattern,
                lr=scaled_lr(cfg.train.base_lr, batch, cfg.train.lr_rule),
                steps_per_epoch=steps_per_epoch(cfg.train.base_samples, batch),
                num_epochs=cfg.train.num_epochs,
                workers=cfg.resources.workers,
                grad_accum=grad_accum_steps(batch, cfg.resources.workers, cfg.train.micro_batch_size),
                layerwise=rule,
                distill=objective,
            )
        )
    return plans


def recipe_text(p: TrialPlan) -> str:
    """``magnitude``, ``wanda 2:4``, ``sparsegpt owl +squarehead``: how a trial is pruned and
    what it recovers with, when that is not the default."""
    return " ".join(x for x in (p.method, p.pattern, None if p.layerwise == "uniform" else p.layerwise,
                                None if p.distill == "none" else f"+{p.distill}") if x)


def format_plan(plans: list[TrialPlan]) -> str:
    tid_w = max([24] + [len(p.trial_id) for p in plans])
    rec_w = max([10] + [len(recipe_text(p)) for p in plans])
    header = (f"{'trial':<{tid_w}} {'method':<{rec_w}} {'sparsity':>8} {'batch':>5} {'steps/ep':>8} "
              f"{'epochs':>6} {'lr':>10} {'workers':>7} {'accum':>5}")
    rows = [header, "-" * len(header)]
    for p in plans:
        rows.append(
            f"{p.trial_id:<{tid_w}} {recipe_text(p):<{rec_w}} {p.sparsity:>8.3f} {p.batch_size:>5} "
            f"{p.steps_per_epoch:>8} {p.num_epochs:>6} {p.lr:>10.3e} {p.workers:>7} {p.grad_accum:>5}"
        )
    return "\n".join(rows)


# Checkpoint keys that change only how the state is written: a resume restores either format.
CHECKPOINT_HOW = ("format", "async", "background_staging")


def grid_fingerprint(cfg: SweepConfig) -> str:
    """What must not change between a sweep and its resume: everything that changes which
    trials exist or what a trial computes. Names, resources and logging may change."""
    d = _non_default(to_dict(cfg), to_dict(SweepConfig()))
    for volatile in ("name", "resources", "loggers", "failure"):
        d.pop(volatile, None)
    checkpoint = d.pop("checkpoint", {})
    for how in CHECKPOINT_HOW:  # how a checkpoint is written, not what it restores
        checkpoint.pop(how, None)
    if checkpoint:
        d["checkpoint"] = checkpoint
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _non_default(values: dict, defaults: dict) -> dict:
    """The keys whose values differ from the defaults: a key added in a later version, at its
    default, leaves the fingerprint of an existing sweep unchanged."""
    out = {}
    for key, value in values.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _non_default(value, default)
            if nested:
                out[key] = nested
        elif value != default:
            out[key] = value
    return out


def trial_threads(cfg: SweepConfig) -> int:
    """Torch threads per worker: ``resources.torch_threads``, else the worker's whole CPUs."""
    r = cfg.resources
    return r.torch_threads or max(1, math.floor(r.cpus_per_worker))


def build_specs(cfg: SweepConfig, plans: list[TrialPlan], layout: SweepLayout,
                prepared: Callable[[str], Prepared]) -> dict[str, TrialSpec]:
    """One frozen ``TrialSpec`` per trial: its plan, its prepared files (``prepared(trial_id)``),
    the config sections its workers read, and where it logs and exports."""
    threads = trial_threads(cfg)
    return {
        p.trial_id: TrialSpec(
            plan=p,
            prepared=prepared(p.trial_id),
            train=cfg.train,
            checkpoint=cfg.checkpoint,
            early_stop=cfg.early_stop,
            seq_len=cfg.data.seq_len,
            eval_batch_size=cfg.eval.batch_size,
            threads=threads,
            log_path=str(layout.trial_log(p.trial_id)),
            progress_path=str(layout.progress(p.trial_id)),
            export_dir=str(layout.export(p.trial_id)) if cfg.checkpoint.export_best else None,
            tasks=cfg.eval.tasks if cfg.eval.tasks.names else None,
            tasks_every=cfg.eval.tasks_every,
            tasks_cwd=os.getcwd() if cfg.eval.tasks.names else None,
        )
        for p in plans
    }
