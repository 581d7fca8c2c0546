"""``sweep run`` / ``sweep resume`` end to end: validate, plan, prepare, run the grid, summarize.

Nothing is started or written before the config is valid. SWEEP_DIR holds everything
(``sweep.layout``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from sweep import failfast
from sweep.config import (
    ConfigError,
    SweepConfig,
    apply_overrides,
    from_dict,
    load_config_dict,
    to_dict,
    yaml_load,
)
from sweep.estimate import disk_line, estimate, format_estimate
from sweep.layout import SweepLayout
from sweep.lease import Lease, acquire
from sweep.plan import build_specs, expand, format_plan, grid_fingerprint
from sweep.results import END_STATUSES
from trainers.files import write_json, write_text
from trainers.storage import Remote, Store, is_uri


class SweepLog:
    """The sweep's own log: printed, and appended to SWEEP_DIR/logs/sweep.log (pushed to the
    store after every message when it is a URI)."""

    def __init__(self, sweep_dir: Path | None, store: Store | None = None):
        self.path = SweepLayout.of(sweep_dir).sweep_log if sweep_dir else None
        self.store = store
        self.out = None  # while the sweep runs: the console (sweep.console.RunConsole.print)

    def __call__(self, text: str) -> None:
        if self.out is not None:
            self.out(text)
        else:
            print(text, flush=True)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.path, "a") as f:
                for line in text.splitlines():
                    f.write(f"{stamp} {line}\n")
            if self.store:
                self.store.push(self.path)


def check_resume_compatible(cfg: SweepConfig, sweep_dir: Path,
                            store: Store | None = None) -> list[str] | None:
    """A sweep directory may only be continued with a config that gives the same grid, unless
    none of its trials ever started (a failed preparation, say): then the new config replaces
    the old setup, and the changed keys are returned (None: nothing to replace)."""
    layout = SweepLayout.of(sweep_dir)
    if not layout.state_file.exists():
        return None
    old = json.loads(layout.state_file.read_text())
    if old.get("fingerprint") != grid_fingerprint(cfg):
        old_cfg = yaml_load(layout.config_file.read_text()) if layout.config_file.exists() else {}
        new_cfg = to_dict(cfg)
        changed = sorted(_diff_keys(old_cfg, new_cfg))
        changed = [k for k in changed if k.split(".")[0] not in ("name", "resources", "loggers", "failure")]
        if failfast.never_started(store, sweep_dir):
            return changed
        raise ConfigError(
            [
                f"{sweep_dir} holds a sweep with a different grid or training setup "
                f"(changed: {', '.join(changed) or 'unknown'}); resume it with its own config "
                f"(`sweep resume {sweep_dir}`) or choose another --name"
            ]
        )
    return None


def _diff_keys(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def write_sweep_state(cfg: SweepConfig, sweep_dir: Path, store: Store | None = None) -> None:
    layout = SweepLayout.of(sweep_dir)
    write_text(layout.config_file, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json(layout.state_file, {"fingerprint": grid_fingerprint(cfg), "name": cfg.name})
    if store:
        store.push(layout.config_file, layout.state_file)


def sync_from_store(store: Store, sweep_dir: Path) -> None:
    """For a URI store, the store is the truth: a staging copy of a sweep the store does not
    hold (a deleted bucket prefix, an old test) is discarded, else refreshed from the store."""
    if not store.remote:
        return
    layout = SweepLayout.of(sweep_dir)
    if not store.exists(layout.state_file):
        shutil.rmtree(sweep_dir, ignore_errors=True)
        return
    # Its state, its results and its logs; prep/ and the exports are pulled only where needed.
    for path in (layout.config_file, layout.state_file, layout.results, layout.logs):
        store.pull(path)


def load_sweep_config(sweep_dir: Path) -> SweepConfig:
    path = SweepLayout.of(sweep_dir).config_file
    if not path.is_file():
        raise ConfigError([f"{sweep_dir} is not a sweep directory (no {path.name})"])
    return from_dict(yaml_load(path.read_text()), str(path))


def run_sweep(cfg: SweepConfig, storage: Store | Path, address: str | None, dry_run: bool,
              verbose: bool = False) -> int:
    store = storage if isinstance(storage, Store) else Store(Path(storage).resolve())
    plans = expand(cfg)
    sweep_dir = store.local / cfg.name
    where = store.display(sweep_dir)
    if dry_run:
        print(f"sweep {cfg.name!r}: {len(plans)} trials -> {where}")
        print(format_plan(plans))
        print(format_estimate(estimate(cfg, plans, eval_windows=SweepLayout.of(sweep_dir).eval_windows)))
        failfast.dry_run(cfg, plans, store, sweep_dir, address)
        return 0
    # Every input problem that reading the inputs or this machine shows, before Ray starts
    # and before anything is written (exit 2).
    failfast.check_before_ray(cfg, store, sweep_dir, address)
    store.check()
    # One driver per sweep: refused (exit 2, naming the holder) while another one is alive.
    notes: list[str] = []
    sink = [notes.append]
    lease = acquire(store, sweep_dir, log=lambda text: sink[0](text))
    try:
        sync_from_store(store, sweep_dir)
        replaced = check_resume_compatible(cfg, sweep_dir, store)
        removed = failfast.clear_setup(store, sweep_dir) if replaced is not None else []
        resuming = SweepLayout.of(sweep_dir).state_file.exists() and replaced is None
        write_sweep_state(cfg, sweep_dir, store)
        log = SweepLog(sweep_dir, store)
        sink[0] = log
        for note in notes:
            log(note)
        log(f"sweep {cfg.name!r}: {len(plans)} trials -> {where}" + (" (resuming)" if resuming else ""))
        if replaced is not None:
            log(f"no trial had started: replacing the previous setup (changed: "
                f"{', '.join(replaced) or 'nothing that defines trials'}"
                + (f"; removed {', '.join(removed)}" if removed else "") + ")")
        log(f"driver attempt {lease.attempt}")
        if store.remote:
            log(f"staging copy: {sweep_dir}")
        log(format_plan(plans))
        return _run(cfg, store, sweep_dir, plans, address, log, lease, verbose)
    finally:
        lease.release()


def _run(cfg: SweepConfig, store: Store, sweep_dir: Path, plans, address: str | None,
         log: SweepLog, lease: Lease | None = None, verbose: bool = False) -> int:
    # Ray, torch and the training stack are imported only once the config is valid, so that
    # invalid input is refused at once.
    import ray

    from sweep.cluster import start_ray
    from sweep.driver import DriverContext
    from sweep.prep import prepare
    from sweep.ray_private import start_autoscaling_coordinator

    t0 = time.perf_counter()
    layout = SweepLayout.of(sweep_dir)
    console = _open_console(layout, plans, store, verbose, log)
    try:
        owns = start_ray(cfg, address)
    except BaseException:
        _close_console(console, log)
        raise
    try:
        if not owns:  # the embedded cluster was checked before it started
            failfast.check_existing_cluster(cfg, log)
        start_autoscaling_coordinator()
        # On the embedded cluster nothing else runs yet: preparation may use every core.
        cores = ray.cluster_resources().get("CPU", 1) - 1 if owns else cfg.resources.cpus_per_worker
        threads = max(1, math.floor(cores))
        task = ray.remote(prepare).options(
            num_cpus=min(cfg.resources.cpus_per_worker, ray.cluster_resources().get("CPU", 1)),
            num_gpus=cfg.resources.gpus_per_worker,
        )
        cache_dir = str(store.local / ".cache" / "models")
        console.phase("preparing")
        try:
            prep = ray.get(task.remote(cfg, str(sweep_dir), cache_dir, plans, threads, store,
                                       os.getcwd()))
        except ray.exceptions.RayTaskError as e:
            problem = failfast.prep_error(e)
            if problem is None:
                raise
            raise problem from e
        log(
            f"prepared in {time.perf_counter() - t0:.1f} s: dense perplexity "
            f"{prep.dense['perplexity']:.2f} ({prep.dense['windows']} windows, "
            f"{prep.dense['tokens']} tokens); model {prep.model_dir}"
        )
        for line in prep.baselines:
            log(line)
        ctx = DriverContext(
            specs=build_specs(cfg, plans, layout, prep.prepared), store=store, layout=layout,
            resources=cfg.resources, failure=cfg.failure, keep_last=cfg.checkpoint.keep_last,
        )
        if lease is not None:  # workers of an older attempt stop before writing
            ctx = dataclasses.replace(ctx, attempt=lease.attempt,
                                      specs=failfast.fence_specs(ctx.specs, lease.attempt, layout))
        log(disk_line(estimate(cfg, plans, _prepared_params(cfg, prep.model_dir), layout.eval_windows)))
        console.phase("running")
        tuner = _make_or_restore_tuner(cfg, plans, ctx, prep.dense_perplexity, log, prep.dense)
        try:
            tuner.fit()
        except Exception as e:
            stop = failfast.taken_over(lease, store, layout)
            if stop is None:
                raise
            raise stop from e
        stop = failfast.taken_over(lease, store, layout)
        if stop is not None:
            raise stop
    finally:
        if owns:
            ray.shutdown()
        _close_console(console, log)
    return _summarize(store, sweep_dir, log, time.perf_counter() - t0)


def _open_console(layout: SweepLayout, plans, store: Store, verbose: bool, log: SweepLog):
    """The live console (sweep.console): trial blocks once, a live status, Ray's own output in
    logs/ray.log unless ``verbose``; the sweep's lines go through it while it runs."""
    from sweep.console import RAY_LOG, RunConsole

    console = RunConsole(layout, [p.trial_id for p in plans], store=store, verbose=verbose)
    console.start()
    log.out = console.print
    if not verbose:
        log(f"Ray's output: {store.display(layout.logs / RAY_LOG)} (--verbose shows it here)")
    console.phase("starting Ray")
    return console


