"""Sharded training checkpoints and the exported model.

Training state is saved with ``torch.distributed.checkpoint`` (each rank writes its own shard,
rank 0 the metadata), plus a small JSON of loop state (epoch, step, loss so far, best) and each
rank's RNG state. Nothing is unpickled on load: DCP reads tensors, JSON is JSON, RNG states are
loaded with ``weights_only=True``. The exported model is a plain Hugging Face directory
(config.json + model.safetensors) with the masks applied.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STATE_FILE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_training_state(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """All ranks call this with their own (possibly local) ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    torch.save(torch.get_rng_state(), directory / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def load_training_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = directory / f"rng_rank{_rank()}.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((directory / STATE_FILE).read_text())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0's CPU (a collective: every rank must call it)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export_hf(model: nn.Module, tokenizer_dir: Path | None, out_dir: Path) -> None:
    """Write a Hugging Face model directory atomically (rank 0 only; call full_state_dict on
    every rank first). Tied weights are written once, as save_pretrained does."""
    from safetensors.torch import save_file

    sd = full_state_dict(model)
    if _rank() != 0:
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in sd.items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue  # tied (e.g. lm_head = embed_tokens): reloads through the config's tie flag
        seen[key] = name
        tensors[name] = t.contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(f, tmp / f.name)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
