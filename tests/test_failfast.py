"""Fail fast, fail clean (issue 12), without Ray: every bad input through the real CLI ends with
exit 2, one message naming the key or path, nothing written and Ray never started; a sweep
directory whose trials never started does not block the corrected config; one driver per sweep
(a live holder refused, a dead one taken over); writers of an older driver attempt are fenced.

The cases that need a cluster (placement timeout, a failed preparation inside Ray, a real
orphaned worker) are in tests/test_failfast_ray.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

import sweep.runner
from sweep.cli import main
from sweep.config import ConfigError, load_config
from sweep.failfast import never_started, prep_error
from sweep.layout import SweepLayout
from sweep.lease import read_holder
from sweep.preflight import input_error
from sweep.results import EPOCHS_FILE, TRIALS_FILE, ResultsWriter, read_rows
from sweep.runner import write_sweep_state
from trainers.fence import Fenced, claim_name, newest_attempt, superseded

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CORES = os.cpu_count() or 1
# Over the default over-subscription limit (2x the cores), and an even split of the batch.
TOO_MANY_WORKERS = 2 * 2 * CORES + 2
# Llama-2-70B's shape (no weights: the memory estimate counts parameters on the meta device).
HUGE_MODEL = ("{model_type: llama, hidden_size: 8192, intermediate_size: 28672, "
              "num_hidden_layers: 80, num_attention_heads: 64, num_key_value_heads: 8}")
HAS_GPU = bool(__import__("torch").cuda.is_available())


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the sweep would go past its checks (start Ray, prepare, run)."""
    def _run(*args, **kwargs):
        raise AssertionError("the sweep got past its checks: Ray would start")

    monkeypatch.setattr(sweep.runner, "_run", _run)


@pytest.fixture
def fake_run(monkeypatch):
    """Stands in for Ray and the grid: records each call (with the driver's lease) and
    succeeds, so that what happens before Ray can be checked on its own."""
    calls: list[dict] = []

    def _run(cfg, store, sweep_dir, plans, address, log, lease=None, *rest):
        calls.append({"cfg": cfg, "sweep_dir": sweep_dir, "attempt": lease.attempt,
                      "holder": read_holder(store, sweep_dir)})
        return 0

    monkeypatch.setattr(sweep.runner, "_run", _run)
    return calls


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The bad-input table: (files to create, --set overrides, storage layout, what the message says)


def _text(name: str) -> str:
    return f"{{source: file, path: {{tmp}}/{name}}}"


