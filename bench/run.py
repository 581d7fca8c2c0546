"""``make bench``: run the benchmarks, print the table, write bench/out/results.json.

    .venv/bin/python -m bench.run [--quick] [--only NAME[,NAME]] [--extra] [--keep] [--out PATH]

Each figure is a ratio of two things measured side by side in this run; goals are printed
and checked, never asserted: the exit status is 1 only when a benchmark failed to run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import OUT_DIR, Row, format_table


def _benches():
    from bench.checkpoint import bench_checkpoint
    from bench.e2e import bench_end_to_end
    from bench.early_stop import bench_early_stop
    from bench.evaluation import bench_evaluation
    from bench.fsdp_memory import bench_fsdp_memory
    from bench.metrics_cost import bench_metrics_cost
    from bench.trial import bench_fixed_cost, bench_trial_efficiency
    from bench.utilization import bench_utilization

    return {
        "trial_efficiency": bench_trial_efficiency,
        "fixed_cost": bench_fixed_cost,
        "evaluation": bench_evaluation,
        "utilization": bench_utilization,
        "fsdp_memory": bench_fsdp_memory,
        "early_stop": bench_early_stop,
        "checkpoint": bench_checkpoint,
        "end_to_end": bench_end_to_end,
        "metrics_cost": bench_metrics_cost,
    }


NAMES = ["trial_efficiency", "fixed_cost", "evaluation", "utilization", "fsdp_memory",
         "early_stop", "checkpoint", "end_to_end", "metrics_cost"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats, no env-var variants")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these (repeat or comma-separate): {', '.join(NAMES)}")
    ap.add_argument("--extra", action="store_true",
                    help="also rerun the 1x1 sweep with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 (~1 min)")
    ap.add_argument("--keep", action="store_true", help="keep the sweeps' temporary directories")
    ap.add_argument("--out", default=str(OUT_DIR / "results.json"))
    args = ap.parse_args(argv)
    only = [n.strip() for x in args.only for n in x.split(",") if n.strip()]
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    selected = [n for n in NAMES if not only or n in only]

    benches = _benches()
    shutil.rmtree(OUT_DIR / "logs", ignore_errors=True)  # the jobs' logs of this run only
    tmp = tempfile.mkdtemp(prefix="bench-")
    ctx = {"quick": args.quick, "extra": args.extra, "tmp": tmp, "cache": {}}
    rows: list[Row] = []
    failures: dict[str, str] = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    try:
        for name in selected:
            print(f"[bench] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                got = benches[name](ctx)
                rows.extend(got)
            except Exception as e:  # noqa: BLE001 - one failed benchmark must not hide the rest
                failures[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                rows.append(Row(name, f"{name} (FAILED)", "", None, "", None, None,
                                note=failures[name].splitlines()[0][:300]))
            timings[name] = time.perf_counter() - t0
            print(f"[bench] {name} done in {timings[name]:.0f} s", flush=True)
    finally:
        if args.keep:
            print(f"[bench] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_all

    table = format_table(rows)
    print()
    print(table)
    print(f"\n{len(selected)} benchmark(s) in {total:.0f} s"
          + (" (--quick)" if args.quick else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "selected": selected,
        "seconds": {"total": total, **timings},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": __import__("os").cpu_count()},
        "failures": failures,
        "rows": [r.to_dict() for r in rows],
        "table": table,
    }, indent=1, default=str))
    print(f"results: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
