"""Benchmark: bytes per training checkpoint, and how long a save stops the step loop.

Bytes: today's dense DCP checkpoint (``trainers.checkpoint.save_training_state``) against the
sparse one (``trainers.sparse_state``), at 50% and 90% magnitude sparsity of a Llama shaped
like a scaled-down SmolLM2-135M (tied embeddings holding about a fifth of the parameters, as
there, so the dense remainder weighs as it would in the demo sweep). When the ``zstandard``
package is importable, today's format through DCP's ZStandard stream extension is measured
too (bytes and save time), as the other way to shrink the zeros.

Stall: the seconds a step loop is held per save by ``AsyncCheckpointer`` (in ``save``:
waiting for the previous write and, by default, copying the state off the training tensors;
with ``background_staging``, in the optimizer-step hook waiting for the background copy),
against a synchronous sparse save and today's synchronous save of the same state. Each timing
is the median of ``REPEATS`` repetitions, reported with min and max. What the background copy
and write take from the training steps is reported beside it (step time while a save is in
flight against without): on a CPU-only machine they share the cores with the step.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Row, format_table, ratio, stats

REPEATS = 5
SHAPE = dict(vocab_size=6144, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
             tie_word_embeddings=True)
BATCH, SEQ = 2, 64


def _setup(sparsity: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.parallel import shard_masks
    from trainers.prune import apply_masks, magnitude_masks

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    masks = magnitude_masks(model, sparsity)
    apply_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    pruned = shard_masks(model, masks)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, SHAPE["vocab_size"], (64, SEQ), generator=g)
    return model, opt, pruned, data


def _step(model, opt, pruned, data, i: int) -> None:
    from trainers.step import train_step

    rows = [(BATCH * i + j) % data.shape[0] for j in range(BATCH)]
    train_step(model, opt, data, [rows], pruned, 1e-4, 1.0, torch.device("cpu"))


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _timed(fn, root: Path, repeats: int) -> list[float]:
    """Seconds of ``fn(fresh_dir)``, each into a new directory, removed after."""
    out = []
    for i in range(repeats):
        d = root / f"t{i}"
        t0 = time.perf_counter()
        fn(d)
        out.append(time.perf_counter() - t0)
        shutil.rmtree(d)
    return out


def _zstd_save(model, opt, d: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    writer = dcp.FileSystemWriter(str(d), _extensions=[ZStandard()])
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)


def _zstd_available() -> bool:
    try:
        from torch.distributed.checkpoint._extension import ZStandard
    except ImportError:
        return False
    return ZStandard.is_available()


def _bytes_rows(sparsity: float, root: Path, repeats: int) -> tuple[list[Row], tuple]:
    from trainers.checkpoint import save_training_state
    from trainers.sparse_state import load_sparse_state, save_sparse_state

    model, opt, pruned, data = _setup(sparsity)
    for i in range(2):
        _step(model, opt, pruned, data, i)
    state = {"epoch": 0, "step": 2}
    save_training_state(root / "today", model, opt, state)
    save_sparse_state(root / "sparse", model, opt, pruned, state)
    today, new = _dir_bytes(root / "today"), _dir_bytes(root / "sparse")
    # The figure counts only if the small checkpoint restores what the big one holds.
    m2, o2, p2, _ = _setup(sparsity)
    load_sparse_state(root / "sparse", m2, o2, p2)
    exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  m2.state_dict().values(), strict=True))
    n_masked = sum(int(w.numel()) for w in pruned.values())
    n_all = sum(p.numel() for p in model.parameters())
    r = ratio(new, today)
    pct = int(round(sparsity * 100))
    rows = [Row(
        "checkpoint", f"checkpoint bytes at {pct}% sparsity (sparse / today)", "sparse",
        new / 2**20, "today", today / 2**20, r, unit="MiB",
        goal="<= 0.35" if sparsity >= 0.9 else "", met=(r <= 0.35) if sparsity >= 0.9 else None,
        note=f"masked layers {n_masked / n_all:.0%} of {n_all / 1e6:.1f}M parameters; "
             f"restore exact: {exact}",
        details={"today_bytes": today, "sparse_bytes": new, "exact": exact,
                 "masked_fraction": n_masked / n_all},
    )]
    if _zstd_available():
        times, plain = [], []
        for _ in range(repeats):  # interleaved: both see the same load
            times += _timed(lambda d: _zstd_save(model, opt, d), root, 1)
            plain += _timed(lambda d: save_training_state(d, model, opt, state), root, 1)
        _zstd_save(model, opt, root / "zstd")
        z = _dir_bytes(root / "zstd")
        zt, pt = stats(times), stats(plain)
        rows.append(Row(
            "checkpoint", f"today + zstd bytes at {pct}% sparsity (zstd / today)", "zstd",
            z / 2**20, "today", today / 2**20, ratio(z, today), unit="MiB",
            note=f"zstd save {zt['median']:.2f} s (min {zt['min']:.2f}, max {zt['max']:.2f}) "
                 f"against today's {pt['median']:.2f} s (min {pt['min']:.2f}, max "
                 f"{pt['max']:.2f})",
            details={"zstd_bytes": z, "zstd_save_s": zt, "today_save_s": pt},
        ))
    return rows, (model, opt, pruned, data)


def _async_save(ckpt, d: Path, state: dict, steps) -> tuple[float, list, list]:
    """One async save followed by ``steps()``'s steps; (stall, busy step times, idle step
    times). The stall: time in ``save``, in the optimizer hook waiting for a background copy,
    and in the closing ``wait`` if the write outlasted the steps."""
    written: list[Path] = []
    hook0 = ckpt.staging_wait_s
    t0 = time.perf_counter()
    ckpt.save(d, state, on_done=written.append)
    stall = time.perf_counter() - t0
    busy, idle = steps(ckpt)
    t0 = time.perf_counter()
    ckpt.wait()
    stall += time.perf_counter() - t0 + ckpt.staging_wait_s - hook0
    shutil.rmtree(written[0])
    return stall, busy, idle


def _stall_rows(setup, root: Path, repeats: int, sparsity: float, every: int = 4) -> list[Row]:
    """Each repetition: an async save (copy in the step loop) then ``every`` steps, the same
    with the copy in the background, then a synchronous sparse save and today's synchronous
    save of the same state; interleaved so that all four see the same load on a shared
    machine."""
    from trainers.checkpoint import save_training_state
    from trainers.sparse_state import AsyncCheckpointer, save_sparse_state

    model, opt, pruned, data = setup
    state = {"epoch": 0, "step": 0}
    stalls = {False: [], True: []}
    sync_sparse, sync_today, busy_steps, idle_steps = [], [], [], []
    counter = iter(range(10**9))

    def steps(ckpt):
        busy, idle = [], []
        for _ in range(every):
            in_flight = ckpt.in_flight
            t0 = time.perf_counter()
            _step(model, opt, pruned, data, next(counter))
            (busy if in_flight else idle).append(time.perf_counter() - t0)
        return busy, idle

    ckpts = {bg: AsyncCheckpointer(model, opt, pruned, background_staging=bg)
             for bg in (False, True)}
    try:
        for rep in range(repeats):
            for bg, ckpt in ckpts.items():
                stall, busy, idle = _async_save(ckpt, root / f"a{rep}-{bg}", state, steps)
                stalls[bg].append(stall)
                busy_steps += busy
                idle_steps += idle
            # Without the zero check, as the async saves after the first: the same work.
            sync_sparse += _timed(
                lambda d: save_sparse_state(d, model, opt, pruned, state, verify=False), root, 1)
            sync_today += _timed(lambda d: save_training_state(d, model, opt, state), root, 1)
    finally:
        for ckpt in ckpts.values():
            ckpt.close()
    s, t = stats(sync_sparse), stats(sync_today)
    pct = int(round(sparsity * 100))

    def fmt(x):
        return f"median {x['median']:.3f} s (min {x['min']:.3f}, max {x['max']:.3f}, n {x['n']})"

    rows = []
    for bg, label in ((False, "copy in loop"), (True, "copy in background")):
        a = stats(stalls[bg])
        r = ratio(a["median"], s["median"])
        rows.append(Row(
            "checkpoint", f"save stall at {pct}%, {label} (async / sync sparse)", "async",
            a["median"], "sync", s["median"], r, unit="s", goal="<= 0.10",
            met=r is not None and r <= 0.10,
            note=f"async {fmt(a)}; sync sparse {fmt(s)}; today's sync {fmt(t)} (async / "
                 f"today {ratio(a['median'], t['median']):.3g}); a save every {every} steps",
            details={"async_stall_s": a, "sync_sparse_s": s, "today_sync_s": t},
            a_stats=a, b_stats=s))
    if busy_steps and idle_steps:
        b, d = stats(busy_steps), stats(idle_steps)
        # What an async save costs the loop in all: its stall plus the time the steps it
        # overlapped lost to it (against the median idle step), per save, both modes pooled.
        extra = sum(x - d["median"] for x in busy_steps) / (2 * repeats)
        pooled = statistics.median(stalls[False] + stalls[True]) + extra
        rows.append(Row(
            "checkpoint", f"loop time per save at {pct}% (async, stall + slower steps / sync "
            "sparse)", "async", pooled, "sync", s["median"], ratio(pooled, s["median"]),
            unit="s", note=f"steps overlapping a save lost {extra:.3f} s per save on average; "
                           "on a CPU-only machine the copy and write take cores from the step",
            details={"extra_step_s_per_save": extra}))
        rows.append(Row(
            "checkpoint", f"step time at {pct}% while a save is in flight (busy / idle)", "busy",
            b["median"], "idle", d["median"], ratio(b["median"], d["median"]), unit="s",
            note=f"the background copy and write share the CPU cores; {b['n']} busy, "
                 f"{d['n']} idle steps", details={"busy_step_s": b, "idle_step_s": d},
            a_stats=b, b_stats=d))
    return rows


def run(repeats: int = REPEATS) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for sparsity in (0.5, 0.9):
            root = Path(tmp) / f"s{sparsity}"
            (root / "stall").mkdir(parents=True)
            r, setup = _bytes_rows(sparsity, root, repeats)
            rows += r
            rows += _stall_rows(setup, root / "stall", repeats, sparsity)
    if not _zstd_available():
        rows[0].note += "; zstd not measured (pip install zstandard)"
    return rows


def bench_checkpoint(ctx=None) -> list[Row]:
    return run(3 if ctx and ctx.get("quick") else REPEATS)


if __name__ == "__main__":
    print(format_table(run()))
