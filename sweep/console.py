"""What a person running a sweep sees: each line once, and one compact live status.

The console shows the plan and the sweep's own messages (``runner.SweepLog``), each trial's
blocks (baseline, epochs, summary) and a live status: trials done / running / pending and, per
running trial, its epoch, step of total, tokens/s, last perplexity and ETA. On a terminal the
status is a ``rich`` live display kept under the printed lines; otherwise (CI, ``ray job
logs``) it is a plain line whenever the console has been quiet for ``interval_s`` and
something changed.

The trial blocks are read from the trial logs (``SWEEP_DIR/logs/<trial>.log``, which rank 0
writes wherever it runs: the storage is shared, or an object store the driver pulls a log
from after each evaluation), not from Ray forwarding the workers' stdout, which prints them
twice (Ray Train's print patch tees ``print`` to stdout and to the root logger's console
handler) and interleaves them with Ray's own chatter. Everything Ray prints in the driver's
process, the forwarded worker output included, goes to ``SWEEP_DIR/logs/ray.log``: the
process's stdout and stderr file descriptors point there while the sweep runs, so C++ core
messages are caught too, and the console writes to a duplicate of the original stdout.
``--verbose`` leaves the descriptors alone and Ray's output on the console.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from sweep.layout import SweepLayout
from sweep.status import StatusReader, SweepStatus, counts_text, running_text, status_line
from trainers.storage import Store

RAY_LOG = "ray.log"
# TrialLog writes "HH:MM:SS [trial] text"; the console shows "[trial] text".
_STAMP = re.compile(r"^\d\d:\d\d:\d\d ")


class LogTail:
    """The new complete lines of a set of trial logs, each returned once, in file order per
    trial. Starting at the files' current ends (``from_end``) skips what an earlier run of the
    same sweep already showed; a file that shrank (replaced by a shorter copy) is read again
    from its start."""

    def __init__(self, paths: dict[str, Path], from_end: bool = True):
        self.paths = dict(paths)
        self.offsets = {k: (_size(p) if from_end else 0) for k, p in self.paths.items()}
        self.partial = {k: b"" for k in self.paths}

    def poll(self, keys: Iterable[str] | None = None) -> list[str]:
        out: list[str] = []
        for key in keys if keys is not None else self.paths:
            out.extend(self._read(key))
        return out

    def _read(self, key: str) -> list[str]:
        path = self.paths[key]
        size = _size(path)
        if size < self.offsets[key]:
            self.offsets[key], self.partial[key] = 0, b""
        if size == self.offsets[key]:
            return []
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets[key])
                data = f.read(size - self.offsets[key])
        except OSError:
            return []
        self.offsets[key] += len(data)
        data = self.partial[key] + data
        *lines, self.partial[key] = data.split(b"\n")
        return [_STAMP.sub("", line.decode("utf-8", "replace")) for line in lines]


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class Capture:
    """Points this process's stdout and stderr (the file descriptors, so Ray's C++ core and
    child processes are caught too) at ``path``, and gives a stream to the original stdout.
    Restored on ``close``, before an exception leaves the ``with`` block, so tracebacks reach
    the terminal."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved: tuple[int, int] | None = None
        self.stream: TextIO | None = None

    def open(self) -> TextIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for s in (sys.stdout, sys.stderr):
            s.flush()
        self.saved = (os.dup(1), os.dup(2))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.stream = os.fdopen(os.dup(self.saved[0]), "w", buffering=1, encoding="utf-8",
                                errors="replace")
        return self.stream

    def close(self) -> None:
        if self.saved is None:
            return
        for s in (sys.stdout, sys.stderr, self.stream):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.stream.close()
        self.saved = self.stream = None


