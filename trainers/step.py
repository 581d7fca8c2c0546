"""One optimizer step with fixed masks, and the learning rate of each step; shared by the worker
loop, the benchmarks and the tests."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers.distill import LossFn, ce_loss
from trainers.parallel import enforce_masks, mask_gradients


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_frac: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant."""
    warmup_steps = int(warmup_frac * total_steps)
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    blocks: torch.Tensor,
    micro: list[list[int]],
    pruned: dict[str, torch.Tensor],
    lr: float,
    max_grad_norm: float | None,
    device: torch.device,
    loss_fn: LossFn = ce_loss,
) -> float:
    """Forward/backward over this worker's micro-batches (rows of ``blocks``), then one step.
    ``pruned``: each masked layer's pruned positions, as ``trainers.parallel.shard_masks`` gives.
    ``loss_fn(model, batch)``: the micro-batch's mean loss (CE by default; a distillation
    objective from ``trainers.distill.make_loss_fn``).

    Each micro-batch's mean token loss is weighted by its share of the worker's sequences, so
    the accumulated gradient is the mean over the worker's share whatever the split; FSDP's
    reduce-scatter then averages over ranks (equal shares), giving the global-batch mean.
    Masks: gradients of pruned weights are zeroed before the step (Adam's moments stay zero),
    and the weights are re-masked after it (weight decay and numerical noise cannot revive
    them). Returns the worker's mean loss for the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = sum(len(m) for m in micro)
    loss_sum = 0.0
    for idx in micro:
        batch = blocks[idx].to(device)
        loss = loss_fn(model, batch)
        weight = len(idx) / total
        (loss * weight).backward()
        loss_sum += loss.item() * weight
    mask_gradients(model, pruned)
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if not math.isfinite(float(norm)):
            loss_sum = float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    enforce_masks(model, pruned)
    return loss_sum
