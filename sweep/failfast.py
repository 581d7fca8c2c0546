"""Fail fast, fail clean: what ``sweep run`` / ``sweep resume`` check, and where.

Input problems end the sweep with exit 2 and a message naming the key or path
(``ConfigError``), never a hang or a Ray traceback:

- before Ray starts and before anything is written (``check_before_ray``): the storage is a
  writable directory, the texts exist, decode and hold one window, the model type is known
  (``sweep.preflight``), and, on the embedded cluster, one trial fits this machine: GPUs,
  cores within ``resources.oversubscription``, memory (``sweep.feasibility``);
- right after connecting to an existing cluster (``check_existing_cluster``): a trial that no
  node set can hold is refused when the cluster cannot grow, and the wait for one trial's
  resources is bounded by ``resources.placement_timeout_s``;
- during preparation (a Ray task), what only reading the data or the model shows: the task
  raises a ``ConfigError`` (``sweep.preflight.input_error``), turned back into one here
  (``prep_error``).

A sweep directory whose trials never started is not a sweep yet (``never_started``): a
corrected config replaces its setup (``clear_setup``) instead of being refused. Attempt
numbers of the driver lease fence what older drivers' workers write (``fence_specs``,
``taken_over``; trainers/fence.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sweep.config import ConfigError, SweepConfig
from sweep.feasibility import (
    ModelShape,
    PlacementTimeout,
    check_cluster,
    check_embedded,
    describe_request,
    fits_at_once,
    model_shape,
    trial_request,
    wait_for_placement,
)
from sweep.layout import SweepLayout
from sweep.preflight import (
    check_lengths,
    check_model_type,
    check_storage_dir,
    check_text,
    sequential_sets,
)
from trainers.fence import newest_attempt
from trainers.spec import TrialPlan, TrialSpec
from trainers.storage import Store

REFUSED = "cannot run the sweep"


# ---------------------------------------------------------------------------------------------
# Before Ray starts


@dataclass(frozen=True)
class Machine:
    """What the embedded cluster can ever offer: this machine."""

    cpus: int
    gpus: int
    memory_bytes: float
    gpu_memory_bytes: float | None = None

    @classmethod
    def here(cls) -> Machine:
        """Cores as the embedded cluster counts them (``os.cpu_count``), the GPUs torch sees
        (``CUDA_VISIBLE_DEVICES`` applied, as Ray applies it), total memory."""
        import psutil
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu_mem = torch.cuda.get_device_properties(0).total_memory if gpus else None
        return cls(os.cpu_count() or 1, gpus, float(psutil.virtual_memory().total), gpu_mem)


def is_embedded(address: str | None) -> bool:
    """True when the sweep will start its own local cluster (``sweep.cluster.start_ray``): no
    address, no ``RAY_ADDRESS``, and this process is not connected to Ray already. Asked
    without importing Ray."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return False
    return not (address or os.environ.get("RAY_ADDRESS"))


def input_problems(cfg: SweepConfig, store: Store, sweep_dir: Path) -> list[str]:
    """Every input problem found by reading the inputs, without Ray: storage, model type,
    texts, and their lengths in tokens (``sweep.preflight``)."""
    problems: list[str] = []
    if store.remote is None:  # a URI is checked by Store.check (exit 2 as well)
        problems += check_storage_dir(store.local, "--storage")
        if not problems:
            problems += check_storage_dir(sweep_dir, f"SWEEP_DIR (--storage/--name {cfg.name})")
    model_ok = True
    if cfg.model.config is not None and cfg.model.config.get("model_type"):
        found = check_model_type(dict(cfg.model.config), "model.config")
        problems += found
        model_ok = not found
    texts = [(cfg.data.train, "data.train")]
    texts += [(es.text, key) for es, key, _ in sequential_sets(cfg)]
    calibration = getattr(getattr(cfg.prune, "calibration", None), "text", None)
    if calibration is not None:
        texts.append((calibration, "prune.calibration.text"))
    text_problems = [p for src, key in texts for p in check_text(src, key)]
    problems += text_problems
    if model_ok and not text_problems:
        problems += check_lengths(cfg)
    return problems


