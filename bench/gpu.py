"""The GPU check: tokens/s and model FLOPs utilization of a trial's training step and of the
evaluation, on a model of OPT-350m's shape built from its config (no hub), pruned to 50%.

It runs the product's own per-step code (``trainers.parallel.shard_model``: FSDP2 with bf16
compute and fp32 master weights on CUDA; ``shard_masks``; ``trainers.step.train_step`` with
masked gradients; ``eval.perplexity.evaluate``) in one process with a one-rank NCCL group, and
needs no Ray: the device machine has torch and transformers but not Ray, and Ray's overhead
around the step is measured on CPU by ``make bench``. One short prepared script, to run where
a GPU is lent::

    PYTHONUNBUFFERED=1 python3 -m bench.gpu --out $OUT/gpu.json      # about 2 minutes on an H200

and on CPU (what the tests do): ``python -m bench.gpu --shape tiny --device cpu``.

Model FLOPs per token (PaLM's accounting, dense: unstructured masks save no matmul work):
training 6 N + 12 L d s, evaluation 2 N + 4 L d s (N parameters, L layers, d hidden size,
s sequence length). MFU divides achieved FLOP/s by the chip's bf16 dense peak (``--peak``,
989 TFLOP/s for an H100/H200 SXM) and, beside it, by a matmul measured on the spot.

Checkpoints (``--checkpoint-repeats``, 0 to skip), the figures ``make bench`` measures on CPU:
bytes of today's dense DCP checkpoint (``trainers.checkpoint``) and of the sparse one
(``trainers.sparse_state``) of the trained state, seconds of a synchronous save of each, and
the seconds an asynchronous save holds the step loop (``AsyncCheckpointer.save``: waiting for
the previous write and copying the state to pinned CPU memory), with a training step between
saves; each the median of the repeats with min and max, written under ``--checkpoint-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {
    # facebook/opt-350m's config.json (the fields that set size and compute).
    "opt350m": dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                    num_attention_heads=16, max_position_embeddings=2048,
                    word_embed_proj_dim=512, do_layer_norm_before=False,
                    activation_function="relu"),
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                 num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                 do_layer_norm_before=True, activation_function="relu"),
}


def build(shape: str, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**SHAPES[shape], dropout=0.0, attention_dropout=0.0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """bf16 FLOP/s of an n x n x n matrix product, mean of ``reps`` after warm-up."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def checkpoint_figures(model, opt, pruned, step, device, repeats: int, root: Path) -> dict:
    """Bytes and save seconds of today's dense and the sparse checkpoint; the async stall."""
    from trainers.checkpoint import save_training_state
    from trainers.sparse_state import AsyncCheckpointer, save_sparse_state

    state = {"epoch": 0, "step": 0}
    times: dict[str, list[float]] = {"dense_sync_s": [], "sparse_sync_s": [], "async_stall_s": []}
    size = {}
    for i in range(repeats):  # interleaved: both see the same machine
        for key, save in (("dense", lambda d: save_training_state(d, model, opt, state)),
                          ("sparse", lambda d: save_sparse_state(d, model, opt, pruned, state))):
            d = root / f"{key}-{i}"
            sync(device)
            t = time.perf_counter()
            save(d)
            sync(device)
            times[f"{key}_sync_s"].append(time.perf_counter() - t)
            size[key] = _dir_bytes(d)
            shutil.rmtree(d)
    with AsyncCheckpointer(model, opt, pruned) as ckpt:
        for i in range(repeats + 1):  # the first save pays the pinned buffers' allocation
            step(i)
            sync(device)
            t = time.perf_counter()
            ckpt.save(root / f"async-{i}", state)
            sync(device)
            if i:
                times["async_stall_s"].append(time.perf_counter() - t)
    out = {k: _stats(v) for k, v in times.items()}
    out.update(dense_bytes=size["dense"], sparse_bytes=size["sparse"],
               bytes_ratio=size["sparse"] / size["dense"],
               stall_ratio_vs_sparse_sync=(out["async_stall_s"]["median"]
                                           / out["sparse_sync_s"]["median"]))
    return out


