"""Per-sweep work, done once before the grid: the model as a plain local directory, the
training tokens, the evaluation windows, the masks of every (method, pattern, sparsity), the
dense perplexity, and each recipe's baseline (the pruned model's perplexity, epoch 0, shared by
every batch size and objective of the recipe). Trials receive paths, never recomputation.

Each artefact is written atomically and reused when present, so a resumed sweep pays nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eval.perplexity import evaluate, tokenize_text
from eval.sets import windows_for
from eval.text import load_text
from sweep.config import SweepConfig, eval_sets, primary_set, to_dict
from sweep.layout import SweepLayout
from sweep.plan import trial_threads
from sweep.preflight import input_error
from trainers.core import baseline_matches, load_sets, measure_baseline, read_baseline
from trainers.data import pack_blocks
from trainers.files import atomic_write, write_json
from trainers.model import cache_target, load_model, load_tokenizer, materialize
from trainers.prune import prunable_linears, save_masks
from trainers.pruning import Recipe, calibration_ids, prune_model
from trainers.spec import ModelConfig, Prepared, TrialPlan
from trainers.storage import Store
from trainers.zeroshot import measure_tasks


def _save_tensors(tensors: dict, path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


@dataclass(frozen=True)
class Preparation:
    """What preparation hands the trials: local paths under SWEEP_DIR/prep and the model cache."""

    model_dir: str
    train_tokens: str
    eval_windows: str  # the primary set's windows
    # The dense model's evaluation: perplexity, windows, tokens, seconds (the primary set),
    # model; "sets": every set's {perplexity, windows, tokens, seconds}; "tasks": task rows.
    dense: dict
    # trial id -> (masks, weights, recipe, baseline) files
    pruned: dict[str, tuple[str, str | None, str, str]]
    timings: dict[str, float]
    # Every evaluation set as (name, windows file), the primary first.
    eval_sets: tuple[tuple[str, str], ...] = ()
    primary: str = "text"
    # One line per recipe: its baseline (epoch 0) on every set, measured now or reused.
    baselines: tuple[str, ...] = ()

    @property
    def dense_perplexity(self) -> float | None:
        value = self.dense["perplexity"]
        return value if math.isfinite(value) else None

    def prepared(self, trial_id: str) -> Prepared:
        masks, weights, recipe, baseline = self.pruned[trial_id]
        return Prepared(self.model_dir, self.train_tokens, self.eval_windows, masks,
                        self.dense_perplexity, weights, recipe, self.eval_sets, self.primary,
                        baseline)


def recipe_of(cfg: SweepConfig, plan: TrialPlan) -> Recipe:
    pr = cfg.prune
    return Recipe(plan.method, None if plan.pattern else plan.sparsity, plan.pattern,
                  plan.layerwise, pr.sparsegpt, pr.owl)


def calibration_settings(cfg: SweepConfig) -> dict:
    """The calibration in effect (defaults resolved), as recorded with every recipe."""
    cal = cfg.prune.calibration
    return {"text": "data.train" if cal.text is None else to_dict(cal.text),
            "samples": cal.samples, "seq_len": cal.seq_len or cfg.data.seq_len,
            "seed": cfg.train.seed if cal.seed is None else cal.seed}


def calibration(cfg: SweepConfig, layout: SweepLayout, tokenizer) -> torch.Tensor:
    """The calibration sequences: by default drawn from the training text's tokens."""
    settings = calibration_settings(cfg)
    if cfg.prune.calibration.text is None:
        tokens = load_file(str(layout.train_tokens))["tokens"]
    else:
        tokens = tokenize_text(tokenizer, load_text(cfg.prune.calibration.text))
    return calibration_ids(tokens, settings["seq_len"], settings["samples"], settings["seed"])


