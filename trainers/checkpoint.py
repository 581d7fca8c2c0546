"""Sharded training checkpoints and the exported model.

Training state is saved with ``torch.distributed.checkpoint`` (each rank writes its own shard,
rank 0 the metadata), plus a small JSON of loop state (epoch, step, loss so far, best) and each
rank's RNG state. Nothing is unpickled on load: DCP reads tensors, JSON is JSON, RNG states are
loaded with ``weights_only=True``. The exported model is a plain Hugging Face directory
(config.json + model.safetensors) with the masks applied.
"""

from __future__ import annotations

import json
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

from trainers.files import write_json
from trainers.hf import tied_keys, write_hf_dir

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
        write_json(directory / STATE_FILE, state)


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
    """Write the (sharded) model as a Hugging Face directory: a collective, every rank calls
    it; rank 0 gathers the weights and writes (``trainers.hf``)."""
    sd = full_state_dict(model)
    if _rank() == 0:
        write_hf_dir(out_dir, model.config, sd, tied_keys(model), tokenizer_dir=tokenizer_dir)
