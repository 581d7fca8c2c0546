"""Training checkpoints whose size follows the kept weights, written off the step loop.

Why: with masked AdamW (``trainers.step``) a pruned layer's weight and both Adam moments are
exactly zero at every pruned position, so a dense checkpoint spends most of its bytes on zeros
at high sparsity. The masks are prepared per sweep and known again at load time, so only the
kept entries need to be stored: each masked layer's weight and every optimizer state shaped
like it (AdamW's ``exp_avg``/``exp_avg_sq``) is saved as the 1-D tensor of its local shard's
kept entries, in row-major order, and scattered back on load into a zeroed tensor. Everything
else (embeddings, norms, ``lm_head``, ``step`` counters, param groups) is saved as today.

Why not DCP's ZStandard stream extension (``FileSystemWriter(_extensions=[ZStandard()])``):
it needs the ``zstandard`` package, costs CPU on every byte written and read, and still reads
every zero; ``bench/checkpoint.py`` measures both.

Format (one directory; every rank may pass its own local directory, as Ray Train does)::

    .metadata, __<r>_0.distcp  torch.distributed.checkpoint of
                               {"model": dense entries, "optim": dense entries,
                                "sparse": {"rank<r>": {"<layer>.weight": {"weight": kept,
                                                                         "exp_avg": kept, ...}}}}
    rng_rank<r>.pt             each rank's CPU RNG state (loaded with weights_only=True)
    trainer_state.json         the loop state (rank 0)
    COMPLETE.json              written last, by rank 0, once every rank's files are on disk

The kept values of a rank are that rank's own entry (FSDP2 shards are uneven after packing,
so they are not DTensors): a checkpoint restores on the same world size with the same masks
only; resharding it to another world size is out of scope and refused with a clear error.
A checkpoint without ``COMPLETE.json`` (a crash while writing) is refused by the loader and
skipped by ``latest_complete``.
"""

from __future__ import annotations

import functools
import io
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.utils.weak import WeakIdKeyDictionary

from trainers.checkpoint import STATE_FILE
from trainers.files import write_bytes, write_json, write_text
from trainers.parallel import is_distributed, local

FORMAT = "sparse-dcp/1"
MARKER = "COMPLETE.json"


class IncompleteCheckpointError(RuntimeError):
    """The directory holds no finished checkpoint (its write was interrupted)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint write failed on this rank or another; the directory is not complete."""


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _world() -> int:
    return dist.get_world_size() if is_distributed() else 1


# Mask tensor -> its kept indices. The masks are fixed for a trial (``shard_masks`` makes them
# once), so the indices are computed once per mask and dropped with it.
_KEEP_CACHE = WeakIdKeyDictionary()


