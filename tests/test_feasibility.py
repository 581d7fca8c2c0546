"""Feasibility of one trial's request (sweep/feasibility.py), table-driven, no Ray cluster:
the embedded machine (GPUs, cores with over-subscription, custom resources, memory), the
dry-run line, an existing cluster's nodes (every placement strategy, the driver's sliver),
the memory estimate against its formula and the parameter count against a real model, and the
bounded wait for a placement group with an injected clock."""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest

from sweep.config import (
    DataConfig,
    EvalConfig,
    GridConfig,
    ModelConfig,
    ResourcesConfig,
    SweepConfig,
    TrainConfig,
    load_config,
)
from sweep.feasibility import (
    GIB,
    PROCESS_BYTES,
    ModelShape,
    PlacementTimeout,
    TrialRequest,
    check_cluster,
    check_embedded,
    describe_request,
    embedded_resources,
    estimate_memory,
    fits_at_once,
    model_shape,
    trial_request,
    wait_for_placement,
)

TINY_MODEL = ModelConfig(
    config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128},
    tokenizer="byte",
)


def cfg_with(workers=2, cpus=0.5, gpus=0.0, custom=None, threads=None, cap=None, batch=(2, 4),
             micro=None, seq_len=64, eval_batch=8, token_length=64) -> SweepConfig:
    return SweepConfig(
        model=TINY_MODEL,
        data=DataConfig(seq_len=seq_len),
        eval=EvalConfig(batch_size=eval_batch, token_length=token_length, stride=token_length),
        train=TrainConfig(micro_batch_size=micro),
        grid=GridConfig(batch_size=batch),
        resources=ResourcesConfig(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus,
                                  custom_per_worker=custom, torch_threads=threads,
                                  max_concurrent_trials=cap),
    )


# ---------------------------------------------------------------------------------------------
# The request, and agreement with what sweep.cluster asks Ray for


@pytest.mark.parametrize("kw", [
    {}, {"workers": 4, "cpus": 1.0, "gpus": 1.0},
    {"workers": 1, "cpus": 2.0, "custom": {"a100": 1}},
    {"workers": 3, "cpus": 0.25, "gpus": 0.5, "custom": {"x": 2}},
])
def test_trial_request_matches_sweep_cluster(kw):
    from sweep.cluster import local_cluster_cpus, trial_resources, worker_resources

    cfg = cfg_with(**kw)
    req = trial_request(cfg)
    assert req.total() == pytest.approx(trial_resources(cfg))
    assert req.per_worker == pytest.approx(worker_resources(cfg.resources))
    r = cfg.resources
    assert req.bundles() == [{"CPU": r.driver_cpus}] + [req.per_worker] * r.workers
    for cores in (1, 2, 16):  # the embedded cluster's logical CPUs, as start_ray computes them
        with mock.patch("os.cpu_count", return_value=cores):
            assert embedded_resources(cfg, cores, 0)["CPU"] == local_cluster_cpus(cfg)


@pytest.mark.parametrize("capacity, need, n", [
    ({"CPU": 3}, {"CPU": 1.01}, 2),
    ({"CPU": 3.03}, {"CPU": 1.01}, 3),  # exact multiples count despite float rounding
    ({"CPU": 8, "GPU": 2}, {"CPU": 1, "GPU": 1}, 2),
    ({"CPU": 8}, {"CPU": 1, "GPU": 1}, 0),
])
def test_fits_at_once(capacity, need, n):
    assert fits_at_once(capacity, need) == n


# ---------------------------------------------------------------------------------------------
# This machine


