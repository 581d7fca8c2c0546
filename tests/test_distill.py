"""Distillation losses and the teacher step: exact reductions to CE, zeros when the student is
the teacher, gradients against closed forms, masks under real steps, FSDP2 against one process.

The closed forms, written out independently of trainers.distill:
  logits, per counted position i with target y_i, N counted positions, p = softmax:
    d/ds_i [alpha CE + (1-alpha) T^2 KL] = alpha (p(s_i) - onehot(y_i)) / N
                                         + (1-alpha) T (p(s_i / T) - p(t_i / T)) / N
  SquareHead, per block and sequence b of B, with r_b = sum(t_b^2):
    d/ds_b = 2 (s_b - t_b) / (B r_b)
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.data import micro_batches, worker_batch
from trainers.distill import (
    DistillLossFn,
    causal_ce,
    ce_loss,
    distill_loss,
    logits_loss,
    make_loss_fn,
    squarehead_loss,
    teacher_memory_mb,
)
from trainers.parallel import shard_masks, shard_model
from trainers.spec import DistillConfig
from trainers.step import train_step

VOCAB, SEQ, N_BLOCKS, BATCH, LR = 97, 16, 12, 4, 1e-2


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def magnitude_masks_ref(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the smallest |W| of each Linear in the blocks (independent of trainers.prune)."""
    masks = {}
    for name, mod in model.named_modules():
        if ".layers." in name and isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach().abs().flatten()
            keep = torch.ones_like(w, dtype=torch.bool)
            keep[torch.argsort(w, stable=True)[: int(round(sparsity * w.numel()))]] = False
            masks[name] = keep.view_as(mod.weight)
    return masks


def pruned_student(masks) -> LlamaForCausalLM:
    model = tiny_model()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name in masks:
                mod.weight.mul_(masks[name])
    return model


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (N_BLOCKS, SEQ), generator=g)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- the spec --------------------------------------------------------------------------------


def test_none_needs_no_teacher_and_is_todays_loss():
    model, batch = tiny_model(), data()[:3]
    assert make_loss_fn(None, DistillConfig()) is ce_loss
    loss, parts = distill_loss(model, None, batch, DistillConfig())
    assert torch.equal(loss, tiny_model()(input_ids=batch, labels=batch).loss)
    assert torch.equal(parts["ce"], loss.detach())
    with pytest.raises(ValueError):
        make_loss_fn(None, DistillConfig(kind="logits"))


# -- logits ----------------------------------------------------------------------------------


def test_causal_ce_is_transformers_loss_including_ignored_labels():
    model, batch = tiny_model(), data()[:3]
    labels = batch.clone()
    labels[0, 5:9] = -100
    labels[2, -1] = -100
    out = model(input_ids=batch, labels=labels)
    assert torch.equal(causal_ce(out.logits, labels), out.loss)


def test_alpha_one_is_ce_exactly_with_the_same_gradients():
    batch = data()[:3]
    ref, student, teacher = tiny_model(), tiny_model(), tiny_model(seed=5)
    ref(input_ids=batch, labels=batch).loss.backward()
    loss, parts = distill_loss(student, teacher, batch, DistillConfig("logits", alpha=1.0))
    loss.backward()
    assert torch.equal(loss.detach(), ref(input_ids=batch, labels=batch).loss.detach())
    assert parts["kl"] > 0  # a different teacher: the KL is there, weighted 0
    want, got = grads(ref), grads(student)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert all(p.grad is None for p in teacher.parameters())


def test_kl_is_zero_with_zero_gradient_when_student_is_teacher():
    batch = data()[:3]
    student = tiny_model()
    teacher = copy.deepcopy(student)
    loss, parts = distill_loss(student, teacher, batch, DistillConfig("logits", alpha=0.0))
    assert loss.item() == 0.0 and parts["kl"].item() == 0.0
    loss.backward()
    for name, g in grads(student).items():
        torch.testing.assert_close(g, torch.zeros_like(g), msg=name)
    # With CE in the mix the gradient is CE's alone, times alpha.
    student.zero_grad()
    ref = tiny_model()
    (0.3 * ref(input_ids=batch, labels=batch).loss).backward()
    loss, _ = distill_loss(student, teacher, batch, DistillConfig("logits", alpha=0.3))
    loss.backward()
    want = grads(ref)
    for name, g in grads(student).items():
        torch.testing.assert_close(g, want[name], msg=name)


