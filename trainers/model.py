"""Loading models and tokenizers, and caching them as a plain local Hugging Face directory.

Three kinds of model come in through ``ModelConfig``: a hub id or local directory, a GGUF
file (dequantized by transformers, ~35 s for SmolLM2-135M), or a random model built from a
config dict (tests, smoke runs). ``materialize`` turns any of them into one local directory
(config.json + model.safetensors + tokenizer files) so each trial reloads it in a fraction
of a second instead of dequantizing again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sweep.config import ModelConfig, resolve_model_path, to_dict

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
    looks_local = path.startswith(("/", ".", "~")) or local.exists()
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
    return hashlib.sha256(json.dumps(to_dict(mc), sort_keys=True).encode()).hexdigest()


def _is_complete(directory: Path, digest: str) -> bool:
    try:
        return json.loads((directory / MARKER_FILE).read_text())["hash"] == digest
    except (OSError, ValueError, KeyError):
        return False


def _unshared_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """State dict that safetensors accepts: tied copies dropped (from_pretrained re-ties
    them), any other shared storage cloned."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            if name in tied:
                continue
            tensor = tensor.clone()
        seen.add(ptr)
        out[name] = tensor.detach().contiguous()
    return out


def _save_gguf_model(model: PreTrainedModel, directory: Path) -> None:
    """save_pretrained refuses GGUF-loaded models ("quantized with gguf and is not
    serializable"), but the weights are plain dequantized tensors by now: save the config
    without its quantization entry and the state dict directly."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(directory)
    save_file(_unshared_state_dict(model), str(directory / "model.safetensors"), {"format": "pt"})


def _write_model_dir(mc: ModelConfig, directory: Path, model: PreTrainedModel | None) -> None:
    model = load_model(mc) if model is None else model
    tokenizer = load_tokenizer(mc)
    if mc.gguf_file:
        _save_gguf_model(model, directory)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


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
    GGUF twice costs ~35 s).

    The directory is named by a hash of ``mc`` and built in a temporary directory beside it,
    then renamed into place, so a crash never leaves a half-written model that looks usable
    and concurrent callers both end up with one complete copy.
    """
    digest = _config_hash(mc)
    cache_dir = Path(cache_dir).expanduser()
    target = cache_target(mc, cache_dir)
    if _is_complete(target, digest):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=cache_dir))
    try:
        _write_model_dir(mc, tmp, model)
        (tmp / MARKER_FILE).write_text(json.dumps({"hash": digest, "model": to_dict(mc)}))
        if target.exists() and not _is_complete(target, digest):
            shutil.rmtree(target)  # left by an older, interrupted layout
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target, digest):  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