def _prune(cfg: SweepConfig, layout: SweepLayout, plan: TrialPlan, local_mc: ModelConfig,
           tokenizer, device: torch.device, timings: dict) -> tuple[str, str | None, str]:
    """The masks (and, for SparseGPT, the pruned weights) of ``plan``'s recipe, computed once
    and shared by every trial with the same recipe."""
    recipe = recipe_of(cfg, plan)
    path = layout.mask(plan.method, plan.pattern, plan.sparsity, plan.layerwise)
    weights = layout.pruned_weights(path) if recipe.changes_weights else None
    record_path = layout.recipe(path)
    if path.exists() and record_path.exists() and (weights is None or weights.exists()):
        return str(path), weights and str(weights), str(record_path)
    model = load_model(local_mc).to(device)  # fresh weights: the methods prune as they go
    calib = calibration(cfg, layout, tokenizer) if recipe.needs_calibration else None
    masks, record = prune_model(model, recipe, calib)
    if calib is not None:
        record["calibration"] = {**calibration_settings(cfg), "samples": int(calib.shape[0])}
    if weights is not None:
        _save_tensors({name: lin.weight.detach().cpu() for name, lin in prunable_linears(model).items()},
                      weights)
    save_masks(masks, path)
    write_json(record_path, record)  # last: its presence means the recipe's files are complete
    timings[f"mask_{path.stem}_s"] = record["seconds"]
    return str(path), weights and str(weights), str(record_path)


def _baseline(cfg: SweepConfig, layout: SweepLayout, prep: Prepared, device: torch.device,
              timings: dict) -> tuple[str, str, bool]:
    """The pruned model's evaluation on every set (epoch 0) of one recipe, measured once for
    all its trials as they would measure it (trainers.core.measure_baseline), beside its
    masks; an existing one is reused when it was measured for the same sets, evaluation batch,
    workers and device (a resume that changed the workers measures it again). Returns the
    file, its log line, and whether it was measured now."""
    path = layout.baseline(Path(prep.masks))
    workers = cfg.resources.workers
    record = read_baseline(str(path))
    windows = {name: int(w["input_ids"].shape[0]) for name, w in load_sets(prep).items()}
    reused = baseline_matches(record, windows, cfg.eval.batch_size, workers, device)
    if not reused:
        record = measure_baseline(prep, cfg.eval.batch_size, workers, trial_threads(cfg), device)
        write_json(path, record)
        timings[f"baseline_{Path(prep.masks).stem}_s"] = sum(
            ev["seconds"] for ev in record["sets"].values())
    sets = ", ".join(f"{name} {ev['perplexity']:.2f} ({ev['windows']} windows, {ev['seconds']:.1f} s)"
                     for name, ev in record["sets"].items())
    return str(path), (f"baseline (epoch 0) {Path(prep.masks).stem}: {sets}"
                       + ("; reused" if reused else "") + f" -> {path.name}"), not reused


