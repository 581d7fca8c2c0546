"""Early stopping through real Ray: every trial ends, some early, and resources come back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from sweep.config import load_config
from sweep.results import END_STATUSES, EPOCHS_FILE, TRIALS_FILE, results_dir
from sweep.runner import run_sweep

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-early-stop.yaml"


TINY = CONFIG.with_name("tiny.yaml")


@pytest.fixture(scope="module")
def cluster():
    # Inherited by the cluster's worker processes: s0.8-b2 fails after its 3rd step, always.
    os.environ["SWEEP_INJECT_FAILURE"] = "s0.8-b2:3"
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()
    del os.environ["SWEEP_INJECT_FAILURE"]


def _settled(start: dict, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    now = ray.available_resources()
    while time.time() < deadline:
        now = ray.available_resources()
        if all(abs(now.get(k, 0) - v) < 1e-6 for k, v in start.items() if k in ("CPU", "GPU")):
            break
        time.sleep(1)
    return now


def test_grid_with_early_stopping_ends_and_frees_resources(cluster, tmp_path):
    cfg = load_config(CONFIG)
    start = ray.available_resources()
    # include_dashboard=False above: Ray's own placement-group cleaner has no State API here,
    # so freeing the stopped trials' workers is up to the sweep's PlacementGroupReaper.
    rc = run_sweep(cfg, tmp_path, address=None, dry_run=False)
    assert rc == 0
    trials = pq.read_table(results_dir(tmp_path / cfg.name) / TRIALS_FILE).to_pylist()
    epochs = pq.read_table(results_dir(tmp_path / cfg.name) / EPOCHS_FILE).to_pylist()
    assert len(trials) == 6
    assert all(t["status"] in END_STATUSES for t in trials), [(t["trial_id"], t["status"]) for t in trials]
    stopped = [t for t in trials if t["status"] in ("early_stopped", "diverged")]
    assert stopped, [(t["trial_id"], t["status"]) for t in trials]
    assert any(t["status"] == "completed" for t in trials)
    for t in trials:
        rows = sorted(r["epoch"] for r in epochs if r["trial_id"] == t["trial_id"])
        assert rows == list(range(t["epochs_completed"] + 1))  # every row up to the stop
        if t["status"] != "completed":
            assert t["stop_reason"] and t["epochs_completed"] < 3
            assert Path(t["best_checkpoint"]).is_dir()  # the best model stays usable
    now = _settled(start)
    assert now.get("CPU") == pytest.approx(start["CPU"]), (start, now)


def test_a_trial_that_keeps_failing_is_errored_and_the_rest_go_on(cluster, tmp_path):
    cfg = load_config(TINY, ["grid.sparsity=[0.5, 0.8]", "grid.batch_size=[2]",
                             "failure.worker_max_failures=1", "failure.trial_max_failures=0"])
    start = ray.available_resources()
    rc = run_sweep(cfg, tmp_path, address=None, dry_run=False)
    assert rc == 1  # a trial errored: the sweep says so
    trials = {t["trial_id"]: t for t in
              pq.read_table(results_dir(tmp_path / cfg.name) / TRIALS_FILE).to_pylist()}
    assert trials["s0.5-b2"]["status"] == "completed"
    bad = trials["s0.8-b2"]
    assert bad["status"] == "errored"
    assert "injected failure in s0.8-b2 at step 3" in bad["stop_reason"]
    assert bad["epochs_completed"] == 0  # its baseline row is kept
    now = _settled(start)
    assert now.get("CPU") == pytest.approx(start["CPU"]), (start, now)
