"""Checks that read inputs but need no Ray, run after the config is valid and before Ray
starts: a problem found here costs a second, not a cluster start and a crashed trial.

Each function returns a list of problems (empty: fine), each naming the config key or path
and what to do, so the caller can gather them all into one ``ConfigError`` (exit 2).
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweep.config import ConfigError

if TYPE_CHECKING:
    from eval.text import TextSource
    from sweep.config import SweepConfig

# Read in chunks: a multi-gigabyte corpus is checked without holding it in memory.
_CHUNK = 1 << 20
# A text is tokenized before Ray starts only when it might be too short for one window: when it
# has fewer than this many bytes per token the window needs. Tokenizers of real models average
# 3 to 5 bytes per token on prose, so a longer text holds its windows; it is tokenized once, in
# preparation, which reports the same problem (exit 2) should this bound ever be wrong.
BYTES_PER_TOKEN_BOUND = 32


def _utf8_error(path: Path) -> tuple[int, str] | None:
    """(byte offset, reason) of the first byte that is not valid UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.start counts from the decoder's buffered tail (an incomplete sequence
                # carried over from the previous chunk) plus this chunk.
                pending = len(e.object) - len(chunk)
                return offset - pending + e.start, e.reason
            if not chunk:
                return None
            offset += len(chunk)


def check_text(src: TextSource, key: str) -> list[str]:
    """``key`` (e.g. "data.train"): a file source exists, is a regular file, decodes as UTF-8
    and holds some text; a dataset given as a local directory exists. Hub datasets are
    checked when loaded (no network here); pydoc_topics ship with Python."""
    if src.source == "file":
        if not src.path:
            return [f"{key}.path: required when {key}.source is 'file'"]
        path = Path(src.path).expanduser()
        if not path.exists():
            return [f"{key}.path: file not found: {path} (relative paths are relative to "
                    f"{Path.cwd()})"]
        if not path.is_file():
            return [f"{key}.path: {path} is not a regular file"]
        try:
            bad = _utf8_error(path)
        except OSError as e:
            return [f"{key}.path: cannot read {path}: {e.strerror or e}"]
        if bad is not None:
            at, reason = bad
            return [f"{key}.path: {path} is not UTF-8 text: byte offset {at} ({reason}); "
                    "convert it (iconv -f LATIN1 -t UTF-8) or fix that byte"]
        size = path.stat().st_size
        if size == 0:
            return [f"{key}.path: {path} is empty"]
        if size <= _CHUNK and not path.read_bytes().decode("utf-8").strip():
            return [f"{key}.path: {path} holds only whitespace"]
        return []
    if src.source == "dataset" and src.dataset:
        if src.dataset.startswith(("/", "./", "../", "~")):
            local = Path(src.dataset).expanduser()
            if not local.exists():
                return [f"{key}.dataset: local dataset directory not found: {local}"]
    return []


def check_windows(
    n_tokens: int,
    token_length: int,
    stride: int,
    key: str,
    *,
    text_key: str | None = None,
) -> list[str]:
    """A token stream of ``n_tokens`` must hold at least one full window of ``token_length``
    starting every ``stride`` tokens (the protocol drops a trailing partial window).
    ``key`` names the length setting ("eval.token_length", or "data.seq_len" for training
    blocks, where stride = seq_len); ``text_key`` the text it cuts ("eval.text")."""
    if token_length < 1 or stride < 1:
        return [f"{key}: window length and stride must be >= 1, got {token_length} / {stride}"]
    if n_tokens >= token_length:
        return []
    text = f"the text ({text_key})" if text_key else "the text"
    grow = f" or a larger {text_key}.max_chars" if text_key else ""
    return [f"{key}={token_length}: {text} has {n_tokens} tokens, fewer than one window of "
            f"{token_length}; use a longer text{grow}, or a smaller {key}"]


