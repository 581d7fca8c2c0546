"""The isolated jobs behind the benchmarks: ``python -m bench.job KIND ARGS_JSON OUT_JSON``.

prepare       sweep.prep.prepare alone (no Ray), so a bare loop can run before the sweep
sweep         a real sweep through ``sweep.runner.run_sweep`` (Tune + TorchTrainer + FSDP2),
              with a timeline of its start-up (bench.hooks) and its Parquet/Tune timings
empty_fit     an empty ``TorchTrainer.fit()`` (1 CPU worker, reports once) on a fresh cluster
bare_train    the trial's training steps in one plain process (optionally FSDP2 on 1 gloo rank)
setup_replay  a trial worker's set-up (imports, model load, masks, shard, data) in a fresh process
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

T_PROCESS = time.time()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return _jsonable(v.item())
        except (ValueError, AttributeError):
            return str(v)
    if v is None or isinstance(v, (int, float, str, bool)):
        return v
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError, ImportError):
        pass
    return str(v)


def _records(df) -> list[dict]:
    return [{k: _jsonable(v) for k, v in row.items()} for row in df.to_dict("records")]


def _timeline_env(tmp: str) -> str:
    from bench.hooks import ENV, SPEC

    path = os.path.join(tmp, "timeline.jsonl")
    os.environ[ENV] = path
    os.environ["RAY_TRAIN_CALLBACKS"] = SPEC
    return path


# ---------------------------------------------------------------------------------------------


def job_sweep(args: dict) -> dict:
    """Run one sweep; stamps from the Tune driver (this process), the Train controller and
    the workers (bench.hooks), then the Parquet rows and Tune's per-result timings."""
    storage = Path(args["storage"])
    timeline = _timeline_env(str(storage))
    t_import = time.time()
    from bench.hooks import read as read_timeline
    from sweep import callbacks, cluster, runner
    from sweep.api import load
    from sweep.config import from_dict
    from sweep.layout import SweepLayout

    stamps: dict[str, float] = {"process_start": T_PROCESS, "imports_begin": t_import}
    events: list[dict] = []

    orig_start_ray = cluster.start_ray

    def start_ray(cfg, address):
        stamps["ray_init_begin"] = time.time()
        try:
            return orig_start_ray(cfg, address)
        finally:
            stamps["ray_init_end"] = time.time()

    cluster.start_ray = start_ray

    orig_make = runner._make_or_restore_tuner

    def make_tuner(*a, **k):
        stamps["prep_end"] = time.time()  # the prepare task has returned
        return orig_make(*a, **k)

    runner._make_or_restore_tuner = make_tuner

    cls = callbacks.ResultsCallback
    orig = {n: getattr(cls, n) for n in ("setup", "on_trial_start", "on_trial_result",
                                          "on_trial_complete", "on_trial_error")}

    def setup(self, **info):
        stamps["tuner_fit_begin"] = time.time()
        return orig["setup"](self, **info)

    def on_start(self, iteration, trials, trial, **info):
        events.append({"event": "trial_start", "trial": callbacks.trial_key(trial), "t": time.time()})
        return orig["on_trial_start"](self, iteration, trials, trial, **info)

    def on_result(self, iteration, trials, trial, result, **info):
        events.append({"event": "trial_result", "trial": callbacks.trial_key(trial), "t": time.time(),
                       "epoch": result.get("epoch"), "kind": result.get("kind")})
        return orig["on_trial_result"](self, iteration, trials, trial, result, **info)

    def on_complete(self, iteration, trials, trial, **info):
        events.append({"event": "trial_complete", "trial": callbacks.trial_key(trial), "t": time.time()})
        return orig["on_trial_complete"](self, iteration, trials, trial, **info)

    def on_error(self, iteration, trials, trial, **info):
        events.append({"event": "trial_error", "trial": callbacks.trial_key(trial), "t": time.time()})
        return orig["on_trial_error"](self, iteration, trials, trial, **info)

    cls.setup, cls.on_trial_start, cls.on_trial_result = setup, on_start, on_result
    cls.on_trial_complete, cls.on_trial_error = on_complete, on_error

    cfg = from_dict(args["config"])
    stamps["run_sweep_begin"] = time.time()
    rc = runner.run_sweep(cfg, storage, None, False)
    stamps["run_sweep_end"] = time.time()

    sweep_dir = storage / cfg.name
    res = load(sweep_dir)
    tune_results = {}
    tune_dir = SweepLayout(sweep_dir).tune
    keep = ("epoch", "kind", "time_total_s", "time_this_iter_s", "timestamp", "eval_s", "wall_s",
            "tokens_per_s", "epoch_steps", "tokens", "steps", "training_iteration", "pid")
    for f in sorted(tune_dir.glob("*/result.json")):
        rows = []
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows.append({k: _jsonable(r.get(k)) for k in keep})
        tune_results[f.parent.name] = rows
    from sweep.cluster import local_cluster_cpus, max_concurrent_trials, trial_resources
    from sweep.plan import expand

    plans = expand(cfg)
    concurrency = max_concurrent_trials({"CPU": float(local_cluster_cpus(cfg))},
                                        trial_resources(cfg), len(plans),
                                        cfg.resources.max_concurrent_trials)
    return {
        "rc": rc,
        "sweep_dir": str(sweep_dir),
        "stamps": stamps,
        "events": events,
        "timeline": read_timeline(timeline),
        "epochs": _records(res.epochs),
        "trials": _records(res.trials),
        "tune": tune_results,
        "concurrency": concurrency,
        "plans": [p.to_dict() for p in plans],
        "env": {k: os.environ.get(k) for k in args.get("report_env", [])},
    }