def test_logits_loss_value_and_gradient_match_closed_form():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 2] = -100
    alpha, T = 0.3, 2.5
    loss = logits_loss(s, t, labels, alpha, T)
    loss.backward()

    # Explicit sums over counted (position -> next-token target) pairs.
    pairs = [(b, i, int(labels[b, i + 1])) for b in range(2) for i in range(4)
             if labels[b, i + 1] != -100]
    n = len(pairs)
    ce = kl = 0.0
    grad = torch.zeros_like(s)
    for b, i, y in pairs:
        ls = s[b, i].detach()
        ce = ce - torch.log_softmax(ls, -1)[y] / n
        ps_t, pt_t = torch.softmax(ls / T, -1), torch.softmax(t[b, i] / T, -1)
        kl = kl + (pt_t * (pt_t.log() - ps_t.log())).sum() / n
        grad[b, i] = alpha * (torch.softmax(ls, -1) - F.one_hot(torch.tensor(y), 7)) / n
        grad[b, i] += (1 - alpha) * T * (ps_t - pt_t) / n
    torch.testing.assert_close(loss.detach(), alpha * ce + (1 - alpha) * T**2 * kl)
    torch.testing.assert_close(s.grad, grad)
    assert torch.autograd.gradcheck(
        lambda x: logits_loss(x, t, labels, alpha, T), (s.detach().requires_grad_(),)
    )


# -- SquareHead ------------------------------------------------------------------------------


def test_squarehead_value_and_gradient_match_closed_form():
    g = torch.Generator().manual_seed(4)
    shape = (3, 4, 5)  # sequences, tokens, features
    s = [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
         for _ in range(2)]
    t = [torch.randn(shape, generator=g, dtype=torch.float64) * (k + 1) for k in range(2)]
    loss = squarehead_loss(s, t)
    loss.backward()
    want = 0.0
    for sk, tk in zip(s, t, strict=True):
        for b in range(shape[0]):
            mse = ((sk[b].detach() - tk[b]) ** 2).mean()  # MSE(student, teacher)
            want = want + mse / (tk[b] ** 2).mean() / shape[0]  # / MSE(teacher, 0)
            r = (tk[b] ** 2).sum()
            torch.testing.assert_close(sk.grad[b], 2 * (sk[b].detach() - tk[b]) / (shape[0] * r))
    torch.testing.assert_close(loss.detach(), want)
    assert torch.autograd.gradcheck(
        lambda a, b: squarehead_loss([a, b], t), tuple(x.detach().requires_grad_() for x in s)
    )


def test_squarehead_is_a_mean_over_sequences_so_any_split_gives_the_same_loss():
    g = torch.Generator().manual_seed(5)
    s = [torch.randn(4, 6, 8, generator=g) for _ in range(3)]
    t = [torch.randn(4, 6, 8, generator=g) for _ in range(3)]
    whole = squarehead_loss(s, t)
    split = (3 * squarehead_loss([x[:3] for x in s], [x[:3] for x in t])
             + squarehead_loss([x[3:] for x in s], [x[3:] for x in t])) / 4
    torch.testing.assert_close(whole, split)


def test_squarehead_is_ce_exactly_when_student_is_teacher():
    batch = data()[:3]
    student, ref = tiny_model(), tiny_model()
    teacher = copy.deepcopy(student)
    loss, parts = distill_loss(student, teacher, batch, DistillConfig("squarehead"))
    assert parts["squarehead"].item() == 0.0
    assert torch.equal(loss.detach(), ref(input_ids=batch, labels=batch).loss.detach())
    loss.backward()
    ref(input_ids=batch, labels=batch).loss.backward()
    want = grads(ref)
    for name, g in grads(student).items():
        assert torch.equal(g, want[name]), name