def resource_problems(cfg: SweepConfig, machine: Machine, shape: ModelShape | None) -> list[str]:
    """One trial against this machine, for the embedded cluster (``check_embedded``)."""
    return check_embedded(cfg, machine.cpus, machine.gpus, machine.memory_bytes,
                          cfg.resources.oversubscription, shape=shape,
                          gpu_memory_bytes=machine.gpu_memory_bytes)


def check_before_ray(cfg: SweepConfig, store: Store, sweep_dir: Path, address: str | None) -> None:
    """All input and (embedded cluster) resource problems at once, as one ``ConfigError``."""
    problems = input_problems(cfg, store, sweep_dir)
    if is_embedded(address):
        problems += resource_problems(cfg, Machine.here(), model_shape(cfg, _cache(store)))
    if problems:
        raise ConfigError(problems)


def _cache(store: Store) -> Path:
    """The sweep's model cache (as ``sweep.runner`` passes it to preparation)."""
    return store.local / ".cache" / "models"


def dry_run(cfg: SweepConfig, plans: list[TrialPlan], store: Store, sweep_dir: Path,
            address: str | None, out: Callable[[str], None] = print) -> None:
    """``sweep run --dry-run`` after the plan: each trial's resource request and whether this
    machine (embedded) or the cluster at ``address`` can hold it; then every problem a run
    would stop on before starting trials, as a ``ConfigError``."""
    problems = input_problems(cfg, store, sweep_dir)
    if is_embedded(address):
        machine, shape = Machine.here(), model_shape(cfg, _cache(store))
        out(describe_request(cfg, machine.cpus, machine.gpus, len(plans),
                             memory_bytes=machine.memory_bytes, shape=shape))
        problems += resource_problems(cfg, machine, shape)
    else:
        line, found = _cluster_request(cfg, len(plans), address)
        out(line)
        problems += found
    if problems:
        raise ConfigError(problems)


def _cluster_request(cfg: SweepConfig, n_trials: int, address: str | None) -> tuple[str, list[str]]:
    """The dry-run line for an existing cluster (connected for the look, unless this process
    already is), and the problems when no node set can ever hold a trial and it cannot grow."""
    import ray

    from sweep.ray_private import cluster_autoscales

    connected = ray.is_initialized()
    if not connected:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive", True)]
        grows = cluster_autoscales()
    finally:
        if not connected:
            ray.shutdown()
    req = trial_request(cfg)
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n["Resources"].items():
            if not k.startswith("node:"):
                totals[k] = totals.get(k, 0.0) + float(v)
    have = ", ".join(f"{v:g} {k}" for k, v in sorted(totals.items()) if k in ("CPU", "GPU")
                     or k in req.per_worker)
    problems = check_cluster(req, nodes)
    line = (f"each trial: {req.describe()}; this cluster: {len(nodes)} "
            f"node{'s' if len(nodes) != 1 else ''} ({have}): ")
    if not problems:
        return line + f"fits {min(fits_at_once(totals, req.total()), n_trials)} at once", []
    if grows is False:
        return line + "cannot hold one", problems
    return (line + "cannot hold one now; "
            + ("its autoscaler may add nodes" if grows else "unless nodes are added")
            + f", the run would wait up to resources.placement_timeout_s="
              f"{cfg.resources.placement_timeout_s:g} s"), []


# ---------------------------------------------------------------------------------------------
# After connecting to an existing cluster


def check_existing_cluster(cfg: SweepConfig, log: Callable[[str], None]) -> float:
    """Before preparing (itself a Ray task that could wait forever): refuse a trial that the
    cluster's nodes can never hold when its autoscaler cannot add any, then wait until one
    trial's resources are placed, at most ``resources.placement_timeout_s`` (printing what it
    waits for). Returns the seconds waited; raises ``ConfigError`` (exit 2)."""
    import ray

    from sweep.ray_private import cluster_autoscales

    req, timeout = trial_request(cfg), cfg.resources.placement_timeout_s
    problems = check_cluster(req, ray.nodes())
    if problems:
        grows = cluster_autoscales()
        if grows is False:
            raise ConfigError(problems + ["the cluster's autoscaler cannot add nodes"],
                              title=REFUSED)
        log(f"{problems[0]}\nwaiting up to resources.placement_timeout_s={timeout:g} s for "
            + ("the autoscaler to add nodes" if grows else "nodes to be added (an autoscaler)"))
    try:
        waited = wait_for_placement(req.bundles(), timeout, log=log)
    except PlacementTimeout as e:
        raise ConfigError([str(e), *problems], title=REFUSED) from None
    if waited >= 1:
        log(f"one trial's resources were placed after {waited:.0f} s")
    return waited


