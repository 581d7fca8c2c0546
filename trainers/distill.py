"""Recovery by distillation: the pruned model (student) learns from the dense one (teacher).

Two objectives next to plain next-token cross-entropy (CE):

* ``logits``: Hinton et al. 2015 (arXiv:1503.02531) on every next-token prediction,
  ``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)`` with both distributions
  softened at temperature T; the T^2 keeps the soft term's gradients on one scale whatever
  T (at high T they shrink as 1/T^2 otherwise, Hinton et al. section 2).
* ``squarehead``: Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large
  Language Models" (arXiv:2310.06927): per decoder block, the MSE between student and teacher
  hidden states divided by the teacher's mean square, summed over blocks, plus
  ``ce_weight * CE``. The normalisation makes every block count alike whatever the scale of
  its residual stream, which grows with depth.

``make_loss_fn`` turns a spec into the ``loss_fn(model, batch) -> Tensor`` that the step runs
on each micro-batch. The teacher runs under ``torch.no_grad`` in eval mode on the same batch,
sharded like the student under FSDP2 (``trainers.parallel.shard_model``); it is never stepped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from trainers.parallel import local
from trainers.spec import DistillConfig

IGNORE_INDEX = -100  # transformers' label for "no loss here"

LossFn = Callable[[nn.Module, Tensor], Tensor]


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (bf16 log-probabilities and sums of squares lose too much); float64
    stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def shifted_labels(labels: Tensor) -> Tensor:
    """The target of each position, as transformers builds it for ``labels=input_ids``:
    position i predicts token i + 1; the last position has none (``IGNORE_INDEX``)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token CE over the positions with a target, computed as transformers'
    ``ForCausalLMLoss`` does (logits upcast to float32, flattened, ``cross_entropy`` mean), so that it
    equals ``model(input_ids=x, labels=x).loss`` bit for bit."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        _upcast(logits).reshape(-1, vocab),
        shifted_labels(labels).reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def logit_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(CE, KL(teacher || student) at temperature T), both means over the positions CE counts.

    Logits are [batch, seq, vocab]; ``labels`` [batch, seq] are the input ids (or ids with
    ``IGNORE_INDEX`` where no loss is wanted), shifted here as for CE. At least float32
    whatever the logits' dtype."""
    ce = causal_ce(student_logits, labels)
    counted = shifted_labels(labels) != IGNORE_INDEX
    log_p_s = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_t = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    # sum_v p_t (log p_t - log p_s), with p_t = 0 handled (kl_div's log_target form).
    kl_tok = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    kl = kl_tok[counted].sum() / counted.sum()
    return ce, kl


