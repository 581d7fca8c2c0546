"""``sweep run`` / ``sweep resume`` end to end: validate, plan, prepare, run the grid, summarize.

Nothing is started or written before the config is valid. SWEEP_DIR holds everything:
``sweep.yaml`` (the resolved config), ``prep/``, ``tune/`` (Ray Tune's experiment),
``train/`` (each trial's Train run and checkpoints), ``results/`` (Parquet), ``logs/``,
``export/`` (best models in Hugging Face format).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from sweep.config import ConfigError, SweepConfig, from_dict, to_dict, yaml_load
from sweep.plan import expand, format_plan, grid_fingerprint
from sweep.results import END_STATUSES
from sweep.storage import Remote, Store

CONFIG_FILE = "sweep.yaml"
STATE_FILE = "sweep.json"


class SweepLog:
    """The sweep's own log: printed, and appended to SWEEP_DIR/logs/sweep.log (pushed to the
    store after every message when it is a URI)."""

    def __init__(self, sweep_dir: Path | None, store: Store | None = None):
        self.path = sweep_dir / "logs" / "sweep.log" if sweep_dir else None
        self.store = store

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.path, "a") as f:
                for line in text.splitlines():
                    f.write(f"{stamp} {line}\n")
            if self.store:
                self.store.push(self.path)


def check_resume_compatible(cfg: SweepConfig, sweep_dir: Path) -> None:
    """A sweep directory may only be continued with a config that gives the same grid."""
    state_path = sweep_dir / STATE_FILE
    if not state_path.exists():
        return
    old = json.loads(state_path.read_text())
    if old.get("fingerprint") != grid_fingerprint(cfg):
        old_cfg = yaml_load((sweep_dir / CONFIG_FILE).read_text()) if (sweep_dir / CONFIG_FILE).exists() else {}
        new_cfg = to_dict(cfg)
        changed = sorted(_diff_keys(old_cfg, new_cfg))
        changed = [k for k in changed if k.split(".")[0] not in ("name", "resources", "loggers", "failure")]
        raise ConfigError(
            [
                f"{sweep_dir} holds a sweep with a different grid or training setup "
                f"(changed: {', '.join(changed) or 'unknown'}); resume it with its own config "
                f"(`sweep resume {sweep_dir}`) or choose another --name"
            ]
        )


def _diff_keys(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def write_sweep_state(cfg: SweepConfig, sweep_dir: Path, store: Store | None = None) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (sweep_dir / STATE_FILE).write_text(
        json.dumps({"fingerprint": grid_fingerprint(cfg), "name": cfg.name}, indent=1)
    )
    if store:
        store.push(sweep_dir / CONFIG_FILE, sweep_dir / STATE_FILE)


# What a sweep's staging copy takes from the store before it continues: its state, its
# results and its logs. prep/ and the exports are pulled only where they are needed.
SYNCED_ON_START = (CONFIG_FILE, STATE_FILE, "results", "logs")


def sync_from_store(store: Store, sweep_dir: Path) -> None:
    """For a URI store, the store is the truth: a staging copy of a sweep the store does not
    hold (a deleted bucket prefix, an old test) is discarded, else refreshed from the store."""
    if not store.remote:
        return
    if not store.exists(sweep_dir / STATE_FILE):
        shutil.rmtree(sweep_dir, ignore_errors=True)
        return
    for rel in SYNCED_ON_START:
        store.pull(sweep_dir / rel)


def load_sweep_config(sweep_dir: Path) -> SweepConfig:
    path = sweep_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError([f"{sweep_dir} is not a sweep directory (no {CONFIG_FILE})"])
    return from_dict(yaml_load(path.read_text()), str(path))


def run_sweep(cfg: SweepConfig, storage: Store | Path, address: str | None, dry_run: bool) -> int:
    store = storage if isinstance(storage, Store) else Store(Path(storage).resolve())
    plans = expand(cfg)
    sweep_dir = store.local / cfg.name
    where = store.display(sweep_dir)
    if dry_run:
        print(f"sweep {cfg.name!r}: {len(plans)} trials -> {where}")
        print(format_plan(plans))
        return 0
    store.check()
    sync_from_store(store, sweep_dir)
    check_resume_compatible(cfg, sweep_dir)
    resuming = (sweep_dir / STATE_FILE).exists()
    write_sweep_state(cfg, sweep_dir, store)
    log = SweepLog(sweep_dir, store)
    log(f"sweep {cfg.name!r}: {len(plans)} trials -> {where}" + (" (resuming)" if resuming else ""))
    if store.remote:
        log(f"staging copy: {sweep_dir}")
    log(format_plan(plans))
    return _run(cfg, store, sweep_dir, plans, address, log)


def _run(cfg: SweepConfig, store: Store, sweep_dir: Path, plans, address: str | None,
         log: SweepLog) -> int:
    import ray

    from sweep import tune as st
    from sweep.prep import prepare

    t0 = time.perf_counter()
    owns = st.start_ray(cfg, address)
    try:
        st.warm_train_services()
        # On the embedded cluster nothing else runs yet: preparation may use every core.
        cores = ray.cluster_resources().get("CPU", 1) - 1 if owns else cfg.resources.cpus_per_worker
        threads = max(1, math.floor(cores))
        task = ray.remote(prepare).options(
            num_cpus=min(cfg.resources.cpus_per_worker, ray.cluster_resources().get("CPU", 1)),
            num_gpus=cfg.resources.gpus_per_worker,
        )
        cache_dir = str(store.local / ".cache" / "models")
        prep = ray.get(task.remote(cfg, str(sweep_dir), cache_dir, [p.to_dict() for p in plans], threads,
                                   store))
        dense = prep["dense_perplexity"]
        log(
            f"prepared in {time.perf_counter() - t0:.1f} s: model {prep['model_dir']}\n"
            f"dense perplexity {dense:.2f} ({prep['dense']['windows']} windows, "
            f"{prep['dense']['tokens']} tokens)"
        )
        ctx = _trial_context(cfg, store, sweep_dir, prep)
        tuner = _make_or_restore_tuner(cfg, sweep_dir, plans, ctx, dense, log)
        tuner.fit()
    finally:
        if owns:
            ray.shutdown()
    return _summarize(store, sweep_dir, log, time.perf_counter() - t0)


def _trial_context(cfg: SweepConfig, store: Store, sweep_dir: Path, prep: dict) -> dict:
    r = cfg.resources
    threads = r.torch_threads or max(1, math.floor(r.cpus_per_worker))
    return {
        "sweep_dir": str(sweep_dir),
        "store": store,
        "model_name": cfg.model.name_or_path or f"config:{cfg.model.config.get('model_type')}",
        "masks": prep["masks"],
        "target_sparsity": prep["target_sparsity"],
        "resources": {"cpus_per_worker": r.cpus_per_worker, "gpus_per_worker": r.gpus_per_worker,
                      "custom_per_worker": r.custom_per_worker},
        "worker_max_failures": cfg.failure.worker_max_failures,
        "keep_last": cfg.checkpoint.keep_last,
        "export_best": cfg.checkpoint.export_best,
        "worker": {
            "model_dir": prep["model_dir"],
            "train_tokens": prep["train_tokens"],
            "eval_windows": prep["eval_windows"],
            "dense_perplexity": prep["dense_perplexity"],
            "seq_len": cfg.data.seq_len,
            "eval_batch_size": cfg.eval.batch_size,
            "threads": threads,
            "progress": True,
            "train": to_dict(cfg.train),
            "checkpoint": to_dict(cfg.checkpoint),
            "early_stop": to_dict(cfg.early_stop),
        },
    }


def _make_or_restore_tuner(cfg, sweep_dir: Path, plans, ctx: dict, dense, log: SweepLog):
    from sweep import tune as st

    tuner = st.restore_tuner(cfg, sweep_dir, ctx)
    if tuner is not None:
        log(f"resuming the Tune experiment in {sweep_dir / st.TUNE_DIR} (finished trials are kept)")
        return tuner
    tuner, n = st.build_tuner(cfg, sweep_dir, plans, ctx, dense)
    log(f"running {len(plans)} trials, at most {n} at once")
    return tuner


def _summarize(store: Store, sweep_dir: Path, log: SweepLog, wall_s: float) -> int:
    """The report table; exit 1 when a trial errored or did not reach an end state."""
    from sweep.report import build_report, format_report

    df = build_report(sweep_dir)
    log(format_report(df))
    log(f"sweep finished in {wall_s:.1f} s; results in {store.display(sweep_dir / 'results')}")
    errored = df[df["status"] == "errored"]
    unfinished = df[~df["status"].isin(END_STATUSES)]
    for _, r in errored.iterrows():
        print(f"trial {r['trial_id']} errored: {r['stop_reason']}", file=sys.stderr)
    return 1 if len(errored) or len(unfinished) else 0


def resume_sweep(target: str, address: str | None) -> int:
    """``target``: SWEEP_DIR, a local path or the sweep's URI in an object store."""
    if "://" in target and not target.startswith("file://"):
        remote = Remote(target)
        store = Store.open(remote.parent().uri)
        sweep_dir = store.local / remote.name
        for rel in (CONFIG_FILE, STATE_FILE):
            store.pull(sweep_dir / rel)
        if not (sweep_dir / CONFIG_FILE).is_file():
            raise ConfigError([f"{remote.display()} is not a sweep (no {CONFIG_FILE} there)"])
    else:
        sweep_dir = Path(target.removeprefix("file://")).expanduser().resolve()
        if not sweep_dir.is_dir():
            raise ConfigError([f"sweep directory not found: {sweep_dir}"])
        store = Store(sweep_dir.parent)
    cfg = load_sweep_config(sweep_dir)
    if sweep_dir.name != cfg.name:
        raise ConfigError([f"{target}: directory name does not match the sweep name {cfg.name!r}"])
    return run_sweep(cfg, store, address, dry_run=False)


def config_from_args(path: str, overrides: list[str], shortcuts: dict) -> SweepConfig:
    from sweep.config import apply_overrides, load_config_dict

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
    (sweep/storage.py)."""
    return Store.open(storage or os.environ.get("SWEEP_STORAGE", "./sweeps"))
