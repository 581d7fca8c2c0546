"""The one writer of Hugging Face model directories (config.json + model.safetensors + tokenizer).

Two callers: the model cache (``trainers.model.materialize``: the model as loaded, a GGUF model
dequantized) and the best-model export (``trainers.checkpoint.export_hf``: the gathered weights
of a sharded model, masks applied). ``save_pretrained`` cannot serve both: it refuses models
loaded from GGUF ("quantized with gguf and is not serializable") and knows nothing of FSDP2's
gathered state dict. The directory is written atomically (``trainers.files.atomic_dir``).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainers.files import atomic_dir

# Files a tokenizer's save_pretrained writes; copied along when a directory already holds them.
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges")


def tied_keys(model: Any) -> set[str]:
    """State-dict names that transformers re-ties on load (e.g. ``lm_head.weight``)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def unshared_tensors(state_dict: dict[str, torch.Tensor], tied: set[str]) -> dict[str, torch.Tensor]:
    """What safetensors accepts: a tied copy is dropped (``from_pretrained`` re-ties it), any
    other tensor sharing storage with an earlier one is cloned."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            if name in tied:
                continue
            tensor = tensor.clone()
        seen.add(ptr)
        out[name] = tensor.detach().contiguous()
    return out


def write_hf_dir(
    out_dir: Path,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    tied: set[str],
    tokenizer: Any = None,
    tokenizer_dir: Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """``out_dir`` as a loadable HF directory: ``config`` (a PretrainedConfig, its GGUF
    ``quantization_config`` entry dropped), the weights, and the tokenizer (an object with
    ``save_pretrained``, or the tokenizer files of ``tokenizer_dir``); ``extra_files`` (name ->
    text) are written last, inside the same atomic rename."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    tensors = unshared_tensors(state_dict, tied)
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.name.startswith(TOKENIZER_PREFIXES):
                    shutil.copy2(f, tmp / f.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
