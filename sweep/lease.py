"""One driver per sweep: a lease in SWEEP_DIR that the running driver keeps renewing.

Two drivers on one sweep (a second ``sweep resume`` while the first still runs, a resume on
another machine while the old head is only partitioned) would both launch every unfinished
trial and interleave their checkpoints and result rows. ``acquire`` refuses a second driver
while the first is alive (``LeaseHeld``, a ``ConfigError``: the CLI exits 2 naming the
holder), and lets a new driver take over once the old one is gone.

Files, under SWEEP_DIR (pushed to the store's URI when the store is remote):

- ``driver.attempts/NNNNNN.json`` - one *claim* per driver start, never deleted: host, pid,
  token, start time, TTL. The claims are the history of attempts: a new driver takes attempt
  ``max + 1``, and exactly one driver can create a given claim, which is what decides a race.
  ``release`` marks its claim ``released``.
- ``driver.lease`` - the current holder's claim plus ``renewed_at``, rewritten by a daemon
  thread every ``heartbeat_s``; ``release`` removes it.

The holder of the newest claim is the rightful driver. Its lease is *stale*, and a new driver
takes it over (logging why), when it was released, when it was not renewed for its TTL
(``renewed_at`` older than ``ttl_s``; wall clocks of the hosts must agree to well within the
TTL), or when it was taken on this host (same host name and pid namespace) by a process that
no longer runs (pid gone, or reused by a process started at another time). A holder that
finds a newer claim at its next renewal has been fenced off: ``lease.lost`` is set and
``lease.check()`` raises ``LeaseLost``; it must stop.

Guarantees.

- A local or shared directory (one POSIX filesystem, including NFS): a claim is created
  with ``link(2)`` of a fully written temporary file (``O_CREAT | O_EXCL`` where links are
  unsupported), which fails when the name exists, so of any number of simultaneous acquirers
  exactly one gets a given attempt; the others see it live and are refused. The lease file is
  replaced atomically (``rename``), so readers never see half a record. Left: a holder that
  stalls longer than its TTL (a suspended laptop) and then renews in the instant between a
  newcomer's claim and the newcomer's first lease write overwrites that write; the newcomer
  rewrites it at its next renewal and the stalled holder finds the newer claim and stops.
- An object store (S3, GCS, MinIO): there is no exclusive create, so a claim is written after
  checking that its name is free, then read back after ``settle_s``; the acquirer whose token
  is in it wins (S3 and GCS read back the latest write). Two acquirers can both win only if one
  of them takes longer than ``settle_s`` between its check and its write; then both run until
  the first renewal of either (``heartbeat_s``), when one finds the other's token in its claim,
  sets ``lost`` and must stop. Attempt numbers fence what an orphaned or losing driver writes
  afterwards.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from sweep.config import ConfigError
from sweep.layout import SweepLayout
from trainers.fence import ATTEMPTS_DIR, attempt_of, claim_name

try:
    from sweep.storage import Store
except ImportError:  # the storage module may move to trainers/ in the restructuring
    from trainers.storage import Store

# Relative to SWEEP_DIR, as sweep/layout.py spells them (the claims' directory is ATTEMPTS_DIR).
LEASE_FILE = SweepLayout.of("").lease.name
DEFAULT_TTL_S = 60.0
# Object stores only: how long a claim must stand before its read-back decides a race.
DEFAULT_SETTLE_S = 2.0
# Re-reads after losing a claim race before giving up (the winner is then normally live).
_ROUNDS = 5

_log = logging.getLogger(__name__)


class LeaseHeld(ConfigError):
    """Another driver holds the sweep's lease; ``holder`` is its record."""

    def __init__(self, holder: dict, where: str):
        self.holder = holder
        super().__init__([_held_message(holder, where)], title="cannot run the sweep")


class LeaseLost(RuntimeError):
    """This driver's lease was taken over: a newer attempt runs the sweep now."""


# ---------------------------------------------------------------------------------------------
# Who we are, and whether a recorded holder still runs


