"""Benchmark: the whole sweep against a plain sequential loop doing the same work.

end_to_end  wall seconds of ``sweep run`` on the demo workload (``configs/demo.yaml``: the
            real SmolLM2-135M, 2x2 grid, 2 epochs, its checkpoint settings) from process start
            to exit, against ``bench.plain_loop`` (the same model, texts, grid, steps and
            evaluations written as one process with all cores). Alternated, ``REPEATS`` times
            each; the model is materialized into the storage's cache first, so both start warm
            (the sweep would otherwise dequantize the GGUF once, the plain loop reads the same
            directory). ``--quick`` runs the tiny config once each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT_DIR, REPEATS, ROOT, TINY, job_env, stats, timed_row

DEMO = ROOT / "configs" / "demo.yaml"
SWEEP = "import sys; from sweep.cli import main; sys.exit(main(sys.argv[1:]))"


def _timed(cmd: list[str], log: Path, timeout: float) -> float:
    """Seconds from process start to exit of ``cmd`` in a fresh Ray temp dir; raises on failure."""
    with tempfile.TemporaryDirectory(prefix="rb-", dir="/tmp") as ray_tmp, open(log, "w") as f:
        env = job_env({"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": None})
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd} exited {proc.returncode} "
                           f"(log: {log}):\n  " + "\n  ".join(tail))
    return seconds


def bench_end_to_end(ctx) -> list:
    from sweep.config import load_config
    from trainers.model import materialize

    config = TINY if ctx["quick"] else DEMO
    repeats = 1 if ctx["quick"] else REPEATS
    storage = Path(ctx["tmp"]) / "e2e"
    logs = OUT_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config)
    # The sweep's model cache (sweep.runner: STORAGE/.cache/models), filled before timing.
    model_dir = materialize(cfg.model, storage / ".cache" / "models")
    sweep_s, plain_s, plain_out = [], [], []
    for i in range(repeats):
        out = storage / f"plain-{i}.json"
        plain_s.append(_timed(
            [sys.executable, "-m", "bench.plain_loop", str(config), str(model_dir), str(out)],
            logs / f"e2e-plain-{i}.log", timeout=1200))
        plain_out.append(json.loads(out.read_text()))
        sweep_s.append(_timed(
            [sys.executable, "-c", SWEEP, "run", str(config), "--storage", str(storage),
             "--name", f"e2e-{i}"], logs / f"e2e-sweep-{i}.log", timeout=1800))
    row = timed_row(
        "end_to_end", f"end to end, {config.stem} workload (sweep / plain loop)", "sweep",
        sweep_s, "plain", plain_s, unit="s", goal="<= 1.25",
        note=f"`sweep run {config.relative_to(ROOT)}` (Ray start, preparation, "
             f"{len(cfg.grid.sparsity) * len(cfg.grid.batch_size)} trials, results) from "
             "process start to exit, against the same work in one process with all cores "
             "(bench/plain_loop.py); warm model cache for both; alternated",
        details={"sweep_s": stats(sweep_s), "plain_s": stats(plain_s),
                 "plain_loop_inner_s": stats([o["seconds"] for o in plain_out]),
                 "plain_perplexities": plain_out[-1]})
    row.met = row.ratio is not None and row.ratio <= 1.25
    return [row]
