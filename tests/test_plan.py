"""Step rules and the trial plan, table-driven: steps per epoch, learning rate, warmup,
gradient accumulation, trial naming, expansion, fingerprint, and how many trials fit."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sweep.cluster import ClusterTooSmall, max_concurrent_trials, trial_resources
from sweep.config import (
    FailureConfig,
    GridConfig,
    ModelConfig,
    PruneConfig,
    ResourcesConfig,
    SweepConfig,
    TrainConfig,
)
from sweep.plan import (
    expand,
    format_plan,
    grad_accum_steps,
    grid_fingerprint,
    scaled_lr,
    steps_per_epoch,
    trial_id,
)
from trainers.step import lr_at

MODEL = ModelConfig(config={"model_type": "llama"}, tokenizer="byte")


def make_cfg(**sections) -> SweepConfig:
    return SweepConfig(model=MODEL, **sections)


# ---------------------------------------------------------------------------------------------
# Batch-size rule (the contract's numbers)


@pytest.mark.parametrize(
    "batch, steps, lr",
    [(1, 10000, 5e-6), (2, 5000, 5e-6 * math.sqrt(2)), (4, 2500, 1e-5), (8, 1250, 1.414e-5)],
)
def test_contract_batch_rule(batch, steps, lr):
    assert steps_per_epoch(10000, batch) == steps
    assert scaled_lr(5e-6, batch) == pytest.approx(lr, rel=1e-3)


@pytest.mark.parametrize(
    "base_samples, batch, steps", [(10000, 3, 3334), (16, 3, 6), (6, 4, 2), (5, 8, 1), (1, 1, 1)]
)
def test_steps_per_epoch_rounds_up(base_samples, batch, steps):
    assert steps_per_epoch(base_samples, batch) == steps


@pytest.mark.parametrize("base_samples, batch", [(0, 1), (10, 0), (10, -2)])
def test_steps_per_epoch_rejects_nonpositive(base_samples, batch):
    with pytest.raises(ValueError):
        steps_per_epoch(base_samples, batch)


@pytest.mark.parametrize(
    "rule, batch, lr",
    [
        ("sqrt", 16, 4e-6),
        ("linear", 1, 1e-6),
        ("linear", 8, 8e-6),
        ("constant", 1, 1e-6),
        ("constant", 64, 1e-6),
    ],
)
def test_lr_rules(rule, batch, lr):
    assert scaled_lr(1e-6, batch, rule) == pytest.approx(lr)


def test_unknown_lr_rule():
    with pytest.raises(ValueError, match="cubic"):
        scaled_lr(1e-6, 4, "cubic")


@pytest.mark.parametrize(
    "step, total, frac, lr",
    [
        (0, 100, 0.0, 1.0),  # no warmup
        (99, 100, 0.0, 1.0),
        (0, 100, 0.1, 0.1),  # 10 warmup steps: 1/10, 2/10, ... 10/10
        (4, 100, 0.1, 0.5),
        (9, 100, 0.1, 1.0),
        (10, 100, 0.1, 1.0),
        (99, 100, 0.1, 1.0),
        (0, 5, 0.1, 1.0),  # int(0.5) = 0 warmup steps
    ],
)
def test_lr_at_warmup(step, total, frac, lr):
    assert lr_at(step, 1.0, total, frac) == pytest.approx(lr)


def test_lr_at_warmup_never_exceeds_peak_and_is_monotone():
    lrs = [lr_at(s, 2e-5, 50, 0.3) for s in range(50)]
    assert max(lrs) == pytest.approx(2e-5)
    assert all(a <= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


# ---------------------------------------------------------------------------------------------
# Gradient accumulation


@pytest.mark.parametrize(
    "batch, workers, micro, accum",
    [
        (8, 1, None, 1),  # whole share in one pass
        (8, 2, None, 1),
        (8, 1, 8, 1),
        (8, 1, 16, 1),  # micro larger than the share
        (8, 1, 2, 4),
        (8, 2, 2, 2),
        (8, 4, 1, 2),
        (10, 2, 2, 3),  # share 5 in passes of at most 2
        (1, 1, 1, 1),
    ],
)
def test_grad_accum_steps(batch, workers, micro, accum):
    assert grad_accum_steps(batch, workers, micro) == accum


@pytest.mark.parametrize("batch, workers", [(3, 2), (6, 4), (1, 2)])
def test_grad_accum_rejects_indivisible_batch(batch, workers):
    with pytest.raises(ValueError, match=f"{batch}.*{workers}"):
        grad_accum_steps(batch, workers, None)


# ---------------------------------------------------------------------------------------------
# Trial naming


@pytest.mark.parametrize(
    "args, name",
    [
        ((0.5, 4), "s0.5-b4"),
        ((0.0, 1), "s0-b1"),
        ((0.25, 16), "s0.25-b16"),
        ((0.5, 4, "wanda"), "wanda-s0.5-b4"),
        ((0.5, 4, "wanda", "2:4"), "wanda-2of4-s0.5-b4"),
        ((0.5, 4, None, "4:8"), "4of8-s0.5-b4"),
        ((0.5, 4, "magnitude", "none"), "magnitude-s0.5-b4"),
    ],
)
def test_trial_id(args, name):
    assert trial_id(*args) == name


def test_trial_ids_unique_across_a_full_grid():
    cfg = make_cfg(
        grid=GridConfig(
            sparsity=(0.3, 0.5, 0.7),
            batch_size=(1, 2, 4),
            method=("magnitude", "wanda"),
            pattern=("none", "2:4", "4:8"),
        )
    )
    plans = expand(cfg)
    ids = [p.trial_id for p in plans]
    # Unstructured: method x sparsity x batch; an N:M pattern fixes the sparsity at 1 - N/M,
    # so its trials are method x pattern x batch.
    assert len(ids) == 2 * 3 * 3 + 2 * 2 * 3
    assert len(set(ids)) == len(ids)
    for p in plans:
        if p.pattern == "2:4":
            assert p.sparsity == 0.5
        if p.pattern == "4:8":
            assert p.sparsity == 0.5


def test_trial_ids_unique_for_close_sparsities():
    ids = [p.trial_id for p in expand(make_cfg(grid=GridConfig(sparsity=(0.1, 0.1000001))))]
    assert len(set(ids)) == 2


# ---------------------------------------------------------------------------------------------
# expand() and format_plan()


def test_expand_order_and_fields():
    cfg = make_cfg(
        train=TrainConfig(num_epochs=3, base_samples=16, base_lr=1e-3, micro_batch_size=1),
        grid=GridConfig(sparsity=(0.5, 0.8), batch_size=(2, 4)),
        resources=ResourcesConfig(workers=2),
    )
    plans = expand(cfg)
    assert [(p.sparsity, p.batch_size) for p in plans] == [(0.5, 2), (0.5, 4), (0.8, 2), (0.8, 4)]
    assert [p.trial_id for p in plans] == ["s0.5-b2", "s0.5-b4", "s0.8-b2", "s0.8-b4"]
    p = plans[1]
    assert (p.method, p.pattern) == ("magnitude", None)
    assert p.steps_per_epoch == 4
    assert p.lr == pytest.approx(2e-3)
    assert (p.num_epochs, p.workers, p.grad_accum) == (3, 2, 2)
    assert p.to_dict()["trial_id"] == "s0.5-b4"


def test_expand_method_and_pattern_axes_vary_slowest():
    cfg = make_cfg(
        grid=GridConfig(
            sparsity=(0.5,),
            batch_size=(1, 2),
            method=("magnitude", "wanda"),
            pattern=("none", "2:4"),
        )
    )
    assert [p.trial_id for p in expand(cfg)] == [
        "magnitude-s0.5-b1",
        "magnitude-s0.5-b2",
        "magnitude-2of4-s0.5-b1",
        "magnitude-2of4-s0.5-b2",
        "wanda-s0.5-b1",
        "wanda-s0.5-b2",
        "wanda-2of4-s0.5-b1",
        "wanda-2of4-s0.5-b2",
    ]
    assert [p.pattern for p in expand(cfg)][:4] == [None, None, "2:4", "2:4"]


def test_expand_uses_prune_section_without_grid_axes():
    cfg = make_cfg(prune=PruneConfig(method="wanda", pattern="2:4"))
    (p,) = expand(cfg)
    assert (p.method, p.pattern, p.trial_id) == ("wanda", "2:4", "2of4-s0.5-b1")


def test_format_plan_lists_every_trial():
    cfg = make_cfg(grid=GridConfig(sparsity=(0.3, 0.6), batch_size=(1, 8), method=("wanda",)))
    plans = expand(cfg)
    text = format_plan(plans)
    assert len(text.splitlines()) == 2 + len(plans)  # header, rule, one row per trial
    for p in plans:
        assert p.trial_id in text


# ---------------------------------------------------------------------------------------------
# Fingerprint: what resume must keep


def test_fingerprint_ignores_name_resources_loggers_failure():
    cfg = make_cfg()
    same = dataclasses.replace(
        cfg,
        name="other",
        resources=ResourcesConfig(workers=4, cpus_per_worker=2),
        loggers=("wandb",),
        failure=FailureConfig(worker_max_failures=5),
        # How checkpoints are written: a resume restores either format.
        checkpoint=dataclasses.replace(cfg.checkpoint, format="dense", async_=False),
    )
    assert grid_fingerprint(same) == grid_fingerprint(cfg)


@pytest.mark.parametrize(
    "change",
    [
        {"grid": GridConfig(sparsity=(0.5, 0.6))},
        {"grid": GridConfig(batch_size=(2,))},
        {"train": TrainConfig(base_lr=1e-5)},
        {"train": TrainConfig(num_epochs=2)},
        {"prune": PruneConfig(method="wanda")},
    ],
    ids=["sparsity", "batch", "base_lr", "epochs", "method"],
)
def test_fingerprint_changes_with_grid_or_training(change):
    cfg = make_cfg()
    assert grid_fingerprint(dataclasses.replace(cfg, **change)) != grid_fingerprint(cfg)


# ---------------------------------------------------------------------------------------------
# How many trials fit


@pytest.mark.parametrize(
    "cluster, need, n_trials, cap, n",
    [
        ({"CPU": 9}, {"CPU": 2.01}, 10, None, 4),
        ({"CPU": 9}, {"CPU": 2.01}, 3, None, 3),  # fewer trials than slots
        ({"CPU": 9}, {"CPU": 2.01}, 10, 2, 2),  # user cap
        ({"CPU": 9}, {"CPU": 2.01}, 10, 8, 4),  # cap above what fits
        ({"CPU": 3}, {"CPU": 1.01}, 4, None, 2),  # 3 / 1.01 floors to 2
        ({"CPU": 4.04}, {"CPU": 1.01}, 9, None, 4),  # exact fit despite float error
        ({"CPU": 32, "GPU": 2}, {"CPU": 2.01, "GPU": 1}, 8, None, 2),  # GPUs bind
        ({"CPU": 32, "GPU": 8}, {"CPU": 2.01, "GPU": 0}, 99, None, 15),  # zero need ignored
    ],
)
def test_max_concurrent_trials(cluster, need, n_trials, cap, n):
    assert max_concurrent_trials(cluster, need, n_trials, cap) == n


@pytest.mark.parametrize(
    "cluster, need",
    [({"CPU": 2}, {"CPU": 2.01}), ({"CPU": 16}, {"CPU": 1.01, "GPU": 1}), ({}, {"CPU": 1})],
)
def test_cluster_too_small(cluster, need):
    with pytest.raises(ClusterTooSmall, match="one trial needs"):
        max_concurrent_trials(cluster, need, 4)


@pytest.mark.parametrize(
    "resources, need",
    [
        (ResourcesConfig(), {"CPU": 1.01}),
        (ResourcesConfig(workers=2, cpus_per_worker=1), {"CPU": 2.01}),
        (ResourcesConfig(workers=2, cpus_per_worker=4, gpus_per_worker=1), {"CPU": 8.01, "GPU": 2}),
        (ResourcesConfig(workers=4, cpus_per_worker=0.5, driver_cpus=0.5), {"CPU": 2.5}),
    ],
)
def test_trial_resources(resources, need):
    got = trial_resources(make_cfg(resources=resources))
    assert got.keys() == need.keys()
    for k, v in need.items():
        assert got[k] == pytest.approx(v)