def _pid_namespace() -> str | None:
    """Pids are only comparable inside one pid namespace (containers sharing a host name)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _identity() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started": psutil.Process(pid).create_time(),
        "pid_ns": _pid_namespace(),
    }


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _same_host(record: dict) -> bool:
    me = _identity()
    if record.get("host") != me["host"]:
        return False
    theirs, mine = record.get("pid_ns"), me["pid_ns"]
    return theirs is None or mine is None or theirs == mine


def _pid_alive(pid: int, started: float | None) -> bool:
    """True when ``pid`` runs and is the process that was started at ``started`` (a pid
    reused by a later process is not the holder)."""
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we may not inspect it


def stale_reason(record: dict, now: float | None = None) -> str | None:
    """Why ``record`` (a claim or lease) no longer holds the sweep, or None while it does."""
    now = time.time() if now is None else now
    if record.get("released"):
        return "it was released"
    ttl = float(record.get("ttl_s") or DEFAULT_TTL_S)
    renewed = record.get("renewed_at", record.get("started_at"))
    if renewed is None:
        return "its record is unreadable"
    age = now - float(renewed)
    if age > ttl:
        return f"it was not renewed for {age:.0f} s (TTL {ttl:.0f} s)"
    pid = record.get("pid")
    if pid is not None and _same_host(record) and not _pid_alive(pid, record.get("pid_started")):
        return f"its process (pid {pid} on this host) is not running"
    return None


def _held_message(holder: dict, where: str) -> str:
    ttl = float(holder.get("ttl_s") or DEFAULT_TTL_S)
    renewed = float(holder.get("renewed_at", holder.get("started_at")) or time.time())
    started = holder.get("started_at")
    since = _iso(float(started)) if started is not None else "an unknown time"
    return (
        f"{where} is being run by another driver: host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, attempt {holder.get('attempt', '?')}, since {since} "
        f"(lease renewed {max(0.0, time.time() - renewed):.0f} s ago). Let it finish, or stop it "
        f"(kill {holder.get('pid', 'PID')} on {holder.get('host', 'its host')}); if that host "
        f"is gone, its lease expires at {_iso(renewed + ttl)} ({ttl:.0f} s without renewal), "
        "after which the same command takes the sweep over."
    )


# ---------------------------------------------------------------------------------------------
# Where the records live: a directory, or a URI through the store's remote


def _claim_rel(attempt: int) -> str:
    return f"{ATTEMPTS_DIR}/{claim_name(attempt)}"


def _parse(data: bytes, mtime: float | None) -> dict:
    try:
        record = json.loads(data)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    # Half written (the O_EXCL fallback) or damaged: live until its TTL counted from mtime.
    return {"corrupt": True, "renewed_at": mtime, "host": "?", "pid": None}


_attempt_of = attempt_of


class _LocalFiles:
    """Records in a directory on one filesystem: exclusive create by ``link(2)``."""

    exclusive = True

    def __init__(self, sweep_dir: Path):
        self.root = Path(sweep_dir)

    def display(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def read(self, rel: str) -> dict | None:
        path = self.root / rel
        try:
            data, mtime = path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            return None
        return _parse(data, mtime)

    def _temp(self, target: Path, record: dict) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    def create(self, rel: str, record: dict) -> bool:
        target = self.root / rel
        tmp = self._temp(target, record)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return self._create_excl(target, record)  # a filesystem without hard links
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create_excl(target: Path, record: dict) -> bool:
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return True

    def replace(self, rel: str, record: dict) -> None:
        target = self.root / rel
        os.replace(self._temp(target, record), target)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def attempts(self) -> list[int]:
        try:
            names = os.listdir(self.root / ATTEMPTS_DIR)
        except FileNotFoundError:
            return []
        return [a for a in map(_attempt_of, names) if a is not None]


class _RemoteFiles:
    """Records under a URI, read straight from the bucket (never from a staging copy, which
    could be stale) and written with ``Remote.push``. No exclusive create: see the module
    docstring for the read-back protocol."""

    exclusive = False

    def __init__(self, remote, prefix: str):
        self.remote, self.prefix = remote, prefix.strip("/")

    def _rel(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def display(self, rel: str = "") -> str:
        return self.remote.display(self._rel(rel)) if rel or self.prefix else self.remote.display()

    def read(self, rel: str) -> dict | None:
        from pyarrow import fs as pafs

        path = self.remote.path(self._rel(rel))
        info = self.remote.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return None
        try:
            with self.remote.fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        return _parse(data, mtime)

    def replace(self, rel: str, record: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="sweep-lease-") as d:
            local = Path(d) / rel.rsplit("/", 1)[-1]
            local.write_text(json.dumps(record, indent=1))
            self.remote.push(local, self._rel(rel))

    def create(self, rel: str, record: dict) -> bool:
        if self.remote.kind(self._rel(rel)) is not None:
            return False
        self.replace(rel, record)
        return True

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.remote.fs.delete_file(self.remote.path(self._rel(rel)))

    def attempts(self) -> list[int]:
        from pyarrow import fs as pafs

        where = self.remote.path(self._rel(ATTEMPTS_DIR))
        selector = pafs.FileSelector(where, allow_not_found=True)
        infos = self.remote.fs.get_file_info(selector)
        return [a for a in (_attempt_of(i.path) for i in infos if i.type == pafs.FileType.File)
                if a is not None]


def _files(store: Store | None, sweep_dir: Path):
    rel = store.rel(Path(sweep_dir)) if store is not None and store.remote is not None else None
    if rel is not None:
        return _RemoteFiles(store.remote, rel)
    return _LocalFiles(Path(sweep_dir))


def _current(files) -> tuple[int, dict | None]:
    """The newest attempt number and its holder's record (None when it released or no
    driver ever ran): the lease when it belongs to that attempt, else its claim."""
    lease = files.read(LEASE_FILE)
    last = max([*files.attempts(), int((lease or {}).get("attempt") or 0)], default=0)
    if last == 0:
        return 0, None
    claim = files.read(_claim_rel(last))
    if claim is not None and claim.get("released"):
        return last, None
    if lease is not None and lease.get("attempt") == last and (
        claim is None or claim.get("token") == lease.get("token")
    ):
        return last, lease
    return last, claim


def current_attempt(store: Store | None, sweep_dir: Path) -> int:
    """The newest driver attempt of the sweep (0: none yet). A writer that carries an older
    attempt belongs to a driver that was taken over and must not write."""
    return _current(_files(store, sweep_dir))[0]


def read_holder(store: Store | None, sweep_dir: Path) -> dict | None:
    """The current driver's record (host, pid, attempt, started_at, renewed_at), or None."""
    return _current(_files(store, sweep_dir))[1]


