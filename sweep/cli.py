"""The ``sweep`` command line: parse, build, run; exit 2 on invalid input, before Ray starts."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from sweep.config import ConfigError
from trainers.storage import StorageError


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="validate a config, print the trial plan, run the grid")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--name", help="sweep name (default: the config's name); re-running a name resumes it")
    p.add_argument("--storage", help="parent directory of SWEEP_DIR, or an object-store URI (default ./sweeps, or $SWEEP_STORAGE)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.base_lr=1e-4 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trial plan only")
    p.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else an embedded one)")
    p.add_argument("--model", help="shortcut: replace model.name_or_path")
    p.add_argument("--gguf-file", help="shortcut: model.gguf_file (with --model)")
    p.add_argument("--sparsity", type=float, nargs="+", help="shortcut: replace grid.sparsity")
    p.add_argument("--batch-size", type=int, nargs="+", help="shortcut: replace grid.batch_size")
    _add_debug(p)


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="continue an interrupted sweep from SWEEP_DIR")
    p.add_argument("sweep_dir", help="SWEEP_DIR, or the sweep's URI when --storage was one")
    p.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else embedded)")
    _add_debug(p)


DEBUG_ENV = "SWEEP_DEBUG"


def _add_debug(p, default=argparse.SUPPRESS) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help=f"also print the traceback of an input error (or ${DEBUG_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep", description="Ray-distributed pruning-recovery sweeps on causal language models"
    )
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_resume(sub)
    from sweep.eval_cmd import add_eval_arguments
    from sweep.plot import add_plot_arguments
    from sweep.prune_cmd import add_prune_arguments
    from sweep.query import add_query_arguments
    from sweep.report import add_report_arguments

    add_query_arguments(sub.add_parser("query", help="SQL over the results (tables epochs, trials)"))
    add_report_arguments(sub.add_parser("report", help="per-trial summary table"))
    add_plot_arguments(sub.add_parser("plot", help="perplexity against sparsity, and over epochs"))
    add_eval_arguments(sub.add_parser("eval", help="perplexity of one model (JSON on the last line)"))
    add_prune_arguments(sub.add_parser("prune", help="prune one model once, no sweep (JSON on the last line)"))
    return parser


def _cmd_run(args) -> int:
    from sweep.runner import config_from_args, env_storage, run_sweep

    if args.gguf_file and not args.model:
        raise ConfigError(["--gguf-file: needs --model"])
    shortcuts = {"model": args.model, "gguf_file": args.gguf_file, "sparsity": args.sparsity,
                 "batch_size": args.batch_size, "name": args.name}
    cfg = config_from_args(args.config, list(args.overrides), shortcuts)
    return run_sweep(cfg, env_storage(args.storage), args.address, args.dry_run)


def _cmd_resume(args) -> int:
    from sweep.runner import resume_sweep

    return resume_sweep(args.sweep_dir, args.address)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "resume":
            return _cmd_resume(args)
        if args.command == "query":
            from sweep.query import run_query_cli

            return run_query_cli(args)
        if args.command == "report":
            from sweep.report import run_report_cli

            return run_report_cli(args)
        if args.command == "plot":
            from sweep.plot import run_plot_cli

            return run_plot_cli(args)
        if args.command == "eval":
            from sweep.eval_cmd import run_eval

            return run_eval(args)
        if args.command == "prune":
            from sweep.prune_cmd import run_prune

            return run_prune(args)
    except ConfigError as e:
        _debug(args)
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        _debug(args)
        print(f"sweep: invalid input: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


def _debug(args) -> None:
    """Input errors are one message; with --debug (or $SWEEP_DEBUG) their traceback too."""
    if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
