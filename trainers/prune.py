"""Pruning masks for causal LMs: magnitude and Wanda, unstructured or N:M.

Masks are bool tensors shaped like the weight, True = keep, keyed by the module's name in
``model.named_modules()``. Only the ``nn.Linear`` layers inside the decoder blocks are pruned
(never embeddings, ``lm_head`` or OPT's ``project_in``/``project_out``), so that ``sparsity``
means the same thing for every architecture: the fraction of zeros in each pruned layer.

How many weights are pruned (``pruned_count``): ``round_half_up(sparsity * n)`` where
``sparsity`` is read as its shortest decimal form (``repr``), so 0.15 of 10 is 2 and 0.5 of 7
is 4, without binary floating-point surprises. Magnitude applies it to each whole layer
(n = numel); Wanda, as in the paper, to each output row (n = in_features).

With an N:M pattern, every group of M consecutive input weights of a row keeps its N best:
the sparsity is then implied (1 - N/M); pass ``sparsity=None`` or that value, anything else
is rejected rather than silently ignored.

Ties are broken deterministically, as a stable sort would: among equal scores the lowest
index is pruned first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainers.files import atomic_write
from trainers.spec import Pattern, parse_pattern

Masks = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Which layers


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list, found generically as the ModuleList holding the most parameters.

    Works for ``model.layers`` (Llama), ``model.decoder.layers`` (OPT) and ``transformer.h``
    (GPT-2) without a per-architecture table.
    """
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if best is None or count > best[2]:
                best = (name, module, count)
    if best is None or best[2] == 0:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of decoder blocks with parameters; "
            "cannot tell which layers to prune"
        )
    return best[0], best[1]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full module name, in module order."""
    prefix, blocks = decoder_blocks(model)
    found = {
        f"{prefix}.{name}" if prefix else name: module
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear)
    }
    if not found:
        raise ValueError(
            f"no nn.Linear inside the decoder blocks {prefix!r} of {type(model).__name__} "
            "(GPT-2 style Conv1D layers are not supported)"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Counting and masks from scores


def pruned_count(n: int, sparsity: float) -> int:
    """Weights to zero out of ``n``: sparsity * n rounded half up, sparsity read as decimal."""
    exact = Decimal(repr(float(sparsity))) * n
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def resolve_sparsity(sparsity: float | None, pattern: Pattern | None) -> float:
    """Validate (sparsity, pattern) and return the sparsity in effect."""
    if pattern is None:
        if sparsity is None or not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        return float(sparsity)
    n, m = parse_pattern(pattern)
    implied = 1.0 - n / m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise ValueError(
            f"sparsity {sparsity} contradicts pattern {n}:{m}, which implies {implied:g}; "
            "pass sparsity=None or the implied value"
        )
    return implied


def _mask_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest scores along the last dimension; among equal scores, lowest index first.

    Same result as a stable sort, in linear time (kthvalue + a cumulative count of ties):
    sorting every layer of a 135M model took seconds on CPU.
    """
    mask = torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= score.shape[-1]:
        return ~mask
    threshold = score.kthvalue(k, dim=-1, keepdim=True).values
    below = score < threshold
    tie = score == threshold
    need = k - below.sum(dim=-1, keepdim=True)
    return ~(below | (tie & (tie.cumsum(dim=-1) <= need)))


