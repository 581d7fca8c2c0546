"""What a trial is told: typed, frozen, and free of Ray and torch (cheap to import anywhere).

``sweep`` builds one ``TrialSpec`` per trial from the validated config and the prepared files,
and it crosses Ray as it is: the worker reads attributes, never string keys. The config
sections a worker needs (``train``, ``checkpoint``, ``early_stop``, the model) are defined here,
where they are used; ``sweep.config`` binds YAML to them. Each field's comment is the config
reference that the README mirrors.

The small rules that several layers share are written here once: what counts as a local model
path, and how an N:M pattern is read and named.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from eval.text import TextSource

# ---------------------------------------------------------------------------------------------
# Shared rules


def resolve_model_path(name_or_path: str) -> str:
    """``pkg:<package>`` names the directory of an installed Python package; anything else is
    returned as it is."""
    if name_or_path.startswith("pkg:"):
        spec = importlib.util.find_spec(name_or_path[4:])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Python package {name_or_path[4:]!r} is not installed")
        return list(spec.submodule_search_locations)[0]
    return name_or_path


def is_local_path(name_or_path: str) -> bool:
    """A local path rather than a hub id: it starts like a path (``/``, ``.``, ``~``, ``pkg:``)
    or exists on disk. Hub ids (``org/name``) never start that way."""
    return name_or_path.startswith(("/", ".", "~", "pkg:")) or Path(name_or_path).expanduser().exists()


Pattern = tuple[int, int]


def parse_pattern(pattern: str | tuple | list | None) -> Pattern | None:
    """``"2:4"`` or ``(2, 4)`` -> (2, 4); None or ``"none"`` -> None. ValueError unless 0 < N < M."""
    if pattern is None or pattern == "none":
        return None
    try:
        n, m = (int(x) for x in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{pattern!r} is not of the form N:M") from None
    if not 0 < n < m:
        raise ValueError(f"{pattern!r} needs 0 < N < M")
    return n, m


def pattern_label(pattern: str | tuple | None) -> str | None:
    """How a pattern appears in trial ids and file names: ``"2:4"`` -> ``"2of4"``."""
    nm = parse_pattern(pattern)
    return f"{nm[0]}of{nm[1]}" if nm else None


# ---------------------------------------------------------------------------------------------
# Config sections the worker reads


@dataclass(frozen=True)
class ModelConfig:
    # Hub id, local directory, or "pkg:<python package>" (the directory of an installed package).
    name_or_path: str | None = None
    # A GGUF file inside name_or_path (or an absolute path); dequantized once per sweep and cached.
    gguf_file: str | None = None
    # Build a randomly initialised model from this Hugging Face config dict (needs "model_type").
    config: dict | None = None
    # Tokenizer: hub id or directory; "byte" is a built-in byte-level tokenizer needing no files.
    # Default: the model's own (name_or_path, gguf_file).
    tokenizer: str | None = None
    # Seed for the random initialisation of a config-built model.
    init_seed: int = 0


@dataclass(frozen=True)
class CalibrationConfig:
    # Text whose activations Wanda, SparseGPT and OWL measure (None: the training text, data.train).
    # The papers use 128 sequences of 2048 tokens from C4's train split.
    text: TextSource | None = None
    # Sequences drawn (without replacement, by a seeded permutation) from the text's blocks.
    samples: int = 128
    # Tokens per calibration sequence (None: data.seq_len).
    seq_len: int | None = None
    # Seed of the draw (None: train.seed).
    seed: int | None = None


@dataclass(frozen=True)
class SparseGPTConfig:
    # Dampening added to the Hessian's diagonal, as a fraction of its mean (the reference's 0.01).
    percdamp: float = 0.01
    # Columns processed together; the mask is chosen adaptively within each block.
    blocksize: int = 128


@dataclass(frozen=True)
class OWLConfig:
    # A Wanda score counts as an outlier above m times its block's mean score (the paper's M).
    m: float = 5.0
    # Per-block sparsities spread over target +/- lam around the target (the paper's lambda).
    lam: float = 0.08


@dataclass(frozen=True)
class DistillConfig:
    # Recovery objective: "none" is plain next-token cross-entropy (CE); "logits" mixes CE with
    # the KL to the dense teacher's softened next-token distribution; "squarehead" adds CE to the
    # per-block hidden-state MSE normalised by the teacher's (Kurtic et al. 2023). The grid axis
    # grid.distill overrides it per trial.
    kind: Literal["none", "logits", "squarehead"] = "none"
    # logits: weight of CE; the KL term gets 1 - alpha (1 is plain CE, 0 pure KL).
    alpha: float = 0.5
    # logits: softmax temperature of both distributions (the KL is scaled by T^2).
    temperature: float = 2.0
    # squarehead: weight of CE next to the summed per-block terms.
    ce_weight: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    # Evaluations after epoch 0 (the baseline); one per epoch.
    num_epochs: int = 1
    # Samples per epoch, whatever the batch size: steps per epoch = ceil(base_samples / batch).
    base_samples: int = 10000
    # Learning rate at batch size 1; lr = base_lr * sqrt(batch_size) under lr_rule "sqrt".
    base_lr: float = 5e-6
    # How lr grows with the batch: sqrt (adaptive optimizers), linear (SGD), constant.
    lr_rule: Literal["sqrt", "linear", "constant"] = "sqrt"
    # Linear warmup over this fraction of all steps (0: none).
    warmup_frac: float = 0.0
    # AdamW weight decay (pruned weights stay zero: they are re-masked after every step).
    weight_decay: float = 0.0
    # Clip the global gradient norm (None: no clipping).
    max_grad_norm: float | None = 1.0
    # Sequences per forward pass on one worker; gradients accumulate up to the global batch
    # (None: the whole per-worker share in one pass).
    micro_batch_size: int | None = None
    # Seed of the data order and of everything random in a trial.
    seed: int = 0
    # Recovery by distillation from the dense model (teacher): the objective and its weights.
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class CheckpointConfig:
    # Save the sharded training state at every epoch end (and every_steps); off: nothing is
    # saved and a resumed trial starts over (cheap for tiny models, see configs/demo.yaml).
    enabled: bool = True
    # Also checkpoint every N optimizer steps inside an epoch (None: only at epoch ends).
    every_steps: int | None = None
    # Checkpoints kept per trial, besides the best one.
    keep_last: int = 2
    # Keep the best model so far in Hugging Face format (safetensors, masks applied) under
    # SWEEP_DIR/export/<trial>, rewritten whenever a trial beats its best (the baseline first).
    export_best: bool = True
    # How the training state is stored. "sparse": each masked layer's weight and Adam moments
    # as their kept entries only (the bytes follow the kept weights; trainers/sparse_state.py),
    # restorable on the same number of workers only. "dense": the full
    # torch.distributed.checkpoint of earlier versions. A resume restores either.
    format: Literal["sparse", "dense"] = "sparse"
    # sparse: write each checkpoint in a background thread; training waits only for the copy
    # off the training tensors. It is registered after the first step at which every rank has
    # finished writing it (at the latest at the next save point or the trial's end).
    # (The YAML key is `async`, a Python keyword: a trailing "_" is dropped from key names.)
    async_: bool = True
    # async: take that copy in the background too, overlapping the next step's forward and
    # backward (its optimizer step waits for the copy); off: the step loop takes the copy.
    background_staging: bool = False


@dataclass(frozen=True)
class TasksConfig:
    # lm-evaluation-harness task names (e.g. boolq, arc_easy, or a task of include_path),
    # measured on the pruned model (epoch 0), the final and the best model; empty: none.
    names: tuple[str, ...] = ()
    # Few-shot examples per task (None: each task's default).
    num_fewshot: int | None = 0
    # The first N documents of each task (a number below 1: that fraction); None: all (what
    # published numbers use).
    limit: float | None = None
    # A directory of task YAMLs (lm-eval's include_path), relative to the working directory.
    include_path: str | None = None
    # Requests per forward pass (an integer: every FSDP rank must run the same passes).
    batch_size: int = 1


@dataclass(frozen=True)
class EarlyStopConfig:
    # Trial scheduler on perplexity (mode min, time attribute: the trial's epoch).
    scheduler: Literal["none", "asha"] = "none"
    # ASHA: epochs before the first cut, and the fraction 1/reduction_factor kept at each rung.
    grace_period: int = 1
    reduction_factor: float = 2.0
    # Plateau stop: stop after `plateau_patience` evaluations that each improve the best
    # perplexity by less than plateau_min_rel_improvement (relative). None: off.
    plateau_patience: int | None = None
    plateau_min_rel_improvement: float = 0.01
    # Divergence stop: loss NaN/inf, or perplexity above diverge_factor x baseline (None: NaN only).
    diverge_factor: float | None = None


# ---------------------------------------------------------------------------------------------
# One trial


@dataclass(frozen=True)
class TrialPlan:
    """One grid point and the step rules applied to it (``sweep.plan.expand`` makes them)."""

    trial_id: str
    sparsity: float  # the target (the mean over layers with OWL); N:M implies 1 - N/M
    batch_size: int  # global: sequences per optimizer step across all workers
    method: str
    pattern: str | None
    lr: float
    steps_per_epoch: int
    num_epochs: int
    workers: int
    grad_accum: int  # forward/backward passes per optimizer step on each worker
    layerwise: str = "uniform"  # how sparsity is spread over blocks: uniform or owl
    distill: str = "none"  # the recovery objective: none (CE), logits, squarehead

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prepared:
    """The files the sweep prepared once for this trial (local paths; with an object store,
    the worker pulls the ones its node lacks)."""

    model_dir: str  # a plain Hugging Face directory (config, safetensors, tokenizer)
    train_tokens: str  # safetensors: "tokens", the whole training text as one 1-D stream
    eval_windows: str  # safetensors: "input_ids" and "labels" of the evaluation windows
    masks: str  # safetensors: one uint8 keep-mask per pruned layer
    dense_perplexity: float | None  # the unpruned model, measured once per sweep
    # safetensors: the pruned layers' weights, for methods that change the kept weights
    # (SparseGPT); None: the model's own weights, masked.
    weights: str | None = None
    # JSON: how the masks were made (method, per-block sparsities, calibration, seconds).
    recipe: str | None = None
    # Every evaluation set as (name, safetensors windows file), the primary first (its file
    # is eval_windows); empty: the primary alone, under primary_set.
    eval_sets: tuple[tuple[str, str], ...] = ()
    # The name the primary set is reported under (eval.primary).
    primary_set: str = "text"
    # JSON: the pruned model's evaluation on every set (epoch 0), measured once per recipe in
    # preparation and read instead of evaluating again when it was measured for this trial's
    # sets, evaluation batch, workers and device; None: the trial evaluates it.
    baseline: str | None = None


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial's workers need, built by ``sweep`` and read as attributes."""

    plan: TrialPlan
    prepared: Prepared
    train: TrainConfig
    checkpoint: CheckpointConfig
    early_stop: EarlyStopConfig
    seq_len: int  # tokens per training sequence
    eval_batch_size: int  # windows per forward pass on each worker
    threads: int  # torch threads per worker
    log_path: str | None = None  # the trial's log (rank 0 appends); None: print only
    progress_path: str | None = None  # rank 0's per-step heartbeat; None: none
    export_dir: str | None = None  # the best model so far, as a Hugging Face directory
    progress_bar: bool = True  # a progress bar while evaluating (rank 0)
    # The driver attempt that launched this trial, and the directory of the attempts' claims
    # (SWEEP_DIR/driver.attempts): workers stop before writing once a newer attempt exists
    # (trainers/fence.py). 0 / None: not fenced (a trial run outside a sweep).
    attempt: int = 0
    attempts_dir: str | None = None
    # Zero-shot tasks (lm-eval) and when: "final" (the pruned, final and best models) or
    # "epoch" (every evaluation); None: no tasks.
    tasks: TasksConfig | None = None
    tasks_every: Literal["final", "epoch"] = "final"
    # The directory relative task paths are read from (the one `sweep run` started in: a local
    # task's YAML names its data files relative to it).
    tasks_cwd: str | None = None
