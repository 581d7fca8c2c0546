"""Zero-shot task accuracy of a trial's model (or the dense one), as the sweep measures it.

``eval.tasks.run_tasks`` does the measuring through lm-evaluation-harness; this module adds
what a sweep needs around it: the tasks config, the working directory a local task's files
are relative to, and the FSDP rule.

**Under FSDP every rank runs the harness.** The harness is given the sharded model object
itself, which it treats as one process's model (``HFLM`` with an initialised model sets its
rank to 0 and world size to 1), so on every rank it builds the same requests in the same
order and runs the same forward passes. Each forward of an FSDP2 model is a collective (the
layers' shards are all-gathered), so the ranks stay in step and none waits on a barrier for
minutes; only rank 0's rows are used (``run_tasks`` returns None where ``LOCAL_RANK`` is not
0). Memory: what an evaluation forward costs, one block's full parameters at a time, as in
training; no full copy of the model. Time: the ranks do not split the requests, each scores
all of them. That is why ``batch_size`` is an integer: the harness's automatic batch size is
probed per process and could differ between ranks.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from trainers.spec import TasksConfig


def task_limit(limit: float | None) -> int | float | None:
    """The harness reads a float below 1 as a fraction and anything else as a count."""
    if limit is None or limit < 1:
        return limit
    return int(limit)


def measure_tasks(model: torch.nn.Module, tokenizer: Any, tasks: TasksConfig,
                  cwd: str | None = None) -> list[dict] | None:
    """Rows {task, metric, value, stderr, samples, num_fewshot} of ``model`` on ``tasks``
    (None on a process whose ``LOCAL_RANK`` is not 0). ``cwd``: the directory that relative
    paths (``include_path``, and the data files a local task's YAML names) are read from."""
    from eval.tasks import run_tasks

    here = Path(cwd) if cwd else Path.cwd()
    include = None
    if tasks.include_path:
        include = Path(tasks.include_path).expanduser()
        include = include if include.is_absolute() else here / include
    with contextlib.chdir(here) if cwd and Path(cwd) != Path(os.getcwd()) else contextlib.nullcontext():
        with torch.no_grad():
            return run_tasks(model, tokenizer, list(tasks.names), num_fewshot=tasks.num_fewshot,
                             limit=task_limit(tasks.limit), include_path=include,
                             batch_size=tasks.batch_size)