@pytest.mark.parametrize("kw, machine, expect", [
    ({}, (2, 0), []),
    ({"workers": 1, "cpus": 1.0, "gpus": 1.0}, (2, 0),
     ["resources.gpus_per_worker=1: this machine has no GPU"]),
    ({"workers": 4, "cpus": 1.0, "gpus": 1.0}, (16, 2),
     ["resources.workers x resources.gpus_per_worker = 4 x 1 = 4 GPUs per trial, this machine "
      "has 2"]),
    ({"workers": 4, "cpus": 1.0, "gpus": 0.5}, (16, 2), []),
    ({"workers": 8, "cpus": 1.0, "batch": (8,)}, (2, 0),
     ["resources.workers x resources.cpus_per_worker = 8 x 1 = 8 CPUs per trial, this machine "
      "has 2 cores (at most 2x over-subscribed: 4)"]),
    ({"workers": 4, "cpus": 1.0, "batch": (4,)}, (2, 0), []),  # 4 CPUs on 2 cores: 2x, allowed
    ({"workers": 8, "cpus": 0.25, "batch": (8,)}, (2, 0),
     ["resources.workers=8 worker processes x 1 torch threads (resources.torch_threads) = 8 "
      "threads per trial on 2 cores"]),
    ({"workers": 2, "cpus": 0.5, "threads": 4}, (2, 0), ["= 8 threads per trial on 2 cores"]),
    ({"custom": {"a100": 1}}, (2, 0),
     ["resources.custom_per_worker.a100: the embedded cluster has no resource 'a100'"]),
])
def test_check_embedded_resources(kw, machine, expect):
    problems = check_embedded(cfg_with(**kw), *machine, memory_bytes=64 * GIB)
    assert len(problems) == len(expect), problems
    for p, e in zip(problems, expect, strict=True):
        assert e in p, (e, p)


@pytest.mark.parametrize("oversubscription, n", [(2.0, 0), (1.5, 0), (1.4, 1), (1.0, 1)])
def test_oversubscription_limit(oversubscription, n):
    cfg = cfg_with(workers=3, cpus=1.0, batch=(3,))  # 3 CPUs on 2 cores
    assert len(check_embedded(cfg, 2, 0, 64 * GIB, oversubscription)) == n


def expected_estimate(shape: ModelShape, workers, micro, seq_len, eval_batch, token_length, gpu):
    """The documented formula, written out independently of the module."""
    act_per = 34 * (1 if gpu else 2)
    train = micro * seq_len * (shape.layers * shape.hidden * act_per + 12 * shape.vocab)
    evaluation = 4 * shape.vocab * token_length * (eval_batch + 2)
    load, state = 5 * shape.params, math.ceil(16 * shape.params / workers)
    device = state + max(train, evaluation)
    host = PROCESS_BYTES + (load if gpu else max(load, device))
    return host, device


BIG = ModelShape(params=1_000_000_000, hidden=2048, layers=24, vocab=50_000)


@pytest.mark.parametrize("kw, micro", [
    ({"workers": 1, "cpus": 1.0, "batch": (1, 2)}, 2),
    ({"workers": 2, "cpus": 1.0, "batch": (2, 8)}, 4),
    ({"workers": 2, "cpus": 1.0, "batch": (8,), "micro": 1}, 1),
    ({"workers": 4, "cpus": 1.0, "gpus": 1.0, "batch": (8,), "seq_len": 2048,
      "token_length": 2048, "eval_batch": 1}, 2),
])
def test_memory_estimate_is_the_documented_formula(kw, micro):
    cfg = cfg_with(**kw)
    est = estimate_memory(cfg, BIG)
    host, device = expected_estimate(BIG, cfg.resources.workers, micro, cfg.data.seq_len,
                                     cfg.eval.batch_size, cfg.eval.token_length,
                                     cfg.resources.gpus_per_worker > 0)
    assert (est.host, est.device) == (host, device)
    assert est.train_tokens == micro * cfg.data.seq_len


@pytest.mark.parametrize("workers, memory_gib, fits", [(1, 8, False), (1, 64, True),
                                                        (4, 64, True), (4, 16, False)])