def prep_error(err: BaseException) -> ConfigError | None:
    """The input problem behind a failed preparation task (``ray.exceptions.RayTaskError``):
    its ``ConfigError`` (``sweep.preflight.input_error``), or a ``ValueError``/``OSError``
    raised outside those sections, as a ``ConfigError``; None for anything else (a bug keeps
    its traceback)."""
    cause = getattr(err, "cause", err)
    title = "invalid input, found while preparing the sweep"
    if isinstance(cause, ConfigError):
        return ConfigError(cause.problems, cause.source, title=title)
    if isinstance(cause, (ValueError, OSError)):
        return ConfigError([f"{type(cause).__name__}: {cause}"], title=title)
    return None


# ---------------------------------------------------------------------------------------------
# A sweep directory that never ran a trial


def never_started(store: Store | None, sweep_dir: Path) -> bool:
    """No trial of the sweep in ``sweep_dir`` ever started: no epochs row, no trial past
    'pending', no Ray Train run directory and no export (a failed preparation leaves only
    ``sweep.yaml``, logs and perhaps part of ``prep/``). Results are read locally (a URI
    store's were pulled); run and export directories are looked up in the store."""
    from sweep.results import EPOCHS_FILE, TRIALS_FILE, read_rows

    layout = SweepLayout.of(sweep_dir)
    if read_rows(layout.results / EPOCHS_FILE):
        return False
    if any(r.get("status") not in (None, "pending") for r in read_rows(layout.results / TRIALS_FILE)):
        return False
    exists = store.exists if store is not None else Path.exists
    return not (exists(layout.train) or exists(layout.exports))


def clear_setup(store: Store | None, sweep_dir: Path) -> list[str]:
    """Remove what a never-started sweep prepared for its old setup (``prep/``, ``tune/``,
    ``results/``, ``train/``, ``export/``) here and in a URI store, so the replacing config
    recomputes them; logs and the lease records stay. Returns what was removed."""
    layout = SweepLayout.of(sweep_dir)
    removed = []
    for path in (layout.prep, layout.tune, layout.results, layout.train, layout.exports):
        rel = store.rel(path) if store is not None and store.remote else None
        there = path.exists() or (rel is not None and store.remote.kind(rel) is not None)
        if path.exists():
            shutil.rmtree(path)
        if rel is not None and store.remote.kind(rel) == "dir":
            store.remote.fs.delete_dir(store.remote.path(rel))
        if there:
            removed.append(path.name)
    return removed


# ---------------------------------------------------------------------------------------------
# Fencing older attempts


def fence_specs(specs: dict[str, TrialSpec], attempt: int, layout: SweepLayout) -> dict[str, TrialSpec]:
    """The specs with this driver's attempt and the claims directory their workers check
    before every write (trainers/fence.py)."""
    return {tid: dataclasses.replace(s, attempt=attempt, attempts_dir=str(layout.attempts))
            for tid, s in specs.items()}


def taken_over(lease, store: Store, layout: SweepLayout) -> ConfigError | None:
    """When this driver's lease was lost or a newer attempt runs the sweep: the message it
    stops with (its trials were stopped and it wrote nothing after noticing)."""
    if lease is None:
        return None
    if lease.lost.is_set():
        reason = lease.lost_reason
    else:
        newest = newest_attempt(layout.attempts, store)
        if newest <= lease.attempt:
            return None
        reason = f"driver attempt {newest} took the sweep over"
    return ConfigError([f"{store.display(layout.root)}: {reason}; this driver (attempt "
                        f"{lease.attempt}) stopped its trials and wrote nothing more"],
                       title="the sweep was taken over")
