"""Fail fast, fail clean on a real cluster (ray.cluster_utils.Cluster, one per module): a trial
that cannot be placed ends at resources.placement_timeout_s; an input problem only preparation
finds ends with exit 2 and leaves nothing that blocks the corrected run, which takes over a
dead driver's lease; a live driver refuses a second one; a driver taken over stops its trials,
whose workers write nothing more.

The checks that need no cluster are in tests/test_failfast.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

import sweep.preflight
from sweep.cli import main
from sweep.layout import SweepLayout
from sweep.lease import acquire, read_holder
from sweep.results import EPOCHS_FILE, TRIALS_FILE, results_dir
from trainers.checkpoint import STATE_FILE
from trainers.fence import claim_name

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ONE_TRIAL = ["--sparsity", "0.5", "--batch-size", "2"]
TID = "s0.5-b2"


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU head node: one tiny trial (2 workers x 0.5 CPU) at a time."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(autouse=True)
def _same_environment(monkeypatch):
    """Every test (and the driver processes it starts) sees the environment without a Ray
    authentication mode: the cluster here has none."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)


def _run(cluster, storage: Path, *extra: str) -> int:
    return main(["run", str(TINY), "--storage", str(storage), "--address", cluster.address,
                 *ONE_TRIAL, *extra])


def _rows(sweep_dir: Path, name: str) -> list[dict]:
    return pq.read_table(results_dir(sweep_dir) / name).to_pylist()


def test_a_trial_that_cannot_be_placed_ends_at_the_timeout(cluster, tmp_path, capfd):
    t0 = time.monotonic()
    rc = _run(cluster, tmp_path, "--set", "resources.custom_per_worker={absent_slot: 1}",
              "--set", "resources.placement_timeout_s=4")
    elapsed = time.monotonic() - t0
    err = capfd.readouterr().err
    sweep_dir = tmp_path / "tiny"
    log = SweepLayout.of(sweep_dir).sweep_log.read_text()
    assert rc == 2, err
    assert err.startswith("sweep: cannot run the sweep:\n  - resources.placement_timeout_s=4: "
                          "one trial's resources (3 bundles"), err
    assert re.search(r"were not free after \d+ s; free now: ", err), err
    assert "resources.custom_per_worker.absent_slot=1: no node of the cluster has 'absent_slot'" in err
    assert "waiting up to resources.placement_timeout_s=4 s" in log  # said while waiting
    assert "Traceback" not in err
    assert 4 <= elapsed < 120, elapsed
    assert read_holder(None, sweep_dir) is None  # the lease was released
    assert not (sweep_dir / "prep").exists()  # it stopped before preparing
    deadline = time.monotonic() + 30  # the probe's placement group is removed (asynchronously)
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2


def test_dry_run_says_whether_the_cluster_holds_a_trial(cluster, tmp_path, capfd):
    assert _run(cluster, tmp_path, "--dry-run") == 0
    assert ("each trial: 2 workers x (0.5 CPU) + driver 0.01 CPU; this cluster: 1 node (2 CPU): "
            "fits 1 at once") in capfd.readouterr().out
    absent = ["--set", "resources.custom_per_worker={absent_slot: 1}"]
    assert _run(cluster, tmp_path, "--dry-run", *absent) == 0
    assert ("each trial: 2 workers x (0.5 CPU, 1 absent_slot) + driver 0.01 CPU; this cluster: "
            "1 node (2 CPU): cannot hold one now; unless nodes are added, the run would wait up "
            "to resources.placement_timeout_s=600 s") in capfd.readouterr().out
    assert not (tmp_path / "tiny").exists()


def test_a_preparation_failure_then_the_corrected_run_takes_over_a_dead_lease(
        cluster, tmp_path, capfd, monkeypatch):
    sweep_dir = tmp_path / "tiny"
    layout = SweepLayout.of(sweep_dir)
    short = tmp_path / "eval.txt"
    short.write_text("ten bytes!")
    # As if the check before Ray could not tell (it tokenizes only texts short in bytes):
    # preparation, inside Ray, is the first to see the text is too short.
    monkeypatch.setattr(sweep.preflight, "BYTES_PER_TOKEN_BOUND", 0)
    rc = _run(cluster, tmp_path, "--set", f"eval.text={{source: file, path: {short}}}")
    err = capfd.readouterr().err
    assert rc == 2, err
    assert err.endswith("sweep: invalid input, found while preparing the sweep:\n"
                        "  - eval.text: the text has 10 tokens, fewer than one window of 64 (use "
                        "a longer text or a shorter token_length)\n"), err[-3000:]
    assert "Traceback" not in err
    assert read_holder(None, sweep_dir) is None
    monkeypatch.undo()

    # A driver killed meanwhile (kill -9 on this host) left a fresh lease behind.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    pid, started = proc.pid, psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    now = time.time()
    record = {"attempt": 2, "token": "dead", "host": socket.gethostname(), "pid": pid,
              "pid_started": started, "pid_ns": None, "started_at": now - 5, "ttl_s": 60.0}
    (layout.attempts / claim_name(2)).write_text(json.dumps(record))
    layout.lease.write_text(json.dumps({**record, "renewed_at": now - 1}))

    rc = _run(cluster, tmp_path)  # the corrected config: the shipped evaluation text
    out, err = capfd.readouterr()
    assert rc == 0, out[-3000:] + err[-3000:]
    log = layout.sweep_log.read_text()
    assert (f"pid {pid} (attempt 2): its process (pid {pid} on this host) is not running; this "
            "is attempt 3") in log
    assert ("no trial had started: replacing the previous setup (changed: eval.text.part, "
            "eval.text.path, eval.text.source; removed prep)") in log
    epochs, trials = _rows(sweep_dir, EPOCHS_FILE), _rows(sweep_dir, TRIALS_FILE)
    assert [(r["epoch"], r["driver_attempt"]) for r in epochs] == [(0, 3), (1, 3), (2, 3)]
    assert [(t["status"], t["driver_attempt"]) for t in trials] == [("completed", 3)]
    states = list((layout.train / layout.train_run_name(TID)).glob(f"checkpoint_*/{STATE_FILE}"))
    assert states and {json.loads(p.read_text())["attempt"] for p in states} == {3}
    assert read_holder(None, sweep_dir) is None


