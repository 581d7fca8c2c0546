"""SparseGPT (Frantar & Alistarh, ICML 2023): prune with second-order weight reconstruction.

Each ``nn.Linear`` of the decoder blocks minimises ||W X - W' X||^2 over its calibration
inputs X: the Hessian of that loss, H = 2/n X^T X, is accumulated over the n calibration
tokens; columns are then visited left to right and every pruned weight's error is spread over
the not yet visited columns of its row by the optimal-brain-surgeon update, read from the
upper Cholesky factor U of H^-1 (row i of U is the OBS update for column i given that
columns < i are fixed). The mask is chosen adaptively, per ``blocksize`` columns (unstructured:
the lowest w^2 / U_ii^2 of the block) or per group of M columns (N:M), on the weights as
updated so far. Same algorithm as the reference (IST-DASLab/sparsegpt ``fasterprune``); the
differences, all deliberate:

- Exact counts. Each layer ends with exactly ``pruned_count(numel, sparsity)`` pruned
  weights, like magnitude: the per-block counts are allocated by cumulative rounding so they
  sum to the layer's count (the reference's ``int(block * sparsity)`` per block drifts).
- Dead inputs (a feature that is zero on every calibration token, diag H = 0, common in OPT's
  fc2): as in the reference H_jj is set to 1, and these weights, useless on the calibration
  data, are pruned before any other; but rather than zeroing all of them up front (more zeros
  than asked when they outnumber the target), exactly the target count is pruned, dead ones
  first. Pruning a dead weight moves no other weight (its row of U is zero off the diagonal).
- Hessians are shared by the Linears that read the same tensor (q/k/v, gate/up): one matrix
  per distinct input of a block, not one per Linear.
- The scale of H does not matter (the damping is relative to mean diag H and the updates
  are ratios of entries of U), so H = 2/n X^T X with n tokens, not sequences as in the
  reference, gives the same result.

Blocks are processed in order, as in Wanda (``trainers.prune``): each block's Hessians come
from the outputs of the already pruned blocks before it, all of a block's Hessians from one
pass over the (dense) block, then the pruned block is run to give the next block its inputs.
Memory: one block's calibration activations plus that block's Hessians (in float32, float64
for a float64 model), on the device of the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from trainers.prune import (
    BlockInputs,
    Masks,
    _mask_lowest,
    _mask_whole,
    calibrated_blocks,
    prunable_linears,
    pruned_count,
    resolve_layer_sparsity,
    resolve_sparsity,
)
from trainers.spec import Pattern, parse_pattern

# ---------------------------------------------------------------------------------------------
# One layer


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp I)^-1, and the dead inputs (diag H == 0).

    Dead inputs get H_jj = 1 first, so that H stays invertible; then the diagonal is raised
    by ``percdamp * mean(diag H)``. ``hessian`` is not modified.
    """
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    diag += percdamp * diag.mean()
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            f"Hessian is not positive definite after dampening by percdamp={percdamp}; "
            "use more calibration tokens or a larger percdamp"
        )
    factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if info.item() != 0:
        raise ValueError(f"inverse Hessian is not positive definite (percdamp={percdamp})")
    return factor, dead


def _block_counts(rows: int, dead: torch.Tensor, total: int, blocksize: int) -> list[int]:
    """Weights to prune in each column block so that they add up to ``total``.

    Dead weights come first (in column order) and are free to prune; the rest of ``total`` is
    spread over the blocks in proportion to their live weights, by rounding the cumulative
    share half up, so each block gets within one of its exact share and the sum is exact.
    """
    dead_cols = dead.view(-1, 1).split(blocksize)
    dead_per_block = [rows * int(d.sum()) for d in dead_cols]
    live_per_block = [rows * d.numel() - k for d, k in zip(dead_cols, dead_per_block, strict=True)]
    dead_left = min(total, sum(dead_per_block))
    live_total, live_target = sum(live_per_block), total - dead_left
    counts, cumulative, previous = [], 0, 0
    for dead_b, live_b in zip(dead_per_block, live_per_block, strict=True):
        take_dead = min(dead_b, dead_left)
        dead_left -= take_dead
        cumulative += live_b
        share = (2 * live_target * cumulative + live_total) // (2 * live_total) if live_total else 0
        counts.append(take_dead + share - previous)
        previous = share
    return counts