def _close_console(console, log: SweepLog) -> None:
    log.out = None
    console.close()


def _prepared_params(cfg: SweepConfig, model_dir: str):
    """The parameter count from the prepared model's safetensors headers when this machine
    sees them (no model code imported), else from the config."""
    from sweep.estimate import (
        ParamCount,
        count_parameters,
        masked_parameters,
        safetensors_parameters,
    )

    try:
        n = safetensors_parameters(Path(model_dir))
    except OSError:
        n = None
    if n is None:
        return count_parameters(cfg.model)
    return ParamCount(n, "safetensors headers", masked_parameters(Path(model_dir)))


def model_name(cfg: SweepConfig) -> str:
    return cfg.model.name_or_path or f"config:{cfg.model.config.get('model_type')}"


def calibration_by_trial(cfg: SweepConfig, plans) -> dict[str, str | None]:
    """What each trial's masks were calibrated on, recorded in the trials table (JSON), or
    None for a recipe that reads no activations (magnitude, uniform)."""
    from sweep.prep import calibration_settings, recipe_of

    text = json.dumps(calibration_settings(cfg), sort_keys=True)
    return {p.trial_id: text if recipe_of(cfg, p).needs_calibration else None for p in plans}


def _make_or_restore_tuner(cfg, plans, ctx, dense, log: SweepLog, dense_detail: dict | None = None):
    from sweep.tuner import build_tuner, restore_tuner

    tuner = restore_tuner(cfg, ctx, dense_detail)
    if tuner is not None:
        log(f"resuming the Tune experiment in {ctx.layout.tune} (finished trials are kept)")
        return tuner
    tuner, n = build_tuner(cfg, plans, ctx, model_name(cfg), dense, calibration_by_trial(cfg, plans),
                           dense_detail)
    log(f"running {len(plans)} trials, at most {n} at once")
    return tuner


