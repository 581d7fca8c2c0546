"""``sweep eval``: perplexity of one model on one text, or on every evaluation set and task
of a sweep config, as one JSON line a script can parse.

The command is registered by ``sweep/cli.py``; this module adds its arguments and runs it.
Inputs are checked before anything heavy is loaded (exit 2, naming the path or flag).

With ``--config`` the sets are the config's ``eval.sets`` (or its ``eval.text``), tokenized
and cut exactly as a sweep's preparation does (``eval.sets.windows_for``), so a number here
equals the sweep's for the same weights; ``--eval-set`` picks some of them, and the config's
``eval.tasks`` run too unless ``--tasks`` replaces them (or ``--no-tasks``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from eval.perplexity import evaluate, make_windows, tokenize_text
from eval.text import TextSource, load_text
from trainers.spec import ModelConfig, is_local_path, resolve_model_path

EXIT_INVALID_INPUT = 2


def add_eval_arguments(parser: argparse.ArgumentParser, text_required: bool = True) -> None:
    """Flags of ``sweep eval`` and ``sweep prune`` (defaults: the README's 2048 / 2048
    perplexity protocol); ``text_required=False`` where a config may name the texts."""
    parser.add_argument("--model", required=True, help="hub id, local directory or pkg:<package>")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    text = parser.add_mutually_exclusive_group(required=text_required)
    text.add_argument("--text-file", default=None, help="a UTF-8 text file, used verbatim")
    text.add_argument("--dataset", default=None, help="datasets name or local directory")
    text.add_argument(
        "--pydoc-topics",
        default=None,
        choices=["all", "train", "eval"],
        help="CPython's bundled docs topics (no download)",
    )
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--max-chars", type=int, default=None, help="keep the first N characters")
    parser.add_argument("--token-length", type=int, default=2048)
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: --token-length, no overlap)",
    )
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all CPUs)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_sets_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags only ``sweep eval`` has: a config's sets and tasks, and tasks by name."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="evaluate on the sets (eval.sets, or eval.text) and tasks (eval.tasks) "
                        "of this sweep config, exactly as its sweep does")
    parser.add_argument("--eval-set", dest="sets", action="append", default=None, metavar="NAME",
                        help="with --config: only this set (repeat for several)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help="lm-eval tasks (replace the config's eval.tasks.names)")
    parser.add_argument("--no-tasks", action="store_true", help="skip the config's tasks")
    parser.add_argument("--tasks-include-path", default=None, metavar="DIR",
                        help="a directory of local lm-eval task YAMLs")
    parser.add_argument("--tasks-limit", type=float, default=None, metavar="N",
                        help="the first N documents per task (below 1: a fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                        help="few-shot examples per task (default 0, or the config's)")
    parser.add_argument("--tasks-batch-size", type=int, default=None, metavar="B")


def _text_source(args: argparse.Namespace) -> TextSource:
    if args.text_file is not None:
        return TextSource(source="file", path=args.text_file, max_chars=args.max_chars)
    if args.pydoc_topics is not None:
        return TextSource(source="pydoc_topics", part=args.pydoc_topics, max_chars=args.max_chars)
    return TextSource(
        source="dataset",
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        max_chars=args.max_chars,
    )


def _input_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the flags and paths, found before any model is loaded."""
    problems = []
    if args.text_file is not None and not Path(args.text_file).expanduser().is_file():
        problems.append(f"--text-file: file not found: {args.text_file}")
    try:
        model_path = Path(resolve_model_path(args.model)).expanduser()
    except FileNotFoundError as e:
        problems.append(f"--model: {e}")
    else:
        is_local = is_local_path(args.model)
        if is_local and not model_path.exists():
            problems.append(f"--model: path not found: {args.model}")
        elif is_local and args.gguf_file and not (model_path / args.gguf_file).is_file():
            problems.append(f"--gguf-file: file not found: {model_path / args.gguf_file}")
    if args.token_length < 2:
        problems.append(f"--token-length: must be >= 2, got {args.token_length}")
    if args.stride < 1 or args.stride > args.token_length:
        problems.append(
            f"--stride: must be in [1, --token-length={args.token_length}], got {args.stride}"
        )
    for flag, value in [
        ("--max-windows", args.max_windows),
        ("--batch-size", args.batch_size),
        ("--max-chars", args.max_chars),
        ("--threads", args.threads),
    ]:
        if value is not None and value < 1:
            problems.append(f"{flag}: must be >= 1, got {value}")
    return problems


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class CommandFailed(Exception):
    """A command ends with ``code`` after printing ``message`` on stderr (no traceback)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def load_inputs(args: argparse.Namespace, prog: str, extra_problems: list[str] = ()):
    """Check the flags, then load the tokenizer, the text's windows and the model: what
    ``sweep eval`` and ``sweep prune`` share. Returns (model, tokenizer, tokens, input_ids,
    labels, load seconds); raises CommandFailed (exit 2 for the user's input)."""
    from trainers.model import load_model, load_tokenizer  # transformers import is slow

    if args.stride is None:
        args.stride = args.token_length
    problems = _input_problems(args) + list(extra_problems)
    if problems:
        raise CommandFailed(EXIT_INVALID_INPUT,
                            f"{prog}: invalid input:\n" + "\n".join(f"  - {p}" for p in problems))
    torch.set_num_threads(args.threads or _default_threads())
    mc = ModelConfig(name_or_path=args.model, gguf_file=args.gguf_file, tokenizer=args.tokenizer)
    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(mc)
        tokens = tokenize_text(tokenizer, load_text(_text_source(args)))
        input_ids, labels = make_windows(tokens, args.token_length, args.stride, args.max_windows)
    except (FileNotFoundError, ValueError) as e:
        raise CommandFailed(EXIT_INVALID_INPUT, f"{prog}: invalid input: {e}") from e
    except OSError as e:  # an unreadable tokenizer: the message names the path
        raise CommandFailed(1, f"{prog}: {e}") from e
    try:
        model = load_model(mc)
    except OSError as e:
        raise CommandFailed(1, f"{prog}: {e}") from e
    return model, tokenizer, tokens, input_ids, labels, time.perf_counter() - t0


def run_eval(args: argparse.Namespace) -> int:
    """Run ``sweep eval``; the result is the last line of stdout, one JSON object."""
    if getattr(args, "config", None) or getattr(args, "tasks", None):
        try:
            return _run_sets(args)
        except CommandFailed as e:
            print(e.message, file=sys.stderr)
            return e.code
    if args.text_file is None and args.dataset is None and args.pydoc_topics is None:
        print("sweep eval: invalid input:\n  - give a text (--text-file, --dataset or "
              "--pydoc-topics), --config or --tasks", file=sys.stderr)
        return EXIT_INVALID_INPUT
    try:
        model, _, tokens, input_ids, labels, load_s = load_inputs(args, "sweep eval")
    except CommandFailed as e:
        print(e.message, file=sys.stderr)
        return e.code
    t1 = time.perf_counter()
    result = evaluate(model, input_ids, labels, args.batch_size, progress=not args.no_progress)
    seconds = time.perf_counter() - t1
    record = {
        **result,
        "model": args.model,
        "gguf_file": args.gguf_file,
        "token_length": args.token_length,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "text_tokens": int(tokens.numel()),
        "seconds": round(seconds, 3),
        "load_seconds": round(load_s, 3),
        # Tokens through the model (windows x length), the throughput that costs time.
        "tokens_per_s": round(input_ids.numel() / seconds, 2) if seconds > 0 else None,
    }
    print(
        f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens in "
        f"{result['windows']} windows of {args.token_length} (stride {args.stride}), "
        f"{seconds:.1f} s",
        file=sys.stderr,
    )
    print(json.dumps(record))
    return 0


def _sets_and_tasks(args: argparse.Namespace):
    """The evaluation sets (primary first) and the tasks config the flags ask for; raises
    CommandFailed (exit 2) naming the flag or config key."""
    from sweep.config import ConfigError, eval_sets, load_config, primary_set
    from trainers.spec import TasksConfig

    sets, primary, tasks, problems = [], None, TasksConfig(), []
    if args.config:
        try:
            cfg = load_config(args.config, check_paths=True)
        except ConfigError as e:
            raise CommandFailed(EXIT_INVALID_INPUT, f"sweep eval: {e}") from e
        sets, primary, tasks = eval_sets(cfg.eval), primary_set(cfg.eval), cfg.eval.tasks
        if args.sets:
            known = [es.name for es in sets]
            problems += [f"--eval-set: {n!r} is not one of the sets {', '.join(known)}"
                         for n in args.sets if n not in known]
            sets = [es for es in sets if es.name in args.sets]
            primary = primary if primary in args.sets else args.sets[0]
        sets.sort(key=lambda es: es.name != primary)
    elif args.text_file or args.dataset or args.pydoc_topics:
        from eval.sets import EvalSet

        sets = [EvalSet("text", _text_source(args), "sequential", args.token_length,
                        args.stride or args.token_length, args.max_windows)]
    elif args.sets:
        problems.append("--eval-set: needs --config")
    if args.no_tasks:
        tasks = TasksConfig()
    if args.tasks:
        tasks = dataclasses.replace(tasks, names=tuple(args.tasks))
    for flag, field_name in (("tasks_include_path", "include_path"), ("tasks_limit", "limit"),
                             ("num_fewshot", "num_fewshot"), ("tasks_batch_size", "batch_size")):
        value = getattr(args, flag)
        if value is not None:
            tasks = dataclasses.replace(tasks, **{field_name: value})
    if tasks.include_path and not Path(tasks.include_path).expanduser().is_dir():
        problems.append(f"--tasks-include-path: not a directory: {tasks.include_path}")
    if tasks.batch_size < 1:
        problems.append(f"--tasks-batch-size: must be >= 1, got {tasks.batch_size}")
    if problems:
        raise CommandFailed(EXIT_INVALID_INPUT,
                            "sweep eval: invalid input:\n" + "\n".join(f"  - {p}" for p in problems))
    return sets, tasks


def _run_sets(args: argparse.Namespace) -> int:
    """Every set and task of ``--config`` (or ``--tasks`` alone): one JSON object whose
    top-level perplexity keys are the first (primary) set's, with ``sets`` {name: result} and
    ``tasks`` (rows {task, metric, value, stderr, samples, num_fewshot})."""
    from eval.sets import windows_for
    from trainers.model import load_model, load_tokenizer
    from trainers.zeroshot import measure_tasks

    sets, tasks = _sets_and_tasks(args)
    torch.set_num_threads(args.threads or _default_threads())
    mc = ModelConfig(name_or_path=args.model, gguf_file=args.gguf_file, tokenizer=args.tokenizer)
    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(mc)
        model = load_model(mc)
    except OSError as e:
        raise CommandFailed(1, f"sweep eval: {e}") from e
    record: dict = {"model": args.model, "gguf_file": args.gguf_file,
                    "load_seconds": round(time.perf_counter() - t0, 3), "sets": {}}
    for es in sets:
        try:
            input_ids, labels = windows_for(es, tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise CommandFailed(EXIT_INVALID_INPUT, f"sweep eval: invalid input: set {es.name}: {e}") from e
        t1 = time.perf_counter()
        result = evaluate(model, input_ids, labels, args.batch_size, progress=not args.no_progress)
        result = {**result, "protocol": es.protocol, "token_length": es.token_length,
                  "seconds": round(time.perf_counter() - t1, 3)}
        record["sets"][es.name] = result
        print(f"{es.name}: perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
              f"in {result['windows']} windows ({es.protocol}, {es.token_length})", file=sys.stderr)
    if sets:
        first = record["sets"][sets[0].name]
        record = {**{k: first[k] for k in ("perplexity", "nll", "tokens", "windows") if k in first},
                  "primary": sets[0].name, **record}
    if tasks.names:
        t1 = time.perf_counter()
        try:
            record["tasks"] = measure_tasks(model, tokenizer, tasks) or []
        except (FileNotFoundError, ValueError) as e:
            raise CommandFailed(EXIT_INVALID_INPUT, f"sweep eval: invalid input: tasks: {e}") from e
        record["tasks_seconds"] = round(time.perf_counter() - t1, 3)
        for r in record["tasks"]:
            print(f"{r['task']} {r['metric']}: {r['value']:.4f}", file=sys.stderr)
    print(json.dumps(record))
    return 0