# ---------------------------------------------------------------------------------------------
# The lease


class Lease:
    """A held lease: renewed by a daemon thread until ``release`` (or the ``with`` block ends).

    ``attempt`` numbers this driver start (1, 2, ...); ``token`` is unique to it. ``lost`` is
    set when a newer attempt took the sweep over; ``check()`` raises ``LeaseLost`` then."""

    def __init__(self, files, record: dict, heartbeat_s: float, log: Callable[[str], None]):
        self._files, self.record, self._log = files, dict(record), log
        self.attempt: int = record["attempt"]
        self.token: str = record["token"]
        self.heartbeat_s = heartbeat_s
        self.lost = threading.Event()
        self.lost_reason: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._beat, name=f"sweep-lease-{self.attempt}", daemon=True
        )

    @property
    def where(self) -> str:
        return self._files.display(LEASE_FILE)

    def __repr__(self):
        return f"Lease(attempt={self.attempt}, {self.where})"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        self._log(f"driver lease lost: {reason}; this driver (attempt {self.attempt}) must stop")

    def _fenced(self) -> str | None:
        newer = [a for a in self._files.attempts() if a > self.attempt]
        if newer:
            holder = self._files.read(_claim_rel(max(newer))) or {}
            return (f"attempt {max(newer)} (host {holder.get('host', '?')}, pid "
                    f"{holder.get('pid', '?')}) took the sweep over")
        if not self._files.exclusive:
            claim = self._files.read(_claim_rel(self.attempt)) or {}
            if claim.get("token") != self.token:
                return (f"another driver (host {claim.get('host', '?')}, pid "
                        f"{claim.get('pid', '?')}) wrote the same attempt {self.attempt}")
        return None

    def renew(self) -> bool:
        """Rewrite the lease with a fresh ``renewed_at``; False (and ``lost`` set) when a
        newer attempt holds the sweep, in which case nothing is written."""
        with self._lock:
            if self.lost.is_set() or self._stop.is_set():
                return False
            reason = self._fenced()
            if reason:
                self._lose(reason)
                return False
            now = time.time()
            self.record.update(renewed_at=now, renewed_at_iso=_iso(now))
            self._files.replace(LEASE_FILE, self.record)
            return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: retry at the next beat
                self._log(f"driver lease renewal failed (will retry): {e}")

    def check(self) -> None:
        """Raise ``LeaseLost`` when the sweep was taken over (call it between trial events)."""
        if self.lost.is_set():
            raise LeaseLost(self.lost_reason or "the driver lease was taken over")

    def release(self) -> None:
        """Stop renewing; mark the claim released and remove the lease, unless a newer
        attempt already holds the sweep (then its records are left alone)."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.lost.is_set() or self._fenced():
            return
        now = time.time()
        claim = {k: v for k, v in self.record.items() if not k.startswith("renewed_at")}
        self._files.replace(_claim_rel(self.attempt), {**claim, "released": True,
                                                        "released_at": now})
        lease = self._files.read(LEASE_FILE)
        if lease is None or lease.get("token") == self.token:
            self._files.delete(LEASE_FILE)


def acquire(
    store: Store | None,
    sweep_dir: Path,
    ttl_s: float = DEFAULT_TTL_S,
    heartbeat_s: float | None = None,
    *,
    settle_s: float = DEFAULT_SETTLE_S,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Lease:
    """Take the sweep's driver lease, or raise ``LeaseHeld`` naming its live holder.

    ``store``: the sweep's ``Store`` (None or a local store: ``sweep_dir`` itself holds the
    records; a URI store: the records live under the URI, read and written directly, never
    through the staging copy). ``ttl_s``: how long without renewal until others may take the
    lease over; ``heartbeat_s`` (default ``ttl_s / 3``): the renewal interval. ``settle_s``:
    object stores only, see the module docstring. ``force``: take the lease over even from a
    live holder, which stops at its next renewal. A stale lease is taken over and the takeover
    logged (``log``, default this module's logger)."""
    heartbeat_s = ttl_s / 3 if heartbeat_s is None else heartbeat_s
    if not 0 < heartbeat_s < ttl_s:
        raise ValueError(f"heartbeat_s must be in (0, ttl_s={ttl_s}), got {heartbeat_s}")
    log = log or _log.warning
    files = _files(store, sweep_dir)
    holder = None
    for _ in range(_ROUNDS):
        last, holder = _current(files)
        reason = None
        if holder is not None:
            reason = "forced (--force)" if force else stale_reason(holder)
            if reason is None:
                raise LeaseHeld(holder, files.display())
        now = time.time()
        record = {
            "attempt": last + 1,
            "token": uuid.uuid4().hex,
            **_identity(),
            "started_at": now,
            "started_at_iso": _iso(now),
            "ttl_s": float(ttl_s),
        }
        if not files.create(_claim_rel(record["attempt"]), record):
            continue  # a concurrent acquirer claimed this attempt: look again
        if not files.exclusive:
            time.sleep(settle_s)
            back = files.read(_claim_rel(record["attempt"]))
            if not back or back.get("token") != record["token"]:
                continue
        if holder is not None:
            log(
                f"taking over the driver lease of {files.display()} from host "
                f"{holder.get('host', '?')} pid {holder.get('pid', '?')} (attempt "
                f"{holder.get('attempt', '?')}): {reason}; this is attempt {record['attempt']}"
            )
        lease = Lease(files, {**record, "renewed_at": now, "renewed_at_iso": _iso(now)},
                      heartbeat_s, log)
        try:
            files.replace(LEASE_FILE, lease.record)
        except BaseException:
            # Do not leave a fresh claim that would block every driver for a TTL.
            with contextlib.suppress(Exception):
                files.replace(_claim_rel(record["attempt"]), {**record, "released": True})
            raise
        lease._thread.start()
        return lease
    if holder is None:
        _, holder = _current(files)
    raise LeaseHeld(holder or {}, files.display())
