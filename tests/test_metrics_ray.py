"""configs/tiny-metrics.yaml end to end through real Ray: two evaluation sets and a local
zero-shot task, each trial on 2 FSDP workers (every rank runs the harness: it must not
deadlock). One sweep, shared by every test here; its numbers are checked against `sweep eval`
and against lm-eval run directly on the exported models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sweep.cli import main
from sweep.results import EPOCHS_FILE, EVALS_FILE, TASKS_FILE, TRIALS_FILE, results_dir

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "configs" / "tiny-metrics.yaml"
TASKS_DIR = ROOT / "tests" / "data" / "tasks"
TRIALS = ("s0.5-b2",)  # one trial of the config's two: the checks are per trial
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def read(sweep_dir: Path, name: str) -> list[dict]:
    return pq.read_table(results_dir(sweep_dir) / name).to_pylist()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`sweep run configs/tiny-metrics.yaml` from the repository root, offline, on one of its
    sparsities (the test suite's time: each trial is checked alone)."""
    storage = tmp_path_factory.mktemp("metrics")
    proc = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "run", str(METRICS), "--storage", str(storage),
         "--sparsity", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **OFFLINE},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "tiny-metrics"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(ROOT)


def test_every_set_and_task_lands_in_the_results(sweep):
    trials = {r["trial_id"]: r for r in read(sweep, TRIALS_FILE)}
    assert set(trials) == set(TRIALS) and all(t["status"] == "completed" for t in trials.values())
    epochs = {(r["trial_id"], r["epoch"]): r for r in read(sweep, EPOCHS_FILE)}
    evals = read(sweep, EVALS_FILE)
    assert {(r["trial_id"], r["epoch"], r["set"]) for r in evals} == {
        (t, e, s) for t in TRIALS for e in (0, 1, 2) for s in ("pydoc", "notes")}
    for r in evals:
        assert r["windows"] == 16 and r["tokens"] > 0 and r["seconds"] >= 0
        if r["set"] == "pydoc":  # the primary is the epochs table's perplexity
            assert r["perplexity"] == epochs[(r["trial_id"], r["epoch"])]["perplexity"]
    tasks = read(sweep, TASKS_FILE)
    for tid, t in trials.items():
        measured = {r["epoch"] for r in tasks if r["trial_id"] == tid}
        assert measured == {0, 2, t["best_epoch"]}  # pruned, final, best
        assert {r["metric"] for r in tasks if r["trial_id"] == tid} == {"acc", "acc_norm"}
    assert all(r["samples"] == 20 and r["dense_value"] is not None for r in tasks)


def test_each_set_equals_sweep_eval_on_the_exported_model(sweep, capsys):
    trials = {r["trial_id"]: r for r in read(sweep, TRIALS_FILE)}
    evals = read(sweep, EVALS_FILE)
    for tid in TRIALS:
        best = trials[tid]["best_epoch"]
        for name in ("pydoc", "notes"):
            assert main(["eval", "--model", trials[tid]["export_dir"], "--config", str(METRICS),
                         "--eval-set", name, "--no-tasks", "--no-progress", "--threads", "1"]) == 0
            got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
            want = next(r["perplexity"] for r in evals
                        if (r["trial_id"], r["epoch"], r["set"]) == (tid, best, name))
            # The sweep evaluated on 2 FSDP ranks, sweep eval on one: sums in another order.
            assert got == pytest.approx(want, rel=1e-5)


def test_task_accuracy_equals_lm_eval_on_the_exported_model(sweep):
    """The harness run as a user would (model="hf" from the exported directory), same task
    and limit: the values the sweep recorded for that (best) model."""
    import lm_eval

    from eval.tasks import task_manager

    trials = {r["trial_id"]: r for r in read(sweep, TRIALS_FILE)}
    tasks = read(sweep, TASKS_FILE)
    for tid in TRIALS:
        direct = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": trials[tid]["export_dir"], "device": "cpu"},
            tasks=["next_word_local"], num_fewshot=0, limit=20,
            task_manager=task_manager(["next_word_local"], TASKS_DIR), log_samples=False,
        )["results"]["next_word_local"]
        for r in tasks:
            if r["trial_id"] == tid and r["epoch"] == trials[tid]["best_epoch"]:
                assert r["value"] == direct[f"{r['metric']},none"], (tid, r)


def test_report_query_and_plot_show_sets_and_tasks(sweep, tmp_path, capsys):
    assert main(["report", str(sweep)]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "notes" in header and "next_word_local/acc" in header
    assert main(["query", str(sweep), "SELECT trial_id, epoch, set, perplexity FROM evals "
                 "WHERE set = 'notes' ORDER BY trial_id, epoch", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3 * len(TRIALS)  # epochs 0, 1, 2
    assert main(["query", str(sweep), "--table", "tasks", "--where", "metric = 'acc'"]) == 0
    assert "next_word_local" in capsys.readouterr().out
    out = tmp_path / "notes.png"
    assert main(["plot", str(sweep), "-o", str(out), "--eval-set", "notes"]) == 0
    assert out.stat().st_size > 10_000
