"""End to end through real Ray: the tiny sweep, then killing it (driver, worker) and resuming.

One uninterrupted tiny sweep is the reference; the kill tests run one trial of the same grid
(trial results do not depend on the other trials) and must land on the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sweep.config import load_config
from sweep.results import EPOCHS_FILE, TRIALS_FILE, results_dir

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# Longer epochs than the shipped tiny config, so kills land mid-epoch; checkpoints every 4 steps.
OVERRIDES = ["train.base_samples=48", "checkpoint.every_steps=4"]
CONTRACT_EPOCH_COLUMNS = (
    "sweep trial_id sparsity batch_size epoch perplexity improvement_pct loss lr steps samples "
    "tokens sparsity_actual wall_s tokens_per_s mem_peak_mb timestamp"
).split()


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweep.cli", *args]


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read(sweep_dir: Path, name: str) -> list[dict]:
    return pq.read_table(results_dir(sweep_dir) / name).to_pylist()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted tiny sweep (its own embedded Ray cluster, shut down at the end)."""
    storage = tmp_path_factory.mktemp("ref")
    args = ["run", str(TINY), "--storage", str(storage)]
    for o in OVERRIDES:
        args += ["--set", o]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "tiny"


def test_every_row_obeys_the_contract(reference):
    cfg = load_config(TINY, OVERRIDES, check_paths=False)
    epochs = read(reference, EPOCHS_FILE)
    trials = read(reference, TRIALS_FILE)
    assert len(trials) == 4 and len(epochs) == 4 * 3
    assert {(r["trial_id"], r["epoch"]) for r in epochs} == {
        (t, e) for t in ("s0.5-b2", "s0.5-b4", "s0.8-b2", "s0.8-b4") for e in (0, 1, 2)
    }
    for r in epochs:
        for col in CONTRACT_EPOCH_COLUMNS:
            if r["epoch"] == 0 and col in ("loss", "tokens_per_s"):
                assert r[col] is None  # nothing trained yet
            else:
                assert r[col] is not None, (col, r)
        steps_per_epoch = math.ceil(cfg.train.base_samples / r["batch_size"])
        assert r["steps"] == r["epoch"] * steps_per_epoch
        assert r["samples"] == r["steps"] * r["batch_size"]
        assert r["tokens"] == r["samples"] * cfg.data.seq_len
        assert r["lr"] == pytest.approx(cfg.train.base_lr * math.sqrt(r["batch_size"]))
        assert r["sparsity_actual"] == pytest.approx(r["sparsity"], abs=1e-3)
        assert r["sparsity_actual"] >= r["sparsity"] - 1e-9  # pruned weights never revive
        base = next(b for b in epochs if b["trial_id"] == r["trial_id"] and b["epoch"] == 0)
        assert r["improvement_pct"] == pytest.approx(
            100 * (base["perplexity"] - r["perplexity"]) / base["perplexity"]
        )
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    dense = {t["dense_perplexity"] for t in trials}
    assert len(dense) == 1 and None not in dense  # computed once per sweep
    for t in trials:
        rows = sorted((r for r in epochs if r["trial_id"] == t["trial_id"]), key=lambda r: r["epoch"])
        assert t["status"] == "completed" and t["epochs_completed"] == 2
        assert t["baseline_perplexity"] == rows[0]["perplexity"]
        assert t["final_perplexity"] == rows[-1]["perplexity"]
        best = min(rows, key=lambda r: r["perplexity"])
        assert (t["best_perplexity"], t["best_epoch"]) == (best["perplexity"], best["epoch"])
        assert t["final_perplexity"] < t["baseline_perplexity"]  # training recovers something
        assert t["steps_per_epoch"] == math.ceil(48 / t["batch_size"]) and t["workers"] == 2


def test_logs_tensorboard_and_export(reference):
    for tid in ("s0.5-b2", "s0.8-b4"):
        text = (reference / "logs" / f"{tid}.log").read_text()
        assert "── baseline ──" in text and "Epoch 2:" in text and "summary: baseline" in text
        assert "memory (process RSS)" in text and "sparsity (measured on weights)" in text
        assert list((reference / "tune" / tid).glob("events.out.tfevents.*"))
    assert "dense perplexity" in (reference / "logs" / "sweep.log").read_text()
    # The best model, exported in Hugging Face format, evaluates to its recorded perplexity.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from eval.perplexity import evaluate

    trial = next(t for t in read(reference, TRIALS_FILE) if t["trial_id"] == "s0.5-b2")
    model = AutoModelForCausalLM.from_pretrained(trial["best_checkpoint"])
    w = load_file(str(reference / "prep" / "eval_windows.safetensors"))
    ppl = evaluate(model, w["input_ids"], w["labels"], batch_size=8)["perplexity"]
    assert ppl == pytest.approx(trial["best_perplexity"], rel=1e-4)
    zeros = [(m.weight == 0).float().mean().item() for n, m in model.named_modules()
             if ".layers." in n and isinstance(m, torch.nn.Linear)]
    assert min(zeros) >= 0.5