def _mix(ce: Tensor, kl: Tensor, alpha: float, temperature: float) -> Tensor:
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def logits_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` at temperature T (see
    ``logit_terms``). Both terms are per-token means over the same tokens, so ``alpha`` is
    the share of each; alpha = 1 is CE exactly (the KL term enters times 0)."""
    ce, kl = logit_terms(student_logits, teacher_logits, labels, temperature)
    return _mix(ce, kl, alpha, temperature)


def squarehead_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]) -> Tensor:
    """SquareHead: sum over blocks of MSE(student, teacher) / MSE(teacher, 0).

    Each element is one block's hidden states [batch, seq, hidden]. The ratio is formed per
    sequence (squares summed over its tokens and features) and averaged over the batch; the
    reference implementation (llm-compressor's ``square_head`` comparison) pools the
    denominator over the whole micro-batch instead. Per sequence keeps the loss a mean over
    sequences, so gradient accumulation and FSDP's average over ranks give the same gradient
    whatever the split of the global batch, as CE does, while each ratio still pools a
    whole sequence's tokens (hundreds) rather than weighing tokens one by one. Every
    position counts: training blocks are packed text without padding. At least float32 sums."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"{len(student_hidden)} student hidden states vs {len(teacher_hidden)} teacher ones"
        )
    total = None
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        s, t = _upcast(s), _upcast(t)
        err = (s - t).square().flatten(1).sum(1)
        ref = t.square().flatten(1).sum(1)
        term = (err / ref).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no hidden states to compare")
    return total


def block_outputs(hidden_states: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """From ``output_hidden_states=True``'s tuple (embeddings, then one state per block) keep
    the L block outputs: blocks 0..L-2 as they leave the block (the residual stream) and the
    last block's output after the final norm, since transformers returns that as the last
    state. This is the set Neural Magic distilled with SquareHead for Sparse-Llama-3.1-8B-2of4
    (targets ``model.layers.0`` .. ``model.layers.30`` and ``model``, the normed output).
    The embeddings are left out: they are not pruned and have no block to correct."""
    return tuple(hidden_states[1:])


def ce_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Today's objective: mean next-token CE, as ``train_step`` computes it."""
    return model(input_ids=batch, labels=batch).loss


def _teacher_forward(teacher: nn.Module, batch: Tensor, **kwargs) -> object:
    if teacher.training:
        teacher.eval()
    with torch.no_grad():
        out = teacher(input_ids=batch, use_cache=False, **kwargs)
    # FSDP2 leaves the root's parameters (embeddings, final norm, lm_head) gathered after
    # forward, expecting a backward that never comes for the teacher: free them now.
    if isinstance(teacher, FSDPModule):
        teacher.reshard()
    return out


def distill_loss(
    student: nn.Module, teacher: nn.Module | None, batch: Tensor, spec: DistillConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch (``batch``: token ids [n, seq], labels = inputs) and its parts
    (detached scalars: "ce" always, "kl" or "squarehead" with a teacher).

    kind "none" is ``model(input_ids=batch, labels=batch).loss`` itself, teacher unused. The
    teacher runs first, without autograd, so only its outputs stay in memory while the
    student's graph is built; it computes the logits only where they are used (for
    squarehead, those of the last position, the cheapest ``logits_to_keep``)."""
    if spec.kind == "none":
        loss = ce_loss(student, batch)
        return loss, {"ce": loss.detach()}
    if teacher is None:
        raise ValueError(f"distillation kind {spec.kind!r} needs a teacher")
    if spec.kind == "logits":
        t_logits = _teacher_forward(teacher, batch).logits
        s_logits = student(input_ids=batch, use_cache=False).logits
        ce, kl = logit_terms(s_logits, t_logits, batch, spec.temperature)
        loss = _mix(ce, kl, spec.alpha, spec.temperature)
        return loss, {"ce": ce.detach(), "kl": kl.detach()}
    t_hidden = block_outputs(
        _teacher_forward(teacher, batch, output_hidden_states=True, logits_to_keep=1).hidden_states
    )
    out = student(input_ids=batch, labels=batch, output_hidden_states=True, use_cache=False)
    sq = squarehead_loss(block_outputs(out.hidden_states), t_hidden)
    loss = spec.ce_weight * out.loss + sq
    return loss, {"ce": out.loss.detach(), "squarehead": sq.detach()}


class DistillLossFn:
    """``loss_fn(model, batch) -> Tensor`` for ``train_step`` with a teacher.

    Also keeps each call's parts, weighted by its sequences, so that ``pop_parts`` gives the
    mean over the step's micro-batches just as ``train_step``'s loss is (floats are taken
    only there, one device sync per step rather than per micro-batch)."""

    def __init__(self, teacher: nn.Module, spec: DistillConfig) -> None:
        if spec.kind == "none":
            raise ValueError("kind 'none' has no teacher: use ce_loss")
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.spec = spec
        self._sums: dict[str, Tensor] = {}
        self._rows = 0

    def __call__(self, model: nn.Module, batch: Tensor) -> Tensor:
        loss, parts = distill_loss(model, self.teacher, batch, self.spec)
        n = batch.shape[0]
        for k, v in parts.items():
            self._sums[k] = self._sums[k] + v * n if k in self._sums else v * n
        self._rows += n
        return loss

    def pop_parts(self) -> dict[str, float]:
        """Mean of each part over the sequences seen since the last call, then reset."""
        out = {k: float(v) / self._rows for k, v in self._sums.items()}
        self._sums, self._rows = {}, 0
        return out


def make_loss_fn(teacher: nn.Module | None, spec: DistillConfig) -> LossFn:
    """The per-micro-batch objective ``train_step`` should run: ``ce_loss`` for kind "none"
    (the teacher may be None and is ignored), else a ``DistillLossFn``, which puts the
    teacher in eval mode and freezes its parameters."""
    if spec.kind == "none":
        return ce_loss
    if teacher is None:
        raise ValueError(f"distillation kind {spec.kind!r} needs a teacher")
    return DistillLossFn(teacher, spec)


def teacher_memory_mb(teacher: nn.Module) -> float:
    """MiB held by the teacher's parameters on this rank: the local shards under FSDP2 (the
    extra cost of distillation in persistent memory; gathered blocks are transient)."""
    total = sum(local(p).numel() * local(p).element_size() for p in teacher.parameters())
    return total / 2**20
