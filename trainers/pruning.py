"""One pruning recipe -> a pruned model and its masks: the one path the sweep's preparation and
``sweep prune`` share.

A recipe is (method, target sparsity or N:M pattern, layer-wise rule) with the methods'
settings. The layer-wise rule decides each block's sparsity (``uniform``: the target everywhere;
``owl``: from the dense model's outlier ratios, trainers/owl.py); the method then chooses each
layer's mask at that sparsity (trainers/prune.py: magnitude, Wanda; trainers/sparsegpt.py), and
SparseGPT also updates the kept weights. The model is pruned in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from trainers.data import pack_blocks
from trainers.owl import layer_sparsities, outlier_ratios, owl_sparsities
from trainers.prune import Masks, apply_masks, magnitude_masks, resolve_sparsity, wanda_masks
from trainers.sparsegpt import sparsegpt_masks
from trainers.spec import OWLConfig, SparseGPTConfig, parse_pattern

METHODS = ("magnitude", "wanda", "sparsegpt")
# Methods that measure activations on calibration data (and OWL, whatever the method).
NEEDS_CALIBRATION = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class Recipe:
    method: str
    sparsity: float | None  # the target (mean over layers); None with an N:M pattern
    pattern: str | None = None
    layerwise: str = "uniform"
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    owl: OWLConfig = field(default_factory=OWLConfig)

    @property
    def needs_calibration(self) -> bool:
        return self.method in NEEDS_CALIBRATION or self.layerwise == "owl"

    @property
    def changes_weights(self) -> bool:
        """The kept weights differ from the dense model's (they must be saved, not re-masked)."""
        return self.method == "sparsegpt"


def calibration_ids(tokens: torch.Tensor, seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """``samples`` sequences of ``seq_len`` tokens: the text's blocks drawn without replacement
    by a seeded permutation (all of them when there are fewer)."""
    blocks = pack_blocks(tokens, seq_len)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(blocks.shape[0], generator=g)[: min(samples, blocks.shape[0])]
    return blocks[idx]


@torch.no_grad()
def prune_model(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor | None = None,
                batch_size: int = 8) -> tuple[Masks, dict]:
    """Prune ``model`` in place by ``recipe``. Returns the keep-masks by layer name and a record
    of what was done (the per-block sparsities under OWL, seconds), for the trial's log."""
    if recipe.method not in METHODS:
        raise ValueError(f"unknown pruning method {recipe.method!r}; expected one of {', '.join(METHODS)}")
    if recipe.needs_calibration and calib_ids is None:
        raise ValueError(f"{recipe.method}/{recipe.layerwise} needs calibration token ids ([S, T])")
    t0 = time.perf_counter()
    pattern = parse_pattern(recipe.pattern)
    target = resolve_sparsity(None if pattern else recipe.sparsity, pattern)
    record: dict = {"method": recipe.method, "pattern": recipe.pattern,
                    "layerwise": recipe.layerwise, "sparsity": target}
    sparsity: float | dict[str, float] | None = None if pattern else target
    if recipe.layerwise == "owl":
        if pattern:
            raise ValueError("OWL spreads an unstructured sparsity; an N:M pattern fixes it")
        ratios = outlier_ratios(model, calib_ids, recipe.owl.m, batch_size)
        blocks = owl_sparsities(ratios, target, recipe.owl.lam)
        sparsity = layer_sparsities(model, blocks)
        record.update(outlier_ratios=ratios, block_sparsities=blocks)
    if recipe.method == "magnitude":
        masks = magnitude_masks(model, sparsity, pattern)
    elif recipe.method == "wanda":
        masks = wanda_masks(model, sparsity, calib_ids, pattern, batch_size=batch_size)
    else:
        masks = sparsegpt_masks(model, sparsity, calib_ids, pattern, blocksize=recipe.sparsegpt.blocksize,
                                percdamp=recipe.sparsegpt.percdamp, batch_size=batch_size)
    apply_masks(model, masks)
    record["seconds"] = time.perf_counter() - t0
    return masks, record