def test_squarehead_compares_block_outputs_against_hooks():
    """The states compared are each block's output, the last one after the final norm."""
    batch = data()[:2]
    student, teacher = tiny_model(), tiny_model(seed=7)
    seen = {"s": [], "t": []}
    for key, m in (("s", student), ("t", teacher)):
        for block in m.model.layers:
            block.register_forward_hook(
                lambda mod, i, o, key=key: seen[key].append(o[0] if isinstance(o, tuple) else o)
            )
    _, parts = distill_loss(student, teacher, batch, DistillConfig("squarehead"))
    for key, m in (("s", student), ("t", teacher)):
        with torch.no_grad():
            seen[key][-1] = m.model.norm(seen[key][-1])
    torch.testing.assert_close(parts["squarehead"], squarehead_loss(seen["s"], seen["t"]))


# -- the training step -----------------------------------------------------------------------


def test_logits_with_alpha_1_is_todays_ce_step_exactly():
    """Two whole optimizer steps (accumulation, clipping, AdamW with weight decay, masks): the
    logits objective at alpha 1 leaves exactly the weights plain CE leaves."""
    masks = magnitude_masks_ref(tiny_model(), 0.5)
    blocks = data()
    teacher = tiny_model(seed=1)
    out = []
    for loss_fn in (None, make_loss_fn(teacher, DistillConfig("logits", alpha=1.0))):
        model = pruned_student(masks)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        pruned = shard_masks(model, masks)
        for step in range(2):
            idx = worker_batch(step, BATCH, N_BLOCKS, seed=0, rank=0, world_size=1)
            extra = {} if loss_fn is None else {"loss_fn": loss_fn}
            train_step(model, opt, blocks, micro_batches(idx, 2), pruned, LR, 1.0,
                       torch.device("cpu"), **extra)
        out.append(model.state_dict())
    for name, w in out[0].items():
        assert torch.equal(out[1][name], w), name


