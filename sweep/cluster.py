"""The Ray cluster a sweep runs on: connect or start one, and what one trial asks of it.

An embedded local cluster is started when no address is given; it gets the machine's cores plus
one logical CPU for the trial drivers, which hold a sliver (``resources.driver_cpus``) each so
they never starve the workers (docs/design.md, "The resource deadlock").
"""

from __future__ import annotations

import math
import os

import ray

from sweep.config import ResourcesConfig, SweepConfig


class ClusterTooSmall(RuntimeError):
    pass


def trial_resources(cfg: SweepConfig) -> dict[str, float]:
    """One trial's whole request: its workers and its driver."""
    r = cfg.resources
    res = {"CPU": r.workers * r.cpus_per_worker + r.driver_cpus}
    if r.gpus_per_worker:
        res["GPU"] = r.workers * r.gpus_per_worker
    for name, amount in (r.custom_per_worker or {}).items():
        res[name] = r.workers * amount
    return res


def worker_resources(r: ResourcesConfig) -> dict[str, float]:
    """One Ray Train worker's request."""
    per_worker = {"CPU": r.cpus_per_worker, **(r.custom_per_worker or {})}
    if r.gpus_per_worker:
        per_worker["GPU"] = r.gpus_per_worker
    return per_worker


def max_concurrent_trials(
    cluster: dict[str, float], need: dict[str, float], n_trials: int, cap: int | None = None
) -> int:
    """How many trials fit at once, each fully placed (driver and all its workers)."""
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ClusterTooSmall(f"one trial needs {need}, the cluster has {have}")
    n = min(fits, n_trials)
    return min(n, cap) if cap else n


def local_cluster_cpus(cfg: SweepConfig) -> int:
    """Logical CPUs for the embedded cluster: the machine's cores (at least one trial's
    workers), plus one logical CPU that holds the trial drivers (0.01 each)."""
    r = cfg.resources
    return max(os.cpu_count() or 1, math.ceil(r.workers * r.cpus_per_worker)) + 1


def start_ray(cfg: SweepConfig, address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start an embedded local cluster.
    Returns True when this process started the cluster (and must shut it down)."""
    if ray.is_initialized():  # a caller (a notebook, a test) already connected
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # No runtime_env here: inside `ray job submit --working-dir .` the job's own runtime
        # environment (which ships this project to every node) must stay in force.
        ray.init(address=address, log_to_driver=True)
        return False
    env = {
        "env_vars": {
            "TOKENIZERS_PARALLELISM": "false",
            # The Train controller polls its workers at this interval; the default (2 s) adds
            # seconds to the end of every trial (README, Benchmarks: the empty fit() row).
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"
            ),
            # Ray Train replaces a worker's print() with one that writes to stdout AND logs to
            # the root logger, whose console handler prints it again: every trial line twice
            # in Ray's output. The console reads the trial logs instead (sweep.console).
            "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
        }
    }
    # include_dashboard left at its default: Ray's placement-group cleaner needs the State API
    # to free a stopped trial's workers (docs/design.md, "The placement-group leak").
    # address="local": never attach to a cluster some other `ray start` left on this machine.
    # log_to_driver: the workers' output reaches this process, whose stdout and stderr point at
    # SWEEP_DIR/logs/ray.log while the sweep runs (sweep.console.Capture; --verbose: the console).
    ray.init(address="local", num_cpus=local_cluster_cpus(cfg), runtime_env=env, log_to_driver=True)
    return True
