"""Benchmark 5: what FSDP2 saves per worker.

Per-worker bytes of the local shards of parameters, of gradients after one backward, of AdamW
state after one step (and of the float mask shards the worker keeps), with 2 gloo processes
over 1. Counted exactly from the tensors (``to_local()``), not from RSS, so the figure does not
move with the load.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from bench.common import TINY, Row, ratio


def _nbytes(t) -> int:
    from trainers.parallel import local

    t = local(t)
    return t.numel() * t.element_size()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sweep.config import load_config
    from trainers.model import build_model, byte_tokenizer
    from trainers.parallel import mask_gradients, shard_masks, shard_model
    from trainers.prune import apply_masks, decoder_blocks, magnitude_masks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(TINY)
    model = build_model(cfg.model, vocab_size=len(byte_tokenizer()))
    masks = magnitude_masks(model, 0.5)
    apply_masks(model, masks)
    _, blocks = decoder_blocks(model)
    shard_model(model, blocks, mixed_precision=False)
    lmasks = shard_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4 // world, 64), generator=g)
    model(input_ids=batch, labels=batch).loss.backward()
    mask_gradients(model, lmasks)
    counts = {
        "params": sum(_nbytes(p) for p in model.parameters()),
        "grads": sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None),
    }
    opt.step()
    counts["adamw_state"] = sum(_nbytes(v) for st in opt.state.values() for v in st.values()
                                if torch.is_tensor(v))
    counts["mask_shards"] = sum(_nbytes(m) for m in lmasks.values())
    t = torch.tensor([[counts[k] for k in sorted(counts)]], dtype=torch.float64)
    gathered = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(gathered, t)
    if rank == 0:
        per_rank = [dict(zip(sorted(counts), map(int, x[0].tolist()), strict=True)) for x in gathered]
        torch.save(per_rank, out)
    dist.destroy_process_group()


def _spawn(world: int) -> list[dict]:
    from bench.job import _free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.pt")
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def bench_fsdp_memory(ctx) -> list[Row]:
    one, two = _spawn(1), _spawn(2)

    def total(d: dict) -> int:
        return d["params"] + d["grads"] + d["adamw_state"]

    a = max(total(d) for d in two)  # the fullest worker
    b = total(one[0])
    r = ratio(a, b)
    return [Row(
        "fsdp_memory", "FSDP memory per worker (2 / 1)", "2 workers", a / 2**20, "1 worker",
        b / 2**20, r, unit="MiB", goal="ideal 0.5 (info)",
        note="params + grads + AdamW state, local shards (ideal 0.5); float mask shards "
             f"add {max(d['mask_shards'] for d in two) / 2**20:.2f} / "
             f"{one[0]['mask_shards'] / 2**20:.2f} MiB",
        details={"one_worker": one, "two_workers": two},
    )]