class RunConsole:
    """The console of ``sweep run`` / ``sweep resume`` (see the module docstring).

    ``print`` puts the sweep's own lines on the console (above the live display); a
    background thread polls every ``poll_s``: the trial logs' new lines, the status, and for
    an object store the log of a trial whose results moved on. ``phase`` says what the
    driver is doing before the grid runs ("starting Ray", "preparing")."""

    def __init__(self, layout: SweepLayout, trial_ids: Iterable[str], *,
                 store: Store | None = None, verbose: bool = False, out: TextIO | None = None,
                 interval_s: float | None = None, poll_s: float = 1.0,
                 reader: StatusReader | None = None, capture: bool | None = None):
        self.layout = layout
        self.trial_ids = list(trial_ids)
        self.store = store
        self.verbose = verbose
        self.capture = Capture(layout.logs / RAY_LOG) if (capture if capture is not None
                                                         else not verbose) else None
        self.out = out
        self.interval_s = interval_s if interval_s is not None else float(
            os.environ.get("SWEEP_STATUS_INTERVAL", "30"))
        self.poll_s = poll_s
        self.reader = reader or StatusReader(layout.root, store)
        self.tail = LogTail({t: layout.trial_log(t) for t in self.trial_ids})
        self.status: SweepStatus | None = None
        self.phase_text: str | None = None
        self.live = None
        self.tty = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_print = time.monotonic()
        self._last_line: str | None = None
        self._seen: dict[str, tuple] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> RunConsole:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.capture is not None:
            self.out = self.capture.open()
        self.out = self.out or sys.stdout
        self.tty = _isatty(self.out)
        if self.tty:
            try:
                self._start_live()
            except BaseException:
                self.close()
                raise
        self._thread = threading.Thread(target=self._run, name="sweep-console", daemon=True)
        self._thread.start()

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.out, highlight=False, markup=False, emoji=False)
        self.live = Live(console=console, transient=True, refresh_per_second=2,
                         redirect_stdout=self.capture is None,
                         redirect_stderr=self.capture is None,
                         get_renderable=self._renderable)
        self.live.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.poll()  # the last lines of every trial
        except Exception:  # noqa: BLE001 - whatever happens, the terminal comes back
            pass
        finally:
            if self.live is not None:
                self.live.stop()
                self.live = None
            if self.capture is not None:
                self.capture.close()
                self.out = None

    def _run(self) -> None:
        said = None
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the console must never stop the sweep
                text = f"(console: {type(e).__name__}: {e})"
                if text != said:  # once, not every second
                    self._write(text)
                    said = text

    # -- output ---------------------------------------------------------------------------

    def print(self, text: str) -> None:
        """The sweep's own lines, shown once, above the live display."""
        with self._lock:
            for line in text.splitlines():
                self._write(line)

    def phase(self, text: str | None) -> None:
        """What the driver does before the grid runs: "starting Ray", "preparing", "running"
        (the live display shows it; plain output prints each preparation step as it starts)."""
        with self._lock:
            self.phase_text = text

    def _write(self, line: str) -> None:
        self._last_print = time.monotonic()
        if self.live is not None:
            self.live.console.print(line, soft_wrap=True)
        elif self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    # -- polling --------------------------------------------------------------------------

    def poll(self) -> None:
        with self._lock:
            status = self._read_status()
            if status is not None and self.store is not None and self.store.remote is not None:
                self._pull_logs(status)
            for line in self.tail.poll():
                self._write(line)
            if status is not None:
                self._announce(status)
                self.status = status
                if not self.tty:
                    self._heartbeat(status)

    def _read_status(self) -> SweepStatus | None:
        try:
            return self.reader.read()
        except Exception:  # noqa: BLE001 - results mid-write or not there yet: next poll
            return None

    def _announce(self, st: SweepStatus) -> None:
        where = self.layout.logs / RAY_LOG if self.capture else "the output above"
        for line in newly_errored(st, self._seen, where):
            self._write(line)

    def _pull_logs(self, st: SweepStatus) -> None:
        pull_newer_logs(self.store, self.layout, st, self._seen)

    def _heartbeat(self, st: SweepStatus) -> None:
        """Plain output: each preparation step once, then a status line whenever the console
        was quiet for ``interval_s`` and something changed."""
        if self.phase_text == "preparing":
            if st.prep:
                line = f"preparing: {st.prep}"
                if line != self._last_line:
                    self._last_line = line
                    self._write(line)
            return
        if not st.counts["running"]:
            return
        line = status_line(st, stamp=False)
        if time.monotonic() - self._last_print >= self.interval_s and line != self._last_line:
            self._last_line = line
            self._write(status_line(st))

    def _renderable(self):
        return live_view(self.status, self.phase_text)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def pull_newer_logs(store: Store, layout: SweepLayout, st: SweepStatus, seen: dict) -> None:
    """Object store: a trial's log reaches the driver through the store (rank 0 pushes it
    with every evaluation); pull it when the trial's results moved on since ``seen`` and the
    store's copy is longer than ours (a worker on this machine writes ours directly)."""
    for t in st.trials:
        if seen.get(t.trial_id) == (t.status, t.epochs_completed):
            continue
        path = layout.trial_log(t.trial_id)
        try:
            info = store.remote.fs.get_file_info(store.remote.path(store.rel(path)))
            if info.size is not None and info.size > _size(path):
                store.pull(path)
        except Exception:  # noqa: BLE001 - the next result tries again
            continue


def live_view(st: SweepStatus | None, phase_text: str | None):
    """What the live display shows: the phase before the grid runs, then the counts and one
    line per running trial."""
    from rich.table import Table
    from rich.text import Text

    if st is None or (phase_text and phase_text != "running"):
        what = phase_text or "starting"
        if st is not None and st.prep and phase_text == "preparing":
            what = f"preparing: {st.prep}"
        return Text(f"{what} ...", style="bold")
    table = Table.grid(padding=(0, 2))
    table.add_row(Text(counts_text(st), style="bold"))
    for t in st.trials:
        if t.status == "running":
            table.add_row(Text("  " + running_text(t)))
    return table


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def newly_errored(st: SweepStatus, seen: dict, where) -> list[str]:
    """A line for what no trial log says: a trial that errored since the last look (its
    traceback is Ray's, in ``where``). Updates ``seen`` (trial id -> (status, epochs))."""
    lines = []
    for t in st.trials:
        before = seen.get(t.trial_id)
        if t.status == "errored" and before is not None and before[0] != "errored":
            lines.append(f"[{t.trial_id}] errored: {t.stop_reason or 'see Ray log'} "
                         f"(Ray's traceback: {where})")
        seen[t.trial_id] = (t.status, t.epochs_completed)
    return lines