def _summarize(store: Store, sweep_dir: Path, log: SweepLog, wall_s: float) -> int:
    """The report table; exit 1 when a trial errored or did not reach an end state."""
    from sweep.report import build_report, format_report

    df = build_report(sweep_dir)
    log(format_report(df))
    log(f"sweep finished in {wall_s:.1f} s; results in {store.display(SweepLayout.of(sweep_dir).results)}")
    errored = df[df["status"] == "errored"]
    unfinished = df[~df["status"].isin(END_STATUSES)]
    for _, r in errored.iterrows():
        print(f"trial {r['trial_id']} errored: {r['stop_reason']}", file=sys.stderr)
    return 1 if len(errored) or len(unfinished) else 0


def resume_sweep(target: str, address: str | None, verbose: bool = False) -> int:
    """``target``: SWEEP_DIR, a local path or the sweep's URI in an object store."""
    if is_uri(target):
        remote = Remote(target)
        store = Store.open(remote.parent().uri)
        layout = SweepLayout(store.local / remote.name)
        sweep_dir = layout.root
        for path in (layout.config_file, layout.state_file):
            store.pull(path)
        if not layout.config_file.is_file():
            raise ConfigError([f"{remote.display()} is not a sweep (no {layout.config_file.name} there)"])
    else:
        sweep_dir = Path(target.removeprefix("file://")).expanduser().resolve()
        if not sweep_dir.is_dir():
            raise ConfigError([f"sweep directory not found: {sweep_dir}"])
        store = Store(sweep_dir.parent)
    cfg = load_sweep_config(sweep_dir)
    if sweep_dir.name != cfg.name:
        raise ConfigError([f"{target}: directory name does not match the sweep name {cfg.name!r}"])
    return run_sweep(cfg, store, address, dry_run=False, verbose=verbose)


def config_from_args(path: str, overrides: list[str], shortcuts: dict) -> SweepConfig:
    data = apply_overrides(load_config_dict(path), overrides)
    if shortcuts.get("model"):
        data["model"] = {"name_or_path": shortcuts["model"], "gguf_file": shortcuts.get("gguf_file")}
    for key in ("sparsity", "batch_size"):
        if shortcuts.get(key):
            data.setdefault("grid", {})[key] = shortcuts[key]
    if shortcuts.get("name"):
        data["name"] = shortcuts["name"]
    return from_dict(data, path)


def env_storage(storage: str | None) -> Store:
    """``--storage`` (or $SWEEP_STORAGE, or ./sweeps): a directory every node sees at the same
    path (local for one machine; NFS, Lustre... for a cluster), or an object-store URI
    (trainers/storage.py)."""
    return Store.open(storage or os.environ.get("SWEEP_STORAGE", "./sweeps"))
