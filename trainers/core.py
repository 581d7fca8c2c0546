"""One rank's part of one trial, with no Ray in sight: build the pruned model, train, evaluate,
measure sparsity, save and restore. ``trainers.loop`` drives it; ``trainers.worker`` adapts it
to Ray Train; tests and ``bench/`` call it directly (one process, or ranks they start).

Everything per-sweep (the materialized model, tokens, evaluation windows, masks, the dense
perplexity) was prepared once before the grid; a trial only reads it (``TrialSpec.prepared``).
So was each recipe's baseline (epoch 0): preparation builds and evaluates the pruned model with
the functions below, as the recipe's trials would, once for all of them (``measure_baseline``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from eval.perplexity import evaluate, nll_sum_sharded, perplexity
from trainers.checkpoint import export_hf, load_training_state, save_training_state
from trainers.data import micro_batches, pack_blocks, worker_batch
from trainers.distill import ce_loss, make_loss_fn
from trainers.model import load_model
from trainers.parallel import (
    all_reduce_sum,
    measured_sparsity,
    one_rank_group,
    shard_masks,
    shard_model,
    sparsity_summary,
)
from trainers.prune import apply_masks, decoder_blocks, load_layer_weights, load_masks
from trainers.sparse_state import (
    AsyncCheckpointer,
    is_sparse_checkpoint,
    load_sparse_state,
    save_sparse_state,
)
from trainers.spec import ModelConfig, Prepared, TrialSpec
from trainers.step import lr_at, train_step


@dataclass
class LoopState:
    """Everything the loop needs to resume exactly (saved as JSON beside the shards)."""

    epoch: int = 0  # evaluations done after epoch 0 (the baseline)
    step: int = 0  # optimizer steps done, over all epochs; also the data position
    epoch_loss_sum: float = 0.0  # loss of the steps of the current, unfinished epoch
    epoch_loss_steps: int = 0
    epoch_train_s: float = 0.0  # training seconds of the current epoch (across restarts)
    baseline: float | None = None
    best: float | None = None
    best_epoch: int | None = None
    sparsity_actual: float | None = None
    history: list = field(default_factory=list)  # [{epoch, perplexity, loss}]
    stopped: str | None = None  # "early_stopped" / "diverged"
    stop_reason: str | None = None
    attempt: int = 0  # the driver attempt that saved this state (trainers/fence.py)


# What an evaluation set's record holds (the ``evals`` table's values, epoch 0 included).
EVAL_KEYS = ("perplexity", "tokens", "windows", "seconds")


def pruned_model(prep: Prepared) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The prepared model with its recipe applied (the pruned weights when the method changed
    them, then the masks), and the masks: what a trial trains and preparation's baseline
    measures, built one way."""
    model = load_model(ModelConfig(name_or_path=prep.model_dir))
    if prep.weights:
        load_layer_weights(model, load_file(prep.weights))
    masks = load_masks(prep.masks)
    apply_masks(model, masks)
    return model, masks


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On the device and wrapped as a trial's ranks wrap it (FSDP2, bf16 compute on a GPU)."""
    if device.type == "cuda":
        model.to(device)
    _, blocks = decoder_blocks(model)
    return shard_model(model, blocks, mixed_precision=device.type == "cuda")


def load_sets(prep: Prepared) -> dict[str, dict]:
    """Every evaluation set's windows by name, the primary first."""
    sets = {prep.primary_set: load_file(prep.eval_windows)}
    sets.update((name, load_file(path)) for name, path in prep.eval_sets
                if name != prep.primary_set)
    return sets


