"""Per-sweep work, done once before the grid: the model as a plain local directory, the
training tokens, the evaluation windows, the masks of every (method, pattern, sparsity), and
the dense perplexity. Trials receive paths, never recomputation.

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

from eval.perplexity import evaluate, make_windows, tokenize_text
from eval.text import load_text
from sweep.config import SweepConfig, to_dict
from sweep.layout import SweepLayout
from trainers.data import pack_blocks
from trainers.files import atomic_write, write_json
from trainers.model import cache_target, load_model, load_tokenizer, materialize
from trainers.prune import apply_masks, compute_masks, save_masks
from trainers.spec import ModelConfig, Prepared, TrialPlan, parse_pattern
from trainers.storage import Store


def _save_tensors(tensors: dict, path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


@dataclass(frozen=True)
class Preparation:
    """What preparation hands the trials: local paths under SWEEP_DIR/prep and the model cache."""

    model_dir: str
    train_tokens: str
    eval_windows: str
    dense: dict  # the dense model's evaluation: perplexity, windows, tokens, seconds, model
    masks: dict[str, str]  # trial id -> its mask file
    timings: dict[str, float]

    @property
    def dense_perplexity(self) -> float | None:
        value = self.dense["perplexity"]
        return value if math.isfinite(value) else None

    def prepared(self, trial_id: str) -> Prepared:
        return Prepared(self.model_dir, self.train_tokens, self.eval_windows,
                        self.masks[trial_id], self.dense_perplexity)


def calibration_ids(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` training blocks drawn without replacement by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(blocks.shape[0], generator=g)[: min(n, blocks.shape[0])]
    return blocks[idx]


def prepare(cfg: SweepConfig, sweep_dir: str, cache_dir: str, plans: list[TrialPlan],
            threads: int, store: Store | None = None) -> Preparation:
    """Runs as a Ray task (so on a cluster it lands where a worker would). With a URI ``store``
    (trainers/storage.py) what the store already holds is pulled instead of recomputed, and
    what is computed here is pushed to it."""
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
    model_dir = materialize(cfg.model, Path(cache_dir))
    local_mc = ModelConfig(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(local_mc)
    timings["model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if not layout.train_tokens.exists():
        tokens = tokenize_text(tokenizer, load_text(cfg.data.train)).to(torch.int64)
        pack_blocks(tokens, cfg.data.seq_len)  # fails early when the text is too short
        _save_tensors({"tokens": tokens}, layout.train_tokens)
    if not layout.eval_windows.exists():
        tokens = tokenize_text(tokenizer, load_text(cfg.eval.text))
        ids, labels = make_windows(tokens, cfg.eval.token_length, cfg.eval.stride, cfg.eval.max_windows)
        _save_tensors({"input_ids": ids, "labels": labels}, layout.eval_windows)
    timings["tokenize_s"] = time.perf_counter() - t

    if layout.dense.exists():
        dense = json.loads(layout.dense.read_text())
    else:
        t = time.perf_counter()
        model = load_model(local_mc).to(device)
        w = load_file(str(layout.eval_windows))
        ev = evaluate(model, w["input_ids"], w["labels"], batch_size=cfg.eval.batch_size, progress=True)
        dense = {**ev, "seconds": time.perf_counter() - t, "model": to_dict(cfg.model)}
        write_json(layout.dense, dense)

    layout.masks_dir.mkdir(exist_ok=True)
    mask_paths: dict[str, str] = {}
    blocks = None
    for p in plans:
        path = layout.mask(p.method, p.pattern, p.sparsity)
        mask_paths[p.trial_id] = str(path)
        if path.exists():
            continue
        t = time.perf_counter()
        model = load_model(local_mc).to(device)  # fresh weights: Wanda prunes as it goes
        calib = None
        if p.method == "wanda":
            if blocks is None:
                blocks = pack_blocks(load_file(str(layout.train_tokens))["tokens"], cfg.data.seq_len)
            calib = calibration_ids(blocks, cfg.prune.calibration_samples, cfg.train.seed)
        pattern = parse_pattern(p.pattern)
        masks = compute_masks(model, p.method, None if pattern else p.sparsity, pattern, calib)
        apply_masks(model, masks)
        save_masks(masks, path)
        timings[f"mask_{path.stem}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store.push_missing(model_dir, layout.train_tokens, layout.eval_windows, layout.dense,
                       *sorted({Path(p) for p in mask_paths.values()}))
    if store.remote:
        timings["push_s"] = time.perf_counter() - t
    return Preparation(str(model_dir), str(layout.train_tokens), str(layout.eval_windows),
                       dense, mask_paths, timings)
