"""The driver lease (sweep/lease.py): one driver per sweep, stale leases taken over.

Local directory: write and release, a live holder refused with its identity in the message,
every kind of stale holder taken over (and a fresh one kept), simultaneous acquirers in threads
and in processes (exactly one wins, fresh and during a takeover), a kill -9'd driver replaced,
a fenced holder told to stop. Object store: the same protocol against a local S3 (moto).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from sweep.config import ConfigError
from sweep.lease import (
    ATTEMPTS_DIR,
    LEASE_FILE,
    LeaseHeld,
    LeaseLost,
    acquire,
    current_attempt,
    read_holder,
    stale_reason,
)

ROOT = Path(__file__).resolve().parents[1]


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def claim_file(sweep_dir: Path, attempt: int) -> Path:
    return sweep_dir / ATTEMPTS_DIR / f"{attempt:06d}.json"


def fabricate(sweep_dir: Path, attempt: int, **fields) -> dict:
    """A holder's claim and lease as another driver would have left them."""
    now = time.time()
    record = {"attempt": attempt, "token": uuid.uuid4().hex, "host": "other-host", "pid": 4242,
              "pid_started": now - 100, "pid_ns": None, "started_at": now - 100,
              "ttl_s": 60.0, "renewed_at": now - 1, **fields}
    claim_file(sweep_dir, attempt).parent.mkdir(parents=True, exist_ok=True)
    claim = {k: v for k, v in record.items() if k != "renewed_at"}
    claim_file(sweep_dir, attempt).write_text(json.dumps(claim))
    (sweep_dir / LEASE_FILE).write_text(json.dumps(record))
    return record


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, started


