"""SparseGPT: the column sweep against a straightforward OBS computation (explicit inverses,
eager updates), exact counts and N:M groups on tiny models, Hessians against independently
captured inputs, and the point of it all: a lower reconstruction error than Wanda and
magnitude at the same sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from trainers.prune import (
    _capture_block_inputs,
    apply_masks,
    decoder_blocks,
    magnitude_masks,
    prunable_linears,
    pruned_count,
    wanda_masks,
)
from trainers.sparsegpt import _block_hessians, sparsegpt_masks, sparsegpt_prune

VOCAB = 300


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16,
    )
    return OPTForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "opt": tiny_opt}


def calib_ids(n: int = 8, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# One layer, against a straightforward computation


def obs_reference(
    w: torch.Tensor,
    h: torch.Tensor,
    blocksize: int,
    block_counts: list[int] | None = None,
    pattern: tuple[int, int] | None = None,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT from the OBS formulas, no Cholesky and no lazy batching.

    Columns in order; when column j is fixed to q_j, the still free columns F = j..n-1 move
    by -(w_j - q_j) / [H_F^-1]_00 * [H_F^-1]_0,: (H_F: H restricted to F), applied at once to
    the whole row. Saliency of column j: w_j^2 / [H_F^-1]_00. Unstructured: the block's mask
    from the weights at the block's start; N:M: each group's mask at its first column.
    """
    w, h = w.clone(), h.clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    inv_rest = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]

    def saliency(cs: range) -> torch.Tensor:
        s = torch.stack([w[:, c] ** 2 / inv_rest[c][0, 0] for c in cs], dim=1)
        return s.masked_fill(dead[list(cs)].expand_as(s), float("-inf"))

    keep = torch.ones(rows, cols, dtype=torch.bool)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        if pattern is None:
            s = saliency(range(i1, i2))
            block_keep = torch.ones(s.numel(), dtype=torch.bool)
            block_keep[torch.sort(s.flatten(), stable=True).indices[: block_counts[b]]] = False
            keep[:, i1:i2] = block_keep.view(rows, i2 - i1)
        for j in range(i1, i2):
            if pattern is not None and j % pattern[1] == 0:
                n, m = pattern
                s = saliency(range(j, j + m))
                group = torch.ones(rows, m, dtype=torch.bool)
                group.scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, : m - n], False)
                keep[:, j : j + m] = group
            q = torch.where(keep[:, j], w[:, j], torch.zeros_like(w[:, j]))
            hinv = inv_rest[j]
            w[:, j:] -= ((w[:, j] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
            w[:, j] = q
    return w, keep


def small_problem(rows: int = 6, cols: int = 12, tokens: int = 40, dead: tuple[int, ...] = ()):
    """float64 weight and a Hessian of correlated inputs (mixed features), some inputs dead."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    f64 = torch.float64
    mix = torch.eye(cols, dtype=f64) + 0.5 * torch.randn(cols, cols, generator=gen, dtype=f64)
    x = torch.randn(tokens, cols, generator=gen, dtype=f64) @ mix
    x[:, list(dead)] = 0
    return w, 2 / tokens * x.T @ x


@pytest.mark.parametrize(
    "sparsity, counts",
    [(0.5, [15, 15, 6]), (0.3, [9, 9, 4])],  # 0.3: 22 of 72, by cumulative share 9.17 / 18.33 / 22
)
def test_column_sweep_equals_obs_reference(sparsity: float, counts: list[int]):
    w, h = small_problem()
    pruned, keep = sparsegpt_prune(w, h, sparsity, blocksize=5)  # blocks of 5, 5, 2 columns
    ref_w, ref_keep = obs_reference(w, h, blocksize=5, block_counts=counts)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(pruned, ref_w)
    assert [int((~keep[:, i : i + 5]).sum()) for i in (0, 5, 10)] == counts
    assert sum(counts) == pruned_count(w.numel(), sparsity)
    assert torch.equal(pruned == 0, ~keep)
    assert not torch.equal(pruned[keep], w[keep])  # the kept weights were updated, not just masked


def test_column_sweep_nm_equals_obs_reference():
    w, h = small_problem(cols=16)
    pruned, keep = sparsegpt_prune(w, h, None, pattern=(2, 4), blocksize=8)
    ref_w, ref_keep = obs_reference(w, h, blocksize=8, pattern=(2, 4))
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(pruned, ref_w)
    assert bool(((~keep).view(6, 4, 4).sum(-1) == 2).all())
    with pytest.raises(ValueError, match="divisible by 4"):
        sparsegpt_prune(w, h, None, pattern=(2, 4), blocksize=6)


def test_dead_inputs_are_pruned_first():
    """Columns 3 and 7 never see a nonzero input: their 12 weights go first, for free."""
    w, h = small_problem(dead=(3, 7))
    pruned, keep = sparsegpt_prune(w, h, 0.5, blocksize=5)
    # blocks of 5/5/2 columns hold 6+24 / 6+24 / 0+12 dead+live weights; the 36 - 12 = 24
    # live ones are shared by cumulative live count: round(24*24/60)=10, round(24*48/60)=19
    ref_w, ref_keep = obs_reference(w, h, blocksize=5, block_counts=[6 + 10, 6 + 9, 5])
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(pruned, ref_w)
    assert not keep[:, [3, 7]].any() and int((~keep).sum()) == 36

    # fewer to prune (7) than dead weights (12): exactly 7, the first dead ones, nothing moves
    pruned, keep = sparsegpt_prune(w, h, 0.1, blocksize=5)
    assert int((~keep).sum()) == 7 == pruned_count(72, 0.1)
    assert not keep[:, 3].any() and not keep[0, 7] and keep[1:, 7].all()
    live = [c for c in range(12) if c not in (3, 7)]
    assert torch.equal(pruned[:, live], w[:, live])
    assert torch.equal(pruned[1:, 7], w[1:, 7])


# ---------------------------------------------------------------------------------------------
# A model


def captured_inputs(
    model: nn.Module, ids: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """Each named Linear's inputs [tokens, in] in one plain forward of the whole model."""
    got: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda _m, args: got.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))

    handles = [model.get_submodule(name).register_forward_pre_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return got


def test_block_hessians_equal_independent_inputs_and_are_shared():
    model, ids = tiny_llama(dtype=torch.float64), calib_ids()
    prefix, blocks = decoder_blocks(model)
    linears = {n: m for n, m in prunable_linears(model).items() if n.startswith(f"{prefix}.0.")}
    inputs = _capture_block_inputs(model, blocks[0], ids, batch_size=3)  # 3 chunks: 3 + 3 + 2
    with torch.no_grad():
        hessians, owner = _block_hessians(blocks[0], linears, inputs)
    shared = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
    full = {k: f"{prefix}.0.{'mlp' if k in ('gate', 'up', 'down') else 'self_attn'}.{k}_proj"
            for k in shared}
    assert owner == {full[k]: full[v] for k, v in shared.items()}
    xs = captured_inputs(model, ids, list(linears))
    for name in linears:
        x = xs[name]
        torch.testing.assert_close(hessians[owner[name]], 2 / x.shape[0] * x.T @ x)


def reconstruction_errors(
    dense: nn.Module, pruned: nn.Module, ids: torch.Tensor
) -> dict[str, float]:
    """||X (W - W')^T||^2 per layer, X: the layer's inputs when the blocks before it are the
    pruned ones and its own block is dense, i.e. what the pruning method calibrated on."""
    prefix, blocks = decoder_blocks(dense)
    errors = {}
    for b in range(len(blocks)):
        hybrid = copy.deepcopy(pruned)
        decoder_blocks(hybrid)[1][b].load_state_dict(blocks[b].state_dict())
        names = [n for n in prunable_linears(dense) if n.startswith(f"{prefix}.{b}.")]
        for name, x in captured_inputs(hybrid, ids, names).items():
            delta = dense.get_submodule(name).weight - pruned.get_submodule(name).weight
            errors[name] = float((x @ delta.detach().T).pow(2).sum())
    return errors


def wider_llama(correlated: bool) -> LlamaForCausalLM:
    """hidden 64 / mlp 128, so a layer's last columns (which SparseGPT cannot compensate) are
    not a third of it. ``correlated``: embeddings of rank 16 plus a little noise, so the
    block inputs are correlated as in trained LMs, the case SparseGPT's updates are made for;
    otherwise random init, near-isotropic inputs, where there is little to compensate."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    if correlated:
        gen, emb = torch.Generator().manual_seed(5), model.get_input_embeddings().weight
        low_rank = torch.randn(VOCAB, 16, generator=gen) @ torch.randn(16, 64, generator=gen)
        with torch.no_grad():
            emb.copy_(0.005 * low_rank + 0.002 * torch.randn(VOCAB, 64, generator=gen))
    return model


@pytest.mark.parametrize("correlated", [False, True], ids=["isotropic", "correlated"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_lower_reconstruction_error_than_wanda_and_magnitude(sparsity: float, correlated: bool):
    dense, ids = wider_llama(correlated), calib_ids(16, 32)
    models = {name: copy.deepcopy(dense) for name in ("sparsegpt", "wanda", "magnitude")}
    sparsegpt_masks(models["sparsegpt"], sparsity, ids)
    wanda_masks(models["wanda"], sparsity, ids)
    apply_masks(models["magnitude"], magnitude_masks(models["magnitude"], sparsity))
    errors = {name: reconstruction_errors(dense, m, ids) for name, m in models.items()}
    for layer in prunable_linears(dense):
        s, w, m = (errors[k][layer] for k in ("sparsegpt", "wanda", "magnitude"))
        assert s < w and s < m, (layer, s, w, m)
    totals = {k: sum(v.values()) for k, v in errors.items()}
    if correlated:
        assert totals["sparsegpt"] < 0.9 * min(totals["wanda"], totals["magnitude"]), totals


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.123])
def test_exact_sparsity_zeros_and_masks(arch: str, sparsity: float):
    model = MODELS[arch]()
    dense = copy.deepcopy(model)
    masks = sparsegpt_masks(model, sparsity, calib_ids(), blocksize=24, batch_size=3)
    assert list(masks) == list(prunable_linears(model))
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int((~mask).sum()) == pruned_count(mask.numel(), sparsity), name
        assert torch.equal(weight == 0, ~mask), name  # pruned: exact zeros; kept: nonzero
    after = {k: v.clone() for k, v in model.state_dict().items()}
    apply_masks(model, masks)  # the masks reproduce the pruned model
    for key, value in model.state_dict().items():
        assert torch.equal(value, after[key]), key
    pruned = {f"{name}.weight" for name in masks}
    for key, value in dense.state_dict().items():  # embeddings, norms, lm_head, biases untouched
        if key not in pruned:
            assert torch.equal(value, after[key]), key


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4)])
def test_nm_groups_on_a_model(pattern: tuple[int, int]):
    model = tiny_llama()
    masks = sparsegpt_masks(model, None, calib_ids(), pattern=pattern, blocksize=16)
    n, m = pattern
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert bool(((~mask).reshape(mask.shape[0], -1, m).sum(-1) == m - n).all()), name
        assert torch.equal(weight == 0, ~mask), name
    with pytest.raises(ValueError, match="contradicts"):
        sparsegpt_masks(tiny_llama(), 0.7, calib_ids(), pattern=(2, 4))


def test_per_layer_sparsity_mapping():
    model = tiny_llama()
    names = list(prunable_linears(model))
    per_layer = {name: [0.2, 0.5, 0.75][i % 3] for i, name in enumerate(names)}
    masks = sparsegpt_masks(model, per_layer, calib_ids())
    for name in names:
        assert int((~masks[name]).sum()) == pruned_count(masks[name].numel(), per_layer[name])
    with pytest.raises(ValueError, match="missing"):
        sparsegpt_masks(tiny_llama(), dict(list(per_layer.items())[1:]), calib_ids())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_like_on_cpu():
    cpu = tiny_llama()
    gpu = copy.deepcopy(cpu).cuda()
    ids = calib_ids()
    cpu_masks = sparsegpt_masks(cpu, 0.5, ids, blocksize=16)
    gpu_masks = sparsegpt_masks(gpu, 0.5, ids, blocksize=16)
    agree = []
    for name, mask in gpu_masks.items():
        weight = gpu.get_submodule(name).weight
        assert mask.device.type == "cuda" and weight.device.type == "cuda"
        assert int((~mask).sum()) == pruned_count(mask.numel(), 0.5)
        assert torch.equal(weight == 0, ~mask)
        agree.append(float((mask.cpu() == cpu_masks[name]).float().mean()))
    assert min(agree) > 0.95, agree  # same algorithm; only float rounding may flip a few
