"""``sweep eval``: perplexity of one model on one text, as a JSON line a script can parse.

The command is registered by ``sweep/cli.py``; this module adds its arguments and runs it. Inputs are checked before anything heavy is loaded (exit 2, naming the path or flag).
"""

from __future__ import annotations

import argparse
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


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``sweep eval`` (defaults: the README's 2048 / 2048 perplexity protocol)."""
    parser.add_argument("--model", required=True, help="hub id, local directory or pkg:<package>")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    text = parser.add_mutually_exclusive_group(required=True)
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