DRIVER = """
import sys
import ray
ray.init(address=sys.argv[1])
from sweep.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _driver_env() -> dict:
    """The driver subprocess joins the cluster in this process's authentication mode: a
    cluster started from a process that ran a local Ray before (as a whole test session does)
    may require Ray's token, and a token-mode client breaks a cluster without one."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return {**os.environ, **({"RAY_AUTH_MODE": "token"} if is_token_auth_enabled() else {})}


def _step(sweep_dir: Path) -> int:
    try:
        return json.loads(SweepLayout.of(sweep_dir).progress(TID).read_text())["step"]
    except (OSError, ValueError):
        return -1


def test_a_live_driver_refuses_a_second_and_a_taken_over_one_stops_writing(
        cluster, tmp_path, capfd):
    sweep_dir = tmp_path / "tiny"
    layout = SweepLayout.of(sweep_dir)
    # The first driver: another process, connected to the cluster (as a Ray job's is).
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.address, "run", str(TINY), "--storage",
         str(tmp_path), "--address", cluster.address, *ONE_TRIAL,
         "--set", "train.base_samples=4000", "--set", "checkpoint.every_steps=4"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=_driver_env())
    try:
        deadline = time.time() + 300
        epochs = results_dir(sweep_dir) / EPOCHS_FILE  # the baseline's row is written
        while ((_step(sweep_dir) < 9 or not epochs.exists()) and driver.poll() is None
               and time.time() < deadline):
            time.sleep(0.2)
        assert _step(sweep_dir) >= 9 and epochs.exists(), (
            driver.communicate()[0][-3000:] if driver.poll() is not None else "timed out")

        # A second driver of the same sweep is refused, naming the first.
        assert main(["resume", str(sweep_dir)]) == 2
        err = capfd.readouterr().err
        assert f"is being run by another driver: host {socket.gethostname()}, pid {driver.pid}" in err

        # A newer driver takes the sweep over (as after a TTL expiry, or --force).
        newer = acquire(None, sweep_dir, ttl_s=60, force=True)
        claimed = time.time()
        results_before = {p.name: p.stat().st_mtime for p in layout.results.iterdir()}
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
            driver.wait()
    try:
        assert newer.attempt == 2
        assert driver.returncode == 2, out[-4000:]
        assert "sweep: the sweep was taken over:" in out
        # Noticed by its results callback ("driver attempt 2 took ...") or by its lease's
        # renewal ("attempt 2 (host ..., pid ...) took ..."), whichever came first.
        assert re.search(r"attempt 2 (\(host .*\) )?took the sweep over; this driver \(attempt 1\) "
                         "stopped its trials", out), out[-4000:]
        # Whoever notices first ends the trial: the worker's fence before its next checkpoint
        # (it logs why it stopped) or the driver, which stops the trial (checking every
        # FENCE_CHECK_S between Tune events). On a loaded machine a checkpoint can outlast that
        # check, so either order is correct; what must hold is that nothing is written after
        # the takeover (below). The worker's side alone is tested in test_failfast.py.
        trial_log = layout.trial_log(TID).read_text()
        fenced = "stopped without writing: driver attempt 2 now runs this sweep; this worker belongs to attempt 1"
        assert fenced in trial_log or "stopped without writing" not in trial_log, trial_log[-2000:]
        # No row after the takeover, and at most the one checkpoint in flight when it came.
        assert {p.name: p.stat().st_mtime for p in layout.results.iterdir()} == results_before
        assert [r["epoch"] for r in _rows(sweep_dir, EPOCHS_FILE)] == [0]
        states = list((layout.train / layout.train_run_name(TID)).glob(f"checkpoint_*/{STATE_FILE}"))
        assert {json.loads(p.read_text())["attempt"] for p in states} == {1}
        assert len([p for p in states if p.stat().st_mtime > claimed]) <= 1
        assert read_holder(None, sweep_dir)["token"] == newer.token  # left alone by attempt 1
    finally:
        newer.release()