def _mask_whole(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest scores of the whole tensor."""
    return _mask_lowest(score.flatten(), k).view(score.shape)


def _mask_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest scores of each row (last dimension)."""
    return _mask_lowest(score, k)


def _mask_nm(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the N highest scores of every M consecutive inputs of each row."""
    n, m = pattern
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = score.reshape(rows, cols // m, m)
    return _mask_rows(groups, m - n).reshape(rows, cols)


def mask_from_scores(
    score: torch.Tensor, sparsity: float, pattern: Pattern | None, per_row: bool
) -> torch.Tensor:
    """Keep-mask from a [out, in] score matrix: N:M groups, per row, or per layer."""
    if pattern is not None:
        return _mask_nm(score, parse_pattern(pattern))
    if per_row:
        return _mask_rows(score, pruned_count(score.shape[-1], sparsity))
    return _mask_whole(score, pruned_count(score.numel(), sparsity))


# ---------------------------------------------------------------------------------------------
# Magnitude


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None,
    pattern: Pattern | None = None,
) -> Masks:
    """Per-layer magnitude masks: drop the smallest |W| of each layer (or of each N:M group).

    ``sparsity``: one value for every layer, or {layer name: value} (``resolve_layer_sparsity``).
    """
    linears = prunable_linears(model)
    per_layer = resolve_layer_sparsity(sparsity, pattern, linears)
    return {
        name: mask_from_scores(
            lin.weight.detach().abs().float(), per_layer[name], pattern, per_row=False
        )
        for name, lin in linears.items()
    }


# ---------------------------------------------------------------------------------------------
# Wanda


class _StopForward(Exception):
    """Raised by the catcher hook once block 0's inputs are captured."""


BlockInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from the summed squared inputs per input feature."""
    return weight.detach().abs().float() * input_sq_norms.float().sqrt().unsqueeze(0)


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, ids: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run the model's embedding stage on each calibration chunk and keep block 0's inputs.

    A pre-hook on block 0 records its args and kwargs (attention mask, position embeddings,
    ...) and raises to stop the forward, SparseGPT's "Catcher", so the rest is not computed.
    """
    captured: BlockInputs = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = embed.weight.device if embed is not None else next(model.parameters()).device
    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in ids.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the decoder blocks were never called; cannot calibrate")
    finally:
        handle.remove()
    return _share_equal_kwargs(captured)


def _share_equal_kwargs(captured: BlockInputs) -> BlockInputs:
    """Let chunks reuse chunk 0's equal kwarg tensors (e.g. a [B,1,T,T] mask) to save memory."""
    if not captured:
        return captured
    first = captured[0][1]
    for i, (args, kwargs) in enumerate(captured[1:], start=1):
        shared = {
            key: first[key] if _same(value, first.get(key)) else value
            for key, value in kwargs.items()
        }
        captured[i] = (args, shared)
    return captured


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


def _input_sq_norms(
    block: nn.Module, linears: Mapping[str, nn.Linear], inputs: BlockInputs
) -> dict[str, torch.Tensor]:
    """Run the block over all chunks, summing each Linear's squared inputs per input feature."""
    sums = {
        name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
        for name, lin in linears.items()
    }

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["input"]
            sums[name] += x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)

        return hook

    handles = [
        lin.register_forward_pre_hook(make_hook(name), with_kwargs=True)
        for name, lin in linears.items()
    ]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _run_block(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace each chunk's hidden states, in place, by the block's output on them."""
    for i, (args, kwargs) in enumerate(inputs):
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        if args:
            inputs[i] = ((hidden, *args[1:]), kwargs)
        else:
            inputs[i] = (args, {**kwargs, "hidden_states": hidden})


def _check_uniform_layers(model: nn.Module) -> None:
    """Block 0's kwargs are reused for every block: refuse models whose layers differ."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise NotImplementedError(
            f"Wanda here reuses block 0's attention inputs for every block, but this model "
            f"mixes layer types {sorted(set(layer_types))} (e.g. sliding-window attention)"
        )


def calibrated_blocks(model: nn.Module, calib_input_ids: torch.Tensor, batch_size: int = 8):
    """Walk the decoder blocks with their calibration inputs, the way Wanda, SparseGPT and
    OWL all do: yields ``(block, {name: Linear}, inputs)`` for each block, and once the caller
    is done with it (pruned it, or only measured it) replaces the inputs by that block's
    outputs, so every block sees what the blocks before it now produce. ``batch_size``
    calibration sequences go through a block at a time; the model is in eval mode meanwhile."""
    if calib_input_ids.dim() != 2 or calib_input_ids.shape[0] == 0:
        raise ValueError(f"calib_input_ids must be [S, T] with S >= 1, got {tuple(calib_input_ids.shape)}")
    _check_uniform_layers(model)
    names = {id(lin): name for name, lin in prunable_linears(model).items()}
    _, blocks = decoder_blocks(model)
    was_training = model.training
    model.eval()
    try:
        inputs = _capture_block_inputs(model, blocks[0], calib_input_ids, batch_size)
        for block in blocks:
            yield block, {names[id(m)]: m for m in block.modules() if id(m) in names}, inputs
            _run_block(block, inputs)
    finally:
        model.train(was_training)


@torch.no_grad()
def wanda_masks(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None,
    calib_input_ids: torch.Tensor,
    pattern: Pattern | None = None,
    batch_size: int = 8,
) -> Masks:
    """Wanda masks (Sun et al. 2023), computed block by block; PRUNES THE MODEL IN PLACE.

    Score |W_ij| * ||X_j||_2 over all calibration tokens, compared within each output row
    (or N:M group). Each block's statistics come from the outputs of the already pruned
    blocks before it, so the masks are applied as they are computed; the returned masks
    reproduce the pruned model exactly (``apply_masks`` with them is a no-op afterwards).
    ``batch_size`` calibration sequences go through a block at a time, to bound memory.
    ``sparsity``: one value for every layer, or {layer name: value} (e.g. OWL's, per block).
    """
    per_layer = resolve_layer_sparsity(sparsity, pattern, prunable_linears(model))
    masks: Masks = {}
    for block, linears, inputs in calibrated_blocks(model, calib_input_ids, batch_size):
        sq_norms = _input_sq_norms(block, linears, inputs)
        for name, lin in linears.items():
            score = wanda_scores(lin.weight, sq_norms[name])
            masks[name] = mask_from_scores(score, per_layer[name], pattern, per_row=True)
            lin.weight.masked_fill_(~masks[name], 0)
    return masks


def resolve_layer_sparsity(
    sparsity: float | Mapping[str, float] | None,
    pattern: Pattern | None,
    names: Mapping[str, Any] | list[str],
) -> dict[str, float]:
    """The sparsity in effect for each named layer, each value checked by ``resolve_sparsity``.

    ``names``: the layer names, or a mapping keyed by them (``prunable_linears``).
    A single value applies to every layer; a mapping (OWL's per-block sparsities, expanded to
    layers) must name exactly these layers: a missing or unknown name is an error rather than
    a silent default, since a typo would otherwise leave a layer dense or unpruned as asked.
    """
    names = list(names)
    if not isinstance(sparsity, Mapping):
        value = resolve_sparsity(sparsity, pattern)
        return dict.fromkeys(names, value)
    missing = [name for name in names if name not in sparsity]
    unknown = sorted(set(sparsity) - set(names))
    if missing or unknown:
        raise ValueError(
            f"per-layer sparsity must name every prunable layer exactly: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unknown {unknown[:3]}"
            f"{'...' if len(unknown) > 3 else ''}"
        )
    return {name: resolve_sparsity(sparsity[name], pattern) for name in names}


# ---------------------------------------------------------------------------------------------
# Dispatch, application, measurement


def _weights(model: nn.Module, masks: Mapping[str, torch.Tensor]):
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        if weight.shape != mask.shape:
            raise ValueError(f"mask for {name} is {tuple(mask.shape)}, weight is {tuple(weight.shape)}")
        yield weight, mask.to(weight.device)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place (exact zeros, even where a weight was inf/nan)."""
    for weight, mask in _weights(model, masks):
        weight.masked_fill_(~mask, 0)
    return model


# ---------------------------------------------------------------------------------------------
# Persistence


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write masks as safetensors (bool as uint8), atomically (``trainers.files``)."""
    tensors = {name: m.detach().to("cpu", torch.uint8).contiguous() for name, m in masks.items()}
    metadata = {"format": "pt", "content": "prune-masks-uint8"}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_masks(path: str | os.PathLike, device: str | torch.device = "cpu") -> Masks:
    """Read masks written by ``save_masks`` (safetensors: no pickle) back as bool tensors."""
    masks = {}
    for name, tensor in load_file(str(path), device=str(device)).items():
        if tensor.dtype not in (torch.uint8, torch.bool):
            raise ValueError(f"{path}: mask {name} has dtype {tensor.dtype}, expected uint8")
        masks[name] = tensor.bool()
    return masks


@torch.no_grad()
def load_layer_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy saved pruned-layer weights (layer name -> weight, as a method that updates the kept
    weights left them) into ``model``'s layers, exactly."""
    for name, tensor in weights.items():
        weight = model.get_submodule(name).weight
        if weight.shape != tensor.shape:
            raise ValueError(f"saved weight of {name} is {tuple(tensor.shape)}, the model's is "
                             f"{tuple(weight.shape)}: prepared for another model?")
        weight.copy_(tensor)
    return model
