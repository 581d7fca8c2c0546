"""The results writer: upserts by key, and a crash at any moment leaves readable Parquet."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import pyarrow.parquet as pq

from sweep.results import EPOCHS_FILE, TRIALS_FILE, ResultsWriter, results_dir


def _row(trial: str, epoch: int, ppl: float) -> dict:
    return {"sweep": "s", "trial_id": trial, "epoch": epoch, "perplexity": ppl, "sparsity": 0.5,
            "batch_size": 2}


def test_upsert_keeps_one_row_per_key(tmp_path):
    w = ResultsWriter(tmp_path)
    w.upsert_epoch(_row("a", 0, 10.0))
    w.upsert_epoch(_row("a", 1, 9.0))
    w.upsert_epoch(_row("a", 1, 8.5))  # a resumed trial re-reports epoch 1
    w.upsert_trial({"trial_id": "a", "status": "running"})
    w.upsert_trial({"trial_id": "a", "status": "completed"})
    rows = pq.read_table(results_dir(tmp_path) / EPOCHS_FILE).to_pylist()
    assert [(r["trial_id"], r["epoch"], r["perplexity"]) for r in rows] == [("a", 0, 10.0), ("a", 1, 8.5)]
    trials = pq.read_table(results_dir(tmp_path) / TRIALS_FILE).to_pylist()
    assert [(t["trial_id"], t["status"]) for t in trials] == [("a", "completed")]
    # A new writer (a resumed sweep) starts from the rows on disk and keeps upserting.
    w2 = ResultsWriter(tmp_path)
    w2.upsert_epoch(_row("a", 1, 8.0))
    w2.drop_epochs_after("a", 0)
    rows = pq.read_table(results_dir(tmp_path) / EPOCHS_FILE).to_pylist()
    assert [(r["epoch"], r["perplexity"]) for r in rows] == [(0, 10.0)]


def _write_forever(path: str) -> None:
    w = ResultsWriter(path)
    epoch = 0
    while True:
        # Big enough that a write takes a while, so kills land mid-write.
        for t in range(200):
            w._epochs[(f"t{t}", epoch)] = _row(f"t{t}", epoch, float(epoch))
        w.upsert_epoch(_row("t0", epoch, float(epoch)))
        epoch += 1


def test_kill_during_writes_leaves_a_readable_file(tmp_path):
    path = results_dir(tmp_path) / EPOCHS_FILE
    rng = random.Random(0)
    last_rows = 0
    ctx = mp.get_context("spawn")
    for _ in range(6):
        proc = ctx.Process(target=_write_forever, args=(str(tmp_path),))
        proc.start()
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        table = pq.read_table(path)  # never torn: the rename is atomic
        assert table.num_rows >= last_rows
        last_rows = table.num_rows
    leftovers = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # Temporary files of killed writers may remain; they are hidden and never read.
    assert all(p.name.startswith(".") for p in leftovers)
