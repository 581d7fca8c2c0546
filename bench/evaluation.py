"""Benchmark 3: ``eval.perplexity.evaluate`` throughput.

batched   batch_size 8 over batch_size 1 (one window per forward: the plain loop), same tiny
          model and windows, one process with one torch thread; alternated and repeated, the
          median of each is kept.
scaling   the same windows split across 2 gloo processes (``world_size=2``, 1 thread each)
          over 1 process with 1 thread, both at batch_size 8.
Every measurement runs in a spawned process so thread settings and imports are alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from bench.common import TINY, Row, ratio, stats

INNER = 3  # evaluations per timed unit: a unit of ~0.1 s alone is at the mercy of the scheduler


def _model_and_windows(n_windows: int):
    from eval.perplexity import make_windows, tokenize_text
    from eval.text import load_text
    from sweep.config import load_config
    from trainers.model import build_model, byte_tokenizer

    cfg = load_config(TINY)
    tok = byte_tokenizer()
    model = build_model(cfg.model, vocab_size=len(tok)).eval()
    tokens = tokenize_text(tok, load_text(cfg.eval.text))
    ids, labels = make_windows(tokens, cfg.eval.token_length, cfg.eval.stride, n_windows)
    return model, ids, labels


def _worker(rank: int, world: int, port: int, n_windows: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from eval.perplexity import evaluate

    model, ids, labels = _model_and_windows(n_windows)
    result: dict = {}
    if world == 1:
        evaluate(model, ids[:8], labels[:8], batch_size=8)  # warm-up
        times: dict[int, list[float]] = {1: [], 8: []}
        ppl = {}
        for _ in range(repeats):
            for bs in (1, 8):
                t0 = time.perf_counter()
                for _ in range(INNER):
                    ev = evaluate(model, ids, labels, batch_size=bs)
                times[bs].append((time.perf_counter() - t0) / INNER)
                ppl[bs] = ev["perplexity"]
        result = {"seconds": times, "tokens": ev["tokens"], "perplexity": ppl}
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        evaluate(model, ids[:16], labels[:16], batch_size=8, rank=rank, world_size=world,
                 all_reduce=dist.all_reduce)  # warm-up
        secs = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(INNER):
                ev = evaluate(model, ids, labels, batch_size=8, rank=rank, world_size=world,
                              all_reduce=dist.all_reduce)
            # The slower rank decides: the all_reduce inside evaluate waits for it.
            secs.append((time.perf_counter() - t0) / INNER)
        result = {"seconds": {8: secs}, "tokens": ev["tokens"], "perplexity": {8: ev["perplexity"]}}
        dist.destroy_process_group()
    if rank == 0:
        torch.save(result, out)


def _spawn(world: int, n_windows: int, repeats: int) -> dict:
    from bench.job import _free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_worker, args=(world, _free_port(), n_windows, repeats, out), nprocs=world,
                 join=True)
        return torch.load(out, weights_only=False)


def bench_evaluation(ctx) -> list[Row]:
    n = 256 if ctx["quick"] else 496  # the eval text has 503 windows of 64
    repeats = 3 if ctx["quick"] else 5
    one = _spawn(1, n, repeats)
    two = _spawn(2, n, repeats)
    tokens = one["tokens"]
    tps = {bs: tokens / statistics.median(s) for bs, s in one["seconds"].items()}
    tps2 = two["tokens"] / statistics.median(two["seconds"][8])
    r = ratio(tps[8], tps[1])
    st = {bs: stats([tokens / x for x in secs]) for bs, secs in one["seconds"].items()}
    st2 = stats([two["tokens"] / x for x in two["seconds"][8]])
    same = abs(one["perplexity"][1] - one["perplexity"][8]) <= 1e-6 * one["perplexity"][1]
    same2 = abs(two["perplexity"][8] - one["perplexity"][8]) <= 1e-6 * one["perplexity"][8]
    details = {"windows": n, "window_tokens": 64, "repeats": repeats, "scored_tokens": tokens,
               "seconds_1proc": one["seconds"], "seconds_2proc": two["seconds"],
               "perplexity": {"bs1": one["perplexity"][1], "bs8": one["perplexity"][8],
                              "bs8_2proc": two["perplexity"][8]},
               "perplexity_equal_bs1_bs8": same, "perplexity_equal_1_2_procs": same2}
    return [
        Row("evaluation", "evaluation batched (bs 8 / bs 1)", "bs 8", tps[8], "bs 1", tps[1], r,
            unit="tok/s", goal=">= 1.5x", met=r is not None and r >= 1.5,
            note=f"{n} windows of 64 tokens, 1 thread, median of {repeats}x{INNER} passes; perplexity "
                 f"{'identical' if same else 'DIFFERS'} across batch sizes",
            details=details, a_stats=st[8], b_stats=st[1]),
        Row("evaluation", "evaluation 2 workers / 1 (bs 8)", "2 procs", tps2, "1 proc", tps[8],
            ratio(tps2, tps[8]), unit="tok/s", goal="ideal 2.0 (info)",
            note=f"2 gloo ranks x 1 thread on this 2-core (shared) machine; perplexity "
                 f"{'identical' if same2 else 'DIFFERS'} to 1 process",
            a_stats=st2, b_stats=st[8]),
    ]