@pytest.mark.parametrize("kind", ["logits", "squarehead"])
def test_distillation_steps_keep_masks_exact_and_leave_the_teacher_alone(kind):
    masks = magnitude_masks_ref(tiny_model(), 0.5)
    student, teacher = pruned_student(masks), tiny_model()
    before = copy.deepcopy(teacher.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.1)
    pruned = shard_masks(student, masks)
    loss_fn = make_loss_fn(teacher, DistillConfig(kind, alpha=0.5))
    assert isinstance(loss_fn, DistillLossFn) and not teacher.training
    blocks, losses = data(), []
    for step in range(3):
        idx = worker_batch(step, BATCH, N_BLOCKS, seed=0, rank=0, world_size=1)
        losses.append(train_step(student, opt, blocks, micro_batches(idx, 2), pruned, LR,
                                     1.0, torch.device("cpu"), loss_fn=loss_fn))
        parts = loss_fn.pop_parts()
        assert set(parts) == {"ce", "kl" if kind == "logits" else "squarehead"}
        assert all(math.isfinite(v) for v in parts.values())
    assert all(math.isfinite(v) for v in losses)
    modules = dict(student.named_modules())
    for name, mask in masks.items():
        w = modules[name].weight
        assert torch.count_nonzero(w[~mask]) == 0, name
        assert torch.count_nonzero(w[mask]) == mask.sum(), name  # kept weights still train
    for name, w in teacher.state_dict().items():
        assert torch.equal(w, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_pop_parts_is_the_mean_over_the_sequences_of_the_step():
    student, teacher = pruned_student(magnitude_masks_ref(tiny_model(), 0.5)), tiny_model()
    blocks = data()[:5]
    loss_fn = make_loss_fn(teacher, DistillConfig("squarehead"))
    whole_loss, whole = distill_loss(student, teacher, blocks, DistillConfig("squarehead"))
    acc = sum(loss_fn(student, blocks[i]) * len(i) for i in ([0, 1, 2], [3, 4])) / 5
    torch.testing.assert_close(acc, whole_loss)
    parts = loss_fn.pop_parts()
    for k, v in whole.items():
        torch.testing.assert_close(torch.tensor(parts[k]), v, msg=k)
    # Popping resets: the next step's parts are its own.
    loss_fn(student, blocks[[0]])
    want = distill_loss(student, teacher, blocks[[0]], DistillConfig("squarehead"))[1]
    torch.testing.assert_close(torch.tensor(loss_fn.pop_parts()["ce"]), want["ce"])


def test_teacher_memory_counts_parameter_bytes():
    teacher = tiny_model()
    want = sum(p.numel() for p in teacher.parameters()) * 4 / 2**20
    assert teacher_memory_mb(teacher) == want
    assert teacher_memory_mb(teacher.to(torch.bfloat16)) == want / 2


# -- FSDP2 on 2 gloo ranks against one process -----------------------------------------------

KINDS = ("logits", "squarehead")
STEPS, ACCUM = 2, 2


def _run(kind: str, masks, rank: int, world: int) -> dict:
    student, teacher = pruned_student(masks), tiny_model()
    if world > 1:
        shard_model(student, student.model.layers, mixed_precision=False)
        shard_model(teacher, teacher.model.layers, mixed_precision=False)
    pruned = shard_masks(student, masks)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.1)
    loss_fn = make_loss_fn(teacher, DistillConfig(kind, alpha=0.5))
    blocks, losses, parts = data(), [], []
    first_grads = {}
    for step in range(STEPS):
        idx = worker_batch(step, BATCH, N_BLOCKS, seed=0, rank=rank, world_size=world)
        if step == 0:
            loss_fn(student, blocks[idx]).backward()
            first_grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                           .clone() for n, p in student.named_parameters()}
            opt.zero_grad()
            loss_fn.pop_parts()
        losses.append(train_step(student, opt, blocks, micro_batches(idx, ACCUM), pruned,
                                     LR, 1.0, torch.device("cpu"), loss_fn=loss_fn))
        parts.append(loss_fn.pop_parts())
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in student.named_parameters()}
    stats = torch.tensor(
        [losses + [p[k] for p in parts for k in sorted(p)] + [teacher_memory_mb(teacher)]],
        dtype=torch.float64,
    )
    if world > 1:
        dist.all_reduce(stats)
        stats[0, :-1] /= world  # means over ranks; the memory is a sum of shards
    return {"grads": first_grads, "params": full, "stats": stats[0],
            "teacher_sharded": isinstance(teacher.lm_head.weight, DTensor)}


def _worker(rank: int, world: int, store: str, masks, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {kind: _run(kind, masks, rank, world) for kind in KINDS}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in test_fsdp: gloo's threads can abort the interpreter's teardown


def test_fsdp_distillation_matches_single_process(tmp_path):
    masks = magnitude_masks_ref(tiny_model(), 0.5)
    out, store = str(tmp_path / "fsdp.pt"), str(tmp_path / "store")
    mp.spawn(_worker, args=(2, store, masks, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for kind in KINDS:
        ref = _run(kind, masks, rank=0, world=1)
        res = got[kind]
        for name, g in ref["grads"].items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-7,
                                       msg=f"{kind} grad {name}")
        for name, w in ref["params"].items():
            torch.testing.assert_close(res["params"][name], w, rtol=1e-5, atol=1e-6,
                                       msg=f"{kind} param {name}")
        # Losses and parts per step (means over ranks), then the teacher's shards summing up to
        # the whole teacher.
        torch.testing.assert_close(res["stats"], ref["stats"], rtol=1e-5, atol=1e-6, msg=kind)
        for name, mask in masks.items():
            assert torch.count_nonzero(res["params"][name + ".weight"][~mask]) == 0, name
        # The teacher's root (embeddings, lm_head) is resharded after its forward.
        assert res["teacher_sharded"]