def test_acquire_writes_the_lease_and_release_removes_it(tmp_path):
    before = time.time()
    lease = acquire(None, tmp_path, ttl_s=30)
    record = json.loads((tmp_path / LEASE_FILE).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["attempt"] == lease.attempt == 1 and record["token"] == lease.token
    assert before <= record["started_at"] <= record["renewed_at"] <= time.time()
    assert record["ttl_s"] == 30.0 and len(record["token"]) == 32
    assert read_holder(None, tmp_path)["token"] == lease.token
    assert current_attempt(None, tmp_path) == 1

    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()
    assert json.loads(claim_file(tmp_path, 1).read_text())["released"] is True
    assert read_holder(None, tmp_path) is None
    lease.release()  # idempotent

    with acquire(None, tmp_path, ttl_s=30) as again:  # the next driver: attempt 2, no takeover
        assert again.attempt == 2 and (tmp_path / LEASE_FILE).exists()
    assert not (tmp_path / LEASE_FILE).exists() and current_attempt(None, tmp_path) == 2


def test_a_live_lease_is_refused_naming_its_holder(tmp_path):
    with acquire(None, tmp_path, ttl_s=30) as held:
        with pytest.raises(LeaseHeld) as err:
            acquire(None, tmp_path, ttl_s=30)
        assert isinstance(err.value, ConfigError) and len(err.value.problems) == 1
        msg = err.value.problems[0]
        started = json.loads((tmp_path / LEASE_FILE).read_text())["started_at_iso"]
        for part in (str(tmp_path), f"host {socket.gethostname()}", f"pid {os.getpid()}",
                     "attempt 1", f"since {started}", f"kill {os.getpid()}", "expires at"):
            assert part in msg, (part, msg)
        assert err.value.holder["token"] == held.token
    # The refusal wrote nothing: the holder's records are intact and no attempt was added.
    assert sorted(os.listdir(tmp_path / ATTEMPTS_DIR)) == ["000001.json"]


def test_the_heartbeat_renews_the_lease(tmp_path):
    with acquire(None, tmp_path, ttl_s=5, heartbeat_s=0.05) as lease:
        first = json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"]
        assert wait_until(
            lambda: json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"] > first)
        assert not lease.lost.is_set()
    with pytest.raises(ValueError, match="heartbeat_s"):
        acquire(None, tmp_path, ttl_s=5, heartbeat_s=5)


@pytest.mark.parametrize(
    "case, fields, expect",
    [
        ("other host, renewed within TTL", {}, None),
        ("other host, TTL expired", {"renewed_at": -120.0}, "not renewed for 120 s (TTL 60 s)"),
        ("other host, own short TTL expired", {"renewed_at": -6.0, "ttl_s": 5.0},
         "not renewed for 6 s (TTL 5 s)"),
        ("this host, dead pid", {"host": "HERE", "pid": "DEAD"}, "is not running"),
        ("this host, pid reused by a later process",
         {"host": "HERE", "pid": "SELF", "pid_started": -1000.0}, "is not running"),
        ("this host, live pid", {"host": "HERE", "pid": "SELF"}, None),
        ("this host, other pid namespace, dead pid",
         {"host": "HERE", "pid": "DEAD", "pid_ns": "pid:[1]"}, "SKIP_IF_NO_NS"),
    ],
)
def test_stale_leases_are_taken_over_and_live_ones_kept(tmp_path, caplog, case, fields, expect):
    now = time.time()
    me = psutil.Process(os.getpid())
    fields = dict(fields)
    if fields.get("host") == "HERE":
        fields["host"] = socket.gethostname()
    if fields.get("pid") == "SELF":
        fields["pid"] = os.getpid()
        fields.setdefault("pid_started", me.create_time())
    elif fields.get("pid") == "DEAD":
        fields["pid"], fields["pid_started"] = dead_pid()
    if fields.get("renewed_at", 0) < 0:  # seconds before now
        fields["renewed_at"] += now
    if fields.get("pid_started", 0) < 0:  # seconds before this process started
        fields["pid_started"] += me.create_time()
    if expect == "SKIP_IF_NO_NS":
        try:
            os.readlink("/proc/self/ns/pid")
        except OSError:
            pytest.skip("no pid namespaces here")
        expect = None  # pids of another namespace say nothing: only the TTL counts
    holder = fabricate(tmp_path, 3, **fields)
    assert (stale_reason(holder) is None) == (expect is None)

    if expect is None:
        with pytest.raises(LeaseHeld, match=f"pid {holder['pid']}"):
            acquire(None, tmp_path, ttl_s=30)
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == holder["token"]
        return
    with caplog.at_level(logging.WARNING, logger="sweep.lease"):
        lease = acquire(None, tmp_path, ttl_s=30)
    try:
        assert lease.attempt == 4  # the previous attempt + 1
        assert expect in stale_reason(holder)
        taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
        assert len(taken) == 1 and expect in taken[0] and f"pid {holder['pid']}" in taken[0]
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == lease.token
    finally:
        lease.release()


def test_released_and_unreadable_records(tmp_path):
    fabricate(tmp_path, 1, released=True)
    (tmp_path / LEASE_FILE).unlink()
    with acquire(None, tmp_path, ttl_s=30) as lease:  # a released attempt is free, no takeover
        assert lease.attempt == 2
    # A claim being written (the O_EXCL fallback, half a record): held until its TTL from mtime.
    claim_file(tmp_path, 3).write_text('{"attempt": 3, "tok')
    with pytest.raises(LeaseHeld):
        acquire(None, tmp_path, ttl_s=30)
    old = time.time() - 3600
    os.utime(claim_file(tmp_path, 3), (old, old))
    with acquire(None, tmp_path, ttl_s=30) as lease:
        assert lease.attempt == 4


@pytest.mark.parametrize("start", ["fresh", "stale holder"])
def test_simultaneous_acquirers_in_threads_one_wins(tmp_path, start):
    n, rounds = 8, 10
    for r in range(rounds):
        d = tmp_path / f"r{r}"
        d.mkdir()
        if start == "stale holder":
            fabricate(d, 5, renewed_at=time.time() - 600)
        barrier = threading.Barrier(n)
        won, held, errors = [], [], []

        def contend(d=d, barrier=barrier, won=won, held=held, errors=errors):
            barrier.wait()
            try:
                won.append(acquire(None, d, ttl_s=30))
            except LeaseHeld as e:
                held.append(e)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=contend) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(won) == 1 and len(held) == n - 1, (won, held, errors)
        expected = 6 if start == "stale holder" else 1
        assert won[0].attempt == expected
        assert sorted(os.listdir(d / ATTEMPTS_DIR))[-1] == f"{expected:06d}.json"
        assert json.loads((d / LEASE_FILE).read_text())["token"] == won[0].token
        won[0].release()


CONTENDER = """
import sys, time
from pathlib import Path
from sweep.lease import LeaseHeld, acquire
d, t0 = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, t0 - time.time()))
try:
    lease = acquire(None, d, ttl_s=60, heartbeat_s=0.2)
except LeaseHeld:
    print("held", flush=True)
    sys.exit(0)
print("won", lease.attempt, flush=True)
time.sleep(120)
"""


def test_processes_race_one_wins_and_a_killed_winner_is_taken_over(tmp_path, caplog):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time() + 2.0  # all contenders start acquiring at the same instant
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), str(t0)],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(4)]
    try:
        lines = [p.stdout.readline().strip() for p in procs]
        winners = [p for p, line in zip(procs, lines, strict=True) if line.startswith("won")]
        assert len(winners) == 1 and lines.count("held") == 3, lines
        winner = winners[0]
        assert read_holder(None, tmp_path)["pid"] == winner.pid
        with pytest.raises(LeaseHeld, match=f"pid {winner.pid}"):
            acquire(None, tmp_path, ttl_s=60)

        winner.kill()  # kill -9: no release; the lease stays behind, fresh
        winner.wait()
        assert (tmp_path / LEASE_FILE).exists()
        with caplog.at_level(logging.WARNING, logger="sweep.lease"):
            lease = acquire(None, tmp_path, ttl_s=60)
        assert lease.attempt == 2
        assert any(f"pid {winner.pid}" in r.getMessage() and "is not running" in r.getMessage()
                   for r in caplog.records)
        lease.release()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()