def test_memory_check(workers, memory_gib, fits):
    cfg = cfg_with(workers=workers, cpus=0.5, batch=(4,))
    problems = check_embedded(cfg, 2, 0, memory_gib * GIB, shape=BIG)
    host, _ = expected_estimate(BIG, workers, 4 // workers, 64, 8, 64, False)
    assert host * workers <= memory_gib * GIB if fits else host * workers > memory_gib * GIB
    assert problems == [] if fits else len(problems) == 1
    if not fits:
        msg = problems[0]
        assert f"need at least {host * workers / GIB:.1f} GiB" in msg
        assert f"{host / GIB:.2f} GiB each" in msg and f"has {memory_gib:.1f} GiB" in msg
        assert "1000.0M parameters" in msg and "resources.workers" in msg


def test_gpu_memory_check():
    cfg = cfg_with(workers=1, cpus=1.0, gpus=1.0, batch=(1,), seq_len=2048, token_length=2048,
                   eval_batch=1)
    _, device = expected_estimate(BIG, 1, 1, 2048, 1, 2048, True)
    assert not check_embedded(cfg, 8, 1, 256 * GIB, shape=BIG, gpu_memory_bytes=device + 1)
    (p,) = check_embedded(cfg, 8, 1, 256 * GIB, shape=BIG, gpu_memory_bytes=device - 1)
    assert p.startswith(f"GPU memory: each worker needs at least {device / GIB:.1f} GiB")


def test_model_shape_counts_the_real_model():
    from trainers.model import build_model

    cfg = cfg_with()
    shape = model_shape(cfg)
    model = build_model(cfg.model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.layers, shape.vocab) == (64, 2, model.config.vocab_size)
    # The README measured FSDP2 state per worker of this model on 2 workers: 0.82 MiB.
    assert estimate_memory(cfg, shape).state / 2**20 == pytest.approx(0.82, abs=0.005)
    hub_only = dataclasses.replace(cfg, model=ModelConfig(name_or_path="org/not-local"))
    assert model_shape(hub_only) is None


# ---------------------------------------------------------------------------------------------
# The dry-run line


@pytest.mark.parametrize("kw, machine, n_trials, expect", [
    ({}, (2, 0), 4,
     "each trial: 2 workers x (0.5 CPU) + driver 0.01 CPU; this machine: 2 cores, no GPU: "
     "fits 2 at once"),
    ({}, (2, 0), 1, "fits 1 at once"),
    ({"cap": 1}, (2, 0), 4, "fits 2 at once, 1 by resources.max_concurrent_trials"),
    ({"workers": 2, "cpus": 1.0, "gpus": 1.0}, (16, 4), 8,
     "each trial: 2 workers x (1 CPU, 1 GPU) + driver 0.01 CPU; this machine: 16 cores, "
     "4 GPUs: fits 2 at once"),
    ({"workers": 1, "cpus": 1.0, "gpus": 1.0}, (2, 0), 4, "no GPU: does not fit"),
])
def test_describe_request(kw, machine, n_trials, expect):
    assert expect in describe_request(cfg_with(**kw), *machine, n_trials)


def test_describe_request_shipped_tiny_config():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    shape = model_shape(cfg)
    line = describe_request(cfg, 2, 0, 4, memory_bytes=24 * GIB, shape=shape)
    assert line.startswith("each trial: 2 workers x (0.5 CPU) + driver 0.01 CPU; this machine: "
                           "2 cores, no GPU: fits 2 at once; memory: at least ")
    assert f"{shape.params / 1e6:.1f}M parameters" in line and "of 24.0 GiB" in line
    assert check_embedded(cfg, 2, 0, 24 * GIB, shape=shape) == []


# ---------------------------------------------------------------------------------------------
# An existing cluster


W_GPU = {"CPU": 1.0, "GPU": 1.0}
DRIVER = {"CPU": 0.01}


@pytest.mark.parametrize("workers, per_worker, nodes, strategy, expect", [
    (3, W_GPU, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], "PACK", None),
    (3, W_GPU, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], "SPREAD", None),
    (3, W_GPU, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], "STRICT_PACK", "holds 2 workers"),
    (2, W_GPU, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], "STRICT_PACK", None),
    (3, W_GPU, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], "STRICT_SPREAD", "2 nodes"),
    (4, W_GPU, [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], "PACK",
     "node 0 (8 CPU, 2 GPU) holds 2 workers; node 1 (8 CPU, 1 GPU) holds 1 worker"),
    # The driver's sliver must fit beside the workers: two 1-CPU workers fill a 2-CPU node.
    (2, {"CPU": 1.0}, [{"CPU": 2}], "PACK", "driver 0.01 CPU"),
    (2, {"CPU": 1.0}, [{"CPU": 2}, {"CPU": 0.5}], "PACK", None),
    (2, {"CPU": 1.0}, [{"CPU": 2.01}], "STRICT_PACK", None),
    (1, {"CPU": 1.0, "a100": 1.0}, [{"CPU": 8, "GPU": 1}], "PACK",
     "resources.custom_per_worker.a100=1: no node of the cluster has 'a100' "
     "(nodes have: CPU, GPU)"),
    (1, W_GPU, [{"CPU": 64}], "PACK", "resources.gpus_per_worker=1: no node of the cluster has"),
])
def test_check_cluster(workers, per_worker, nodes, strategy, expect):
    problems = check_cluster(TrialRequest(workers, per_worker, DRIVER), nodes, strategy)
    if expect is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expect in problems[0], problems


