"""Shared pieces of the benchmarks: the tiny sweep config, isolated jobs, rows of the table.

Every figure is a ratio of two things measured in the same run on the same machine (never an
absolute timing held against a fixed number), because the 2 cores here are shared and the
absolute speed moves with the load. Anything that starts Ray runs in its own subprocess
(``python -m bench.job``): a fresh cluster per measurement, environment variables applied to
the cluster it starts, and a crash costs one row, not the suite.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
OUT_DIR = ROOT / "bench" / "out"


@dataclass
class Row:
    """One line of the table: ``a`` and ``b`` measured side by side, ``ratio`` = a / b
    (or as ``note`` says), and the goal it is held against (None: reported only)."""

    bench: str
    name: str
    a_label: str
    a: float | None
    b_label: str
    b: float | None
    ratio: float | None
    unit: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""
    details: dict = field(default_factory=dict)
    a_stats: dict | None = None  # stats() of the repetitions behind ``a`` (its median)
    b_stats: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


REPEATS = 3  # every timing figure of `make bench` is the median of at least this many runs


def repeats(ctx) -> int:
    """Repetitions per timing figure: ``REPEATS``, or 1 with ``--quick`` (n=1 in the table)."""
    return 1 if ctx.get("quick") else REPEATS


def stats(xs: list[float]) -> dict:
    """Median, min, max and count of repeated measurements (None values dropped)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def timed_row(bench: str, name: str, a_label: str, a: list[float], b_label: str,
              b: list[float], **kw) -> Row:
    """A row of two repeated measurements: medians side by side, their spread shown; the
    ratio is of the medians."""
    sa, sb = stats(a), stats(b)
    return Row(bench, name, a_label, sa["median"], b_label, sb["median"],
               ratio(sa["median"], sb["median"]), a_stats=sa, b_stats=sb, **kw)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def tiny_sweep_dict(name: str, sparsity: list[float], batch: list[int], workers: int,
                    steps_per_epoch: int | None = None, base_samples: int | None = None,
                    epochs: int = 2) -> dict:
    """configs/tiny.yaml, reshaped for a benchmark: no export, checkpoints as configured."""
    d = yaml.safe_load(TINY.read_text())
    d = copy.deepcopy(d)
    d["name"] = name
    d["grid"] = {"sparsity": list(sparsity), "batch_size": list(batch)}
    d.setdefault("resources", {})
    d["resources"].update({"workers": workers, "cpus_per_worker": 1})
    d.setdefault("train", {})
    if steps_per_epoch is not None:
        # steps per epoch = ceil(base_samples / batch): a single batch size gives exact steps.
        d["train"]["base_samples"] = steps_per_epoch * batch[0]
    elif base_samples is not None:
        d["train"]["base_samples"] = base_samples
    d["train"]["num_epochs"] = epochs
    d.setdefault("checkpoint", {})["export_best"] = False
    return d


def job_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # Ray's workers inherit the raylet's environment: this makes bench.hooks importable there.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("RAY_DEDUP_LOGS", "1")
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


class JobFailed(RuntimeError):
    pass


def run_job(kind: str, args: dict, env: dict | None = None, timeout: float = 300,
            log_dir: Path | None = None) -> dict:
    """Run ``bench.job`` ``kind`` in a fresh Python process; returns its JSON answer."""
    # A private Ray temp dir: ray.init() without an address otherwise attaches to the cluster
    # last started with `ray start` on this machine (its address is in /tmp/ray), and fails on
    # num_cpus. Short path: Ray's unix sockets live under it.
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp, \
            tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as ray_tmp:
        env = {**(env or {}), "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": None}
        out = Path(tmp) / "out.json"
        log_dir = log_dir or OUT_DIR / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{kind}-{int(time.time() * 1000) % 10**8}.log"
        cmd = [sys.executable, "-m", "bench.job", kind, json.dumps(args), str(out)]
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=job_env(env), stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise JobFailed(f"{kind} timed out after {timeout:.0f} s (log: {log_path})") from None
        if proc.returncode != 0 or not out.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
            raise JobFailed(f"{kind} exited {proc.returncode} (log: {log_path}):\n  "
                            + "\n  ".join(tail))
        res = json.loads(out.read_text())
        res["_job_wall_s"] = time.perf_counter() - t0
        res["_log"] = str(log_path)
        return res


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            s = f"{v:,.0f}"
        elif abs(v) >= 100:
            s = f"{v:.0f}"
        elif abs(v) >= 10:
            s = f"{v:.1f}"
        else:
            s = f"{v:.2f}"
    else:
        s = str(v)
    return f"{s} {unit}".strip()


def _with_spread(v, st: dict | None, unit: str) -> str:
    """``median unit [min-max, n=N]`` for a repeated measurement, the value alone otherwise."""
    if not st or not st.get("n") or st["n"] < 2:
        return fmt(v, unit)
    return f"{fmt(v, unit)} [{fmt(st['min'])}-{fmt(st['max'])}, n={st['n']}]"


def format_table(rows: list[Row]) -> str:
    head = ["benchmark", "measured (a): median [min-max]", "against (b)", "ratio a/b", "goal",
            "met"]
    lines = []
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append([
            r.name,
            f"{r.a_label} {_with_spread(r.a, r.a_stats, r.unit)}",
            f"{r.b_label} {_with_spread(r.b, r.b_stats, r.unit)}",
            fmt(r.ratio) if r.ratio is None else f"{r.ratio:.3g}",
            r.goal or "(info)",
            met,
        ])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in lines]
    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:"] + notes
    return "\n".join(out)