def test_rerunning_a_finished_sweep_changes_nothing(reference):
    before = read(reference, EPOCHS_FILE)
    proc = run_cli(["resume", str(reference)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(reference, EPOCHS_FILE) == before


def test_ray_trains_own_controller_layout_gives_the_same_numbers(reference, tmp_path):
    """Trials run Ray Train's controller inside the trial driver by default (sweep.ray_private); the
    stock layout, a controller actor of its own, must still work and agree to the last digit
    of what the tests compare."""
    tid = "s0.8-b4"
    args = ["run", str(TINY), "--storage", str(tmp_path), "--sparsity", "0.8", "--batch-size", "4"]
    for o in OVERRIDES:
        args += ["--set", o]
    proc = subprocess.run(sweep_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SWEEP_TRAIN_CONTROLLER": "actor"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Its own actor did run (Ray's output goes to the sweep's ray.log, not the console).
    assert "TrainController pid=" in (tmp_path / "tiny" / "logs" / "ray.log").read_text()
    _compare_with_reference(tmp_path / "tiny", reference, tid)


def _wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _progress(sweep_dir: Path, tid: str) -> dict:
    try:
        return json.loads((sweep_dir / "logs" / f"{tid}.progress.json").read_text())
    except (OSError, ValueError):
        return {"step": -1, "epoch": -1}


def _settled_progress(sweep_dir: Path, tid: str, quiet_s: float = 5.0) -> int:
    last, since = _progress(sweep_dir, tid)["step"], time.time()
    while time.time() - since < quiet_s:
        time.sleep(0.5)
        now = _progress(sweep_dir, tid)["step"]
        if now != last:
            last, since = now, time.time()
    return last


def _compare_with_reference(sweep_dir: Path, reference: Path, tid: str) -> None:
    got = {r["epoch"]: r for r in read(sweep_dir, EPOCHS_FILE) if r["trial_id"] == tid}
    ref = {r["epoch"]: r for r in read(reference, EPOCHS_FILE) if r["trial_id"] == tid}
    assert sorted(got) == [0, 1, 2]  # no gap, no duplicate (keys are unique by construction)
    for e in ref:
        assert got[e]["perplexity"] == pytest.approx(ref[e]["perplexity"], rel=1e-4), e
        assert got[e]["steps"] == ref[e]["steps"]
    trial = next(t for t in read(sweep_dir, TRIALS_FILE) if t["trial_id"] == tid)
    assert trial["status"] == "completed"


def test_kill_driver_then_resume(reference, tmp_path):
    tid = "s0.5-b2"  # 24 steps per epoch, checkpoints every 4
    args = ["run", str(TINY), "--storage", str(tmp_path), "--sparsity", "0.5", "--batch-size", "2"]
    for o in OVERRIDES:
        args += ["--set", o]
    sweep_dir = tmp_path / "tiny"
    proc = subprocess.Popen(sweep_cmd(*args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill mid-epoch 2, between two checkpoints.
        _wait_for(lambda: _progress(sweep_dir, tid)["step"] >= 24 + 6, 300, proc)
        at_kill = _progress(sweep_dir, tid)["step"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, at once
        proc.wait()
    # Ray's worker processes live in process groups of their own and notice the dead raylet
    # a moment later (they may train on, even checkpoint): wait until the progress stops
    # moving before resuming.
    reached = _settled_progress(sweep_dir, tid)
    status = {t["trial_id"]: t["status"] for t in read(sweep_dir, TRIALS_FILE)}
    assert status[tid] == "running"
    resumed = run_cli(["resume", str(sweep_dir)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = (sweep_dir / "logs" / f"{tid}.log").read_text()
    line = next(x for x in log.splitlines() if "resumed from checkpoint" in x)
    restart_step = int(line.rsplit("step ", 1)[1])
    print(f"driver kill at step {at_kill} (orphaned workers reached {reached}): resumed at "
          f"step {restart_step}, {max(0, at_kill - restart_step)} steps of the killed run lost, "
          f"{reached - restart_step} repeated")
    # Restarts land on a checkpoint (every 4 steps, or an epoch end). Work lost is the steps
    # since the last checkpoint the Train controller had registered: its poll of the workers
    # lags a report by up to a health-check interval, a few tiny steps here.
    assert restart_step % 4 == 0 and restart_step >= 24
    # Work lost is counted from the kill: steps the orphans ran on afterwards are not the
    # sweep's doing (they can only move the restart later).
    assert at_kill - restart_step <= 3 * 4
    assert reached >= restart_step
    _compare_with_reference(sweep_dir, reference, tid)


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line
            and "defunct" not in line]


def test_kill_worker_restarts_from_checkpoint(reference, tmp_path):
    tid = "s0.8-b2"
    args = ["run", str(TINY), "--storage", str(tmp_path), "--sparsity", "0.8", "--batch-size", "2"]
    for o in OVERRIDES:
        args += ["--set", o]
    sweep_dir = tmp_path / "tiny"
    proc = subprocess.Popen(sweep_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _progress(sweep_dir, tid)["step"] >= 14, 300, proc)
        pids = _train_worker_pids()
        assert pids, "no Ray Train worker process found"
        reached = _progress(sweep_dir, tid)["step"]
        os.kill(pids[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    log = (sweep_dir / "logs" / f"{tid}.log").read_text()
    line = next(x for x in log.splitlines() if "resumed from checkpoint" in x)
    restart_step = int(line.rsplit("step ", 1)[1])
    print(f"worker kill: reached step >= {reached}, restarted at step {restart_step}")
    _compare_with_reference(sweep_dir, reference, tid)
