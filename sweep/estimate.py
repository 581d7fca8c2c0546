"""What a sweep will cost before it runs (``sweep run --dry-run``): per trial and in total the
optimizer steps, training tokens, evaluation tokens, and the disk its checkpoints and exports
take, so nobody learns it from a full disk.

Disk follows from the model's parameter count, found without loading weights where possible:
a config-built model is built on the meta device; a local Hugging Face directory is read from
its safetensors headers (or its config.json, on the meta device); a GGUF file from its tensor
shapes (the ``gguf`` package); a hub id from the local Hugging Face cache's config, else
"unknown". A dense checkpoint holds the fp32 weights and AdamW's two fp32 moments (12 bytes
per parameter; training keeps fp32 master weights on GPU too). A sparse one
(``checkpoint.format: sparse``, trainers/sparse_state.py) holds those 12 bytes for every
parameter outside the pruned layers and for the kept fraction (1 - sparsity) of the pruned
layers' weights, so the pruned layers' parameter count is needed too; where it is unknown (a
GGUF file whose config cannot be read) the dense figure stands as an upper bound.
``keep_last`` checkpoints are kept per trial (one more exists while the next is written). An
export is the model in fp32 safetensors (4 bytes per parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sweep.config import SweepConfig
from trainers.spec import ModelConfig, TrialPlan, is_local_path, resolve_model_path

CHECKPOINT_BYTES_PER_PARAM = 4 + 2 * 4  # fp32 weights + AdamW's exp_avg and exp_avg_sq
EXPORT_BYTES_PER_PARAM = 4  # fp32 safetensors


@dataclass(frozen=True)
class ParamCount:
    n: int | None  # None: unknown
    how: str  # where the count comes from, or why it is unknown
    masked: int | None = None  # parameters of the pruned layers' weights (None: unknown)


def count_parameters(mc: ModelConfig) -> ParamCount:
    """The model's parameter count (tied weights once), without loading its weights."""
    try:
        if mc.config is not None:
            return _from_meta(_config_from_dict(mc), "built from the config on the meta device")
        from transformers import AutoConfig

        path = resolve_model_path(mc.name_or_path or "")
        local = Path(path).expanduser()
        if mc.gguf_file:
            gguf = Path(mc.gguf_file) if Path(mc.gguf_file).is_absolute() else local / mc.gguf_file
            masked = _masked_or_none(lambda: AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
            return ParamCount(gguf_parameters(gguf), f"tensor shapes of {gguf.name}", masked)
        if is_local_path(path) and local.is_dir():
            n = safetensors_parameters(local)
            if n is not None:
                return ParamCount(n, "safetensors headers", masked_parameters(local))
            return _from_meta(AutoConfig.from_pretrained(local), "config.json on the meta device")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except OSError:
            return ParamCount(None, f"{path} is a hub id whose config is not in the local "
                                    "Hugging Face cache")
        return _from_meta(config, "cached config on the meta device")
    except Exception as e:  # noqa: BLE001 - an estimate never stops a dry run
        return ParamCount(None, f"unknown ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def _config_from_dict(mc: ModelConfig):
    from transformers import AutoConfig

    config = dict(mc.config)
    if "vocab_size" not in config:
        from trainers.model import load_tokenizer

        config["vocab_size"] = len(load_tokenizer(mc))
    return AutoConfig.for_model(**config)


def _meta_count(config) -> tuple[int, int | None]:
    """(parameters, pruned layers' weight parameters) of the model ``config`` describes, built
    on the meta device (no memory); ``parameters()`` yields a tied weight once."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.prune import prunable_linears

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        masked = sum(lin.weight.numel() for lin in prunable_linears(model).values())
    except ValueError:
        masked = None
    return sum(p.numel() for p in model.parameters()), masked


def _from_meta(config, how: str) -> ParamCount:
    n, masked = _meta_count(config)
    return ParamCount(n, how, masked)


def masked_parameters(model_dir: Path) -> int | None:
    """The pruned layers' weight parameters of a local Hugging Face directory (its config.json
    on the meta device), None when it cannot be read."""
    from transformers import AutoConfig

    return _masked_or_none(lambda: AutoConfig.from_pretrained(model_dir))


def _masked_or_none(config_fn) -> int | None:
    """The pruned layers' weight parameters of the model whose config ``config_fn`` reads;
    None where that config cannot be read (the dense figure then bounds a sparse checkpoint)."""
    try:
        return _meta_count(config_fn())[1]
    except Exception:  # noqa: BLE001 - only sharpens the estimate
        return None


def gguf_parameters(path: Path) -> int:
    """Elements of every tensor in a GGUF file, from its header (the file is memory-mapped,
    its data not read)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def safetensors_parameters(directory: Path) -> int | None:
    """Elements of every tensor in a directory's ``*.safetensors`` files, from their headers;
    ``lm_head.weight`` is left out when config.json ties it to the embeddings. None without
    safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    tied = False
    try:
        tied = bool(json.loads((Path(directory) / "config.json").read_text()).get("tie_word_embeddings"))
    except (OSError, ValueError):
        pass
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if tied and name == "lm_head.weight":
                    continue
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


@dataclass(frozen=True)
class TrialEstimate:
    trial_id: str
    steps: int
    train_tokens: int
    eval_tokens: int | None  # None: the number of windows is unknown before tokenizing
    checkpoint_bytes: int | None
    export_bytes: int | None


@dataclass(frozen=True)
class Estimate:
    params: ParamCount
    trials: list[TrialEstimate]
    dense_eval_tokens: int | None  # one evaluation (the dense model's runs once per sweep)
    eval_exact: bool  # False: eval.max_windows bounds the windows, the text may have fewer
    checkpoint_each: int | None  # one checkpoint's bytes
    keep_last: int
    checkpoints: bool
    exports: bool
    format: str = "dense"  # "sparse"; "sparse?": sparse, the pruned layers' size unknown

    def total(self, attr: str) -> int | None:
        values = [getattr(t, attr) for t in self.trials]
        return None if any(v is None for v in values) else sum(values)


def eval_tokens_per_evaluation(token_length: int, stride: int, windows: int | None) -> int | None:
    """Tokens scored by one evaluation (README, "Perplexity protocol"): the first window scores
    ``token_length - 1`` (each position predicts the next), every later one its ``stride`` new
    tokens, at most ``token_length - 1``."""
    if windows is None:
        return None
    if windows <= 0:
        return 0
    return (token_length - 1) + (windows - 1) * min(stride, token_length - 1)


def known_windows(cfg: SweepConfig, eval_windows: Path | None = None) -> tuple[int | None, bool]:
    """(windows, exact) of one evaluation: from the prepared windows' header when they exist;
    else ``eval.max_windows``, an upper bound (a shorter text has fewer); else unknown."""
    if eval_windows is not None and Path(eval_windows).is_file():
        from safetensors import safe_open

        with safe_open(str(eval_windows), framework="pt") as st:
            return int(st.get_slice("input_ids").get_shape()[0]), True
    return cfg.eval.max_windows, False


def estimate(cfg: SweepConfig, plans: list[TrialPlan], params: ParamCount | None = None,
             eval_windows: Path | None = None) -> Estimate:
    params = params or count_parameters(cfg.model)
    windows, exact = known_windows(cfg, eval_windows)
    per_eval = eval_tokens_per_evaluation(cfg.eval.token_length, cfg.eval.stride, windows)
    ck = cfg.checkpoint
    each = params.n * CHECKPOINT_BYTES_PER_PARAM if params.n is not None else None
    export = params.n * EXPORT_BYTES_PER_PARAM if params.n is not None else None
    sparse = ck.format == "sparse" and params.n is not None and params.masked is not None
    trials = []
    for p in plans:
        one = (checkpoint_bytes(params, p.sparsity) if sparse else each)
        steps = p.steps_per_epoch * p.num_epochs
        trials.append(TrialEstimate(
            trial_id=p.trial_id, steps=steps, train_tokens=steps * p.batch_size * cfg.data.seq_len,
            # the baseline (epoch 0) and one evaluation per epoch
            eval_tokens=None if per_eval is None else per_eval * (p.num_epochs + 1),
            checkpoint_bytes=(one * ck.keep_last if one is not None else None) if ck.enabled else 0,
            export_bytes=export if ck.export_best else 0,
        ))
    return Estimate(params, trials, per_eval, exact, each, ck.keep_last, ck.enabled,
                    ck.export_best, ck.format if ck.format != "sparse" or sparse else "sparse?")


def checkpoint_bytes(params: ParamCount, sparsity: float) -> int:
    """One sparse checkpoint: 12 bytes for every parameter outside the pruned layers' weights
    and for the kept ones (weight, exp_avg, exp_avg_sq: kept entries only)."""
    kept = params.masked - int(round(sparsity * params.masked))
    return (params.n - params.masked + kept) * CHECKPOINT_BYTES_PER_PARAM


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def format_estimate(est: Estimate) -> str:
    """The dry run's cost table: one row per trial, a total row, and how disk was counted."""
    from sweep.query import format_table

    columns = ["trial", "steps", "train tokens", "eval tokens", "checkpoints", "export"]
    ck = human_bytes if est.checkpoints else _off
    ex = human_bytes if est.exports else _off
    rows = [[t.trial_id, _count(t.steps), _count(t.train_tokens), _count(t.eval_tokens),
             ck(t.checkpoint_bytes), ex(t.export_bytes)] for t in est.trials]
    dense = est.dense_eval_tokens
    total_eval = est.total("eval_tokens")
    rows.append(["total", _count(est.total("steps")), _count(est.total("train_tokens")),
                 _count(None if total_eval is None else total_eval + dense),
                 ck(est.total("checkpoint_bytes")), ex(est.total("export_bytes"))])
    table = format_table(columns, rows, footer=False, right=[False] + [True] * 5)
    lines = [_params_text(est.params), table]
    notes = []
    if est.checkpoints:
        if est.format == "sparse":
            notes.append(f"checkpoints: keep_last {est.keep_last} per trial, sparse format: fp32 "
                         "weights + AdamW's 2 fp32 moments (12 bytes/parameter) for the kept "
                         f"weights only ({human_bytes(est.checkpoint_each)} dense); one more "
                         "while the next is written")
        else:
            notes.append(f"checkpoints: keep_last {est.keep_last} x {human_bytes(est.checkpoint_each)} "
                         "per trial (fp32 weights + AdamW's 2 fp32 moments: 12 bytes/parameter; "
                         "one more while the next is written"
                         + ("; an upper bound: the sparse format stores the kept weights only, "
                            "the pruned layers' size is unknown)" if est.format == "sparse?" else ")"))
    else:
        notes.append("checkpoints: off (checkpoint.enabled: false)")
    notes.append("export: the best model in fp32 safetensors, 4 bytes/parameter" if est.exports
                 else "export: off (checkpoint.export_best: false)")
    if dense is None:
        notes.append("eval tokens: unknown until the evaluation text is tokenized "
                     "(set eval.max_windows to bound it)")
    else:
        bound = "" if est.eval_exact else "at most "
        notes.append(f"eval tokens: {bound}{dense:,} per evaluation (baseline + one per epoch; "
                     "the total adds the dense model's once)")
    return "\n".join(lines + notes)


def _off(_n: int | None) -> str:
    return "off"


def _params_text(p: ParamCount) -> str:
    if p.n is None:
        return f"model: parameter count unknown ({p.how}): disk not estimated"
    return f"model: {p.n:,} parameters ({p.how})"


def disk_line(est: Estimate) -> str:
    """One line for a real run: what checkpoints and exports will take in all."""
    ck = human_bytes(est.total("checkpoint_bytes")) if est.checkpoints else "off"
    ex = human_bytes(est.total("export_bytes")) if est.exports else "off"
    n = f"{est.params.n:,} parameters" if est.params.n is not None else "parameter count unknown"
    return f"disk: checkpoints {ck}, exports {ex} ({n}; `sweep run --dry-run` itemizes)"