def _scores(w: torch.Tensor, d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [H_F^-1]_ii = (w / U_ii)^2; dead inputs first (-inf)."""
    return (w / d).square().masked_fill(dead, float("-inf"))


def prune_with_factor(
    weight: torch.Tensor,
    factor: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float | None,
    pattern: Pattern | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column sweep on one [out, in] weight, given ``inverse_hessian_factor``.

    Returns (pruned weight in ``weight``'s dtype, bool keep-mask); ``weight`` is not modified.
    The arithmetic is in the factor's dtype. Pruned positions are exact zeros; kept ones are
    nonzero unless the update leaves one exactly 0 or it rounds to 0 in ``weight``'s dtype
    (fp16 below 6e-8), or it was 0 before and nothing moved it: zero weights score lowest,
    so this needs more zeros than the layer prunes.
    """
    sparsity = resolve_sparsity(sparsity, pattern)
    nm = parse_pattern(pattern)
    rows, cols = weight.shape
    if factor.shape != (cols, cols) or dead.shape != (cols,):
        raise ValueError(
            f"factor {tuple(factor.shape)} does not match weight {tuple(weight.shape)}"
        )
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if nm is not None:
        if cols % nm[1] or blocksize % nm[1]:
            raise ValueError(
                f"N:M pattern {nm[0]}:{nm[1]} needs in_features ({cols}) and blocksize "
                f"({blocksize}) divisible by {nm[1]}"
            )
        counts = None
    else:
        counts = _block_counts(rows, dead, pruned_count(weight.numel(), sparsity), blocksize)
    w_all = weight.detach().to(factor.device, factor.dtype, copy=True)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=factor.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w = w_all[:, i1:i2].clone()
        u = factor[i1:i2, i1:i2]
        d = u.diagonal()
        dead_b = dead[i1:i2].expand(rows, -1)
        errors = torch.zeros_like(w)
        if counts is not None:  # unstructured: the whole block's mask from its current weights
            keep[:, i1:i2] = _mask_whole(_scores(w, d, dead_b), counts[b])
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # N:M: this group's mask, weights as updated
                g = slice(i, i + nm[1])
                keep[:, i1 + i : i1 + i + nm[1]] = _mask_lowest(
                    _scores(w[:, g], d[g], dead_b[:, g]), nm[1] - nm[0]
                )
            q = w[:, i].masked_fill(~keep[:, i1 + i], 0)
            err = (w[:, i] - q) / d[i]
            w[:, i:].sub_(torch.outer(err, u[i, i:]))
            w[:, i] = q  # exactly q (the update leaves it q up to rounding)
            errors[:, i] = err
        w_all[:, i1:i2] = w
        w_all[:, i2:].sub_(errors @ factor[i1:i2, i2:])  # the block's updates to later columns
    return w_all.to(weight.device, weight.dtype), keep.to(weight.device)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    pattern: Pattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one [out, in] weight given the Hessian of its inputs: (pruned weight, keep-mask)."""
    factor, dead = inverse_hessian_factor(hessian, percdamp)
    return prune_with_factor(weight, factor, dead, sparsity, pattern, blocksize)


# ---------------------------------------------------------------------------------------------
# A model


def _hessian_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _block_hessians(
    block: nn.Module, linears: Mapping[str, nn.Linear], inputs: BlockInputs
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run the block over all chunks; H = 2/n X^T X per distinct Linear input.

    Returns (Hessians keyed by the first Linear reading each input, {Linear: that key}).
    Linears called one after another on the very same, unmodified tensor (same object and
    version counter: q/k/v, gate/up) share one Hessian, saving its memory and its X^T X.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    owner: dict[str, str] = {}
    last: dict = {"x": None, "version": None, "name": None}

    def make_hook(name: str, lin: nn.Linear):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            if x is last["x"] and x._version == last["version"]:
                source = last["name"]
            else:
                source = name
                flat = x.detach().reshape(-1, x.shape[-1]).to(_hessian_dtype(lin.weight))
                if name not in sums:
                    sums[name] = flat.new_zeros(flat.shape[1], flat.shape[1])
                    tokens[name] = 0
                sums[name].addmm_(flat.T, flat)
                tokens[name] += flat.shape[0]
                last.update(x=x, version=x._version, name=name)
            if owner.setdefault(name, source) != source:
                raise RuntimeError(f"{name} read a different input than in the first chunk")

        return hook

    handles = [
        lin.register_forward_pre_hook(make_hook(name, lin), with_kwargs=True)
        for name, lin in linears.items()
    ]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
            last.update(x=None, version=None, name=None)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in linears if name not in owner]
    if missing:
        raise RuntimeError(f"these Linears were never called by their block: {missing}")
    return {name: s.mul_(2.0 / tokens[name]) for name, s in sums.items()}, owner


@torch.no_grad()
def sparsegpt_masks(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None,
    calib_input_ids: torch.Tensor,
    pattern: Pattern | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    batch_size: int = 8,
) -> Masks:
    """SparseGPT masks, block by block; PRUNES AND UPDATES THE MODEL'S WEIGHTS IN PLACE.

    ``sparsity``: one value, or {layer name: value} for every prunable layer (OWL); with an
    N:M ``pattern``, None or the implied 1 - N/M. ``calib_input_ids``: [S, T] token ids,
    ``batch_size`` sequences through a block at a time. Unlike magnitude and Wanda, the kept
    weights change too: the returned masks reproduce the zeros of the pruned model, but the
    pruned model itself (its weights) is the result, a dense model with these masks is not.
    """
    per_layer = resolve_layer_sparsity(sparsity, pattern, prunable_linears(model))
    masks: Masks = {}
    for block, linears, inputs in calibrated_blocks(model, calib_input_ids, batch_size):
        hessians, owner = _block_hessians(block, linears, inputs)
        last_user = {owner[name]: name for name in linears}  # in the order pruned below
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, lin in linears.items():
            key = owner[name]
            if key not in factors:  # each Hessian becomes its factor once, then is freed
                factors[key] = inverse_hessian_factor(hessians.pop(key), percdamp)
            pruned, masks[name] = prune_with_factor(
                lin.weight, *factors[key], per_layer[name], pattern, blocksize
            )
            lin.weight.copy_(pruned)
            if last_user[key] == name:
                del factors[key]
    return masks
