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
    _add_verbose(p)
    _add_debug(p)


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="continue an interrupted sweep from SWEEP_DIR")
    p.add_argument("sweep_dir", help="SWEEP_DIR, or the sweep's URI when --storage was one")
    p.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else embedded)")
    _add_verbose(p)
    _add_debug(p)


def _add_verbose(p) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own output on the console too (default: SWEEP_DIR/logs/ray.log)")


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
    from sweep.eval_cmd import add_eval_arguments, add_sets_arguments
    from sweep.plot import add_plot_arguments
    from sweep.prune_cmd import add_prune_arguments
    from sweep.query import add_query_arguments
    from sweep.report import add_report_arguments

    add_query_arguments(sub.add_parser("query", help="SQL over the results (tables epochs, trials, evals, tasks)"))
    add_report_arguments(sub.add_parser("report", help="per-trial summary table"))
    add_plot_arguments(sub.add_parser("plot", help="perplexity against sparsity, and over epochs"))
    eval_parser = sub.add_parser(
        "eval", help="perplexity of one model on a text or a config's sets, and task accuracy "
        "(JSON on the last line)")
    add_eval_arguments(eval_parser, text_required=False)
    add_sets_arguments(eval_parser)
    add_prune_arguments(sub.add_parser("prune", help="prune one model once, no sweep (JSON on the last line)"))
    from sweep.status import add_status_arguments

    add_status_arguments(sub.add_parser(
        "status", help="where a sweep stands: trials, steps, perplexity, ETA, its driver"))
    return parser


def _cmd_run(args) -> int:
    from sweep.runner import config_from_args, env_storage, run_sweep

    if args.gguf_file and not args.model:
        raise ConfigError(["--gguf-file: needs --model"])
    shortcuts = {"model": args.model, "gguf_file": args.gguf_file, "sparsity": args.sparsity,
                 "batch_size": args.batch_size, "name": args.name}
    cfg = config_from_args(args.config, list(args.overrides), shortcuts)
    return _joining(args, lambda: run_sweep(cfg, env_storage(args.storage), args.address,
                                            args.dry_run, args.verbose))


def _cmd_resume(args) -> int:
    from sweep.runner import resume_sweep

    return _joining(args, lambda: resume_sweep(args.sweep_dir, args.address, args.verbose))


def token_retry_env(error: BaseException, address: str | None, environ=os.environ) -> dict | None:
    """After an existing cluster refused this client for want of a token (Ray 2.60 sends its
    token only in token mode, which a client never turns on by itself): the environment in
    which to run the same command again in token mode, when a token is at hand ($RAY_AUTH_TOKEN,
    the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) and the user has not chosen a mode;
    else None. Token mode is never turned on ahead of time: a client in token mode breaks a
    cluster without authentication (its workers cannot call back). Ray reads the mode once,
    at import, hence a new process rather than a retry in this one."""
    if type(error).__name__ != "AuthenticationError" or not type(error).__module__.startswith("ray"):
        return None
    if not (address or environ.get("RAY_ADDRESS")) or "RAY_AUTH_MODE" in environ:
        return None
    path = environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".ray", "auth_token")
    if environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        return {**environ, "RAY_AUTH_MODE": "token"}
    return None


def _joining(args, run) -> int:
    """``run()`` for sweep run / resume, in token mode again when the cluster asks for it."""
    try:
        return run()
    except Exception as e:
        env = token_retry_env(e, getattr(args, "address", None))
        if env is None:
            if type(e).__name__ == "AuthenticationError":
                raise ConfigError([f"--address: the Ray cluster requires token authentication; set "
                                   f"RAY_AUTH_MODE=token and the head's token (RAY_AUTH_TOKEN, or "
                                   f"the file ~/.ray/auth_token): {e}"]) from None
            raise
        print("sweep: the cluster uses token authentication: running again with "
              "RAY_AUTH_MODE=token", file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "sweep.cli", *args.argv], env)
        raise AssertionError("unreachable") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
        if args.command == "status":
            from sweep.status import run_status_cli

            return run_status_cli(args)
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