def keep_indices(pruned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each masked layer's kept positions in its flattened local shard (ascending, on the
    mask's device). Gathering by index reads only the kept entries, where boolean indexing
    scans the whole mask again for every tensor; int32 indices of the kept entries cost less
    memory than the bool mask once sparsity is above 3/4."""
    out = {}
    for name, where in pruned.items():
        idx = _KEEP_CACHE.get(where)
        if idx is None:
            idx = (~where).reshape(-1).nonzero().squeeze(1)
            idx = idx.to(torch.int32) if where.numel() < 2**31 else idx
            _KEEP_CACHE[where] = idx
        out[name] = idx
    return out


def _is_dense_like(v, shape: torch.Size) -> bool:
    return torch.is_tensor(v) and local(v).shape == shape


def _state_refs(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The DCP state dict with containers of its own, holding references to the live tensors
    (get_state_dict may hand back the optimizer's own per-parameter dicts, which ``_pack``
    must not edit)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_state = {k: dict(v) for k, v in optim_sd["state"].items()}
    return {"model": dict(model_sd), "optim": {**optim_sd, "state": optim_state}}


def _pack(
    refs: dict, pruned: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], verify: bool
) -> tuple[dict, dict]:
    """Takes the masked tensors out of ``refs`` (left with the dense rest, still referencing
    the training tensors) and returns (refs, this rank's kept values as fresh tensors)."""
    model_sd, optim_state = refs["model"], refs["optim"]["state"]
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    checks: list[tuple[str, str, torch.Tensor]] = []  # (fqn, kind, any nonzero where pruned)
    for name, where in pruned.items():
        fqn = f"{name}.weight"
        if fqn not in model_sd:
            raise KeyError(f"masked layer {name}: no {fqn} in the model's state dict")
        idx = keep[name]
        entry = {}
        tensors = {"weight": model_sd.pop(fqn)}
        st = optim_state.get(fqn, {})
        for k in [k for k, v in st.items() if _is_dense_like(v, where.shape)]:
            tensors[k] = st.pop(k)
        for kind, t in tensors.items():
            flat = local(t).detach().reshape(-1)
            if flat.numel() != where.numel():
                raise RuntimeError(f"{fqn} {kind}: local shard does not line up with its mask")
            entry[kind] = flat.index_select(0, idx)
            if verify:
                # NaN != 0 too. A -0.0 passes and restores as +0.0: equal, not bit-identical.
                checks.append((fqn, kind, (flat != 0).logical_and_(where.reshape(-1)).any()))
        sparse[fqn] = entry
    if checks and bool(torch.stack([c for *_, c in checks]).any()):
        bad = [f"{fqn} {kind}" for fqn, kind, c in checks if bool(c)]
        raise ValueError(
            "nonzero values at pruned positions, a sparse checkpoint would drop them: "
            + ", ".join(bad[:5])
        )
    return refs, sparse


def _rng_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(torch.get_rng_state(), buf)
    return buf.getvalue()


def _agree(ok: bool, group) -> bool:
    """True only if every rank succeeded (so all ranks take the same path after)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _write(directory: Path, sd: dict, rng: bytes, state_json: str, rank: int, world: int,
           group) -> None:
    """Every rank's own files first, then the DCP save (a collective whose last act is rank 0
    writing ``.metadata`` after all ranks have written and fsynced their data), then the
    marker. Any failure on any rank leaves no marker and raises on every rank."""
    error: BaseException | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes(directory / f"rng_rank{rank}.pt", rng)
        if rank == 0:
            write_text(directory / STATE_FILE, state_json)
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(directory)), process_group=group)
        if rank == 0:
            write_json(directory / MARKER,
                       {"format": FORMAT, "world_size": world, "saved_at": time.time()})
    except BaseException as e:  # noqa: BLE001 - reported to every rank below
        error = e
    if not _agree(error is None, group):
        raise CheckpointWriteError(f"checkpoint {directory} not written") from error


def _check_fresh(directory: Path) -> None:
    if is_complete(directory):
        raise FileExistsError(
            f"{directory} already holds a complete checkpoint; write each one to a fresh "
            "directory so a crash mid-write cannot damage the previous one"
        )


def is_complete(directory: Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def is_sparse_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds this format (else the dense one of
    ``trainers.checkpoint``, which has no marker). A sparse checkpoint whose marker is
    missing, its write interrupted after the data, is refused here rather than misread as
    dense."""
    directory = Path(directory)
    if is_complete(directory):
        return True
    if (directory / ".metadata").is_file():
        keys = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        if any(k.startswith("sparse.") for k in keys):
            raise IncompleteCheckpointError(
                f"{directory} has no {MARKER}: its save did not finish")
    return False


def latest_complete(root: Path) -> Path | None:
    """The most recently saved complete checkpoint directly under ``root`` (None if none)."""
    best: tuple[float, Path] | None = None
    for d in Path(root).iterdir() if Path(root).is_dir() else ():
        if is_complete(d):
            saved = json.loads((d / MARKER).read_text())["saved_at"]
            if best is None or saved > best[0]:
                best = (saved, d)
    return None if best is None else best[1]


def save_sparse_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruned: dict[str, torch.Tensor],
    state: dict,
    verify: bool = True,
) -> None:
    """Synchronous save; all ranks call it (each with its own or a shared ``directory``).
    ``pruned``: each masked layer's pruned positions, as ``trainers.parallel.shard_masks``
    gives. With ``verify`` a nonzero value at a pruned position raises instead of being lost."""
    directory = Path(directory)
    _check_fresh(directory)
    dense, sparse = _pack(_state_refs(model, optimizer), pruned, keep_indices(pruned), verify)
    sd = {**dense, "sparse": {f"rank{_rank()}": _to_cpu(sparse)}}
    _write(directory, sd, _rng_bytes(), json.dumps(state, indent=1), _rank(), _world(), None)