def prepare(cfg: SweepConfig, sweep_dir: str, cache_dir: str, plans: list[TrialPlan],
            threads: int, store: Store | None = None, cwd: str | None = None) -> Preparation:
    """Runs as a Ray task (so on a cluster it lands where a worker would). With a URI ``store``
    (trainers/storage.py) what the store already holds is pulled instead of recomputed, and
    what is computed here is pushed to it. ``cwd``: where relative task paths are read from
    (the directory ``sweep run`` started in)."""
    layout = SweepLayout.of(sweep_dir)
    store = store or Store(layout.root.parent)  # a plain directory: nothing to sync
    torch.set_num_threads(threads)
    # On a GPU node the dense evaluation and Wanda's calibration pass run on the GPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not layout.prep.exists():
        store.pull(layout.prep)  # prepared on another machine (a resume on a fresh node)
    layout.prep.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        store.ensure(cache_target(cfg.model, Path(cache_dir)))  # built on another machine
    except FileNotFoundError:
        pass  # not in the store (or half uploaded): built here
    # Input problems the checks before Ray could not see end the sweep as invalid input (exit 2).
    with input_error("model"):
        model_dir = materialize(cfg.model, Path(cache_dir))
        local_mc = ModelConfig(name_or_path=str(model_dir))
        tokenizer = load_tokenizer(local_mc)
    timings["model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if not layout.train_tokens.exists():
        with input_error("data.train"):
            tokens = tokenize_text(tokenizer, load_text(cfg.data.train)).to(torch.int64)
            pack_blocks(tokens, cfg.data.seq_len)  # fails early when the text is too short
        _save_tensors({"tokens": tokens}, layout.train_tokens)
    # Every evaluation set tokenized once, into a windows file of its own (primary first).
    primary = primary_set(cfg.eval)
    sets = sorted(eval_sets(cfg.eval), key=lambda es: es.name != primary)
    windows = {es.name: layout.set_windows(es.name, primary) for es in sets}
    for es in sets:
        if not windows[es.name].exists():
            with input_error("eval.sets." + es.name if cfg.eval.sets else "eval.text"):
                ids, labels = windows_for(es, tokenizer)
            _save_tensors({"input_ids": ids, "labels": labels}, windows[es.name])
    timings["tokenize_s"] = time.perf_counter() - t

    dense = json.loads(layout.dense.read_text()) if layout.dense.exists() else {}
    # A dense.json of a sweep written before several sets lacks "sets": its one set is the
    # primary, measured already.
    measured = dense.get("sets") or ({primary: {k: dense[k] for k in ("perplexity", "windows",
                                                                       "tokens", "seconds")}}
                                     if dense else {})
    missing = [name for name in windows if name not in measured]
    wants_tasks = bool(cfg.eval.tasks.names) and "tasks" not in dense
    if missing or wants_tasks:
        model = load_model(local_mc).to(device)
        for name in missing:
            t = time.perf_counter()
            w = load_file(str(windows[name]))
            ev = evaluate(model, w["input_ids"], w["labels"], batch_size=cfg.eval.batch_size,
                          progress=True)
            measured[name] = {**ev, "seconds": time.perf_counter() - t}
        dense = {**measured[primary], "model": to_dict(cfg.model), "sets": measured,
                 **({"tasks": dense["tasks"]} if "tasks" in dense else {})}
        if wants_tasks:
            t = time.perf_counter()
            with input_error("eval.tasks"):
                dense["tasks"] = measure_tasks(model, tokenizer, cfg.eval.tasks, cwd) or []
            timings["dense_tasks_s"] = time.perf_counter() - t
        write_json(layout.dense, dense)
        del model

    recipes = {p.trial_id: _prune(cfg, layout, p, local_mc, tokenizer, device, timings)
               for p in plans}
    sets = tuple((name, str(path)) for name, path in windows.items())
    # Each recipe's baseline once, whatever the number of its trials (batch sizes, objectives).
    baselines = {}
    for masks, weights, recipe in dict.fromkeys(recipes.values()):
        files = Prepared(str(model_dir), str(layout.train_tokens), str(layout.eval_windows),
                         masks, None, weights, recipe, sets, primary)
        baselines[masks] = _baseline(cfg, layout, files, device, timings)
    pruned = {tid: (*trio, baselines[trio[0]][0]) for tid, trio in recipes.items()}
    t = time.perf_counter()
    # A baseline measured now replaces the store's (a resume with other workers measures again).
    store.push(*(Path(path) for path, _, fresh in baselines.values() if fresh))
    files = sorted({Path(f) for files in pruned.values() for f in files if f})
    store.push_missing(model_dir, layout.train_tokens, *windows.values(), layout.dense, *files)
    if store.remote:
        timings["push_s"] = time.perf_counter() - t
    return Preparation(str(model_dir), str(layout.train_tokens), str(layout.eval_windows),
                       dense, pruned, timings, sets, primary,
                       tuple(line for _, line, _ in baselines.values()))
