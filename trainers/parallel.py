"""FSDP2 sharding and masks that follow the shards.

The model never knows how it is sharded: ``shard_model`` wraps each decoder block with
``fully_shard`` and then the root. FSDP2 shards every parameter on dim 0 as a DTensor; a mask
distributed with the weight's mesh and placements lines up element for element with the local
shard, so masking gradients (before the step, which keeps Adam's moments at zero for pruned
weights) and weights (after the step) is a local, exact operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from trainers.prune import prunable_linears


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shard_model(model: nn.Module, blocks: nn.ModuleList, mixed_precision: bool) -> nn.Module:
    """FSDP2 per decoder block, then the root (embeddings, final norm, lm_head).

    With ``mixed_precision`` (GPU) parameters are gathered in bf16 for compute while the
    sharded master weights, gradients' reduction and optimizer state stay fp32. A single CPU
    rank has nothing to shard and no precision to change: the wrapper would only cost time
    (README, Benchmarks: the FSDP2 wrap row), so it is skipped."""
    world = dist.get_world_size() if is_distributed() else 1
    if world == 1 and not mixed_precision:
        return model

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


@contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A process group of this process alone, for the length of the block, so a model on a GPU
    sharded outside a trial (preparation measuring the baseline) is wrapped by ``shard_model``
    exactly as a one-worker trial's: bf16 compute, like every trial on a GPU. Nothing on a CPU
    (a single CPU rank is not wrapped) nor when a group exists already."""
    if device.type != "cuda" or is_distributed():
        yield
        return
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full masks (module name -> bool, True = keep) -> the local shard of each weight's
    *pruned* positions (bool, True = pruned), laid out like the weight (a DTensor shard under
    FSDP2, the whole tensor otherwise), on the weight's device. Inverted once here so the
    per-step masking allocates nothing."""
    modules = dict(model.named_modules())
    out = {}
    for name, mask in masks.items():
        weight = modules[name].weight
        if isinstance(weight, DTensor):
            # Distributed as floats (collectives need a numeric dtype), then back to bool.
            dmask = distribute_tensor(
                mask.to(weight.dtype).to(weight.device_mesh.device_type),
                weight.device_mesh,
                weight.placements,
            )
            keep = dmask.to_local().bool()
        else:
            keep = mask.to(device=weight.device, dtype=torch.bool)
        if keep.shape != local(weight).shape:
            raise RuntimeError(f"mask shard of {name} does not line up with its weight shard")
        out[name] = ~keep
    return out


@torch.no_grad()
def mask_gradients(model: nn.Module, pruned: dict[str, torch.Tensor]) -> None:
    """Before each optimizer step: zero pruned weights' gradients so Adam's moments stay 0."""
    for name, where in pruned.items():
        grad = model.get_submodule(name).weight.grad
        if grad is not None:
            local(grad).masked_fill_(where, 0)


@torch.no_grad()
def enforce_masks(model: nn.Module, pruned: dict[str, torch.Tensor]) -> None:
    """After each optimizer step: re-zero pruned weights (weight decay, numerics). A fill,
    not a multiply: an inf weight times 0 would be NaN, not an exact zero."""
    for name, where in pruned.items():
        local(model.get_submodule(name).weight).masked_fill_(where, 0)


@torch.no_grad()
def measured_sparsity(model: nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Zero fraction of each named layer's weight (default: every prunable layer), counted on
    the local shards and summed over ranks: measured on the weights themselves, never copied
    from the config. The one sparsity measure of the project (prep, worker, tests)."""
    names = list(prunable_linears(model)) if names is None else list(names)
    modules = dict(model.named_modules())
    counts = torch.zeros(len(names), 2, dtype=torch.float64)
    for i, name in enumerate(names):
        w = local(modules[name].weight)
        counts[i, 0] = (w == 0).sum().item()
        counts[i, 1] = w.numel()
    all_reduce_sum(counts)
    return {n: float(counts[i, 0] / counts[i, 1]) for i, n in enumerate(names)}


def sparsity_summary(per_layer: dict[str, float], sizes: dict[str, int] | None = None) -> dict[str, float]:
    """min / mean / max across layers, and overall = zeros / weights (size-weighted; without
    ``sizes`` every layer counts the same, so overall == mean)."""
    if not per_layer:
        raise ValueError("no layers to summarise")
    values = list(per_layer.values())
    if sizes is None:
        overall = sum(values) / len(values)
    else:
        total = sum(sizes[name] for name in per_layer)
        overall = sum(round(s * sizes[name]) for name, s in per_layer.items()) / total
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values),
            "overall": overall}


def all_reduce_sum(t: torch.Tensor) -> None:
    """In-place SUM across ranks (no-op when not distributed); NCCL needs a CUDA tensor."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl" and not t.is_cuda:
        tmp = t.cuda()
        dist.all_reduce(tmp)
        t.copy_(tmp.cpu())
    else:
        dist.all_reduce(t)