def check_model_type(model_config_dict: dict, key: str) -> list[str]:
    """``key`` (e.g. "model.config"): ``model_type`` is one transformers knows and builds a
    causal LM from, and the dict makes a valid config; unknown names get the closest known
    ones."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = model_config_dict.get("model_type")
    if not model_type:
        return [f"{key}.model_type: required (e.g. 'llama', 'opt', 'gpt2')"]
    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        return [f"{key}.model_type: {model_type!r} is not a model type this transformers "
                f"knows{hint}"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(
            str(model_type), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
        hint = f"; causal LMs with close names: {', '.join(close)}" if close else ""
        return [f"{key}.model_type: {model_type!r} has no causal language model in "
                f"transformers (AutoModelForCausalLM){hint}"]
    try:
        AutoConfig.for_model(**model_config_dict)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds
        return [f"{key}: not a valid {model_type} config: {e}"]
    return []


def check_storage_dir(path: str | os.PathLike, key: str = "--storage") -> list[str]:
    """A local storage root or SWEEP_DIR: not a regular file (nor below one), and writable
    where it will be created. Probed with an unnamed temporary file, so nothing is left."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return [f"{key}: {path} is a regular file, not a directory; give a directory"]
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{key}: {path} cannot be created: {existing} is a regular file"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        where = "" if existing == path else f" (its nearest existing parent {existing})"
        return [f"{key}: {path} is not writable{where}: {e.strerror or e}; choose another "
                "directory or fix its permissions"]
    return []


def _maybe_short(src: TextSource, tokens: int) -> str | None:
    """The text of ``src`` when it might hold fewer than ``tokens`` tokens; None when it surely
    holds them, or when only preparation can read it (a dataset: the hub, or a slow load)."""
    from eval.text import load_text

    bound = BYTES_PER_TOKEN_BOUND * tokens
    if src.source == "file":
        # Bytes >= characters: a file (or its first max_chars characters) of `bound` bytes.
        size = Path(src.path).expanduser().stat().st_size
        if size >= bound and (src.max_chars is None or src.max_chars >= bound):
            return None
    elif src.source != "pydoc_topics":
        return None
    text = load_text(src)
    return None if len(text.encode("utf-8")) >= bound else text


def _local_tokenizer(cfg: SweepConfig) -> tuple[object | None, list[str]]:
    """The sweep's tokenizer when it loads without the hub ("byte", or a local directory or
    GGUF file), else None; and the problem when a local one does not load."""
    from trainers.model import load_tokenizer
    from trainers.spec import is_local_path

    m = cfg.model
    if m.tokenizer == "byte":
        return load_tokenizer(m), []
    key, where = ("model.tokenizer", m.tokenizer) if m.tokenizer else (
        "model.name_or_path", m.name_or_path)
    if not where or not is_local_path(where):
        return None, []
    try:
        return load_tokenizer(m), []
    except (OSError, ValueError) as e:
        return None, [f"{key}: {e}"]


def sequential_sets(cfg: SweepConfig) -> list[tuple[Any, str, str]]:
    """(set, its text's key, its window length's key) of every evaluation set read as one
    text (the sequential protocol without a separator); the document protocols are checked
    in preparation, which reads their documents."""
    from sweep.config import eval_sets

    if not cfg.eval.sets:
        return [(eval_sets(cfg.eval)[0], "eval.text", "eval.token_length")]
    return [(es, f"eval.sets.{es.name}.text",
             f"eval.sets.{es.name}.token_length" if cfg.eval.sets[es.name].token_length
             else "eval.token_length")
            for es in eval_sets(cfg.eval) if es.protocol == "sequential" and es.separator is None]


def check_lengths(cfg: SweepConfig) -> list[str]:
    """The evaluation text holds one window of ``eval.token_length`` and the training text one
    block of ``data.seq_len`` tokens. Texts that are long in bytes pass without tokenizing
    (``BYTES_PER_TOKEN_BOUND``); short ones are tokenized with the sweep's tokenizer when it
    is local (the hub is never asked before Ray starts). Run after ``check_text`` passed."""
    cases = [(es.text, text_key, es.token_length, es.stride or es.token_length, length_key)
             for es, text_key, length_key in sequential_sets(cfg)]
    cases.append((cfg.data.train, "data.train", cfg.data.seq_len, cfg.data.seq_len, "data.seq_len"))
    short = [(text, *rest) for src, *rest in cases
             if (text := _maybe_short(src, rest[1])) is not None]
    if not short:
        return []
    tokenizer, problems = _local_tokenizer(cfg)
    if tokenizer is None:
        return problems
    from eval.perplexity import tokenize_text

    for text, text_key, length, stride, key in short:
        n = tokenize_text(tokenizer, text).numel() if text else 0
        problems += check_windows(n, length, stride, key, text_key=text_key)
    return problems


@contextlib.contextmanager
def input_error(key: str):
    """In preparation (a Ray task): a ``ValueError`` or ``OSError`` raised while reading
    ``key``'s input (a text that turned out too short, a model that does not load) becomes a
    ``ConfigError`` naming the key, which crosses Ray intact and ends the sweep with exit 2."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError([f"{key}: {e}"]) from e
