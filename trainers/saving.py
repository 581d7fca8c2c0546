"""What a save point does, the same for Ray Train (``trainers.worker.RayHooks``) and one plain
process (``trainers.loop.LocalHooks``): the hooks differ only in where a checkpoint is written
(``fresh_dir``), how metrics and a finished checkpoint are handed on (``send``: Ray Train's
report, or a list and a rename) and what an abandoned directory needs (``discard``).

Written now (``checkpoint.format: dense``, or ``async: false``): the state is saved into a
fresh directory and sent with the save point's metrics, as before.

Written in the background (sparse and ``async``, ``TrialCore.checkpointer``): the save
point's metrics are sent at once without a checkpoint (Tune sees an evaluation when it
happens), the state is copied and written off the step loop, and the finished checkpoint is
sent with the metrics of the step it holds (kind "step", which the results callback and
TensorBoard skip, and which repeats an evaluation schedulers have already seen) after the
first training step at which every rank has finished writing it (``poll``, one small
all-reduce per step while a write is in flight), at the latest at the next save point
(after that point's own metrics) or at the trial's end (``flush``). Ray Train uploads it in
the background until the loop's next report. Each of those calls happens at the same step
on every rank, so Ray Train's report, a barrier, lines up. A checkpoint that was never sent
is never restored: after a crash a trial resumes from the last one sent, which is the last
one written unless the crash came while the next was being written or in the step it
finished. The fence is checked again before that send,
so a worker orphaned while its write ran never registers it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.fence import check_fence

if TYPE_CHECKING:
    from trainers.core import TrialCore
    from trainers.storage import Store


def saved_step(core: TrialCore) -> dict:
    """The metrics a checkpoint is sent with: where it stands (as mid-epoch save points
    report), the last evaluation's perplexity for schedulers that read every result."""
    st = core.st
    return {"kind": "step", "epoch": st.epoch, "perplexity": st.history[-1]["perplexity"],
            "steps": st.step}


class SavingHooks:
    """The save-point half of ``trainers.loop.Hooks``; subclasses give the three methods."""

    store: Store | None = None
    _pending: Path | None = None  # the directory of the background write not yet sent

    def fresh_dir(self, core: TrialCore) -> Path:
        """An empty directory for the next checkpoint (every rank calls it)."""
        raise NotImplementedError

    def send(self, core: TrialCore, metrics: dict, checkpoint: Path | None) -> None:
        """Hand on metrics, with a complete checkpoint directory or without (every rank)."""
        raise NotImplementedError

    def discard(self, directory: Path) -> None:
        """A background write's directory that will never be sent."""

    def save_point(self, core: TrialCore, metrics: dict) -> None:
        """Checkpoint the state as it is now and report ``metrics`` (every rank)."""
        if core.checkpointer is None:
            directory = self.fresh_dir(core)
            core.save(directory, asdict(core.st))
            self.send(core, metrics, directory)
            return
        self.send(core, metrics, None)  # first: nothing waits for the previous write
        self.flush(core)
        state, held = asdict(core.st), saved_step(core)
        self._pending = self.fresh_dir(core)
        core.checkpointer.save(self._pending, state,
                               on_done=lambda d: self._written(core, held, d))

    def _written(self, core: TrialCore, metrics: dict, directory: Path) -> None:
        """A background write finished on every rank: send it, unless the sweep has a newer
        driver now (``Fenced`` propagates after the directory is dropped)."""
        self._pending = None
        try:
            check_fence(core, self.store)
        except BaseException:
            self.discard(directory)
            raise
        self.send(core, metrics, directory)

    def poll(self, core: TrialCore) -> None:
        """After a training step (every rank): send the background write once it has
        finished everywhere, so a crash soon after loses nothing it holds."""
        checkpointer = core.checkpointer
        if checkpointer is not None and checkpointer.finished():
            checkpointer.wait()

    def flush(self, core: TrialCore) -> None:
        """Wait for the write in flight and send it (every rank, at the same point)."""
        if core.checkpointer is not None:
            core.checkpointer.wait()

    def close(self, core: TrialCore) -> None:
        """At the trial's end on this rank, whatever ended it: a write still in flight (after
        an error or a fence) is abandoned, never sent, its directory discarded."""
        checkpointer = getattr(core, "checkpointer", None)
        if checkpointer is not None:
            checkpointer.abandon()
        if self._pending is not None:
            self.discard(self._pending)
            self._pending = None