def test_check_cluster_reads_ray_nodes_and_skips_dead_ones():
    nodes = [
        {"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1",
         "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 1e10, "node:10.0.0.1": 1.0}},
        {"NodeID": "b" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.2",
         "Resources": {"CPU": 8.0, "GPU": 8.0}},
    ]
    (p,) = check_cluster(TrialRequest(2, W_GPU, DRIVER), nodes)
    assert "10.0.0.1 (8 CPU, 1 GPU) holds 1 worker" in p and "1 node " in p
    assert "resources.cpus_per_worker or resources.gpus_per_worker" in p
    assert check_cluster(TrialRequest(1, W_GPU, DRIVER), nodes) == []


# ---------------------------------------------------------------------------------------------
# Bounded wait for a placement group (injected: no cluster)


class FakeCluster:
    """A placement group that becomes ready at ``ready_at`` seconds of a fake clock, which
    advances only while ``wait`` blocks (as Ray's does)."""

    def __init__(self, ready_at: float | None):
        self.now, self.ready_at = 1000.0, ready_at
        self.waits, self.created, self.removed = [], [], []

    def clock(self):
        return self.now

    def create(self, bundles, strategy):
        self.created.append((bundles, strategy))
        return self

    def wait(self, timeout_seconds):
        assert isinstance(timeout_seconds, int)  # Ray's wait takes whole seconds
        self.waits.append(timeout_seconds)
        start = self.now
        if self.ready_at is not None and start + timeout_seconds >= 1000.0 + self.ready_at:
            self.now = max(start, 1000.0 + self.ready_at)
            return True
        self.now = start + timeout_seconds
        return False


@pytest.mark.parametrize("ready_at, timeout_s, waits, result", [
    (0.0, 60, [10], 0.0),
    (25.0, 60, [10, 10, 10], 25.0),
    (None, 25, [10, 10, 5], PlacementTimeout),
    (None, 0.5, [1], PlacementTimeout),
])
def test_wait_for_placement(ready_at, timeout_s, waits, result):
    fake = FakeCluster(ready_at)
    logs = []
    bundles = trial_request(cfg_with()).bundles()
    kwargs = dict(poll_s=10, log=logs.append, create=fake.create, remove=fake.removed.append,
                  available=lambda: {"CPU": 0.5, "node:10.0.0.1": 1.0}, clock=fake.clock)
    if result is PlacementTimeout:
        with pytest.raises(PlacementTimeout) as err:
            wait_for_placement(bundles, timeout_s, **kwargs)
        msg = str(err.value)
        assert f"resources.placement_timeout_s={timeout_s:g}" in msg
        assert "free now: 0.5 CPU" in msg and "node:" not in msg
    else:
        assert wait_for_placement(bundles, timeout_s, **kwargs) == result
    assert fake.waits == waits
    assert fake.created == [(bundles, "PACK")] and fake.removed == [fake]  # always released
    assert len(logs) == len(waits) - (0 if result is PlacementTimeout else 1)
    assert all("placement_timeout_s" in line for line in logs)
