"""Typed, strictly validated sweep configuration.

A YAML file is bound to frozen dataclasses field by field: unknown keys, wrong types and
out-of-range values are all gathered and reported at once (``ConfigError``) before Ray starts.
Every field carries a comment that is the config reference (the README mirrors it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from eval.sets import EvalSet
from eval.text import TextSource
from trainers.spec import (
    CalibrationConfig,
    CheckpointConfig,
    DistillConfig,
    EarlyStopConfig,
    ModelConfig,
    OWLConfig,
    SparseGPTConfig,
    TasksConfig,
    TrainConfig,
    is_local_path,
    parse_pattern,
    resolve_model_path,
)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (an exponent without a dot) as a string; accept it as a float,
    as every user who writes a learning rate expects."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """Invalid input; ``problems`` lists every problem found, each naming its key."""

    def __init__(self, problems: list[str], source: str | None = None,
                 title: str = "invalid configuration"):
        self.problems = list(problems)
        self.source = source
        self.title = title
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{title}{where}:\n{lines}")

    def __reduce__(self):
        # Crosses Ray intact (a preparation task's input error): rebuilt from its problems, not
        # from the joined message.
        return (ConfigError, (self.problems, self.source, self.title))


@dataclass(frozen=True)
class DataConfig:
    # Training text, tokenized once per sweep and packed into blocks of seq_len tokens.
    train: TextSource = field(
        default_factory=lambda: TextSource(source="dataset", split="train")
    )
    # Tokens per training sequence.
    seq_len: int = 512


@dataclass(frozen=True)
class EvalSetConfig:
    # Where the set's text comes from (a text source); the c4 protocols read documents: a
    # JSON-lines file (optionally .gz) or a dataset, one document per line or row.
    text: TextSource = field(default_factory=TextSource)
    # How the text becomes windows: "sequential" (the whole text, full windows every stride
    # tokens), "c4_wanda" (the first `documents` (1100) documents joined with a space, the first
    # `max_windows` (256) windows) or "c4_sparsegpt" (`max_windows` (256) windows, each from a
    # random document of at least token_length tokens at a random start, seeded by `seed`).
    protocol: Literal["sequential", "c4_wanda", "c4_sparsegpt"] = "sequential"
    # Tokens per window (None: eval.token_length).
    token_length: int | None = None
    # sequential: tokens between window starts (None: eval.stride, capped at token_length).
    stride: int | None = None
    # At most this many windows (None: eval.max_windows for sequential, 256 for the c4 protocols).
    max_windows: int | None = None
    # c4_sparsegpt: the seed of the window draw (the reference's 0).
    seed: int = 0
    # Read only the first N documents (None: 1100 for c4_wanda, all otherwise).
    documents: int | None = None
    # sequential: join the source's documents with this string instead of reading one text
    # (SparseGPT's PTB: " ").
    separator: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    # Evaluation text (default: the WikiText-2 raw test split): the one set of a config
    # without eval.sets, reported as "wikitext2" (that default) or "text".
    text: TextSource = field(default_factory=TextSource)
    # Named evaluation sets (name -> set), all measured at the baseline and after every epoch;
    # None: eval.text alone. token_length, stride and max_windows below are their defaults.
    sets: dict[str, EvalSetConfig] | None = None
    # The set Tune's metric, early stopping and the `perplexity` column use (None: the first).
    primary: str | None = None
    # Zero-shot tasks through lm-evaluation-harness.
    tasks: TasksConfig = field(default_factory=TasksConfig)
    # When tasks are measured: "final" (the pruned model at epoch 0, the final and the best
    # model) or "epoch" (every evaluation).
    tasks_every: Literal["final", "epoch"] = "final"
    # Window length and stride in tokens (README, "Perplexity protocol").
    token_length: int = 2048
    # Windows start every `stride` tokens; stride < token_length overlaps them, the overlap
    # being context only; stride > token_length is refused.
    stride: int = 2048
    # Evaluate only the first K windows (None: all).
    max_windows: int | None = None
    # Windows per forward pass on each worker.
    batch_size: int = 1


@dataclass(frozen=True)
class PruneConfig:
    # Pruning criterion: per-layer weight magnitude, Wanda (|W| x input activation norm), or
    # SparseGPT (masks chosen with the inputs' Hessian, the kept weights updated to compensate).
    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    # Semi-structured N:M pattern such as "2:4" (None: unstructured).
    pattern: str | None = None
    # How the target sparsity is spread over decoder blocks: the same everywhere, or OWL
    # (blocks with more activation outliers pruned less; the mean stays the target).
    layerwise: Literal["uniform", "owl"] = "uniform"
    # Calibration data of the activation-aware methods (wanda, sparsegpt, owl).
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    owl: OWLConfig = field(default_factory=OWLConfig)


@dataclass(frozen=True)
class GridConfig:
    # Grid axes: every combination becomes one trial.
    sparsity: tuple[float, ...] = (0.5,)
    # Global batch sizes (sequences per optimizer step, across all workers).
    batch_size: tuple[int, ...] = (1,)
    # Optional axis of pruning methods (default: prune.method alone).
    method: tuple[str, ...] | None = None
    # Optional axis of N:M patterns, "none" for unstructured (default: prune.pattern alone). A
    # pattern fixes its trials' sparsity at 1 - N/M.
    pattern: tuple[str, ...] | None = None
    # Optional axis of layer-wise rules, "uniform" and/or "owl" (default: prune.layerwise alone).
    layerwise: tuple[str, ...] | None = None
    # Optional axis of recovery objectives, "none", "logits", "squarehead" (default:
    # train.distill.kind alone); the objectives' weights come from train.distill.
    distill: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ResourcesConfig:
    # Ray Train workers per trial (FSDP2 ranks); the global batch is split across them.
    workers: int = 1
    # Ray resources of each worker; GPUs switch on NCCL and bf16 mixed precision.
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Concurrent trials (None: as many as the cluster fits, each fully placed).
    max_concurrent_trials: int | None = None
    # CPU held by each trial's driver (the Tune function that runs its TorchTrainer): kept tiny so
    # drivers never starve the workers (docs/design.md, "The resource deadlock").
    driver_cpus: float = 0.01
    # Torch threads per worker (None: cpus_per_worker rounded down, at least 1).
    torch_threads: int | None = None
    # Custom Ray resources each worker needs, e.g. {"a100": 1} to pin trials to such nodes.
    custom_per_worker: dict | None = None
    # On an existing cluster (--address), how long to wait for one trial's resources before the
    # sweep ends with a message instead of waiting forever; an autoscaler may need minutes to
    # add a node. The embedded cluster is checked before it starts and never waits.
    placement_timeout_s: float = 600.0
    # Embedded cluster: the most CPUs one trial may ask for, as a multiple of this machine's
    # cores (workers x cpus_per_worker, and workers x torch threads); more is refused.
    oversubscription: float = 2.0


@dataclass(frozen=True)
class FailureConfig:
    # Worker-group restarts from the latest checkpoint before a trial is marked errored.
    worker_max_failures: int = 2
    # Relaunches of a crashed trial driver.
    trial_max_failures: int = 1


@dataclass(frozen=True)
class SweepConfig:
    # Sweep name; SWEEP_DIR = <storage>/<name>.
    name: str = "sweep"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    # Extra experiment trackers through Ray Tune's logger callbacks: "wandb", "mlflow".
    loggers: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Binding YAML to dataclasses


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _bind(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp``; append a problem naming ``key`` when it does not fit."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return tp()
        return _bind_dataclass(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if typing.get_origin(non_none[0]) is dict and isinstance(value, dict):
            return _bind(non_none[0], value, key, problems)  # a mapping's entries name themselves
        trial: list[str] = []
        result = _bind(non_none[0], value, key, trial)
        if trial:
            problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return result
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_bind(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(items))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
            return value
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[1]):  # a mapping of named sections
            return {k: _bind(args[1], v, f"{key}.{k}", problems) for k, v in value.items()}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def config_key(f: dataclasses.Field) -> str:
    """A field's key in YAML: its name, less a trailing "_" (``async_`` is ``async``, a
    keyword that cannot name a field)."""
    return f.name.removesuffix("_")


def _bind_dataclass(cls: Any, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {config_key(f) for f in dataclasses.fields(cls)}
    for unknown in sorted(set(data) - names):
        where = f"{prefix}.{unknown}" if prefix else str(unknown)
        problems.append(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if config_key(f) in data:
            key = f"{prefix}.{config_key(f)}" if prefix else config_key(f)
            found: list[str] = []
            value = _bind(hints[f.name], data[config_key(f)], key, found)
            problems.extend(found)
            # A badly typed value keeps its default, so the range checks still run on the rest
            # and every problem is reported at once; a nested section keeps its valid fields.
            if not found or dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Overrides and loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.base_lr=1e-4"`` -> (["train", "base_lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key=value"])
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"--set {item!r}: empty key segment"])
    return parts, yaml_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config_dict(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping of keys"], str(p))
    return data


def from_dict(data: dict, source: str | None = None, check_paths: bool = True) -> SweepConfig:
    problems: list[str] = []
    cfg = _bind_dataclass(SweepConfig, data, "", problems)
    problems.extend(validate(cfg, check_paths=check_paths))

    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(
    path: str | os.PathLike, overrides: list[str] | None = None, check_paths: bool = True
) -> SweepConfig:
    data = apply_overrides(load_config_dict(path), overrides or [])
    return from_dict(data, str(path), check_paths=check_paths)


def to_dict(cfg: Any) -> Any:
    """Plain (YAML/JSON-able) form of a config: tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {config_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# ---------------------------------------------------------------------------------------------
# Semantic checks: ranges, combinations and paths


def _check_text_source(src: TextSource, key: str, check_paths: bool) -> list[str]:
    problems = []
    if src.source == "file":
        if not src.path:
            problems.append(f"{key}.path: required when {key}.source is 'file'")
        elif check_paths and not Path(src.path).expanduser().is_file():
            problems.append(f"{key}.path: file not found: {src.path}")
    elif src.source == "dataset":
        if not src.dataset:
            problems.append(f"{key}.dataset: required when {key}.source is 'dataset'")
    if src.max_chars is not None and src.max_chars < 1:
        problems.append(f"{key}.max_chars: must be >= 1, got {src.max_chars}")
    return problems


# Set names become file names and report columns: a letter, then letters, digits, _ . -
SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def legacy_set_name(src: TextSource) -> str:
    """The name a config without eval.sets reports its one text under."""
    wikitext2 = (src.source == "dataset" and src.dataset == "wikitext"
                 and src.dataset_config == "wikitext-2-raw-v1")
    return "wikitext2" if wikitext2 else "text"


def _eval_set(e: EvalConfig, name: str, s: EvalSetConfig) -> EvalSet:
    """One configured set with eval's window settings as its defaults (ValueError if invalid)."""
    length = s.token_length or e.token_length
    sequential = s.protocol == "sequential"
    stride = (s.stride or min(e.stride, length)) if sequential else s.stride
    windows = s.max_windows if s.max_windows is not None else (e.max_windows if sequential else None)
    return EvalSet(name, s.text, s.protocol, length, stride, windows, s.seed, s.documents,
                   s.separator)


def eval_sets(e: EvalConfig) -> list[EvalSet]:
    """Every evaluation set in effect, in config order: eval.sets, or eval.text as one set."""
    if not e.sets:
        return [EvalSet(legacy_set_name(e.text), e.text, "sequential", e.token_length, e.stride,
                        e.max_windows)]
    return [_eval_set(e, name, s) for name, s in e.sets.items()]


def primary_set(e: EvalConfig) -> str:
    """The name of the set that Tune's metric, early stopping and `perplexity` use."""
    if e.primary is not None:
        return e.primary
    return next(iter(e.sets)) if e.sets else legacy_set_name(e.text)


def _check_eval(e: EvalConfig, check_paths: bool) -> list[str]:
    p: list[str] = []
    if e.sets is None:
        if e.primary is not None and e.primary != legacy_set_name(e.text):
            p.append(f"eval.primary: {e.primary!r} is not one of the sets "
                     f"{legacy_set_name(e.text)} (without eval.sets, eval.text is the one set)")
    elif not e.sets:
        p.append("eval.sets: empty (name at least one set, or leave it out to use eval.text)")
    else:
        if e.text != TextSource():
            p.append("eval.text: give either eval.text (one set) or eval.sets, not both")
        for name, s in e.sets.items():
            key = f"eval.sets.{name}"
            if not isinstance(name, str) or not SET_NAME.match(name):
                p.append(f"{key}: a set name is a letter then letters, digits, '_', '.' or '-'")
                continue
            if not isinstance(s, EvalSetConfig):
                continue  # reported by the binding
            p += _check_text_source(s.text, f"{key}.text", check_paths)
            low = [(k, v) for k in ("token_length", "stride", "max_windows", "documents")
                   if (v := getattr(s, k)) is not None and v < 1]
            p += [f"{key}.{k}: must be >= 1, got {v}" for k, v in low]
            if low:
                continue  # the set's own checks would repeat them
            try:
                _eval_set(e, name, s)
            except ValueError as err:
                p.append(f"{key}: {str(err).split(': ', 1)[-1]}")
        if e.primary is not None and e.primary not in e.sets:
            p.append(f"eval.primary: {e.primary!r} is not one of the sets {', '.join(e.sets)}")
    t = e.tasks
    if len(set(t.names)) != len(t.names):
        p.append("eval.tasks.names: values repeat")
    for i, n in enumerate(t.names):
        if not n or not isinstance(n, str):
            p.append(f"eval.tasks.names[{i}]: expected a task name, got {n!r}")
    if t.num_fewshot is not None and t.num_fewshot < 0:
        p.append(f"eval.tasks.num_fewshot: must be >= 0 or null, got {t.num_fewshot}")
    if t.limit is not None and not t.limit > 0:
        p.append(f"eval.tasks.limit: must be > 0 or null, got {t.limit}")
    if t.limit is not None and t.limit > 1 and t.limit != int(t.limit):
        p.append(f"eval.tasks.limit: a count of documents (an integer) or a fraction below 1, "
                 f"got {t.limit}")
    if t.batch_size < 1:
        p.append(f"eval.tasks.batch_size: must be >= 1, got {t.batch_size}")
    if t.include_path is not None and check_paths and not Path(t.include_path).expanduser().is_dir():
        p.append(f"eval.tasks.include_path: not a directory: {t.include_path}")
    if t.names and check_paths and importlib.util.find_spec("lm_eval") is None:
        p.append("eval.tasks.names: tasks need the lm-eval package "
                 "(pip install 'prune-sweep[tasks]')")
    return p


def _check_model(m: ModelConfig, check_paths: bool) -> list[str]:
    problems = []
    if m.config is None and not m.name_or_path:
        problems.append("model.name_or_path: required (a hub id or a directory), or give model.config")
    if m.config is not None:
        if m.name_or_path:
            problems.append("model.config: give either model.config or model.name_or_path, not both")
        if "model_type" not in m.config:
            problems.append("model.config.model_type: required to build a model from a config")
        if m.tokenizer is None:
            problems.append("model.tokenizer: required with model.config ('byte' needs no files)")
    if m.name_or_path and check_paths and is_local_path(m.name_or_path):
        try:
            local = Path(resolve_model_path(m.name_or_path)).expanduser()
        except FileNotFoundError as e:
            problems.append(f"model.name_or_path: {e}")
        else:
            if not local.exists():
                problems.append(f"model.name_or_path: path not found: {m.name_or_path}")
            elif m.gguf_file and not (local / m.gguf_file).is_file():
                problems.append(f"model.gguf_file: file not found: {local / m.gguf_file}")
            elif not m.gguf_file and local.is_dir() and not (local / "config.json").is_file():
                problems.append(
                    f"model.name_or_path: {local} has no config.json (not a Hugging Face model directory)"
                )
    return problems


# The values each optional grid axis may take (the config's Literal choices of the same key).
GRID_CHOICES = {
    "method": typing.get_args(typing.get_type_hints(PruneConfig)["method"]),
    "layerwise": typing.get_args(typing.get_type_hints(PruneConfig)["layerwise"]),
    "distill": typing.get_args(typing.get_type_hints(DistillConfig)["kind"]),
}


def _check_prune(cfg: SweepConfig, check_paths: bool) -> list[str]:
    p: list[str] = []
    pr, cal = cfg.prune, cfg.prune.calibration
    if cal.text is not None:
        p += _check_text_source(cal.text, "prune.calibration.text", check_paths)
    if cal.samples < 1:
        p.append(f"prune.calibration.samples: must be >= 1, got {cal.samples}")
    if cal.seq_len is not None and cal.seq_len < 2:
        p.append(f"prune.calibration.seq_len: must be >= 2 or null, got {cal.seq_len}")
    if not 0 <= pr.sparsegpt.percdamp < 1:
        p.append(f"prune.sparsegpt.percdamp: must be in [0, 1), got {pr.sparsegpt.percdamp}")
    if pr.sparsegpt.blocksize < 1:
        p.append(f"prune.sparsegpt.blocksize: must be >= 1, got {pr.sparsegpt.blocksize}")
    if not pr.owl.m > 0:
        p.append(f"prune.owl.m: must be > 0, got {pr.owl.m}")
    if not 0 <= pr.owl.lam < 0.5:
        p.append(f"prune.owl.lam: must be in [0, 0.5), got {pr.owl.lam}")
    rules = set(cfg.grid.layerwise or (pr.layerwise,))
    patterns = [x for x in (cfg.grid.pattern or (pr.pattern,)) if x not in (None, "none")]
    if "owl" in rules and patterns:
        p.append("prune.layerwise: owl spreads an unstructured sparsity over blocks; an N:M "
                 f"pattern ({', '.join(patterns)}) fixes every layer's sparsity (drop one of them)")
    if "owl" in rules:
        for i, s in enumerate(cfg.grid.sparsity):
            if not pr.owl.lam <= s <= 1 - pr.owl.lam:
                p.append(f"grid.sparsity[{i}]: {s} +/- prune.owl.lam {pr.owl.lam} leaves [0, 1] "
                         "(OWL's per-block sparsities would not be valid)")
    d = cfg.train.distill
    if not 0 <= d.alpha <= 1:
        p.append(f"train.distill.alpha: must be in [0, 1], got {d.alpha}")
    if not d.temperature > 0:
        p.append(f"train.distill.temperature: must be > 0, got {d.temperature}")
    if d.ce_weight < 0:
        p.append(f"train.distill.ce_weight: must be >= 0, got {d.ce_weight}")
    return p


def validate(cfg: SweepConfig, check_paths: bool = True) -> list[str]:
    """Every range and combination problem, each naming its key."""
    p: list[str] = []
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        p.append(f"name: must be a non-empty directory name, got {cfg.name!r}")
    p += _check_model(cfg.model, check_paths)
    p += _check_text_source(cfg.data.train, "data.train", check_paths)
    p += _check_text_source(cfg.eval.text, "eval.text", check_paths)
    if cfg.data.seq_len < 2:
        p.append(f"data.seq_len: must be >= 2, got {cfg.data.seq_len}")
    e = cfg.eval
    if e.token_length < 2:
        p.append(f"eval.token_length: must be >= 2, got {e.token_length}")
    if e.stride < 1:
        p.append(f"eval.stride: must be >= 1, got {e.stride}")
    elif e.stride > e.token_length:
        p.append(
            f"eval.stride: {e.stride} is larger than eval.token_length {e.token_length} "
            "(tokens between windows would never be scored)"
        )
    if e.max_windows is not None and e.max_windows < 1:
        p.append(f"eval.max_windows: must be >= 1, got {e.max_windows}")
    if e.batch_size < 1:
        p.append(f"eval.batch_size: must be >= 1, got {e.batch_size}")
    if e.token_length >= 2 and 1 <= e.stride <= e.token_length:
        p += _check_eval(e, check_paths)
    p += _check_prune(cfg, check_paths)
    for key, pat in [("prune.pattern", cfg.prune.pattern)] + [
        (f"grid.pattern[{i}]", x) for i, x in enumerate(cfg.grid.pattern or ())
    ]:
        try:
            parse_pattern(pat)
        except ValueError as err:
            p.append(f"{key}: {err}")
    for axis, allowed in GRID_CHOICES.items():
        values = getattr(cfg.grid, axis) or ()
        for i, v in enumerate(values):
            if v not in allowed:
                p.append(f"grid.{axis}[{i}]: {v!r} is not one of {' | '.join(map(repr, allowed))}")
    for axis in ("method", "pattern", "layerwise", "distill"):
        values = getattr(cfg.grid, axis) or ()
        if len(set(values)) != len(values):
            p.append(f"grid.{axis}: values repeat")
    t = cfg.train
    if t.num_epochs < 1:
        p.append(f"train.num_epochs: must be >= 1, got {t.num_epochs}")
    if t.base_samples < 1:
        p.append(f"train.base_samples: must be >= 1, got {t.base_samples}")
    if not t.base_lr > 0:
        p.append(f"train.base_lr: must be > 0, got {t.base_lr}")
    if not 0 <= t.warmup_frac < 1:
        p.append(f"train.warmup_frac: must be in [0, 1), got {t.warmup_frac}")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        p.append(f"train.max_grad_norm: must be > 0 or null, got {t.max_grad_norm}")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    r = cfg.resources
    if r.workers < 1:
        p.append(f"resources.workers: must be >= 1, got {r.workers}")
    if r.cpus_per_worker < 0 or r.gpus_per_worker < 0:
        p.append("resources.cpus_per_worker / gpus_per_worker: must be >= 0")
    if r.cpus_per_worker == 0 and r.gpus_per_worker == 0:
        p.append("resources.cpus_per_worker: a worker needs some CPU or GPU")
    if r.max_concurrent_trials is not None and r.max_concurrent_trials < 1:
        p.append(f"resources.max_concurrent_trials: must be >= 1, got {r.max_concurrent_trials}")
    if not 0 < r.driver_cpus <= 1:
        p.append(f"resources.driver_cpus: must be in (0, 1], got {r.driver_cpus}")
    for name, amount in (r.custom_per_worker or {}).items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
            p.append(f"resources.custom_per_worker.{name}: must be a number > 0, got {amount!r}")
    if r.torch_threads is not None and r.torch_threads < 1:
        p.append(f"resources.torch_threads: must be >= 1, got {r.torch_threads}")
    if not r.placement_timeout_s > 0:
        p.append(f"resources.placement_timeout_s: must be > 0, got {r.placement_timeout_s}")
    if not r.oversubscription >= 1:
        p.append(f"resources.oversubscription: must be >= 1, got {r.oversubscription}")
    g = cfg.grid
    if not g.sparsity:
        p.append("grid.sparsity: the grid is empty (give at least one sparsity)")
    if not g.batch_size:
        p.append("grid.batch_size: the grid is empty (give at least one batch size)")
    for i, s in enumerate(g.sparsity):
        if not 0 <= s < 1:
            p.append(f"grid.sparsity[{i}]: {s} is outside [0, 1)")
    if len(set(g.sparsity)) != len(g.sparsity):
        p.append("grid.sparsity: values repeat")
    for i, b in enumerate(g.batch_size):
        if b < 1:
            p.append(f"grid.batch_size[{i}]: {b} is below 1")
        elif r.workers >= 1 and b % r.workers:
            p.append(
                f"grid.batch_size[{i}]: {b} cannot be split evenly across "
                f"resources.workers={r.workers} (use a multiple of {r.workers})"
            )
    if len(set(g.batch_size)) != len(g.batch_size):
        p.append("grid.batch_size: values repeat")
    c = cfg.checkpoint
    if c.every_steps is not None and c.every_steps < 1:
        p.append(f"checkpoint.every_steps: must be >= 1 or null, got {c.every_steps}")
    if c.keep_last < 1:
        p.append(f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    if c.background_staging and not (c.async_ and c.format == "sparse"):
        p.append("checkpoint.background_staging: needs checkpoint.async: true and "
                 f"checkpoint.format: sparse (got async {str(c.async_).lower()}, format {c.format})")
    es = cfg.early_stop
    if es.grace_period < 1:
        p.append(f"early_stop.grace_period: must be >= 1, got {es.grace_period}")
    if not es.reduction_factor > 1:
        p.append(f"early_stop.reduction_factor: must be > 1, got {es.reduction_factor}")
    if es.plateau_patience is not None and es.plateau_patience < 1:
        p.append(f"early_stop.plateau_patience: must be >= 1 or null, got {es.plateau_patience}")
    if es.plateau_min_rel_improvement < 0:
        p.append("early_stop.plateau_min_rel_improvement: must be >= 0")
    if es.diverge_factor is not None and not es.diverge_factor > 1:
        p.append(f"early_stop.diverge_factor: must be > 1 or null, got {es.diverge_factor}")
    f = cfg.failure
    if f.worker_max_failures < 0 or f.trial_max_failures < 0:
        p.append("failure.worker_max_failures / trial_max_failures: must be >= 0")
    for i, lg in enumerate(cfg.loggers):
        if lg not in ("wandb", "mlflow"):
            p.append(f"loggers[{i}]: {lg!r} is not one of 'wandb' | 'mlflow'")
        elif check_paths and importlib.util.find_spec(lg) is None:
            p.append(f"loggers[{i}]: {lg!r} needs the {lg} package (pip install {lg})")
    return p
