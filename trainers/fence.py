"""Fencing: a trial's workers stop writing once a newer driver runs their sweep.

A killed sweep driver leaves its Ray workers running for seconds (README, "Resume and
failures"); a driver whose lease was taken over (``sweep.lease``) may run on until its next
renewal. Either can still write a checkpoint, an export or a result after a resumed driver has
started, interleaving stale state with the new run's. Every driver start takes a new attempt
number by creating ``SWEEP_DIR/driver.attempts/NNNNNN.json`` (claims are never deleted), and
every trial is told its driver's attempt (``TrialSpec.attempt``). Before each write a worker
lists the claims: a newer one means its driver was superseded, and it stops without writing
(``Fenced``). The saved loop state carries the attempt that wrote it, so a worker of an old
attempt that restores a newer attempt's checkpoint stops too.

This module is the workers' side and names the claims directory for ``sweep.lease`` (which
creates the claims); it needs no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.storage import Store

ATTEMPTS_DIR = "driver.attempts"


class Fenced(RuntimeError):
    """A newer driver attempt runs this sweep: this worker must stop without writing."""


def claim_name(attempt: int) -> str:
    return f"{attempt:06d}.json"


def attempt_of(name: str) -> int | None:
    """The attempt number of a claim's file name (or path), None for anything else (a
    temporary file of a claim being written)."""
    stem = str(name).rsplit("/", 1)[-1].removesuffix(".json")
    return int(stem) if stem.isdigit() else None


def newest_attempt(attempts_dir: str | Path, store: Store | None = None) -> int:
    """The newest driver attempt claimed in ``attempts_dir`` (0: none). With a URI ``store``
    the claims are listed in the bucket (the staging copy never holds them)."""
    rel = store.rel(Path(attempts_dir)) if store is not None and store.remote else None
    if rel is not None:
        from pyarrow import fs as pafs

        remote = store.remote
        selector = pafs.FileSelector(remote.path(rel), allow_not_found=True)
        names = [i.path for i in remote.fs.get_file_info(selector)
                 if i.type == pafs.FileType.File]
    else:
        try:
            names = [p.name for p in Path(attempts_dir).iterdir()]
        except FileNotFoundError:
            names = []
    return max((a for a in map(attempt_of, names) if a is not None), default=0)


def superseded(attempt: int, attempts_dir: str | Path | None,
               store: Store | None = None) -> str | None:
    """Why a writer of ``attempt`` must not write (a newer attempt exists), or None. A writer
    without an attempt (0) or without a claims directory (a trial run outside a sweep) is
    never fenced."""
    if not attempt or not attempts_dir:
        return None
    newest = newest_attempt(attempts_dir, store)
    if newest > attempt:
        return (f"driver attempt {newest} now runs this sweep; this worker belongs to attempt "
                f"{attempt} (a driver that was killed or taken over)")
    return None


def check_fence(core: Any, store: Store | None = None) -> None:
    """Raise ``Fenced`` on every rank of ``core``'s trial when a newer attempt runs the sweep.

    A collective when the trial has several ranks: each lists the claims and they agree (any
    rank that sees a newer attempt stops them all), so no rank is left waiting in a
    checkpoint's collective for ranks that stopped."""
    spec = core.spec
    if not spec.attempt or not spec.attempts_dir:
        return
    reason = superseded(spec.attempt, spec.attempts_dir, store)
    if core.world > 1:
        import torch

        from trainers.parallel import all_reduce_sum

        flag = torch.tensor([1.0 if reason else 0.0], dtype=torch.float64)
        all_reduce_sum(flag)
        if flag.item() > 0 and reason is None:
            reason = (f"another rank saw a newer driver attempt than this worker's "
                      f"({spec.attempt})")
    if reason:
        raise Fenced(reason)


def adopt_attempt(core: Any) -> None:
    """After build and restore: refuse a checkpoint saved by a newer attempt (this worker is the
    orphan), then mark the state as this attempt's, so that what it saves next carries it."""
    saved = getattr(core.st, "attempt", 0) or 0
    if core.spec.attempt and saved > core.spec.attempt:
        raise Fenced(f"the checkpoint was saved by driver attempt {saved}; this worker belongs "
                     f"to attempt {core.spec.attempt}")
    core.st.attempt = core.spec.attempt
