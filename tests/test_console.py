"""What a person running a sweep sees: each trial line once, a live status, Ray's own output in
logs/ray.log; TensorBoard stepped by epoch; joining a token-authenticated cluster.

All but the last test run without Ray: the console reads files a real sweep writes (trial logs
in ``TrialLog``'s format, results through ``ResultsWriter``). The last (``ray``) runs the tiny
sweep through the real CLI and counts what reaches its stdout.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweep.cli import token_retry_env
from sweep.config import to_dict
from sweep.console import LogTail, RunConsole
from sweep.layout import SweepLayout
from sweep.results import ResultsWriter
from sweep.runner import config_from_args

try:
    from test_status import beat, write_sweep
except ImportError:  # run from another rootdir
    from tests.test_status import beat, write_sweep

REPO = Path(__file__).resolve().parents[1]


def log_lines(path: Path, tid: str, *lines: str, end: str = "\n") -> None:
    """Append lines as ``trainers.trial_log.TrialLog`` writes them."""
    with open(path, "a") as f:
        f.write("".join(f"12:00:0{i % 10} [{tid}] {line}{end}" for i, line in enumerate(lines)))


def test_log_tail_reads_each_line_once(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    log_lines(a, "a", "from an earlier run")
    tail = LogTail({"a": a, "b": b})
    assert tail.poll() == []  # what an earlier run showed is not shown again
    log_lines(a, "a", "one", "two")
    log_lines(b, "b", "first")
    assert tail.poll() == ["[a] one", "[a] two", "[b] first"]
    assert tail.poll() == []
    with open(a, "a") as f:
        f.write("12:00:05 [a] half")  # a line still being written waits for its end
    assert tail.poll() == []
    with open(a, "a") as f:
        f.write(" done\n")
    assert tail.poll() == ["[a] half done"]
    a.write_text("12:00:09 [a] replaced by a shorter copy\n")
    assert tail.poll() == ["[a] replaced by a shorter copy"]
    assert LogTail({"a": a}, from_end=False).poll() == ["[a] replaced by a shorter copy"]


CAPTURE_SCRIPT = """
import os, subprocess, sys
from pathlib import Path
from sweep.console import Capture
cap = Capture(Path(sys.argv[1]))
out = cap.open()
print("python print")
print("python stderr", file=sys.stderr)
os.write(1, b"fd 1\\n")
os.write(2, b"fd 2\\n")
subprocess.run(["echo", "child process"], check=True)
out.write("to the console\\n")
cap.close()
print("after")
"""


def test_capture_sends_everything_else_to_the_file(tmp_path):
    ray_log = tmp_path / "logs" / "ray.log"
    r = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT, str(ray_log)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout == "to the console\nafter\n"
    assert r.stderr == ""
    assert ray_log.read_text().splitlines() == [
        "python print", "python stderr", "fd 1", "fd 2", "child process"]


def _console(layout, **kw) -> tuple[RunConsole, io.StringIO]:
    out = io.StringIO()
    c = RunConsole(layout, ["s0.5-b2", "s0.5-b4", "s0.8-b2", "s0.8-b4"], out=out, capture=False,
                   **kw)
    return c, out


def test_plain_console(tmp_path):
    layout = write_sweep(tmp_path)
    log_lines(layout.trial_log("s0.5-b2"), "s0.5-b2", "summary: from before")
    beat(layout, "s0.5-b4", 1, 6, time.time())
    c, out = _console(layout, interval_s=3600)
    c.print("the plan\nsecond line")
    log_lines(layout.trial_log("s0.5-b4"), "s0.5-b4", "── epoch 2/2 ──", "Epoch 2: 80.00")
    c.poll()
    c.poll()
    assert out.getvalue().splitlines() == [
        "the plan", "second line", "[s0.5-b4] ── epoch 2/2 ──", "[s0.5-b4] Epoch 2: 80.00"]

    # Quiet for the interval: one status line, and again only when something changed.
    c.interval_s = 0
    c.poll()
    c.poll()
    status = [line for line in out.getvalue().splitlines() if line.startswith("status ")]
    assert len(status) == 1
    assert "1 done, 1 running, 1 pending, 1 errored" in status[0]
    assert "s0.5-b4 ep 2/2 step 6/8" in status[0]
    beat(layout, "s0.5-b4", 1, 7, time.time())
    c.poll()
    status = [line for line in out.getvalue().splitlines() if line.startswith("status ")]
    assert len(status) == 2 and "step 7/8" in status[1]

    # A trial that errors says so once (its traceback is Ray's, in ray.log).
    ResultsWriter(layout.root).upsert_trial({"trial_id": "s0.5-b4", "status": "errored",
                                             "stop_reason": "RuntimeError: injected"})
    c.poll()
    c.poll()
    errored = [line for line in out.getvalue().splitlines() if "errored:" in line]
    assert errored == ["[s0.5-b4] errored: RuntimeError: injected (Ray's traceback: the output above)"]


def test_plain_console_prints_each_preparation_step(tmp_path):
    cfg = config_from_args(str(REPO / "configs" / "tiny.yaml"), [], {})
    layout = SweepLayout(tmp_path / cfg.name)
    layout.root.mkdir()
    layout.config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    c, out = _console(layout, interval_s=0)
    c.phase("preparing")
    c.poll()
    c.poll()
    layout.prep.mkdir()
    layout.train_tokens.write_bytes(b"x")
    c.poll()
    assert out.getvalue().splitlines() == ["preparing: model and training tokens",
                                           "preparing: evaluation windows"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_console(tmp_path):
    """On a terminal: a rich live display under the printed lines, each line printed once."""
    from rich.console import Console

    layout = write_sweep(tmp_path)
    beat(layout, "s0.5-b4", 1, 6, time.time())
    out = FakeTerminal()
    c = RunConsole(layout, ["s0.5-b4"], out=out, capture=False, poll_s=3600)
    c.start()
    try:
        assert c.tty and c.live is not None
        c.phase("running")
        log_lines(layout.trial_log("s0.5-b4"), "s0.5-b4", "Epoch 2: 80.00")
        c.print("a line of the sweep's")
        c.poll()
        shown = Console(file=io.StringIO(), width=200, record=True)
        shown.print(c._renderable())
        live = shown.export_text()
        assert "1 done, 1 running, 1 pending, 1 errored" in live
        assert "s0.5-b4 ep 2/2 step 6/8, 1,024 tok/s, ppl 143.8, ETA" in live
    finally:
        c.close()
    text = out.getvalue()
    assert text.count("[s0.5-b4] Epoch 2: 80.00") == 1
    assert text.count("a line of the sweep's") == 1


def test_token_mode_only_after_the_cluster_asks_for_it(tmp_path):
    from ray.exceptions import AuthenticationError

    refused = AuthenticationError("Missing authentication token")
    home = tmp_path / "home"
    token = home / ".ray" / "auth_token"
    env = {"HOME": str(home)}
    assert token_retry_env(refused, "10.0.0.1:6379", env) is None  # no token anywhere
    token.parent.mkdir(parents=True)
    token.write_text("secret")
    assert token_retry_env(refused, None, env) is None  # an embedded cluster: nothing to join
    assert token_retry_env(RuntimeError("other"), "10.0.0.1:6379", env) is None
    assert token_retry_env(refused, "10.0.0.1:6379", env)["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_MODE" not in env  # the caller's environment is left alone
    env = {"HOME": str(home), "RAY_ADDRESS": "10.0.0.1:6379", "RAY_AUTH_MODE": "disabled"}
    assert token_retry_env(refused, None, env) is None  # the user chose a mode
    env = {"HOME": str(tmp_path), "RAY_ADDRESS": "10.0.0.1:6379", "RAY_AUTH_TOKEN": "secret"}
    assert token_retry_env(refused, None, env)["RAY_AUTH_MODE"] == "token"
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token)}
    assert token_retry_env(refused, "ray://h:10001", env)["RAY_AUTH_MODE"] == "token"


def read_events(directory: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a directory's TensorBoard event files (TFRecord:
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


class FakeTrial:
    def __init__(self, path: Path):
        self.local_path = str(path)
        self.evaluated_params = {"trial_id": "s0.5-b2"}

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)

    def __hash__(self):
        return id(self)


def test_tensorboard_steps_are_epochs(tmp_path):
    from sweep.callbacks import EpochTensorBoard

    cb = EpochTensorBoard()
    trial = FakeTrial(tmp_path / "s0.5-b2")
    reports = [
        {"kind": "eval", "epoch": 0, "perplexity": 259.6, "loss": None, "tokens": 0, "lr": 1e-3},
        {"kind": "eval", "epoch": 1, "perplexity": 109.7, "loss": 5.2, "tokens": 1024, "lr": 1e-3},
        {"kind": "step", "epoch": 1, "perplexity": 109.7, "steps": 12},  # a mid-epoch checkpoint
        {"kind": "eval", "epoch": 2, "perplexity": 54.0, "loss": 4.4, "tokens": 2048, "lr": 1e-3},
    ]
    for i, r in enumerate(reports, 1):
        cb.log_trial_result(i, trial, {**r, "training_iteration": i})
    cb.log_trial_end(trial)
    events = read_events(tmp_path / "s0.5-b2")
    ppl = [(step, round(v, 1)) for tag, step, v in events if tag == "perplexity"]
    assert ppl == [(0, 259.6), (1, 109.7), (2, 54.0)]
    assert [(s, round(v, 1)) for t, s, v in events if t == "loss"] == [(1, 5.2), (2, 4.4)]
    assert [(s, round(v, 1)) for t, s, v in events if t == "by_tokens/perplexity"] == [
        (0, 259.6), (1024, 109.7), (2048, 54.0)]


@pytest.mark.ray
def test_tiny_sweep_console(tmp_path):
    """The tiny sweep (2 of its trials, run at once) through the real CLI, stdout not a
    terminal: under 80 lines,
    each trial's summary once, none of Ray's chatter (it is in logs/ray.log), TensorBoard
    stepped by epoch, and ``sweep status`` agreeing with the run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "run", "configs/tiny.yaml", "--storage",
                        str(tmp_path), "--batch-size", "4"], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    # The periodic status lines come with time (one per quiet 30 s, more on a loaded machine);
    # the rest is what the sweep prints once.
    assert len([line for line in lines if not line.startswith("status ")]) < 80, r.stdout
    for tid in ("s0.5-b4", "s0.8-b4"):
        assert sum(line.startswith(f"[{tid}] summary:") for line in lines) == 1, r.stdout
        assert sum(line.startswith(f"[{tid}] ── baseline ──") for line in lines) == 1
    for noise in ("TrainingReport(", "PreemptionWatcher", "Checkpoint successfully created",
                  "Trial status", "pid="):
        assert noise not in r.stdout
    sweep_dir = tmp_path / "tiny"
    ray_log = (sweep_dir / "logs" / "ray.log").read_text()
    assert "TrainingReport(" in ray_log  # Ray's output went there, not away
    steps = {s for t, s, _ in read_events(sweep_dir / "tune" / "s0.5-b4") if t == "perplexity"}
    assert steps == {0, 1, 2}
    s = subprocess.run([sys.executable, "-m", "sweep.cli", "status", str(sweep_dir), "--format",
                        "json"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(s.stdout)
    assert data["finished"] and data["counts"]["done"] == 2
    assert data["driver"]["alive"] is False
    assert {t["trial_id"]: t["step"] for t in data["trials"]} == {"s0.5-b4": 8, "s0.8-b4": 8}


def test_object_store_logs_are_pulled_when_results_move(tmp_path):
    """With an object store the driver's console pulls a trial's log (rank 0 pushes it with
    every evaluation) when that trial's results move on; a ``file://`` remote stands in for
    the bucket."""
    from trainers.storage import Remote, Store

    bucket, staging = tmp_path / "bucket", tmp_path / "staging"
    layout = write_sweep(staging)  # the driver's own results, in its staging copy
    store = Store(staging, Remote(f"file://{bucket}"))
    remote_log = bucket / "tiny" / "logs" / "s0.5-b4.log"
    remote_log.parent.mkdir(parents=True)
    log_lines(remote_log, "s0.5-b4", "── epoch 1/2 ──")
    c, out = _console(layout, store=store, interval_s=3600)
    c.poll()
    assert out.getvalue().splitlines() == ["[s0.5-b4] ── epoch 1/2 ──"]
    log_lines(remote_log, "s0.5-b4", "── epoch 2/2 ──")
    c.poll()  # the results did not move: no pull
    assert out.getvalue().splitlines() == ["[s0.5-b4] ── epoch 1/2 ──"]
    ResultsWriter(layout.root).upsert_trial({"trial_id": "s0.5-b4", "epochs_completed": 2,
                                             "status": "completed"})
    c.poll()
    assert out.getvalue().splitlines() == ["[s0.5-b4] ── epoch 1/2 ──", "[s0.5-b4] ── epoch 2/2 ──"]
