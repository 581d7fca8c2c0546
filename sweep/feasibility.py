"""Can a trial ever run here? One trial's resource request against what a cluster offers.

Ray never refuses a request it cannot place: a trial that needs a GPU the cluster lacks, or
more CPUs than any node has, waits forever with a periodic "No available node types can fulfill
resource request" warning. These pure functions find such configs before Ray starts (the
embedded cluster: ``check_embedded``) or right after connecting (``check_cluster``), and say
which keys to change. ``wait_for_placement`` bounds the remaining case, a request that fits the
cluster's totals but not what is free (a busy shared cluster, an autoscaler that cannot grow).

No Ray import at module level: ``sweep run --dry-run`` uses ``describe_request`` without it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.config import SweepConfig

GIB = 1024**3
# Over-subscription of cores that a trial may ask for on the embedded cluster before it is
# refused: CPU-bound ranks beyond this spend more time descheduled than computing.
DEFAULT_OVERSUBSCRIPTION = 2.0
# Resident memory of a worker process before the model is loaded: Python, torch, Ray Train and
# transformers imported (the README's tiny-model trial log: "memory (process RSS): before
# 554 MB"). A lower bound: the estimate below only refuses what cannot fit.
PROCESS_BYTES = 512 * 1024**2
# Bytes of saved activations per token per layer per unit of hidden size, for 16-bit
# activations without recomputation (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", eq. 1: s*b*h*34 per layer, leaving out the
# 5*a*s^2*b attention-score term that SDPA / flash attention do not keep). Doubled for fp32.
ACT_BYTES_PER_HIDDEN = 34
# Ray's name for a config key of one worker's request.
_KEY_OF = {"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker"}


def _key(resource: str) -> str:
    return _KEY_OF.get(resource, f"resources.custom_per_worker.{resource}")


def _num(x: float) -> str:
    return f"{x:g}"


def _res(d: Mapping[str, float]) -> str:
    return ", ".join(f"{_num(v)} {k}" for k, v in d.items()) or "nothing"


# ---------------------------------------------------------------------------------------------
# What one trial asks for


@dataclass(frozen=True)
class TrialRequest:
    """One trial: ``workers`` Ray Train workers of ``per_worker`` each (one placement group)
    and its Tune driver holding ``driver``."""

    workers: int
    per_worker: dict[str, float]
    driver: dict[str, float]

    def total(self) -> dict[str, float]:
        """Everything at once, summed (what ``sweep.cluster.trial_resources`` returns)."""
        out = {k: self.workers * v for k, v in self.per_worker.items()}
        for k, v in self.driver.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def bundles(self, with_driver: bool = True) -> list[dict[str, float]]:
        """Placement-group bundles: the driver's first (when asked), then one per worker."""
        return ([dict(self.driver)] if with_driver and self.driver else []) + [
            dict(self.per_worker) for _ in range(self.workers)
        ]

    def describe(self) -> str:
        return f"{self.workers} workers x ({_res(self.per_worker)}) + driver {_res(self.driver)}"


def trial_request(cfg: SweepConfig) -> TrialRequest:
    r = cfg.resources
    per_worker = {"CPU": float(r.cpus_per_worker)}
    if r.gpus_per_worker:
        per_worker["GPU"] = float(r.gpus_per_worker)
    for name, amount in (r.custom_per_worker or {}).items():
        per_worker[name] = float(amount)
    per_worker = {k: v for k, v in per_worker.items() if v > 0}
    return TrialRequest(r.workers, per_worker, {"CPU": float(r.driver_cpus)})


def threads_per_worker(cfg: SweepConfig) -> int:
    """Torch threads each worker runs (the worker's rule: torch_threads, else cpus_per_worker
    rounded down, at least 1)."""
    r = cfg.resources
    return r.torch_threads or max(1, math.floor(r.cpus_per_worker))