def measure_baseline(prep: Prepared, batch_size: int, world: int, threads: int,
                     device: torch.device) -> dict:
    """Epoch 0 of every trial of ``prep``'s recipe, measured once in one process: the pruned
    model built and wrapped as a trial builds it (on a GPU inside a one-rank process group, so
    with the same FSDP2 bf16 policy), with the trial's torch threads, and each set's windows
    evaluated as a trial of ``world`` ranks evaluates them: each rank's share in the same
    batches, the ranks' float64 sums added as the all-reduce adds them. So a trial that reads
    it reports what it would have measured. Returns the record ``baseline_matches`` checks:
    the conditions and every set's {perplexity, nll, tokens, windows, seconds}."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with one_rank_group(device):
            model = shard(pruned_model(prep)[0], device)
            sets = {name: _evaluate_as_ranks(model, w, batch_size, world)
                    for name, w in load_sets(prep).items()}
            del model  # before its process group goes
    finally:
        torch.set_num_threads(before)
    return {"eval_batch_size": batch_size, "workers": world, "device": device.type,
            "threads": threads, "sets": sets}


def _evaluate_as_ranks(model: torch.nn.Module, windows: dict, batch_size: int,
                       world: int) -> dict:
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for rank in range(world):  # each rank's own totals (no collective), summed in rank order
        r_nll, r_count = nll_sum_sharded(model, windows["input_ids"], windows["labels"], rank,
                                         world, batch_size, all_reduce=lambda totals: None)
        nll, count = nll + r_nll, count + r_count
    return {"perplexity": perplexity(nll, count), "nll": nll, "tokens": count,
            "windows": int(windows["input_ids"].shape[0]), "seconds": time.perf_counter() - t0}


def baseline_matches(record: dict | None, windows: dict[str, int], batch_size: int, world: int,
                     device: torch.device) -> bool:
    """Whether a baseline record was measured for exactly these evaluation sets (name ->
    window count), evaluation batch, number of ranks and kind of device; anything else (a
    resume with more workers, a record of other sets) is measured again."""
    if not record:
        return False
    sets = record.get("sets", {})
    return (record.get("eval_batch_size") == batch_size and record.get("workers") == world
            and record.get("device") == device.type and set(sets) == set(windows)
            and all(sets[name].get("windows") == n for name, n in windows.items()))


def read_baseline(path: str | None) -> dict | None:
    """A baseline record (``Prepared.baseline``), or None when there is none to read."""
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def silence_transformers() -> None:
    """Workers print trial blocks, not transformers' progress bars and advice."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class TrialCore:
    """The model, optimizer, data and loop state of one rank of one trial."""

    def __init__(self, spec: TrialSpec, rank: int = 0, world: int = 1,
                 device: torch.device | None = None):
        self.spec, self.plan = spec, spec.plan
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.st = LoopState()
        self.checkpointer: AsyncCheckpointer | None = None
        self.t_start = time.perf_counter()
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.train.seed + rank)

    def build(self) -> None:
        """Load the prepared model (with the pruned weights when the method changed them),
        apply the masks, shard it, load the data, and for distillation the dense teacher."""
        prep = self.spec.prepared
        model, masks = pruned_model(prep)
        self.names = sorted(masks)
        self.sizes = {n: m.numel() for n, m in masks.items()}
        self.model = self._shard(model)
        self.pruned = shard_masks(self.model, masks)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=self.plan.lr, weight_decay=self.spec.train.weight_decay
        )
        self.blocks = pack_blocks(load_file(prep.train_tokens)["tokens"], self.spec.seq_len)
        # Every evaluation set's windows, the primary first (self.windows).
        self.sets = load_sets(prep)
        self.windows = self.sets[prep.primary_set]
        self.tokenizer = None  # loaded by the first task measurement
        self.recipe = json.loads(Path(prep.recipe).read_text()) if prep.recipe else {}
        self.teacher, self.loss_fn = None, ce_loss
        distill = replace(self.spec.train.distill, kind=self.plan.distill)
        if distill.kind != "none":
            # The dense model, frozen, sharded like the student on the same ranks; no optimizer
            # state and no checkpoint (a resumed trial loads it again from the prepared model).
            self.teacher = self._shard(load_model(ModelConfig(name_or_path=prep.model_dir)))
            self.loss_fn = make_loss_fn(self.teacher, distill)
        self.checkpointer = self._checkpointer()

    def _checkpointer(self) -> AsyncCheckpointer | None:
        """The background writer of sparse checkpoints (``checkpoint.async``), made here on
        every rank: its gloo group is created by all ranks together, at the same point."""
        ck = self.spec.checkpoint
        if not (ck.enabled and ck.format == "sparse" and ck.async_):
            return None
        return AsyncCheckpointer(self.model, self.opt, self.pruned,
                                 background_staging=ck.background_staging)

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard(model, self.device)

    # -- measuring ---------------------------------------------------------------------------
    def evaluate(self, name: str | None = None) -> dict:
        """Perplexity on one evaluation set's windows (None: the primary), sharded across
        ranks; adds ``seconds``."""
        windows = self.windows if name is None else self.sets[name]
        t0 = time.perf_counter()
        out = evaluate(
            self.model, windows["input_ids"], windows["labels"],
            batch_size=self.spec.eval_batch_size, rank=self.rank, world_size=self.world,
            all_reduce=all_reduce_sum if self.world > 1 else None,
            progress=self.spec.progress_bar and self.rank == 0,
        )
        out["seconds"] = time.perf_counter() - t0
        return out

    def evaluate_sets(self, primary: dict) -> dict[str, dict]:
        """Every set's {perplexity, tokens, windows, seconds}: ``primary`` (the primary set's
        evaluation, already done) and each other set, in the order prepared."""
        out = {}
        for name in self.sets:
            ev = primary if name == self.spec.prepared.primary_set else self.evaluate(name)
            out[name] = {k: ev[k] for k in EVAL_KEYS}
        return out

    def shared_baseline(self) -> dict[str, dict] | None:
        """Every set's epoch-0 evaluation as preparation measured it once for this recipe
        (``Prepared.baseline``), in this trial's set order, when it was measured for exactly
        this trial's sets, evaluation batch, ranks and device; None: evaluate here. The ranks
        decide together: evaluating is a collective, one rank alone would wait forever."""
        record = read_baseline(self.spec.prepared.baseline)
        windows = {name: int(w["input_ids"].shape[0]) for name, w in self.sets.items()}
        usable = baseline_matches(record, windows, self.spec.eval_batch_size, self.world,
                                  self.device)
        if self.world > 1:
            votes = torch.tensor([float(usable)], dtype=torch.float64)
            all_reduce_sum(votes)
            usable = int(votes.item()) == self.world
        if not usable:
            return None
        return {name: {k: record["sets"][name][k] for k in EVAL_KEYS} for name in self.sets}

    def measure_tasks(self, model_dir: str | None = None) -> list[dict] | None:
        """Zero-shot task rows of the model as it is now, or of the Hugging Face directory
        ``model_dir`` (the exported best model), loaded and sharded like the student for the
        measurement and dropped after it. A collective: every rank runs the harness on the
        same requests (trainers/zeroshot.py); rank 0 gets the rows, the others None."""
        from trainers.model import load_tokenizer
        from trainers.zeroshot import measure_tasks

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(ModelConfig(name_or_path=self.spec.prepared.model_dir))
        model = self.model if model_dir is None else self._shard(
            load_model(ModelConfig(name_or_path=model_dir)))
        rows = measure_tasks(model, self.tokenizer, self.spec.tasks, self.spec.tasks_cwd)
        return rows if self.rank == 0 else None

    def measure_sparsity(self) -> dict:
        """min / mean / max / overall over the pruned layers, measured on the weights; the
        overall (size-weighted) value is kept as ``sparsity_actual``."""
        summary = sparsity_summary(measured_sparsity(self.model, self.names), self.sizes)
        self.st.sparsity_actual = summary["overall"]
        return summary

    # -- training ----------------------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step at the current data position; returns this rank's loss."""
        st, plan, train = self.st, self.plan, self.spec.train
        t0 = time.perf_counter()
        idx = worker_batch(st.step, plan.batch_size, self.blocks.shape[0], train.seed,
                           self.rank, self.world)
        loss = train_step(
            self.model, self.opt, self.blocks, micro_batches(idx, plan.grad_accum), self.pruned,
            lr_at(st.step, plan.lr, plan.total_steps, train.warmup_frac),
            train.max_grad_norm, self.device, self.loss_fn,
        )
        st.step += 1
        st.epoch_loss_sum += loss
        st.epoch_loss_steps += 1
        st.epoch_train_s += time.perf_counter() - t0
        return loss

    def epoch_loss(self) -> float:
        """Mean loss over all ranks and steps of the current epoch (a collective)."""
        st = self.st
        loss = torch.tensor([st.epoch_loss_sum / max(st.epoch_loss_steps, 1)], dtype=torch.float64)
        all_reduce_sum(loss)
        return float(loss.item()) / self.world

    # -- state -------------------------------------------------------------------------------
    def save(self, directory: Path, state: dict) -> None:
        """A synchronous save in ``checkpoint.format`` (all ranks; ``directory`` fresh)."""
        if self.spec.checkpoint.format == "dense":
            save_training_state(directory, self.model, self.opt, state)
        else:
            save_sparse_state(directory, self.model, self.opt, self.pruned, state)

    def restore(self, directory: Path) -> None:
        """Either format, whatever ``checkpoint.format`` says now: checkpoints of sweeps
        saved by earlier versions are dense."""
        if is_sparse_checkpoint(directory):
            state = load_sparse_state(directory, self.model, self.opt, self.pruned)
        else:
            state = load_training_state(directory, self.model, self.opt)
        self.st = LoopState(**state)

    def export(self, out_dir: Path) -> None:
        """The model as it is now, as a Hugging Face directory (a collective)."""
        export_hf(self.model, Path(self.spec.prepared.model_dir), out_dir)
