"""Per-sweep work, done once before the grid: the model as a plain local directory, the
training tokens, the evaluation windows, the masks of every (method, pattern, sparsity), and
the dense perplexity. Trials receive paths, never recomputation.

Each artefact is written atomically and reused when present, so a resumed sweep pays nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from sweep.config import ModelConfig, SweepConfig, parse_pattern, to_dict

PREP_DIR = "prep"


def mask_key(method: str, pattern: str | None, sparsity: float) -> str:
    pat = f"-{pattern.replace(':', 'of')}" if pattern else ""
    return f"{method}{pat}-s{sparsity:g}"


def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def calibration_ids(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` training blocks drawn without replacement by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(blocks.shape[0], generator=g)[: min(n, blocks.shape[0])]
    return blocks[idx]


def prepare(cfg: SweepConfig, sweep_dir: str, cache_dir: str, plans: list[dict], threads: int,
            store=None) -> dict:
    """Runs as a Ray task (so on a cluster it lands where a worker would). Returns the paths
    and figures the trials need. With a URI ``store`` (sweep/storage.py) what the store already
    holds is pulled instead of recomputed, and what is computed here is pushed to it."""
    from eval.perplexity import evaluate, make_windows
    from eval.text import load_text, tokenize_text
    from sweep.storage import Store
    from trainers.data import pack_blocks
    from trainers.model import cache_target, load_model, load_tokenizer, materialize
    from trainers.prune import apply_masks, compute_masks, save_masks

    store = store or Store(Path(sweep_dir).parent)  # a plain directory: nothing to sync

    torch.set_num_threads(threads)
    # On a GPU node the dense evaluation and Wanda's calibration pass run on the GPU.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prep = Path(sweep_dir) / PREP_DIR
    if not prep.exists():
        store.pull(prep)  # prepared on another machine (a resume on a fresh node)
    prep.mkdir(parents=True, exist_ok=True)
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
    train_path = prep / "train_tokens.safetensors"
    if not train_path.exists():
        tokens = tokenize_text(tokenizer, load_text(cfg.data.train)).to(torch.int64)
        pack_blocks(tokens, cfg.data.seq_len)  # fails early when the text is too short
        _save_tensors({"tokens": tokens}, train_path)
    eval_path = prep / "eval_windows.safetensors"
    if not eval_path.exists():
        tokens = tokenize_text(tokenizer, load_text(cfg.eval.text))
        ids, labels = make_windows(tokens, cfg.eval.token_length, cfg.eval.stride, cfg.eval.max_windows)
        _save_tensors({"input_ids": ids, "labels": labels}, eval_path)
    timings["tokenize_s"] = time.perf_counter() - t

    from safetensors.torch import load_file

    model = None
    dense_path = prep / "dense.json"
    if dense_path.exists():
        dense = json.loads(dense_path.read_text())
    else:
        t = time.perf_counter()
        model = load_model(local_mc).to(device)
        w = load_file(str(eval_path))
        ev = evaluate(model, w["input_ids"], w["labels"], batch_size=cfg.eval.batch_size, progress=True)
        dense = {**ev, "seconds": time.perf_counter() - t, "model": to_dict(cfg.model)}
        _write_json(dense, dense_path)

    masks_dir = prep / "masks"
    masks_dir.mkdir(exist_ok=True)
    mask_paths, targets = {}, {}
    blocks = None
    for p in plans:
        key = mask_key(p["method"], p["pattern"], p["sparsity"])
        path = masks_dir / f"{key}.safetensors"
        mask_paths[p["trial_id"]] = str(path)
        targets[p["trial_id"]] = p["sparsity"]
        if path.exists():
            continue
        t = time.perf_counter()
        model = load_model(local_mc).to(device)  # fresh weights: Wanda prunes as it goes
        calib = None
        if p["method"] == "wanda":
            if blocks is None:
                blocks = pack_blocks(load_file(str(train_path))["tokens"], cfg.data.seq_len)
            calib = calibration_ids(blocks, cfg.prune.calibration_samples, cfg.train.seed)
        pattern = parse_pattern(p["pattern"]) if p["pattern"] else None
        masks = compute_masks(model, p["method"], None if pattern else p["sparsity"], pattern, calib)
        apply_masks(model, masks)
        save_masks(masks, path)
        timings[f"mask_{key}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store.push_missing(model_dir, train_path, eval_path, dense_path,
                       *sorted({Path(p) for p in mask_paths.values()}))
    if store.remote:
        timings["push_s"] = time.perf_counter() - t
    return {
        "model_dir": str(model_dir),
        "train_tokens": str(train_path),
        "eval_windows": str(eval_path),
        "dense_perplexity": dense["perplexity"] if math.isfinite(dense["perplexity"]) else None,
        "dense": dense,
        "masks": mask_paths,
        "target_sparsity": targets,
        "timings": timings,
    }
