"""Where a sweep stands, from its files alone: per trial its status, step of total, tokens/s,
last and best perplexity and ETA; the driver's host and whether it is alive.

``sweep status SWEEP_DIR|URI`` and the live status of ``sweep run`` read the same things, so
they agree, and both work from any machine that sees the storage, while the sweep runs or
after: the results Parquet (``sweep.report.build_report``: the figures ``sweep report``
shows), rank 0's ``logs/<trial>.progress.json`` heartbeat (step and time of the last
optimizer step), ``sweep.yaml`` (the plan: steps per epoch, batch, sequence length) and the
driver's lease ``driver.lease`` (``sweep.lease``; tolerated absent).

Rates come from consecutive heartbeats of the running epoch when the reader has seen two
(``--watch`` and the live console), else from the last evaluated epoch's tokens/s. An
evaluation's duration is what an epoch's wall time leaves after its training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sweep.config import ConfigError, from_dict, yaml_load
from sweep.layout import SweepLayout
from sweep.results import END_STATUSES
from trainers.storage import Remote, Store, is_uri

LEASE_FILE = "driver.lease"  # sweep.lease.LEASE_FILE; read directly when that module is absent
DEFAULT_LEASE_TTL_S = 60.0


# ---------------------------------------------------------------------------------------------
# The data


@dataclass
class TrialStatus:
    trial_id: str
    status: str  # pending, running, completed, early_stopped, diverged, errored
    epoch: int  # the epoch in progress (1-based) while training, else the epochs completed
    epochs_completed: int
    num_epochs: int
    step: int  # optimizer steps done (cumulative over epochs)
    total_steps: int
    tokens_per_s: float | None
    last_perplexity: float | None  # the latest evaluation (epoch 0: the pruned baseline)
    best_perplexity: float | None  # the lowest over trained epochs
    best_epoch: int | None
    eta_s: float | None  # seconds until this trial ends, for a running trial
    stop_reason: str | None = None


@dataclass
class DriverStatus:
    host: str | None
    pid: int | None
    alive: bool | None  # None: unknown (no lease file)
    detail: str


@dataclass
class SweepStatus:
    name: str
    where: str
    trials: list[TrialStatus]
    driver: DriverStatus | None
    prep: str | None = None  # the preparation step under way, before the grid starts
    time: float = field(default_factory=time.time)

    @property
    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "pending": 0, "errored": 0}
        for t in self.trials:
            if t.status == "errored":
                out["errored"] += 1
            elif t.status in END_STATUSES:
                out["done"] += 1
            elif t.status == "running":
                out["running"] += 1
            else:
                out["pending"] += 1
        return out

    @property
    def finished(self) -> bool:
        return bool(self.trials) and all(t.status in END_STATUSES for t in self.trials)

    @property
    def eta_s(self) -> float | None:
        """The sweep's remaining time: the running trials' longest ETA, plus the pending trials
        in waves of as many as run now, each wave as long as a finished trial took (or, with
        none finished, as long as a running one will have taken)."""
        running = [t for t in self.trials if t.status == "running"]
        pending = [t for t in self.trials if t.status == "pending"]
        if not running and not pending:
            return 0.0
        etas = [t.eta_s for t in running]
        if any(e is None for e in etas) or (pending and not running):
            return None
        wave = max(etas, default=0.0)
        if not pending:
            return wave
        per_trial = self._trial_seconds
        if per_trial is None:
            return None
        return wave + math.ceil(len(pending) / len(running)) * per_trial

    _trial_seconds: float | None = None  # set by the reader: a whole trial's typical duration

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.name, "where": self.where, "time": self.time,
            "counts": self.counts, "finished": self.finished, "eta_s": self.eta_s,
            "prep": self.prep, "driver": asdict(self.driver) if self.driver else None,
            "trials": [asdict(t) for t in self.trials],
        }


# ---------------------------------------------------------------------------------------------
# Pure rules


def trial_eta(remaining_steps: int, remaining_evals: int, steps_per_s: float | None,
              eval_s: float | None, epoch_wall_s: float | None,
              steps_per_epoch: int) -> float | None:
    """Seconds until a trial ends: its remaining steps at its step rate plus its remaining
    evaluations; without a rate, whole epochs at the wall time an epoch took; else None."""
    if remaining_steps <= 0 and remaining_evals <= 0:
        return 0.0
    if steps_per_s and steps_per_s > 0:
        return remaining_steps / steps_per_s + remaining_evals * (eval_s or 0.0)
    if epoch_wall_s is not None and steps_per_epoch > 0:
        return remaining_steps / steps_per_epoch * epoch_wall_s
    return None


def epoch_timing(rows: list[dict], tokens_per_epoch: int) -> tuple[float | None, float | None]:
    """(wall seconds per trained epoch, evaluation seconds) from a trial's epochs rows
    (``epoch``, ``wall_s``, ``tokens_per_s``): the mean increase of ``wall_s`` from one
    evaluation to the next, and what is left of it after the epoch's training time. Rows of
    an earlier attempt (``wall_s`` restarts at a resume) give negative steps and are skipped."""
    rows = sorted((r for r in rows if _finite(r.get("wall_s"))), key=lambda r: r["epoch"])
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:], strict=False)
             if b["epoch"] == a["epoch"] + 1 and b["wall_s"] > a["wall_s"]]
    if not walls:
        return None, None
    wall = sum(walls) / len(walls)
    tps = [r["tokens_per_s"] for r in rows if r["epoch"] > 0 and _finite(r.get("tokens_per_s"))]
    if not tps:
        return wall, None
    train = tokens_per_epoch / tps[-1]
    return wall, max(0.0, wall - train)


class StepRate:
    """Optimizer steps per second of each running trial, from the heartbeats this reader saw
    within the trial's current epoch (an evaluation between epochs is not a step)."""

    def __init__(self, window: int = 20):
        self.window = window
        self.samples: dict[str, tuple[int, deque]] = {}

    def add(self, trial_id: str, epoch: int, step: int, t: float) -> None:
        current = self.samples.get(trial_id)
        if current is None or current[0] != epoch:
            current = (epoch, deque(maxlen=self.window))
            self.samples[trial_id] = current
        q = current[1]
        if not q or step > q[-1][0]:
            q.append((step, t))
        elif step < q[-1][0]:  # restarted from a checkpoint
            q.clear()
            q.append((step, t))

    def steps_per_s(self, trial_id: str) -> float | None:
        current = self.samples.get(trial_id)
        if current is None or len(current[1]) < 2:
            return None
        (s0, t0), (s1, t1) = current[1][0], current[1][-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def read_progress(path: Path) -> dict | None:
    """Rank 0's heartbeat ``{"epoch", "step", "time"}`` (trainers.loop.Progress), or None."""
    try:
        record = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not {"epoch", "step", "time"} <= set(record):
        return None
    return record


def prep_stage(layout: SweepLayout) -> str:
    """The preparation step under way, from which of its files exist yet (sweep.prep writes
    them in this order)."""
    if not layout.train_tokens.exists():
        return "model and training tokens"
    if not layout.eval_windows.exists():
        return "evaluation windows"
    if not layout.dense.exists():
        return "dense perplexity"
    masks = list(layout.masks_dir.glob("*.safetensors")) if layout.masks_dir.is_dir() else []
    return f"masks ({len(masks)} written)" if masks else "masks"


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _num(v: Any) -> float | None:
    return float(v) if _finite(v) else None


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------
# The driver


def driver_status(layout: SweepLayout, store: Store | None = None,
                  now: float | None = None) -> DriverStatus:
    """Who drives the sweep, from its lease: ``sweep.lease`` decides liveness when present
    (same-host pid checks, fencing); otherwise the lease file's age against its TTL."""
    now = time.time() if now is None else now
    try:
        from sweep import lease
    except ImportError:
        lease = None
    if lease is not None:
        try:
            holder = lease.read_holder(store, layout.root)
        except Exception:  # noqa: BLE001 - a status never fails over a lease it cannot read
            holder = None
        if holder is None:
            return DriverStatus(None, None, False, "no driver holds the sweep")
        reason = lease.stale_reason(holder, now)
        return _driver_from(holder, reason, now)
    path = layout.root / LEASE_FILE
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return DriverStatus(None, None, None, "no lease file (unknown)")
    except (OSError, ValueError):
        return DriverStatus(None, None, None, "unreadable lease file")
    renewed = holder.get("renewed_at", holder.get("renewed", holder.get("started_at")))
    ttl = float(holder.get("ttl_s") or DEFAULT_LEASE_TTL_S)
    reason = None
    if holder.get("released"):
        reason = "it was released"
    elif not _finite(renewed):
        reason = "its record is unreadable"
    elif now - float(renewed) > ttl:
        reason = f"it was not renewed for {now - float(renewed):.0f} s (TTL {ttl:.0f} s)"
    return _driver_from(holder, reason, now)


def _driver_from(holder: dict, reason: str | None, now: float) -> DriverStatus:
    host, pid = holder.get("host"), holder.get("pid")
    renewed = holder.get("renewed_at", holder.get("renewed", holder.get("started_at")))
    age = f", renewed {max(0.0, now - float(renewed)):.0f} s ago" if _finite(renewed) else ""
    if reason is None:
        return DriverStatus(host, pid, True, f"alive{age}")
    return DriverStatus(host, pid, False, f"not running: {reason}")


# ---------------------------------------------------------------------------------------------
# Reading a sweep


class StatusReader:
    """Reads a sweep's status; keep one across reads (``--watch``, the live console) so step
    rates come from the heartbeats seen in between.

    ``store`` with a remote: the results, sweep.yaml and lease are read from the URI (pulled
    into the staging copy on every read); progress heartbeats are not synced there, so a
    remote sweep shows steps at epoch granularity."""

    def __init__(self, sweep_dir: Path, store: Store | None = None, where: str | None = None,
                 pull: bool = False):
        self.layout = SweepLayout.of(sweep_dir)
        self.store = store
        self.where = where or str(sweep_dir)
        self.pull = pull and store is not None and store.remote is not None
        self.rates = StepRate()
        self._tables: tuple[Any, list[dict], dict[str, list[dict]]] | None = None
        self._plans: dict[str, Any] | None = None
        self._seq_len: int | None = None
        self.name = Path(sweep_dir).name

    def _load_plan(self) -> None:
        if self._plans is not None:
            return
        from sweep.plan import expand

        try:
            cfg = from_dict(yaml_load(self.layout.config_file.read_text()),
                            str(self.layout.config_file))
        except FileNotFoundError as e:
            raise ConfigError([f"{self.where} is not a sweep (no {self.layout.config_file.name})"]) from e
        self.name = cfg.name
        self._seq_len = cfg.data.seq_len
        self._plans = {p.trial_id: p for p in expand(cfg)}

    def _report(self) -> list[dict]:
        from sweep.report import build_report

        try:
            return build_report(self.layout.root).to_dict("records")
        except FileNotFoundError:
            return []

    def _epochs(self) -> dict[str, list[dict]]:
        from sweep.api import read_epochs

        try:
            df = read_epochs(self.layout.root)
        except FileNotFoundError:
            return {}
        cols = [c for c in ("trial_id", "epoch", "wall_s", "tokens_per_s") if c in df]
        out: dict[str, list[dict]] = {}
        for r in df[cols].to_dict("records"):
            out.setdefault(r["trial_id"], []).append(r)
        return out

    def _results(self) -> tuple[list[dict], dict[str, list[dict]]]:
        """The report rows and epochs rows, read again only when a results file changed (the
        live console reads every second; Parquet and pandas would cost a trial CPU time)."""
        try:
            key = tuple(sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size)
                               for f in self.layout.results.rglob("*.parquet")
                               if not f.name.startswith(".")))
        except OSError:  # a file replaced while listing: read again
            key = None
        if self._tables is None or key is None or self._tables[0] != key:
            self._tables = (key, self._report(), self._epochs())
        return self._tables[1], self._tables[2]

    def read(self, now: float | None = None) -> SweepStatus:
        now = time.time() if now is None else now
        if self.pull:
            self.store.pull(self.layout.config_file)
            self.store.pull(self.layout.results)
        self._load_plan()
        rows, epochs = self._results()
        report = {r["trial_id"]: r for r in rows}
        trials = [self._trial(tid, plan, report.get(tid), epochs.get(tid, []))
                  for tid, plan in self._plans.items()]
        walls = [_num(r.get("wall_s")) for r in report.values()
                 if r.get("status") in ("completed",) and _num(r.get("wall_s"))]
        st = SweepStatus(self.name, self.where, trials,
                         driver_status(self.layout, self.store, now), time=now)
        if not report and not self.layout.results.exists():
            st.prep = prep_stage(self.layout)
        if walls:
            st._trial_seconds = sum(walls) / len(walls)
        else:
            running = [t for t in trials if t.status == "running" and t.eta_s is not None]
            elapsed = [_num(report[t.trial_id].get("wall_s")) for t in running]
            if running and all(e is not None for e in elapsed):
                st._trial_seconds = max(e + t.eta_s for e, t in zip(elapsed, running, strict=True))
        return st

    def _trial(self, tid: str, plan, row: dict | None, rows: list[dict]) -> TrialStatus:
        row = row or {}
        spe, n_epochs = plan.steps_per_epoch, plan.num_epochs
        total = spe * n_epochs
        status = row.get("status") or "pending"
        done = _int(row.get("epochs_completed"))
        step, epoch = done * spe, done
        tokens_per_step = plan.batch_size * (self._seq_len or 0)
        progress = read_progress(self.layout.progress(tid)) if status == "running" else None
        if progress is not None and _int(progress["epoch"]) >= done:
            step = max(step, _int(progress["step"]))
            self.rates.add(tid, _int(progress["epoch"]), step, float(progress["time"]))
            epoch = min(_int(progress["epoch"]) + 1, n_epochs)
        wall, eval_s = epoch_timing(rows, spe * tokens_per_step)
        last_tps = next((r["tokens_per_s"] for r in sorted(rows, key=lambda r: -r["epoch"])
                         if _finite(r.get("tokens_per_s"))), None)
        rate = self.rates.steps_per_s(tid) if status == "running" else None
        if rate is None and last_tps and tokens_per_step:
            rate = last_tps / tokens_per_step
        tps = rate * tokens_per_step if rate and tokens_per_step else _num(last_tps)
        eta = None
        if status == "running":
            eta = trial_eta(total - step, n_epochs - done, rate, eval_s, wall, spe)
        last = _num(row.get("final_perplexity"))
        if last is None and done == 0:
            last = _num(row.get("baseline_perplexity"))
        return TrialStatus(
            trial_id=tid, status=status, epoch=epoch, epochs_completed=done, num_epochs=n_epochs,
            step=min(step, total), total_steps=total,
            tokens_per_s=tps if status == "running" else _num(last_tps),
            last_perplexity=last, best_perplexity=_num(row.get("best_perplexity")),
            best_epoch=_int(row["best_epoch"], None) if _finite(row.get("best_epoch")) else None,
            eta_s=eta, stop_reason=row.get("stop_reason") or None,
        )