def _to_cpu(sparse: dict) -> dict:
    return {f: {k: v.cpu() for k, v in e.items()} for f, e in sparse.items()}


def load_sparse_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pruned: dict[str, torch.Tensor],
) -> dict:
    """Restore model, optimizer and this rank's RNG exactly; returns the loop state. Same
    world size and masks as at save time (the masks are part of the sweep's prepared data)."""
    directory = Path(directory)
    if not is_complete(directory):
        raise IncompleteCheckpointError(f"{directory} has no {MARKER}: its save did not finish")
    marker = json.loads((directory / MARKER).read_text())
    if marker.get("format") != FORMAT:
        raise ValueError(f"{directory}: format {marker.get('format')!r}, expected {FORMAT!r}")
    if marker["world_size"] != _world():
        raise ValueError(
            f"{directory} was saved by {marker['world_size']} ranks, this run has {_world()}: "
            "the kept values are stored per rank, resharding is not supported"
        )
    keep = keep_indices(pruned)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_sd = dict(model_sd)
    optim_state = {k: dict(v) for k, v in optim_sd["state"].items()}
    targets: list[tuple[dict, str, torch.Tensor, torch.Tensor, str]] = []
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    for name, where in pruned.items():
        fqn = f"{name}.weight"
        if fqn not in model_sd:
            raise KeyError(f"masked layer {name}: no {fqn} in the model's state dict")
        st = optim_state.get(fqn, {})
        owners = [(model_sd, "weight", fqn)] + [
            (st, k, k) for k, v in st.items() if _is_dense_like(v, where.shape)
        ]
        sparse[fqn] = {}
        for owner, kind, key in owners:
            t = owner.pop(key)
            values = torch.empty(keep[name].numel(), dtype=t.dtype)
            sparse[fqn][kind] = values
            targets.append((owner, key, t, values, name))
    sd = {"model": model_sd, "optim": {**optim_sd, "state": optim_state},
          "sparse": {f"rank{_rank()}": sparse}}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(directory)))
    with torch.no_grad():
        for owner, key, t, values, name in targets:
            loc = local(t)
            full = torch.zeros(loc.numel(), dtype=loc.dtype, device=loc.device)
            full.index_copy_(0, keep[name].to(loc.device, torch.long), values.to(loc.device))
            loc.copy_(full.view_as(loc))
            owner[key] = t
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = directory / f"rng_rank{_rank()}.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((directory / STATE_FILE).read_text())