BAD_INPUTS = {
    "empty evaluation text": (
        {"eval.txt": b""}, [f"eval.text={_text('eval.txt')}"], "absent",
        ["eval.text.path", "eval.txt", "is empty"]),
    "evaluation text shorter than one window": (
        {"eval.txt": b"0123456789"}, [f"eval.text={_text('eval.txt')}"], "absent",
        ["eval.token_length=64", "(eval.text) has 10 tokens", "fewer than one window of 64"]),
    "training text shorter than one block": (
        {"train.txt": b"x" * 20}, [f"data.train={_text('train.txt')}"], "absent",
        ["data.seq_len=64", "(data.train) has 20 tokens"]),
    "evaluation text not UTF-8": (
        {"eval.txt": b"caf\xe9 " + b"z" * 4000}, [f"eval.text={_text('eval.txt')}"], "absent",
        ["eval.text.path", "eval.txt", "is not UTF-8 text: byte offset 3"]),
    "training text not UTF-8": (
        {"train.txt": b"ok " * 50 + b"\xff"}, [f"data.train={_text('train.txt')}"], "absent",
        ["data.train.path", "train.txt", "is not UTF-8 text: byte offset 150"]),
    "unknown model type": (
        {}, ["model.config.model_type=lama"], "absent",
        ["model.config.model_type", "'lama' is not a model type", "closest: llama"]),
    "GPUs the machine does not have": (
        {}, ["resources.gpus_per_worker=1"], "absent",
        ["resources.gpus_per_worker=1: this machine has no GPU"]),
    "more workers than the cores allow": (
        {}, [f"resources.workers={TOO_MANY_WORKERS}", f"grid.batch_size=[{TOO_MANY_WORKERS}]",
             "resources.cpus_per_worker=1"], "absent",
        [f"{TOO_MANY_WORKERS} CPUs per trial, this machine has {CORES} cores",
         "at most 2x over-subscribed"]),
    "a model larger than this machine's memory": (
        {}, [f"model.config={HUGE_MODEL}"], "absent",
        ["memory: one trial's 2 workers need at least", "GiB", "this machine has"]),
    "a custom resource the embedded cluster lacks": (
        {}, ["resources.custom_per_worker={a100: 1}"], "absent",
        ["resources.custom_per_worker.a100", "the embedded cluster has no resource 'a100'"]),
    "--storage is a regular file": (
        {}, [], "storage is a file", ["--storage", "is a regular file, not a directory"]),
    "SWEEP_DIR is a regular file": (
        {}, [], "sweep dir is a file", ["SWEEP_DIR", "tiny", "is a regular file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_naming_it_and_writes_nothing(case, tmp_path, no_ray, capsys):
    files, overrides, storage_kind, expect = BAD_INPUTS[case]
    if case == "GPUs the machine does not have" and HAS_GPU:
        pytest.skip("this machine has a GPU")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    storage = tmp_path / "sweeps"
    if storage_kind == "storage is a file":
        storage.write_bytes(b"not a directory")
    elif storage_kind == "sweep dir is a file":
        storage.mkdir()
        (storage / "tiny").write_bytes(b"not a directory")
    before = snapshot(tmp_path)
    args = ["run", str(TINY), "--storage", str(storage)]
    for o in overrides:
        args += ["--set", o.replace("{tmp}", str(tmp_path))]
    t0 = time.monotonic()
    rc = main(args)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("sweep: invalid configuration:\n"), err
    for text in expect:
        assert text in err, (text, err)
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written, not even the storage directory
    assert elapsed < 60, elapsed  # seconds, not a hang


def test_every_problem_at_once(tmp_path, no_ray, capsys):
    (tmp_path / "eval.txt").write_bytes(b"short")
    rc = main(["run", str(TINY), "--storage", str(tmp_path / "sweeps"),
               "--set", f"eval.text={{source: file, path: {tmp_path}/eval.txt}}",
               "--set", "model.config.model_type=lama",
               "--set", "resources.custom_per_worker={a100: 1}"])
    err = capsys.readouterr().err
    assert rc == 2
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    # The text is not tokenized while the model type is wrong: its length is checked next run.
    assert len(problems) == 2, err
    assert "model.config.model_type" in problems[0] and "custom_per_worker.a100" in problems[1]


def test_debug_shows_the_traceback(tmp_path, no_ray, capsys, monkeypatch):
    args = ["run", str(TINY), "--storage", str(tmp_path / "s"), "--set",
            "model.config.model_type=lama"]
    assert main([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "sweep: invalid configuration" in err
    monkeypatch.setenv("SWEEP_DEBUG", "1")
    assert main(args) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_real_process_prints_one_message_and_no_traceback(tmp_path):
    (tmp_path / "eval.txt").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "run", str(TINY), "--storage", str(tmp_path / "s"),
         "--set", f"eval.text={{source: file, path: {tmp_path}/eval.txt}}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "sweep: invalid configuration:", f"  - eval.text.path: {tmp_path}/eval.txt is empty"]
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------
# --dry-run: the resource request and whether this machine holds it


def test_dry_run_prints_the_request_and_whether_it_fits(tmp_path, capsys):
    assert main(["run", str(TINY), "--storage", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("each trial:"))
    assert line.startswith("each trial: 2 workers x (0.5 CPU) + driver 0.01 CPU; this machine: "
                           f"{CORES} cores")
    assert "fits" in line and "at once" in line and "GiB per worker" in line
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_dry_run_of_an_impossible_trial_says_so_and_exits_2(tmp_path, capsys):
    rc = main(["run", str(TINY), "--storage", str(tmp_path / "s"), "--dry-run",
               "--set", "resources.gpus_per_worker=1"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "s0.5-b2" in out  # the plan is printed first
    line = next(x for x in out.splitlines() if x.startswith("each trial:"))
    assert "(0.5 CPU, 1 GPU)" in line and "no GPU: does not fit; memory:" in line
    assert "resources.gpus_per_worker=1: this machine has no GPU" in err


# ---------------------------------------------------------------------------------------------
# A failed preparation leaves nothing that blocks the corrected run


def _fabricate_prepared_but_unstarted(sweep_dir: Path, statuses: dict[str, str],
                                      epochs: int = 0) -> None:
    """What a run whose preparation failed leaves (state, a log, part of prep/, pending
    rows), or, with other statuses / epochs rows, a sweep whose trials did start."""
    cfg = load_config(TINY, check_paths=False)
    write_sweep_state(cfg, sweep_dir)
    layout = SweepLayout.of(sweep_dir)
    layout.train_tokens.parent.mkdir(parents=True)
    layout.train_tokens.write_bytes(b"tokens of the old config")
    layout.sweep_log.parent.mkdir(parents=True)
    layout.sweep_log.write_text("old run: preparation stopped\n")
    writer = ResultsWriter(sweep_dir)
    for tid, status in statuses.items():
        writer.upsert_trial({"trial_id": tid, "sweep": "tiny", "status": status})
    for e in range(epochs):
        writer.upsert_epoch({"trial_id": "s0.5-b2", "epoch": e, "perplexity": 100.0})


def test_a_corrected_config_replaces_a_sweep_that_never_started(tmp_path, fake_run, capsys):
    sweep_dir = tmp_path / "tiny"
    _fabricate_prepared_but_unstarted(sweep_dir, {"s0.5-b2": "pending", "s0.8-b2": "pending"})
    assert never_started(None, sweep_dir)
    rc = main(["run", str(TINY), "--storage", str(tmp_path), "--set", "grid.sparsity=[0.6]",
               "--set", "data.seq_len=32"])
    assert rc == 0, capsys.readouterr().err
    assert len(fake_run) == 1 and fake_run[0]["cfg"].grid.sparsity == (0.6,)
    layout = SweepLayout.of(sweep_dir)
    assert yaml.safe_load(layout.config_file.read_text())["grid"]["sparsity"] == [0.6]
    assert not layout.prep.exists() and not layout.results.exists()  # the old setup's files
    log = layout.sweep_log.read_text()
    assert "old run: preparation stopped" in log  # the history is kept
    assert ("no trial had started: replacing the previous setup (changed: data.seq_len, "
            "grid.sparsity; removed prep, results)") in log
    assert "(resuming)" not in log


@pytest.mark.parametrize("statuses, epochs", [
    ({"s0.5-b2": "running", "s0.8-b2": "pending"}, 0),
    ({"s0.5-b2": "pending"}, 1),
], ids=["a trial ran", "a row was written"])
def test_a_sweep_with_results_is_still_protected(tmp_path, fake_run, capsys, statuses, epochs):
    sweep_dir = tmp_path / "tiny"
    _fabricate_prepared_but_unstarted(sweep_dir, statuses, epochs)
    assert not never_started(None, sweep_dir)
    before = snapshot(sweep_dir)
    rc = main(["run", str(TINY), "--storage", str(tmp_path), "--set", "grid.sparsity=[0.6]"])
    assert rc == 2 and not fake_run
    err = capsys.readouterr().err
    assert "holds a sweep with a different grid or training setup (changed: grid.sparsity)" in err
    after = snapshot(sweep_dir)
    claims = [k for k in after if k.startswith("driver.attempts/")]
    assert {k: v for k, v in after.items() if k not in claims} == before  # state untouched
    assert read_holder(None, sweep_dir) is None  # the refused run released its lease


def test_prep_errors_from_ray_become_input_errors():
    from ray.exceptions import RayTaskError

    with pytest.raises(ConfigError) as info, input_error("eval.text"):
        raise ValueError("the text has 3 tokens, fewer than one window of 64")
    assert info.value.problems == ["eval.text: the text has 3 tokens, fewer than one window of 64"]
    wrapped = RayTaskError("prepare", "Traceback ...", info.value).as_instanceof_cause()
    err = prep_error(wrapped)
    assert err.problems == info.value.problems
    assert str(err).startswith("invalid input, found while preparing the sweep:\n  - eval.text:")
    raw = prep_error(RayTaskError("prepare", "tb", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x")))
    assert raw.problems == ["UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in "
                            "position 0: x"]
    assert prep_error(RayTaskError("prepare", "tb", RuntimeError("a bug"))) is None


# ---------------------------------------------------------------------------------------------
# One driver per sweep


HOLDER = """
import sys, time
from pathlib import Path
from sweep.lease import acquire
lease = acquire(None, Path(sys.argv[1]), ttl_s=60)
print("held", lease.attempt, flush=True)
time.sleep(300)
"""


def test_a_second_driver_is_refused_while_the_first_lives(tmp_path, fake_run, capsys):
    sweep_dir = tmp_path / "tiny"
    write_sweep_state(load_config(TINY, check_paths=False), sweep_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(sweep_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().split() == ["held", "1"]
        before = snapshot(sweep_dir)
        for args in (["resume", str(sweep_dir)], ["run", str(TINY), "--storage", str(tmp_path)]):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith("sweep: cannot run the sweep:\n"), err
            assert (f"{sweep_dir} is being run by another driver: host {socket.gethostname()}, "
                    f"pid {holder.pid}, attempt 1, since ") in err
            assert f"kill {holder.pid} on {socket.gethostname()}" in err
        lease_file = SweepLayout.of(sweep_dir).lease.name
        after = snapshot(sweep_dir)
        assert {k: v for k, v in after.items() if k != lease_file} == \
               {k: v for k, v in before.items() if k != lease_file}
        assert not fake_run
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def _fabricate_holder(sweep_dir: Path, attempt: int, **fields) -> dict:
    now = time.time()
    record = {"attempt": attempt, "token": uuid.uuid4().hex, "host": socket.gethostname(),
              "pid": os.getpid(), "pid_started": psutil.Process().create_time(), "pid_ns": None,
              "started_at": now - 100, "ttl_s": 60.0, "renewed_at": now - 1, **fields}
    layout = SweepLayout.of(sweep_dir)
    layout.attempts.mkdir(parents=True, exist_ok=True)
    claim = {k: v for k, v in record.items() if k != "renewed_at"}
    (layout.attempts / claim_name(attempt)).write_text(json.dumps(claim))
    layout.lease.write_text(json.dumps(record))
    return record


def test_a_driver_on_another_host_is_refused(tmp_path, fake_run, capsys):
    sweep_dir = tmp_path / "tiny"
    write_sweep_state(load_config(TINY, check_paths=False), sweep_dir)
    _fabricate_holder(sweep_dir, 4, host="head-node-7", pid=31337)
    assert main(["resume", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert "being run by another driver: host head-node-7, pid 31337, attempt 4" in err
    assert "its lease expires at" in err and not fake_run


def dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, started


def test_a_killed_drivers_lease_is_taken_over(tmp_path, fake_run, capsys):
    sweep_dir = tmp_path / "tiny"
    write_sweep_state(load_config(TINY, check_paths=False), sweep_dir)
    pid, started = dead_pid()
    _fabricate_holder(sweep_dir, 1, pid=pid, pid_started=started)  # kill -9: lease left fresh
    assert main(["resume", str(sweep_dir)]) == 0, capsys.readouterr().err
    assert fake_run[0]["attempt"] == 2
    assert fake_run[0]["holder"]["pid"] == os.getpid()  # held while the sweep ran
    log = SweepLayout.of(sweep_dir).sweep_log.read_text()
    assert (f"taking over the driver lease of {sweep_dir} from host {socket.gethostname()} pid "
            f"{pid} (attempt 1): its process (pid {pid} on this host) is not running; this is "
            "attempt 2") in log
    assert read_holder(None, sweep_dir) is None  # released at the end
    assert newest_attempt(SweepLayout.of(sweep_dir).attempts) == 2


# ---------------------------------------------------------------------------------------------
# Fencing: writes of an older driver attempt


def test_newest_attempt_and_superseded(tmp_path):
    attempts = tmp_path / "driver.attempts"
    assert newest_attempt(attempts) == 0
    attempts.mkdir()
    for a in (1, 2, 10):
        (attempts / claim_name(a)).write_text("{}")
    (attempts / ".000011.json.tmp").write_text("")  # a claim being written is not one
    assert newest_attempt(attempts) == 10
    assert superseded(10, attempts) is None
    assert superseded(2, attempts).startswith("driver attempt 10 now runs this sweep")
    assert superseded(0, attempts) is None and superseded(2, None) is None


def test_a_fenced_results_writer_writes_nothing(tmp_path):
    attempts = tmp_path / "driver.attempts"
    attempts.mkdir()
    (attempts / claim_name(1)).write_text("{}")
    writer = ResultsWriter(tmp_path, attempt=1, fenced=lambda: superseded(1, attempts))
    writer.upsert_trial({"trial_id": "t", "status": "running"})
    writer.upsert_epoch({"trial_id": "t", "epoch": 0, "perplexity": 9.0, "driver_attempt": 1})
    files = snapshot(tmp_path / "results")
    (attempts / claim_name(2)).write_text("{}")  # a resumed driver started
    assert not writer.upsert_epoch({"trial_id": "t", "epoch": 1, "perplexity": 8.0,
                                    "driver_attempt": 1})
    writer.upsert_trial({"trial_id": "t", "status": "completed"})
    writer.drop_epochs_after("t", -1)
    assert snapshot(tmp_path / "results") == files
    assert "driver attempt 2 now runs this sweep" in writer.fenced_reason
    trials = read_rows(tmp_path / "results" / TRIALS_FILE)
    assert trials == [{**trials[0], "status": "running", "driver_attempt": 1}]


def test_a_row_of_an_older_attempt_never_replaces_a_newer_one(tmp_path):
    writer = ResultsWriter(tmp_path)
    assert writer.upsert_epoch({"trial_id": "t", "epoch": 1, "perplexity": 8.0, "driver_attempt": 2})
    assert not writer.upsert_epoch({"trial_id": "t", "epoch": 1, "perplexity": 99.0,
                                    "driver_attempt": 1})
    assert writer.upsert_epoch({"trial_id": "t", "epoch": 1, "perplexity": 7.0, "driver_attempt": 3})
    rows = read_rows(tmp_path / "results" / EPOCHS_FILE)
    assert [(r["perplexity"], r["driver_attempt"]) for r in rows] == [(7.0, 3)]


class _Trial:
    def __init__(self, tid: str):
        self.config, self.trial_id = {"trial_id": tid}, f"tune-{tid}"


def test_the_results_callback_ignores_other_attempts_and_stops_when_superseded(tmp_path):
    from sweep.callbacks import ResultsCallback
    from trainers.metrics import EvalReport

    plan = load_config(TINY, check_paths=False)
    from sweep.plan import expand

    plan = expand(plan)[0]
    sweep_dir = tmp_path / "tiny"
    attempts = SweepLayout.of(sweep_dir).attempts
    attempts.mkdir(parents=True)
    (attempts / claim_name(2)).write_text("{}")
    cb = ResultsCallback(str(sweep_dir), "tiny", "m", 200.0, [plan])
    cb.relocate(str(sweep_dir), cb.store, attempt=2)
    cb.setup()

    def report(epoch: int, attempt: int) -> dict:
        return {**EvalReport(epoch=epoch, perplexity=50.0 + attempt, eval_tokens=1, eval_s=0.1,
                             steps=epoch, samples=0, tokens=0, sparsity_actual=0.5,
                             baseline_perplexity=100.0, best_perplexity=50.0, best_epoch=0,
                             wall_s=1.0, mem_peak_mb=1.0, lr=1e-3, loss=None,
                             tokens_per_s=None, epoch_steps=0,
                             driver_attempt=attempt).to_dict(), "node_id": "n"}

    trial = _Trial(plan.trial_id)
    cb.on_trial_result(0, [], trial, report(0, 2))
    cb.on_trial_result(0, [], trial, report(1, 1))  # an orphan of attempt 1
    rows = read_rows(sweep_dir / "results" / EPOCHS_FILE)
    assert [(r["epoch"], r["driver_attempt"]) for r in rows] == [(0, 2)]
    assert read_rows(sweep_dir / "results" / TRIALS_FILE)[0]["driver_attempt"] == 2
    cb.on_step_begin(0, [])  # attempt 2 is still the newest
    (attempts / claim_name(3)).write_text("{}")
    before = snapshot(sweep_dir / "results")
    cb.on_trial_result(0, [], trial, report(1, 2))
    assert snapshot(sweep_dir / "results") == before
    cb._fence_checked = 0.0
    with pytest.raises(Fenced, match="driver attempt 3 now runs this sweep"):
        cb.on_step_begin(0, [])


@pytest.fixture(scope="module")
def one_trial(tmp_path_factory):
    """configs/tiny.yaml cut to one trial, prepared without Ray (as tests/test_trial_core.py)."""
    from sweep.plan import build_specs, expand
    from sweep.prep import prepare

    root = tmp_path_factory.mktemp("storage")
    cfg = load_config(TINY, ["grid.sparsity=[0.5]", "grid.batch_size=[2]"])
    plans = expand(cfg)
    layout = SweepLayout(root / cfg.name)
    prep = prepare(cfg, str(layout.root), str(root / ".cache" / "models"), plans, threads=1)
    return layout, build_specs(cfg, plans, layout, prep.prepared)[plans[0].trial_id]


def _fenced_spec(one_trial, tmp_path, attempt: int):
    layout, spec = one_trial
    attempts = tmp_path / "driver.attempts"
    attempts.mkdir(exist_ok=True)
    return dataclasses.replace(spec, attempt=attempt, attempts_dir=str(attempts),
                               log_path=str(tmp_path / "t.log"),
                               progress_path=str(tmp_path / "t.progress.json"),
                               export_dir=str(tmp_path / "export"))


def test_an_orphaned_worker_stops_before_its_next_write(one_trial, tmp_path):
    """A driver attempt starts while attempt 1's trial is between its baseline and its first
    checkpoint: the trial writes no checkpoint and no export after that, and ends quietly."""
    from trainers.core import TrialCore
    from trainers.loop import LocalHooks, run_trial

    spec = _fenced_spec(one_trial, tmp_path, attempt=1)
    (Path(spec.attempts_dir) / claim_name(1)).write_text("{}")

    class ResumedMeanwhile(LocalHooks):
        def report(self, core, metrics, save):
            super().report(core, metrics, save)
            if metrics["epoch"] == 0:
                (Path(spec.attempts_dir) / claim_name(2)).write_text("{}")

    hooks = ResumedMeanwhile(tmp_path / "ckpt")
    run_trial(TrialCore(spec), hooks)  # returns: a fenced worker ends without an error
    assert [r["epoch"] for r in hooks.reports] == [0]
    assert hooks.reports[0]["driver_attempt"] == 1
    assert not (tmp_path / "ckpt").exists()  # its epoch-1 checkpoint was never written
    export = tmp_path / "export" / "model.safetensors"
    assert export.is_file()  # the baseline's, written before attempt 2 began
    log = (tmp_path / "t.log").read_text()
    assert ("stopped without writing: driver attempt 2 now runs this sweep; this worker belongs "
            "to attempt 1") in log
    assert "Epoch 1:" in log and "summary" not in log


def test_checkpoints_carry_their_attempt_and_an_older_one_refuses_a_newer_checkpoint(
        one_trial, tmp_path):
    from trainers.checkpoint import STATE_FILE
    from trainers.core import TrialCore
    from trainers.loop import LocalHooks, run_trial

    newer = _fenced_spec(one_trial, tmp_path, attempt=2)
    (Path(newer.attempts_dir) / claim_name(2)).write_text("{}")
    run_trial(TrialCore(newer), LocalHooks(tmp_path / "ckpt"))
    saved = json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())
    assert saved["attempt"] == 2 and saved["epoch"] == 2
    before = snapshot(tmp_path)
    # A worker of attempt 1 restarted by its (dying) Train controller finds attempt 2's state.
    older = dataclasses.replace(newer, attempt=1)
    hooks = LocalHooks(tmp_path / "ckpt")
    run_trial(TrialCore(older), hooks)
    assert hooks.reports == []
    changed = {k for k, v in snapshot(tmp_path).items() if before.get(k) != v}
    assert changed == {"t.log"}  # only its log line saying why it stopped
    assert ("stopped without writing: the checkpoint was saved by driver attempt 2; this worker "
            "belongs to attempt 1") in (tmp_path / "t.log").read_text()


def test_the_memory_check_reads_an_already_materialized_model(tmp_path):
    """A rerun reads the model's shape from the sweep's model cache (a plain config.json)
    rather than from the source it was built from (a GGUF file takes seconds to parse)."""
    from transformers import LlamaConfig

    from sweep.feasibility import model_shape
    from trainers.model import cache_target

    cfg = load_config(TINY, check_paths=False)
    assert model_shape(cfg, tmp_path).hidden == 64  # nothing cached: from model.config
    cached = cache_target(cfg.model, tmp_path)
    cached.mkdir(parents=True)
    LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                num_attention_heads=4, vocab_size=300).save_pretrained(cached)
    shape = model_shape(cfg, tmp_path)
    assert (shape.hidden, shape.layers, shape.vocab) == (96, 3, 300)
    # Counted on the meta device: embeddings, 3 blocks (4 attention + 3 MLP matrices, 2 norms),
    # the final norm and an untied head.
    block = 4 * 96 * 96 + 3 * 96 * 192 + 2 * 96
    assert shape.params == 300 * 96 + 3 * block + 96 + 300 * 96


def test_a_live_driver_on_an_object_store_is_refused(tmp_path, monkeypatch, fake_run, capsys):
    moto_server = pytest.importorskip("moto.server")
    import logging

    from sweep.lease import acquire
    from trainers.storage import Store

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SWEEP_STAGING", str(tmp_path / "staging"))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        uri = (f"s3://b{uuid.uuid4().hex[:12]}/sweeps?endpoint_override={host}:{port}"
               "&scheme=http&allow_bucket_creation=true")
        store = Store.open(uri)
        store.check()
        holder = acquire(store, store.local / "tiny", ttl_s=60, settle_s=0.05)
        try:
            assert main(["run", str(TINY), "--storage", uri]) == 2
            err = capsys.readouterr().err
            assert f"{store.remote.display('tiny')} is being run by another driver" in err
            assert f"pid {os.getpid()}, attempt 1" in err and not fake_run
        finally:
            holder.release()
        assert main(["run", str(TINY), "--storage", uri]) == 0  # free again: attempt 2 runs
        assert fake_run[0]["attempt"] == 2
    finally:
        server.stop()