def open_sweep(target: str) -> StatusReader:
    """A reader for SWEEP_DIR (a path) or a sweep's URI in an object store."""
    if is_uri(target):
        remote = Remote(target)
        store = Store.open(remote.parent().uri)
        return StatusReader(store.local / remote.name, store, where=remote.display(), pull=True)
    sweep_dir = Path(target.removeprefix("file://")).expanduser().resolve()
    if not sweep_dir.is_dir():
        raise ConfigError([f"sweep directory not found: {sweep_dir}"])
    return StatusReader(sweep_dir)


# ---------------------------------------------------------------------------------------------
# Formatting


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _ppl(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _tps(v: float | None) -> str:
    return "" if v is None else f"{v:,.0f}"


def counts_text(st: SweepStatus) -> str:
    c = st.counts
    text = f"{len(st.trials)} trials: {c['done']} done, {c['running']} running, {c['pending']} pending"
    if c["errored"]:
        text += f", {c['errored']} errored"
    if not st.finished and st.counts["running"] and st.eta_s is not None:
        text += f"; sweep ETA ~{duration(st.eta_s)}"
    return text


def driver_text(d: DriverStatus | None) -> str:
    if d is None:
        return "driver: unknown"
    who = f"{d.host or '?'} pid {d.pid or '?'}, " if d.host or d.pid else ""
    return f"driver: {who}{d.detail}"


TABLE_COLUMNS = ("trial", "status", "epoch", "step", "tok/s", "last ppl", "best ppl", "ETA")


def trial_cells(t: TrialStatus) -> list[str]:
    running = t.status == "running"
    best = _ppl(t.best_perplexity) + (f" @{t.best_epoch}" if t.best_perplexity is not None else "")
    return [
        t.trial_id, t.status, f"{t.epoch}/{t.num_epochs}", f"{t.step}/{t.total_steps}",
        _tps(t.tokens_per_s) if running else "", _ppl(t.last_perplexity), best,
        duration(t.eta_s) if running else "",
    ]


def format_status(st: SweepStatus) -> str:
    """The full status: who drives the sweep, the counts, one row per trial."""
    from sweep.query import format_table

    head = [f"sweep {st.name!r} -> {st.where}", driver_text(st.driver)]
    if st.prep:
        head.append(f"preparing: {st.prep}")
    head.append(counts_text(st))
    table = format_table(TABLE_COLUMNS, [trial_cells(t) for t in st.trials], footer=False,
                         right=[False, False, True, True, True, True, True, True])
    return "\n".join(head) + "\n" + table


def status_line(st: SweepStatus, stamp: bool = True) -> str:
    """One line for logs that are not a terminal: the counts and each running trial."""
    parts = [time.strftime("%H:%M:%S", time.localtime(st.time))] if stamp else []
    if st.prep:
        parts.append(f"preparing: {st.prep}")
    else:
        parts.append(counts_text(st))
    for t in st.trials:
        if t.status == "running":
            parts.append(running_text(t))
    return "status " + " | ".join(parts)


def running_text(t: TrialStatus) -> str:
    """``s0.5-b2 ep 1/2 step 5/16, 1,518 tok/s, ppl 259.6, ETA 12s`` (what is known of it)."""
    if t.epoch == 0 and t.step == 0:
        where = "baseline" if t.last_perplexity is None else "starting epoch 1"
        text = f"{t.trial_id} {where}"
    else:
        text = f"{t.trial_id} ep {t.epoch}/{t.num_epochs} step {t.step}/{t.total_steps}"
    if t.tokens_per_s:
        text += f", {_tps(t.tokens_per_s)} tok/s"
    if t.last_perplexity is not None:
        text += f", ppl {_ppl(t.last_perplexity)}"
    if t.eta_s is not None:
        text += f", ETA {duration(t.eta_s)}"
    return text


# ---------------------------------------------------------------------------------------------
# The command


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", help="SWEEP_DIR, or the sweep's URI in an object store")
    parser.add_argument("--watch", nargs="?", type=float, const=5.0, default=None,
                        metavar="SECONDS",
                        help="refresh every SECONDS (default 5) until the sweep ends; Ctrl-C stops")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="json: one object per refresh (JSON lines)")


def render(st: SweepStatus, fmt: str) -> str:
    return json.dumps(st.to_dict(), default=str) if fmt == "json" else format_status(st)


def run_status_cli(args: argparse.Namespace) -> int:
    reader = open_sweep(args.sweep_dir)
    if args.watch is None:
        print(render(reader.read(), args.format))
        return 0
    interval = max(0.5, float(args.watch))
    try:
        if args.format == "table" and sys.stdout.isatty():
            _watch_live(reader, interval)
        else:
            _watch_plain(reader, interval, args.format)
    except KeyboardInterrupt:
        pass
    return 0


def _done(st: SweepStatus) -> bool:
    return st.finished and not (st.driver and st.driver.alive)


def _watch_live(reader: StatusReader, interval: float) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    with Live(console=console, auto_refresh=False) as live:
        while True:
            st = reader.read()
            live.update(Text(format_status(st)), refresh=True)
            if _done(st):
                return
            time.sleep(interval)


def _watch_plain(reader: StatusReader, interval: float, fmt: str) -> None:
    while True:
        st = reader.read()
        text = render(st, fmt)
        print(text if fmt == "json" else f"{text}\n", flush=True)
        if _done(st):
            return
        time.sleep(interval)