class AsyncCheckpointer:
    """Sparse checkpoints written in a background thread, at most one in flight.

    ``save`` waits for the previous write (if any), copies the state off the training tensors
    (the kept values of masked layers, a CPU snapshot of the rest, the RNG state and the loop
    state as JSON) and returns: the step loop waits only for that copy. The write then runs in
    a single background thread. Collectives of the checkpoint (DCP's plan exchange, the
    agreements that every rank's snapshot and write succeeded) go over a gloo group of their
    own, created here (all ranks must construct the checkpointer together): DCP's collectives
    on the default group from a second thread interleave with the training's and gloo aborts
    on the mismatch.

    ``background_staging``: take the copy in the background thread too, so that it overlaps
    the next step's forward and backward passes, which only read the weights and the
    optimizer state. An optimizer step pre-hook holds the next ``optimizer.step()`` until the
    copy is done (``staging_wait_s`` adds up how long it held it). Only for loops where
    nothing but ``optimizer.step()`` and what follows it changes those tensors in place, as
    in ``trainers.step.train_step``.

    ``on_done(directory)`` runs after the write has completed on every rank, in the thread
    that next calls ``save`` or ``wait``, never in the writer thread: those calls happen at
    the same step on every rank, so a callback that is itself a collective (Ray Train's
    ``report`` is a barrier) runs in step on all ranks. A failed write raises
    ``CheckpointWriteError`` from that same call, and its callback is not run.

    The CPU snapshot of the dense part reuses its buffers from one save to the next (pinned
    when the model is on CUDA), which is safe because a save never starts before the previous
    write has finished.

    ``verify``: check that every pruned position is zero (else the sparse checkpoint would not
    restore exactly) until one save has passed the check (``"first"``, the default), on every
    save (``"always"``) or never. The check reads every entry of every masked tensor, where
    the packing reads only the kept ones, so it would be the larger part of every stall. The
    zeros are an invariant of the masked step (``trainers.step``): a loop that breaks it
    shows at its first save.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        pruned: dict[str, torch.Tensor],
        verify: str = "first",
        background_staging: bool = False,
    ) -> None:
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', not {verify!r}")
        self.model, self.optimizer, self.pruned, self.verify = model, optimizer, pruned, verify
        self.background_staging = background_staging
        self._verified = False
        self._keep = keep_indices(pruned)
        self._group = dist.new_group(backend="gloo") if is_distributed() else None
        # ``finished``'s agreement, from the training thread while the writer thread may be
        # in a collective of ``_group``: a group of its own, so the two never interleave.
        self._poll_group = dist.new_group(backend="gloo") if is_distributed() else None
        cuda = any(p.is_cuda for p in model.parameters())
        self._stager = DefaultStager(StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
            use_non_blocking_copy=False,
        ))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparse-ckpt")
        self._inflight: tuple[Future, Path, Callable[[Path], None] | None] | None = None
        self._staged = threading.Event()
        self._staged.set()
        self.staging_wait_s = 0.0
        self._hook = (optimizer.register_step_pre_hook(self._before_step)
                      if background_staging else None)

    def _before_step(self, *_) -> None:
        if not self._staged.is_set():
            t0 = time.perf_counter()
            self._staged.wait()
            self.staging_wait_s += time.perf_counter() - t0

    def _snapshot(self, refs: dict, verify: bool) -> dict:
        """The CPU copy; every rank learns whether every rank's copy succeeded."""
        error: BaseException | None = None
        try:
            dense, sparse = _pack(refs, self.pruned, self._keep, verify)
            sd = {**self._stager.stage(dense), "sparse": {f"rank{_rank()}": _to_cpu(sparse)}}
        except BaseException as e:  # noqa: BLE001 - reported to every rank below
            error = e
        finally:
            self._staged.set()
        if not _agree(error is None, self._group):
            if error is not None:
                raise error
            raise CheckpointWriteError("another rank could not snapshot its state")
        self._verified = self._verified or verify
        return sd

    def _snapshot_and_write(self, refs: dict, verify: bool, write: Callable[[dict], None]):
        write(self._snapshot(refs, verify))

    def save(self, directory: Path, state: dict,
             on_done: Callable[[Path], None] | None = None) -> None:
        self.wait()
        directory = Path(directory)
        _check_fresh(directory)
        verify = self.verify == "always" or (self.verify == "first" and not self._verified)
        refs = _state_refs(self.model, self.optimizer)
        write = functools.partial(
            _write, directory, rng=_rng_bytes(), state_json=json.dumps(state, indent=1),
            rank=_rank(), world=_world(), group=self._group,
        )
        if self.background_staging:
            self._staged.clear()
            future = self._executor.submit(self._snapshot_and_write, refs, verify, write)
        else:
            future = self._executor.submit(write, self._snapshot(refs, verify))
        self._inflight = (future, directory, on_done)

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None and not self._inflight[0].done()

    def finished(self) -> bool:
        """Whether the save in flight has been written on every rank (False when none is).
        While one is in flight, a one-integer all-reduce over a gloo group of its own: every
        rank calls it at the same step (saves start at the same step everywhere, so all
        ranks agree whether one is in flight). Then ``wait`` returns at once and runs the
        callback in step on every rank."""
        if self._inflight is None:
            return False
        return _agree(self._inflight[0].done(), self._poll_group)

    def wait(self) -> Path | None:
        """Block until the save in flight is written; run its callback here; return its
        directory (None when nothing was in flight)."""
        if self._inflight is None:
            return None
        future, directory, on_done = self._inflight
        self._inflight = None
        future.result()
        if on_done is not None:
            on_done(directory)
        return directory

    def abandon(self) -> None:
        """Stop without waiting for the save in flight and without running its callback: for
        a rank that failed. Its peers may never finish their part of that write (a wait
        would hang on its collectives) and must not be asked into a callback's collective.
        The unfinished directory gets no marker or is never registered, so the checkpoint
        a restart restores is the previous one."""
        pending, self._inflight = self._inflight, None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        if pending is None or pending[0].done():
            self._stager.close()  # else a write may still read its buffers

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._hook is not None:
                self._hook.remove()
            self._executor.shutdown(wait=True)
            self._stager.close()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
