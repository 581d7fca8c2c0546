"""Loading models and tokenizers, and caching them as a plain local Hugging Face directory.

Three kinds of model come in through ``ModelConfig``: a hub id or local directory, a GGUF
file (dequantized by transformers, which is slow), or a random model built from a
config dict (tests, smoke runs). ``materialize`` turns any of them into one local directory
(config.json + model.safetensors + tokenizer files) so each trial reloads it in a fraction
of a second instead of dequantizing again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from trainers.hf import tied_keys, write_hf_dir
from trainers.spec import ModelConfig, is_local_path, resolve_model_path

BYTE_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
# Written last into a materialized directory: its presence means the directory is complete.
MARKER_FILE = ".materialized.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer needing no files: token id = byte value, then <bos> <eos> <pad>.

    BPE with no merges splits each pre-token into single byte symbols, so every text
    round-trips and the vocabulary stays at 259 (tiny test models stay tiny).
    """
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    for i, tok in enumerate(BYTE_SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _local_model_path(mc: ModelConfig) -> str:
    """The directory or hub id to load from; a clear error when a local path is missing."""
    if not mc.name_or_path:
        raise ValueError("model.name_or_path is not set")
    path = resolve_model_path(mc.name_or_path)
    local = Path(path).expanduser()
    looks_local = is_local_path(path)
    if looks_local and not local.exists():
        raise FileNotFoundError(f"model path not found: {local}")
    if looks_local and mc.gguf_file and not (local / mc.gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file not found: {local / mc.gguf_file}")
    return str(local) if looks_local else path


def load_tokenizer(mc: ModelConfig) -> Any:
    """The tokenizer ``mc`` names ("byte", a hub id or directory, or the model's own)."""
    if mc.tokenizer == "byte":
        return byte_tokenizer()
    if mc.tokenizer is not None:
        path, gguf_file = mc.tokenizer, None
    else:
        path, gguf_file = _local_model_path(mc), mc.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as e:
        where = f"{path} (gguf_file={gguf_file})" if gguf_file else path
        raise OSError(f"cannot load a tokenizer from {where}: {e}") from e
    if tok.pad_token is None:
        # Evaluation never pads; training batches of packed blocks neither. Some collators
        # still insist on a pad token.
        tok.pad_token = tok.eos_token
    return tok


def build_model(mc: ModelConfig, vocab_size: int | None = None) -> PreTrainedModel:
    """A randomly initialised model from ``mc.config``; the same init_seed gives the same
    weights, without disturbing the caller's random state."""
    if mc.config is None:
        raise ValueError("build_model needs model.config")
    config_dict = dict(mc.config)
    if "vocab_size" not in config_dict:
        if vocab_size is None:
            vocab_size = len(load_tokenizer(mc))
        config_dict["vocab_size"] = vocab_size
    config = AutoConfig.for_model(**config_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mc.init_seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def load_model(mc: ModelConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model ``mc`` names, in ``dtype``, in eval mode."""
    if mc.config is not None:
        return build_model(mc).to(dtype).eval()
    path = _local_model_path(mc)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, gguf_file=mc.gguf_file)
    except (OSError, ValueError) as e:
        where = f"{path} (gguf_file={mc.gguf_file})" if mc.gguf_file else path
        raise OSError(f"cannot load a model from {where}: {e}") from e
    return model.eval()


def _config_hash(mc: ModelConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(mc), sort_keys=True).encode()).hexdigest()


def _is_complete(directory: Path, digest: str) -> bool:
    try:
        return json.loads((directory / MARKER_FILE).read_text())["hash"] == digest
    except (OSError, ValueError, KeyError):
        return False


def _write_model_dir(mc: ModelConfig, directory: Path, model: PreTrainedModel | None,
                     marker: str) -> None:
    model = load_model(mc) if model is None else model
    write_hf_dir(directory, model.config, model.state_dict(), tied_keys(model),
                 tokenizer=load_tokenizer(mc), extra_files={MARKER_FILE: marker})


def cache_target(mc: ModelConfig, cache_dir: Path) -> Path:
    """The directory ``materialize`` builds for ``mc``: named by a hash of the config."""
    if mc.name_or_path:
        label = Path(mc.name_or_path.replace(":", "_")).name
    else:
        label = str((mc.config or {}).get("model_type", "model"))
    return Path(cache_dir).expanduser() / f"{label}-{_config_hash(mc)[:12]}"


def materialize(mc: ModelConfig, cache_dir: Path, model: PreTrainedModel | None = None) -> Path:
    """A plain local HF directory for ``mc`` under ``cache_dir``, built once and reused.

    ``model``: the model ``mc`` names when the caller has already loaded it (dequantizing a
    GGUF is slow: it should happen once).

    The directory is named by a hash of ``mc`` and written atomically (``trainers.hf``), with a
    marker holding the hash, so a crash never leaves a half-written model that looks usable.
    """
    digest = _config_hash(mc)
    target = cache_target(mc, cache_dir)
    if not _is_complete(target, digest):
        _write_model_dir(mc, target, model, json.dumps({"hash": digest, "model": asdict(mc)}))
    return target
