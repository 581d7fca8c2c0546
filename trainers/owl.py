"""OWL, Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024; reference: luuyin/OWL).

Blocks whose Wanda scores have more outliers are pruned less, the others more, at the same
mean sparsity. Three steps, kept apart so that any criterion can use the result:

    ratios = outlier_ratios(model, calib_input_ids, M=5.0)       # dense model, no change
    block_sparsity = owl_sparsities(ratios, target=0.7, lam=0.08)
    masks = wanda_masks(model, layer_sparsities(model, block_sparsity), calib_input_ids)

(``magnitude_masks`` and ``sparsegpt_masks`` take the same mapping.) Unstructured only: an
N:M pattern fixes every layer's sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from trainers.prune import (
    _input_sq_norms,
    calibrated_blocks,
    decoder_blocks,
    prunable_linears,
    wanda_scores,
)


@torch.no_grad()
def outlier_ratios(
    model: nn.Module, calib_input_ids: torch.Tensor, M: float = 5.0, batch_size: int = 8
) -> list[float]:
    """Per decoder block, the fraction of its weights whose Wanda score is an outlier.

    Scores |W_ij| * ||X_j||_2 of all the block's Linears together; an outlier is a score
    strictly above ``M`` times their mean (the reference's ``check_outlier_mean``, which
    reports a percentage; here a fraction, which ``owl_sparsities`` treats the same since it
    rescales the ratios). As in the reference, every block's inputs are the outputs of the
    dense blocks before it: the model is not modified. The reference's running mean of the
    squared inputs and the sum used here differ by one factor for the whole block, which
    cancels in score / mean.
    """
    ratios = []
    for block, linears, inputs in calibrated_blocks(model, calib_input_ids, batch_size):
        sq_norms = _input_sq_norms(block, linears, inputs)
        total, count = 0.0, 0
        for name, lin in linears.items():  # one layer's scores at a time, never the block's
            total += wanda_scores(lin.weight, sq_norms[name]).sum(dtype=torch.float64).item()
            count += lin.weight.numel()
        threshold = M * total / count
        outliers = sum(
            int((wanda_scores(lin.weight, sq_norms[name]) > threshold).sum())
            for name, lin in linears.items()
        )
        ratios.append(outliers / count)
    return ratios


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: the reference's formula, with its bounds.

    The reference (``prune_wanda_outlier``) maps the ratios linearly onto [0, 2 * lam], a
    density bonus, then shifts them so that their mean is 0 and the density mean is
    1 - target. In sparsity: s_i = target - (v_i - mean(v)), v_i = 2 lam (r_i - min r) /
    (max r - min r). What holds, for L blocks with ratios not all equal:

    - mean(s) = target (up to float rounding);
    - more outliers -> lower sparsity (strictly; equal ratios, equal sparsity);
    - max(s) - min(s) = 2 * lam exactly;
    - every s_i lies in [target - 2 lam (L-1)/L, target + 2 lam (L-1)/L].

    The paper's S_i in [target - lam, target + lam] does NOT hold in general (the reference
    code does not enforce it): it does for L = 2, and whenever the v_i average lam, but e.g.
    ratios (0, 0, 1) give target + 2lam/3 twice and target - 4lam/3. The reference's formula
    is kept as it is, since it produced the published results; squeezing the spread into
    [target - lam, target + lam] would change those results.

    Equal ratios (where the reference divides by zero) and lam = 0 give ``target`` for
    every block. A sparsity outside [0, 1] is a ValueError: the reference replaces one <= 0
    by 0.01, which changes the mean; choose a smaller lam instead.
    """
    ratios = [float(r) for r in ratios]
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"need one finite outlier ratio per block, got {ratios!r}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sparsity must be in [0, 1], got {target!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    low, high = min(ratios), max(ratios)
    if lam == 0 or high == low:
        return [float(target)] * len(ratios)
    bonus = [(r - low) / (high - low) * 2 * lam for r in ratios]
    mean = math.fsum(bonus) / len(bonus)
    sparsities = [target - (b - mean) for b in bonus]
    if min(sparsities) < 0 or max(sparsities) > 1:
        raise ValueError(
            f"OWL sparsities {min(sparsities):.4f}..{max(sparsities):.4f} leave [0, 1] "
            f"(target {target}, lam {lam}); use a smaller lam"
        )
    return sparsities


def layer_sparsities(model: nn.Module, block_sparsities: Sequence[float]) -> dict[str, float]:
    """{layer name: sparsity} for every prunable Linear, from one value per decoder block."""
    linears = prunable_linears(model)
    prefix, blocks = decoder_blocks(model)
    if len(block_sparsities) != len(blocks):
        raise ValueError(
            f"{len(block_sparsities)} sparsities for {len(blocks)} decoder blocks of {prefix!r}"
        )
    names = {id(lin): name for name, lin in linears.items()}
    per_layer = {
        names[id(m)]: float(s)
        for block, s in zip(blocks, block_sparsities, strict=True)
        for m in block.modules()
        if id(m) in names
    }
    return {name: per_layer[name] for name in linears}