def embedded_resources(cfg: SweepConfig, cpu_count: int, gpu_count: int) -> dict[str, float]:
    """The logical resources the embedded cluster starts with (``sweep.cluster.start_ray``):
    the cores, raised to one trial's workers, plus one CPU for the trial drivers."""
    r = cfg.resources
    cpus = max(cpu_count, math.ceil(r.workers * r.cpus_per_worker)) + 1
    return {"CPU": float(cpus), **({"GPU": float(gpu_count)} if gpu_count else {})}


def fits_at_once(capacity: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many copies of ``need`` fit in ``capacity`` (0 when a resource is missing)."""
    counts = [math.floor(capacity.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(0, min(counts)) if counts else 0


# ---------------------------------------------------------------------------------------------
# Memory: a lower bound per worker


@dataclass(frozen=True)
class ModelShape:
    params: int  # parameters (tied weights once)
    hidden: int
    layers: int
    vocab: int


def model_shape(cfg: SweepConfig, cache_dir: str | Path | None = None) -> ModelShape | None:
    """The model's size, read from its config without loading weights (a meta-device model
    counts the parameters exactly). None when only the hub knows it (no network here).
    ``cache_dir``: the sweep's model cache; a model materialized there already (a rerun) is
    read from its plain config.json, not from its GGUF file (whose parse takes seconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sweep.config import resolve_model_path
    from trainers.model import cache_target

    m = cfg.model
    cached = cache_target(m, Path(cache_dir)) if cache_dir is not None else None
    try:
        if cached is not None and (cached / "config.json").is_file():
            hf = AutoConfig.from_pretrained(cached, local_files_only=True)
        elif m.config is not None:
            d = dict(m.config)
            if "vocab_size" not in d and m.tokenizer == "byte":
                from trainers.model import byte_tokenizer

                d["vocab_size"] = len(byte_tokenizer())
            hf = AutoConfig.for_model(**d)
        else:
            path = resolve_model_path(m.name_or_path or "")
            hf = AutoConfig.from_pretrained(path, gguf_file=m.gguf_file, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
    except Exception:  # noqa: BLE001 - unknown shape: the memory check is skipped
        return None
    params = sum(p.numel() for p in model.parameters())
    return ModelShape(params, int(hf.hidden_size), int(hf.num_hidden_layers), int(hf.vocab_size))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per worker, each term a lower bound of what the worker loop allocates:

    - ``load``: every rank loads the whole fp32 model (4 B/param) and the trial's full mask
      (1 B/param, bool) before FSDP2 shards them;
    - ``state``: parameters, gradients and the two AdamW moments in fp32 (16 B/param), sharded
      by FSDP2 across the trial's workers;
    - ``train_act``: activations of one micro-batch (tokens x layers x hidden x 34 B, x2 for
      fp32) plus its logits, their log-softmax and gradient (tokens x vocab x 12 B);
    - ``eval_act``: one evaluation batch's fp32 logits plus one row's float copy and
      log-softmax (4 B x vocab x token_length x (eval.batch_size + 2)).

    Host memory per worker = process + max(load, state + max(train_act, eval_act)) on CPU;
    with GPUs the host holds process + load and each GPU state + activations (bf16)."""

    shape: ModelShape
    workers: int
    gpu: bool
    train_tokens: int
    eval_tokens: int
    load: int
    state: int
    train_act: int
    eval_act: int
    process: int = PROCESS_BYTES

    @property
    def device(self) -> int:
        """Per worker on the device that trains: the state and the larger activations."""
        return self.state + max(self.train_act, self.eval_act)

    @property
    def host(self) -> int:
        if self.gpu:
            return self.process + self.load
        return self.process + max(self.load, self.device)

    def describe(self) -> str:
        p = self.shape.params
        return (
            f"{p / 1e6:.1f}M parameters: load {self.load / GIB:.2f} GiB (5 B x params), "
            f"state {self.state / GIB:.2f} GiB (16 B x params / {self.workers} workers), "
            f"activations {max(self.train_act, self.eval_act) / GIB:.2f} GiB "
            f"({self.train_tokens} training / {self.eval_tokens} evaluation tokens per pass), "
            f"process {self.process / GIB:.2f} GiB"
        )


def estimate_memory(cfg: SweepConfig, shape: ModelShape) -> MemoryEstimate:
    r, t = cfg.resources, cfg.train
    gpu = r.gpus_per_worker > 0
    per_worker = max(cfg.grid.batch_size) // max(1, r.workers)
    micro = min(t.micro_batch_size or per_worker, per_worker) or 1
    train_tokens = micro * cfg.data.seq_len
    eval_tokens = cfg.eval.batch_size * cfg.eval.token_length
    act_bytes = ACT_BYTES_PER_HIDDEN * (1 if gpu else 2)
    return MemoryEstimate(
        shape=shape,
        workers=r.workers,
        gpu=gpu,
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        load=5 * shape.params,
        state=math.ceil(16 * shape.params / max(1, r.workers)),
        train_act=train_tokens * (shape.layers * shape.hidden * act_bytes + 12 * shape.vocab),
        eval_act=4 * shape.vocab * cfg.eval.token_length * (cfg.eval.batch_size + 2),
    )


# ---------------------------------------------------------------------------------------------
# The embedded cluster (this machine)


def check_embedded(
    cfg: SweepConfig,
    cpu_count: int,
    gpu_count: int,
    memory_bytes: float,
    oversubscription: float = DEFAULT_OVERSUBSCRIPTION,
    *,
    shape: ModelShape | None = None,
    gpu_memory_bytes: float | None = None,
) -> list[str]:
    """Problems that keep one trial from ever running well on this machine, each naming keys
    and numbers. ``shape``: the model's size (``model_shape``); None skips the memory check.
    ``gpu_memory_bytes``: memory of one GPU (None skips the GPU memory check)."""
    r = cfg.resources
    req = trial_request(cfg)
    problems: list[str] = []
    gpus = r.workers * r.gpus_per_worker
    if gpus and not gpu_count:
        problems.append(
            f"resources.gpus_per_worker={_num(r.gpus_per_worker)}: this machine has no GPU "
            "(set it to 0 to train on CPU, or run on a cluster with GPUs: --address)"
        )
    elif gpus > gpu_count:
        problems.append(
            f"resources.workers x resources.gpus_per_worker = {r.workers} x "
            f"{_num(r.gpus_per_worker)} = {_num(gpus)} GPUs per trial, this machine has "
            f"{gpu_count}: lower either"
        )
    for name in (r.custom_per_worker or {}):
        problems.append(
            f"resources.custom_per_worker.{name}: the embedded cluster has no resource "
            f"{name!r} (it only knows CPU and GPU); connect to a cluster that defines it "
            "(--address) or remove the key"
        )
    limit = oversubscription * cpu_count
    cpus = r.workers * r.cpus_per_worker
    if cpus > limit:
        problems.append(
            f"resources.workers x resources.cpus_per_worker = {r.workers} x "
            f"{_num(r.cpus_per_worker)} = {_num(cpus)} CPUs per trial, this machine has "
            f"{cpu_count} cores (at most {_num(oversubscription)}x over-subscribed: "
            f"{_num(limit)}): lower either, or run on a cluster (--address)"
        )
    threads = r.workers * threads_per_worker(cfg)
    if threads > limit and cpus <= limit:
        problems.append(
            f"resources.workers={r.workers} worker processes x {threads_per_worker(cfg)} torch "
            f"threads (resources.torch_threads) = {threads} threads per trial on "
            f"{cpu_count} cores (at most {_num(oversubscription)}x: {_num(limit)}): lower "
            "resources.workers or resources.torch_threads"
        )
    if shape is not None:
        est = estimate_memory(cfg, shape)
        host = r.workers * est.host
        if host > memory_bytes:
            problems.append(
                f"memory: one trial's {r.workers} workers need at least {host / GIB:.1f} GiB "
                f"({est.host / GIB:.2f} GiB each: {est.describe()}), this machine has "
                f"{memory_bytes / GIB:.1f} GiB: use more resources.workers (FSDP shards the "
                "state), a smaller train.micro_batch_size, data.seq_len or eval.batch_size, "
                "or a larger machine"
            )
        if est.gpu and gpu_memory_bytes:
            per_gpu = gpu_memory_bytes * r.gpus_per_worker
            if est.device > per_gpu:
                problems.append(
                    f"GPU memory: each worker needs at least {est.device / GIB:.1f} GiB "
                    f"({est.describe()}), a worker's share of GPU memory is "
                    f"{per_gpu / GIB:.1f} GiB (resources.gpus_per_worker="
                    f"{_num(r.gpus_per_worker)}): use more resources.workers or a smaller "
                    "train.micro_batch_size, data.seq_len or eval.batch_size"
                )
    if not problems and fits_at_once(embedded_resources(cfg, cpu_count, gpu_count),
                                     req.total()) < 1:
        problems.append(f"one trial needs {_res(req.total())}, which the embedded cluster "
                        f"({_res(embedded_resources(cfg, cpu_count, gpu_count))}) cannot hold")
    return problems


def describe_request(
    cfg: SweepConfig,
    cpu_count: int,
    gpu_count: int,
    n_trials: int | None = None,
    *,
    memory_bytes: float | None = None,
    shape: ModelShape | None = None,
) -> str:
    """One line for ``--dry-run``: what each trial asks for and how many fit on this machine
    ("each trial: 2 workers x (0.5 CPU) + driver 0.01 CPU; this machine: 2 cores, no GPU:
    fits 2 at once")."""
    req = trial_request(cfg)
    gpus = f"{gpu_count} GPU{'s' if gpu_count > 1 else ''}" if gpu_count else "no GPU"
    n = fits_at_once(embedded_resources(cfg, cpu_count, gpu_count), req.total())
    cap = cfg.resources.max_concurrent_trials
    if n < 1:
        fit = "does not fit"
    else:
        if n_trials is not None:
            n = min(n, n_trials)
        fit = f"fits {n} at once"
        if cap is not None and cap < n:
            fit += f", {cap} by resources.max_concurrent_trials"
    line = (f"each trial: {req.describe()}; this machine: {cpu_count} cores, {gpus}: {fit}")
    if shape is not None:
        est = estimate_memory(cfg, shape)
        where = f" of {memory_bytes / GIB:.1f} GiB" if memory_bytes else ""
        line += (f"; memory: at least {est.host / GIB:.2f} GiB per worker{where} "
                 f"({est.describe()})")
    return line


# ---------------------------------------------------------------------------------------------
# An existing cluster


def _node_resources(nodes: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """``ray.nodes()`` entries (dead ones skipped) or plain resource dicts -> (name, totals)."""
    out = []
    for i, node in enumerate(nodes):
        if "Resources" in node:
            if node.get("Alive") is False:
                continue
            name = str(node.get("NodeManagerAddress") or node.get("NodeID", f"node {i}"))
            out.append((name, {k: float(v) for k, v in node["Resources"].items()}))
        else:
            out.append((f"node {i}", {k: float(v) for k, v in node.items()}))
    return out


def _minus(capacity: Mapping[str, float], used: Mapping[str, float]) -> dict[str, float]:
    return {k: capacity.get(k, 0.0) - used.get(k, 0.0) for k in set(capacity) | set(used)}


def _placeable(counts: list[int], workers: int, strategy: str) -> bool:
    if strategy == "STRICT_PACK":
        return max(counts, default=0) >= workers
    if strategy == "STRICT_SPREAD":
        return sum(1 for c in counts if c >= 1) >= workers
    return sum(counts) >= workers  # PACK, SPREAD: soft, any split over nodes


def check_cluster(need: TrialRequest, nodes: Sequence[Mapping[str, Any]],
                  strategy: str = "PACK") -> list[str]:
    """Problems when no placement of one trial (its driver and its ``workers`` identical
    worker bundles, Ray Train's placement ``strategy``) fits the nodes' *total* resources:
    Ray would wait forever. ``nodes``: ``ray.nodes()`` or a list of resource dicts.

    Identical bundles make this exact: a node holds floor(min over resources of total /
    request) workers, independently of the other nodes; the driver is tried on every node."""
    named = _node_resources(nodes)
    problems = []
    for res, amount in need.per_worker.items():
        if not any(caps.get(res, 0.0) > 0 for _, caps in named):
            have = sorted({k for _, caps in named for k in caps if not k.startswith("node:")})
            problems.append(
                f"{_key(res)}={_num(amount)}: no node of the cluster has {res!r} "
                f"(nodes have: {', '.join(have) or 'nothing'})"
            )
    if problems:
        return problems
    hosts = [None] if not need.driver else [i for i, (_, c) in enumerate(named)
                                            if fits_at_once(c, need.driver) >= 1]
    for d in hosts:
        counts = [fits_at_once(_minus(c, need.driver) if i == d else c, need.per_worker)
                  for i, (_, c) in enumerate(named)]
        if _placeable(counts, need.workers, strategy):
            return []
    counts = [fits_at_once(c, need.per_worker) for _, c in named]
    best = sorted(zip(counts, named, strict=True), key=lambda x: -x[0])[:3]
    offer = "; ".join(
        f"{name} ({_res({k: v for k, v in c.items() if k in need.per_worker})}) "
        f"holds {n} worker{'s' if n != 1 else ''}" for n, (name, c) in best
    )
    keys = " or ".join(sorted({_key(k) for k in need.per_worker}))
    return [
        f"one trial needs {need.describe()} ({strategy}); no placement fits the cluster's "
        f"{len(named)} node{'s' if len(named) != 1 else ''} (largest: {offer}): Ray would wait "
        f"forever. Lower resources.workers or {keys}, or add nodes"
    ]


# ---------------------------------------------------------------------------------------------
# Waiting for a placement, bounded


class PlacementTimeout(RuntimeError):
    """One trial's resources were not free within ``resources.placement_timeout_s``."""


def wait_for_placement(
    bundles: list[dict[str, float]],
    timeout_s: float,
    *,
    strategy: str = "PACK",
    poll_s: float = 10.0,
    log: Callable[[str], None] = print,
    create: Callable[[list[dict[str, float]], str], Any] | None = None,
    remove: Callable[[Any], None] | None = None,
    available: Callable[[], Mapping[str, float]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Reserve ``bundles`` (one trial's) as a placement group and wait until Ray places it,
    printing every ``poll_s`` what is awaited and what is free; then release it. Returns the
    seconds waited; raises ``PlacementTimeout`` after ``timeout_s``.

    A probe: it proves that the cluster can place a trial now (an autoscaler sees the
    request and grows meanwhile), and turns Ray's silent endless wait into a bounded one
    with a message. ``create`` (a placement group with ``.wait(timeout_seconds) -> bool``),
    ``remove`` and ``available`` default to Ray's; tests inject them."""
    if create is None or remove is None or available is None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        create = create or (lambda b, s: placement_group(b, strategy=s))
        remove = remove or remove_placement_group
        available = available or ray.available_resources
    start = clock()
    pg = create(bundles, strategy)
    try:
        while True:
            elapsed = clock() - start
            left = timeout_s - elapsed
            if left <= 0:
                free = {k: v for k, v in available().items() if not k.startswith("node:")}
                raise PlacementTimeout(
                    f"resources.placement_timeout_s={_num(timeout_s)}: one trial's resources "
                    f"({len(bundles)} bundles: {bundles}, {strategy}) were not free after "
                    f"{elapsed:.0f} s; free now: {_res(free)}. Wait for other jobs, raise "
                    "the timeout, or ask for less per trial"
                )
            if pg.wait(max(1, math.ceil(min(poll_s, left)))):
                return clock() - start
            log(f"waiting for one trial's resources ({len(bundles)} bundles, {strategy}): "
                f"{clock() - start:.0f} s of resources.placement_timeout_s={_num(timeout_s)}")
    finally:
        remove(pg)