def test_a_holder_that_was_taken_over_stops_and_leaves_the_new_lease(tmp_path, caplog):
    old = acquire(None, tmp_path, ttl_s=10, heartbeat_s=0.05)
    new = acquire(None, tmp_path, ttl_s=10, force=True)  # e.g. `sweep resume --force`
    assert new.attempt == 2 and current_attempt(None, tmp_path) == 2
    assert wait_until(old.lost.is_set)
    assert "attempt 2" in old.lost_reason
    with pytest.raises(LeaseLost, match="attempt 2"):
        old.check()
    old.release()  # must not remove what the newer attempt holds
    assert read_holder(None, tmp_path)["token"] == new.token
    assert not json.loads(claim_file(tmp_path, 2).read_text()).get("released")
    new.check()
    new.release()
    assert read_holder(None, tmp_path) is None


# ---------------------------------------------------------------------------------------------
# Object store (moto): no exclusive create, the read-back decides


moto_server = pytest.importorskip("moto.server")
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture()
def s3_uri(monkeypatch, tmp_path):
    """A fresh bucket on a local S3 server (as tests/test_object_store.py starts it)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SWEEP_STAGING", str(tmp_path / "staging"))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield (f"s3://b{uuid.uuid4().hex[:12]}/sweeps?endpoint_override={host}:{port}&scheme=http"
           "&allow_bucket_creation=true")
    server.stop()


def test_object_store_lease(s3_uri):
    from pyarrow import fs as pafs

    try:
        from sweep.storage import Store
    except ImportError:
        from trainers.storage import Store

    store = Store.open(s3_uri)
    store.check()
    sweep_dir = store.local / "sw"
    remote = store.remote

    def read(rel):
        with remote.fs.open_input_stream(remote.path(f"sw/{rel}")) as f:
            return json.loads(f.read())

    lease = acquire(store, sweep_dir, ttl_s=30, heartbeat_s=0.1, settle_s=0.05)
    assert lease.attempt == 1 and read(LEASE_FILE)["token"] == lease.token
    assert read(f"{ATTEMPTS_DIR}/000001.json")["token"] == lease.token
    assert not sweep_dir.exists()  # never through the staging copy
    first = read(LEASE_FILE)["renewed_at"]
    assert wait_until(lambda: read(LEASE_FILE)["renewed_at"] > first)
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}") as err:
        acquire(store, sweep_dir, ttl_s=30, settle_s=0.05)
    assert remote.display("sw") in err.value.problems[0]
    lease.release()
    assert remote.fs.get_file_info(remote.path(f"sw/{LEASE_FILE}")).type == pafs.FileType.NotFound
    assert read_holder(store, sweep_dir) is None and current_attempt(store, sweep_dir) == 1

    # Simultaneous acquirers: all see attempt 2 free and write it; the read-back after the
    # settle delay names one token, so one wins.
    n = 4
    barrier = threading.Barrier(n)
    won, held = [], []

    def contend():
        barrier.wait()
        try:
            won.append(acquire(store, sweep_dir, ttl_s=30, settle_s=0.5))
        except LeaseHeld as e:
            held.append(e)

    threads = [threading.Thread(target=contend) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(held) == n - 1
    assert won[0].attempt == 2 and read(f"{ATTEMPTS_DIR}/000002.json")["token"] == won[0].token

    # Expired on another host: taken over with the next attempt.
    won[0]._stop.set()  # a driver that stopped renewing without releasing (killed)
    won[0]._thread.join()
    stale = {**read(LEASE_FILE), "host": "other-host", "renewed_at": time.time() - 600}
    local = store.local / "fabricated.json"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps(stale))
    remote.push(local, f"sw/{LEASE_FILE}")
    with acquire(store, sweep_dir, ttl_s=30, settle_s=0.05) as taken:
        assert taken.attempt == 3 and read(LEASE_FILE)["token"] == taken.token