def run(args) -> dict:
    from eval.perplexity import evaluate, make_windows
    from trainers.data import micro_batches
    from trainers.parallel import measured_sparsity, shard_masks, shard_model
    from trainers.prune import apply_masks, decoder_blocks, magnitude_masks
    from trainers.step import train_step

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        model = build(args.shape)
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        masks = magnitude_masks(model, args.sparsity)
        apply_masks(model, masks)
        names = sorted(masks)
        model.to(device)
        _, blocks = decoder_blocks(model)
        model = shard_model(model, blocks, mixed_precision=device.type == "cuda")
        pruned = shard_masks(model, masks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

        g = torch.Generator().manual_seed(0)
        seq, batch = args.seq, args.batch
        data = torch.randint(0, cfg.vocab_size, (batch * (args.warmup + args.steps), seq),
                             generator=g)
        micro = max(1, batch // args.micro_batch)

        def step(i: int) -> float:
            idx = list(range(i * batch, (i + 1) * batch))
            return train_step(model, opt, data, micro_batches(idx, micro), pruned, 1e-5, 1.0,
                              device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            step(i)
        sync(device)
        t = time.perf_counter()
        losses = [step(args.warmup + i) for i in range(args.steps)]
        sync(device)
        train_s = time.perf_counter() - t
        train_tps = args.steps * batch * seq / train_s
        mem_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        sparsity = measured_sparsity(model, names)

        tokens = torch.randint(0, cfg.vocab_size, (seq * args.eval_windows + 1,), generator=g)
        ids, labels = make_windows(tokens, seq, seq, args.eval_windows)
        evaluate(model, ids[: args.eval_batch], labels[: args.eval_batch], batch_size=args.eval_batch)
        sync(device)
        t = time.perf_counter()
        ev = evaluate(model, ids, labels, batch_size=args.eval_batch)
        sync(device)
        eval_s = time.perf_counter() - t
        eval_tps = ev["tokens"] / eval_s

        ckpt = None
        if args.checkpoint_repeats:
            root = Path(tempfile.mkdtemp(prefix="gpu-ckpt-", dir=args.checkpoint_dir))
            try:
                ckpt = checkpoint_figures(model, opt, pruned, step, device,
                                          args.checkpoint_repeats, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)

        L, d = cfg.num_hidden_layers, cfg.hidden_size
        train_fpt = 6 * n_params + 12 * L * d * seq
        eval_fpt = 2 * n_params + 4 * L * d * seq
        measured = matmul_peak(device)
        peak = args.peak * 1e12 if device.type == "cuda" else None

        def mfu(tps: float, fpt: int, against: float | None) -> float | None:
            return None if not against else tps * fpt / against

        return {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": args.shape, "params": n_params,
            "sparsity_target": args.sparsity,
            "sparsity_after_training": sum(sparsity.values()) / len(sparsity),
            "seq_len": seq, "batch": batch, "micro_batches": micro, "steps": args.steps,
            "loss_first": losses[0], "loss_last": losses[-1],
            "train_tokens_per_s": train_tps, "train_step_s": train_s / args.steps,
            "train_tflops_per_s": train_tps * train_fpt / 1e12,
            "train_mfu": mfu(train_tps, train_fpt, peak),
            "train_mfu_vs_measured_matmul": mfu(train_tps, train_fpt, measured),
            "train_mem_peak_mib": mem_peak,
            "eval_windows": ev["windows"], "eval_batch": args.eval_batch,
            "eval_tokens_per_s": eval_tps, "eval_tflops_per_s": eval_tps * eval_fpt / 1e12,
            "eval_mfu": mfu(eval_tps, eval_fpt, peak),
            "eval_mfu_vs_measured_matmul": mfu(eval_tps, eval_fpt, measured),
            "eval_perplexity_random_tokens": ev["perplexity"],
            "peak_tflops_spec": args.peak if peak else None,
            "matmul_bf16_tflops_measured": measured / 1e12 if measured else None,
            "checkpoint": ckpt,
        }
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt350m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--peak", type=float, default=989.0, help="bf16 dense TFLOP/s of the chip")
    ap.add_argument("--checkpoint-repeats", type=int, default=3,
                    help="saves per checkpoint figure (0: skip the checkpoint figures)")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="where the checkpoints are written (default: the temp directory)")
    ap.add_argument("--out", help="also write the figures here (JSON)")
    args = ap.parse_args(argv)
    if args.shape == "tiny":
        args.seq = min(args.seq, SHAPES["tiny"]["max_position_embeddings"])
    out = run(args)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