def job_empty_fit(args: dict) -> dict:
    """An empty TorchTrainer.fit() on a fresh local cluster set up like sweep.cluster.start_ray:
    1 CPU worker whose train function only reports its start time once."""
    tmp = tempfile.mkdtemp(prefix="bench-empty-")
    timeline = _timeline_env(tmp)
    t_import = time.time()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t_imported = time.time()
    env = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}}
    ray.init(num_cpus=args.get("num_cpus", 3), runtime_env=env, log_to_driver=False)
    t_ray = time.time()
    # Like the sweep, which runs its prepare task before the first trial: let the cluster's
    # pre-started workers settle, so fit() is not timed against their boot.
    ray.get(ray.remote(lambda: None).options(num_cpus=1).remote())
    time.sleep(args.get("settle_s", 2.0))

    def empty(config):
        import os as _os

        import ray.train as rt

        from bench.hooks import ENV, mark

        mark(_os.environ.get(ENV), "fn_start")
        rt.report({"done": 1})

    trainer = TorchTrainer(
        empty,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="empty", storage_path=os.path.join(tmp, "train")),
    )
    t_fit = time.time()
    result = trainer.fit()
    t_done = time.time()
    ray.shutdown()
    from bench.hooks import read

    events = read(timeline)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "stamps": {"process_start": T_PROCESS, "imports_begin": t_import,
                   "imports_end": t_imported, "ray_init_end": t_ray, "fit_begin": t_fit,
                   "fit_end": t_done},
        "error": str(result.error) if getattr(result, "error", None) else None,
        "timeline": events,
    }


def job_prepare(args: dict) -> dict:
    """The sweep's per-sweep preparation (sweep.prep.prepare) ahead of the sweep, without Ray,
    so the bare loop can be timed before the sweep too; run_sweep then reuses the artefacts."""
    from sweep.config import from_dict
    from sweep.plan import expand
    from sweep.prep import prepare

    cfg = from_dict(args["config"])
    storage = Path(args["storage"])
    out = prepare(cfg, str(storage / cfg.name), str(storage / ".cache" / "models"), expand(cfg), 1)
    return {"timings": out.timings, "model_dir": out.model_dir}


