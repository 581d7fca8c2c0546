"""The per-worker loop of one trial: load -> mask -> shard -> [train epoch -> evaluate ->
checkpoint -> report]*.

Runs inside a Ray Train worker (one FSDP2 rank). Everything per-sweep (the materialized
model, tokens, evaluation windows, masks, the dense perplexity) was prepared once before the
grid; a trial only reads it. Rank 0 reports metrics (forwarded to Tune) and writes the log.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.checkpoint import export_hf, load_training_state, save_training_state
from trainers.data import micro_batches, pack_blocks, worker_batch
from trainers.parallel import all_reduce_sum, measured_sparsity, shard_masks, shard_model
from trainers.step import train_step
from trainers.trial_log import (
    TrialLog,
    format_memory,
    format_sparsity,
    format_summary,
    memory_mb,
    reset_peak,
    trend,
)


@dataclass
class LoopState:
    """Everything the loop needs to resume exactly (saved as JSON beside the shards)."""

    epoch: int = 0  # evaluations done after epoch 0 (the baseline)
    step: int = 0  # optimizer steps done, over all epochs; also the data position
    epoch_loss_sum: float = 0.0  # loss of the steps of the current, unfinished epoch
    epoch_loss_steps: int = 0
    baseline: float | None = None
    best: float | None = None
    best_epoch: int | None = None
    sparsity_actual: float | None = None
    history: list = field(default_factory=list)


def _setup(config: dict):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["train"]["seed"] + rank)
    return rank, world, device


def _load_masked_model(config: dict, device: torch.device):
    from sweep.config import ModelConfig
    from trainers.model import load_model
    from trainers.prune import apply_masks, decoder_blocks, load_masks

    model = load_model(ModelConfig(name_or_path=config["model_dir"]))
    masks = load_masks(config["mask_path"])
    apply_masks(model, masks)
    if device.type == "cuda":
        model.to(device)
    _, blocks = decoder_blocks(model)
    return model, blocks, masks


def _evaluate(model, windows, config, rank, world, log: TrialLog) -> dict:
    from eval.perplexity import evaluate

    t0 = time.perf_counter()
    out = evaluate(
        model,
        windows["input_ids"],
        windows["labels"],
        batch_size=config["eval_batch_size"],
        rank=rank,
        world_size=world,
        all_reduce=all_reduce_sum if world > 1 else None,
        progress=config["progress"] and rank == 0,
    )
    out["seconds"] = time.perf_counter() - t0
    return out


def _train_epoch(model, opt, blocks, lmasks, plan, config, st: LoopState, rank, world, device, on_step):
    """Train until the end of epoch ``st.epoch + 1`` (resuming mid-epoch if needed)."""
    tcfg = config["train"]
    total_steps = plan["steps_per_epoch"] * plan["num_epochs"]
    end = (st.epoch + 1) * plan["steps_per_epoch"]
    n_blocks = blocks.shape[0]
    from sweep.plan import lr_at

    while st.step < end:
        idx = worker_batch(st.step, plan["batch_size"], n_blocks, tcfg["seed"], rank, world)
        lr = lr_at(st.step, plan["lr"], total_steps, tcfg["warmup_frac"])
        loss = train_step(
            model, opt, blocks, micro_batches(idx, plan["grad_accum"]), lmasks, lr,
            tcfg["max_grad_norm"], device,
        )
        st.step += 1
        st.epoch_loss_sum += loss
        st.epoch_loss_steps += 1
        on_step(st)


def _global_mean(value: float, world: int, device) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    all_reduce_sum(t)
    return float(t.item()) / world


def train_loop(config: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    import ray.train
    from ray.train import Checkpoint

    rank, world, device = _setup(config)
    plan = config["plan"]
    log = TrialLog(plan["trial_id"], config["log_path"], enabled=rank == 0)
    t_start = time.perf_counter()

    model, blocks_list, masks = _load_masked_model(config, device)
    names = sorted(masks)
    shard_model(model, blocks_list, mixed_precision=device.type == "cuda")
    lmasks = shard_masks(model, masks)
    opt = torch.optim.AdamW(
        model.parameters(), lr=plan["lr"], weight_decay=config["train"]["weight_decay"]
    )
    from safetensors.torch import load_file

    tokens = load_file(config["train_tokens"])["tokens"]
    blocks = pack_blocks(tokens, config["seq_len"])
    windows = load_file(config["eval_windows"])

    st = LoopState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = LoopState(**load_training_state(Path(d), model, opt))
        log(f"resumed from checkpoint: epoch {st.epoch}, step {st.step}")

    def report(metrics: dict, save: bool) -> None:
        metrics = {**metrics, "trial_name": plan["trial_id"]}
        if world > 1:
            dist.barrier()
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            save_training_state(Path(tmp), model, opt, st.__dict__)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def row(epoch: int, ev: dict, extra: dict) -> dict:
        mem_now, mem_peak, _ = memory_mb(device)
        return {
            "kind": "eval",
            "epoch": epoch,
            "perplexity": ev["perplexity"],
            "eval_tokens": ev["tokens"],
            "eval_s": ev["seconds"],
            "steps": st.step,
            "samples": st.step * plan["batch_size"],
            "tokens": st.step * plan["batch_size"] * config["seq_len"],
            "sparsity_actual": st.sparsity_actual,
            "baseline_perplexity": st.baseline,
            "best_perplexity": st.best,
            "best_epoch": st.best_epoch,
            "wall_s": time.perf_counter() - t_start,
            "mem_peak_mb": mem_peak,
            "lr": plan["lr"],
            **extra,
        }

    if st.baseline is None:
        _baseline(model, names, windows, config, plan, st, rank, world, log, row, report)

    while st.epoch < plan["num_epochs"]:
        reset_peak(device)
        mem_before, _, label = memory_mb(device)
        t0 = time.perf_counter()
        step0 = st.step
        every = config["checkpoint"]["every_steps"]

        def on_step(s: LoopState) -> None:
            if every and s.step % every == 0 and s.step % plan["steps_per_epoch"]:
                report(row(s.epoch, {"perplexity": s.history[-1]["perplexity"], "tokens": 0, "seconds": 0}, {"kind": "step"}), save=True)

        _train_epoch(model, opt, blocks, lmasks, plan, config, st, rank, world, device, on_step)
        train_s = time.perf_counter() - t0
        mem_after, mem_peak, _ = memory_mb(device)
        loss = _global_mean(st.epoch_loss_sum / max(st.epoch_loss_steps, 1), world, device)
        st.epoch += 1
        ev = _evaluate(model, windows, config, rank, world, log)
        ppl = ev["perplexity"]
        sp = measured_sparsity(model, names)
        st.sparsity_actual = _overall(sp, model, names)
        improved = math.isfinite(ppl) and (st.best is None or ppl < st.best)
        if improved:
            st.best, st.best_epoch = ppl, st.epoch
        tokens = (st.step - step0) * plan["batch_size"] * config["seq_len"]
        log(
            f"── epoch {st.epoch}/{plan['num_epochs']} ──\n"
            f"loss {loss:.4f} (mean over {st.step - step0} batches, {st.epoch_loss_steps} steps this epoch), "
            f"{(st.step - step0) * plan['batch_size']} samples, {tokens} tokens, "
            f"{tokens / max(train_s, 1e-9):.1f} tok/s, {train_s:.1f} s\n"
            + format_memory(mem_before, mem_after, mem_peak, label)
            + f"\nEpoch {st.epoch}: {ppl:.2f} ({trend(ppl, st.baseline)} vs baseline {st.baseline:.2f}), "
            f"eval {ev['seconds']:.1f} s"
        )
        st.history.append({"epoch": st.epoch, "perplexity": ppl, "loss": loss})
        extra = {"loss": loss, "tokens_per_s": tokens / max(train_s, 1e-9),
                 "epoch_steps": st.step - step0, "diverged": not math.isfinite(loss) or not math.isfinite(ppl)}
        st.epoch_loss_sum, st.epoch_loss_steps = 0.0, 0
        if improved and config["export_dir"]:
            export_hf(model, Path(config["model_dir"]), Path(config["export_dir"]))
        report(row(st.epoch, ev, extra), save=True)

    final = st.history[-1]["perplexity"] if st.history else st.baseline
    log(format_summary(st.baseline, final, st.best, st.best_epoch))


def _overall(per_layer: dict[str, float], model, names: list[str]) -> float:
    modules = dict(model.named_modules())
    sizes = {n: modules[n].weight.numel() for n in names}
    total = sum(sizes.values())
    return sum(per_layer[n] * sizes[n] for n in names) / total


def _baseline(model, names, windows, config, plan, st, rank, world, log, row, report) -> None:
    """Epoch 0: the pruned model before any training step."""
    sp = measured_sparsity(model, names)
    st.sparsity_actual = _overall(sp, model, names)
    values = list(sp.values())
    summary = {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}
    target = config["target_sparsity"]
    ev = _evaluate(model, windows, config, rank, world, log)
    st.baseline = st.best = ev["perplexity"]
    st.best_epoch = 0
    dense = config.get("dense_perplexity")
    log(
        f"── baseline ── {plan['method']}{' ' + plan['pattern'] if plan['pattern'] else ''} "
        f"sparsity {plan['sparsity']}, batch {plan['batch_size']} "
        f"({plan['batch_size'] // world} per worker x {world} workers, accumulation {plan['grad_accum']}), "
        f"lr {plan['lr']:.3e}, {plan['steps_per_epoch']} steps/epoch x {plan['num_epochs']} epochs\n"
        + (f"dense perplexity {dense:.2f}\n" if dense else "")
        + f"pruned perplexity (epoch 0) {ev['perplexity']:.2f}"
        + (f" ({trend(ev['perplexity'], dense)} vs dense)" if dense else "")
        + f", {ev['windows']} windows, {ev['tokens']} tokens, {ev['seconds']:.1f} s\n"
        + format_sparsity(summary, target, len(names))
    )
    st.history.append({"epoch": 0, "perplexity": ev["perplexity"], "loss": None})
    if config["export_dir"] and config.get("export_baseline", False):
        export_hf(model, Path(config["model_dir"]), Path(config["export_dir"]))
    report(row(0, ev, {"loss": None, "tokens_per_s": None, "epoch_steps": 0,
                       "sparsity_min": summary["min"], "sparsity_max": summary["max"],
                       "diverged": not math.isfinite(ev["perplexity"])}), save=False)