def _trial_spec(sweep_dir: Path, trial_id: str, config: dict | None = None):
    """The ``TrialSpec`` the sweep gives ``trial_id``, from its prepared files (no Ray)."""
    import yaml

    from sweep.config import from_dict
    from sweep.layout import SweepLayout
    from sweep.plan import build_specs, expand
    from trainers.spec import Prepared

    layout = SweepLayout(sweep_dir)
    cfg = from_dict(config or yaml.safe_load(layout.config_file.read_text()))
    plans = [p for p in expand(cfg) if p.trial_id == trial_id]
    models = sorted((sweep_dir.parent / ".cache" / "models").iterdir())
    model_dir = next(m for m in models if not m.name.startswith("."))

    def prepared(tid: str) -> Prepared:
        p = plans[0]
        mask = layout.mask(p.method, p.pattern, p.sparsity, p.layerwise)
        weights = layout.pruned_weights(mask)
        return Prepared(str(model_dir), str(layout.train_tokens), str(layout.eval_windows),
                        str(mask), None, str(weights) if weights.exists() else None,
                        str(layout.recipe(mask)))

    spec = build_specs(cfg, plans, layout, prepared)[trial_id]
    return replace(spec, log_path=None, progress_path=None, export_dir=None, progress_bar=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_bare_train(args: dict) -> dict:
    """The trial's steps in one process: the trial core the worker runs (trainers.core), with
    the sweep's own prepared model, masks and tokens, the same data order, lr schedule and
    step, one torch thread like the worker. ``fsdp``: also wrap with FSDP2 on a 1-rank gloo
    group (the worker skips that wrap on one CPU rank; this measures what the skip saves)."""
    import torch

    from trainers.core import TrialCore

    spec = _trial_spec(Path(args["sweep_dir"]), args["trial_id"], args.get("config"))
    spec = replace(spec, threads=args.get("threads", 1))
    core = TrialCore(spec)
    core.build()
    if args.get("fsdp"):
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        from trainers.parallel import shard_masks
        from trainers.prune import decoder_blocks, load_masks

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        _, blocks_list = decoder_blocks(core.model)
        for block in blocks_list:
            fully_shard(block)
        fully_shard(core.model)
        core.pruned = shard_masks(core.model, load_masks(spec.prepared.masks))
        core.opt = torch.optim.AdamW(core.model.parameters(), lr=spec.plan.lr,
                                     weight_decay=spec.train.weight_decay)

    def step(s: int) -> float:
        core.st.step = s
        t0 = time.perf_counter()
        core.step()
        return time.perf_counter() - t0

    first = step(0)
    for s in range(1, args["warmup"]):
        step(s)
    lo, hi = args["first_step"], args["first_step"] + args["steps"]
    times = [step(s) for s in range(lo, hi)]
    train_s = sum(times)
    tokens = len(times) * spec.plan.batch_size * spec.seq_len
    return {"tokens_per_s": tokens / train_s, "train_s": train_s, "steps": len(times),
            "first_step_s": first, "median_step_s": sorted(times)[len(times) // 2],
            "fsdp": bool(args.get("fsdp"))}


def job_setup_replay(args: dict) -> dict:
    """What a fresh trial worker does before its first step, in a fresh process: imports, the
    trial core's build and the baseline evaluation (the worker itself reports only the sum,
    as epoch 0's wall_s)."""
    t = {"process_start": T_PROCESS}
    t0 = time.time()
    import torch

    t["import_torch_s"] = time.time() - t0
    t0 = time.time()
    import trainers.worker  # noqa: F401 - the train function's module, as Ray unpickles it

    t["import_worker_module_s"] = time.time() - t0
    import torch.distributed as dist

    from trainers.core import TrialCore

    spec = _trial_spec(Path(args["sweep_dir"]), args["trial_id"])
    t0 = time.time()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    t["init_process_group_s"] = time.time() - t0
    core = TrialCore(replace(spec, threads=1), device=torch.device("cpu"))
    t0 = time.time()
    core.build()
    t["build_s"] = time.time() - t0
    t0 = time.time()
    core.evaluate()
    t["baseline_eval_s"] = time.time() - t0
    dist.destroy_process_group()
    return t


JOBS = {"sweep": job_sweep, "empty_fit": job_empty_fit, "prepare": job_prepare,
        "bare_train": job_bare_train, "setup_replay": job_setup_replay}


def main() -> None:
    kind, args, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    result = JOBS[kind](args)
    Path(out).write_text(json.dumps(result, default=_jsonable))


if __name__ == "__main__":
    main()
