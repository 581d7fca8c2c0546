"""Zero- and few-shot task accuracy of an in-memory model, through lm-evaluation-harness.

Pruning papers report zero-shot accuracy as lm-eval measures it (Wanda: boolq, rte,
hellaswag, winogrande, arc_easy, arc_challenge, openbookqa), so the harness itself runs the
tasks: ``HFLM`` wraps the model object as it is (no copy, no reload) and ``simple_evaluate``
does the rest, so a number here is the number ``lm_eval --model hf`` gives for the same
weights, tasks, shots and limit. The harness's tasks fetch their datasets from the hub at
run time; a task defined by a local YAML (``dataset_path: json`` with ``data_files``, found
through ``include_path``) needs no network.

Side effects the harness would have on a training process are undone: ``simple_evaluate``
seeds Python's, NumPy's and torch's global generators (so training after an evaluation
would replay the same random stream every epoch) and ``HFLM`` puts the model in eval mode.
The harness is imported on first use (it pulls scipy and sacrebleu), so a process that
evaluates no task never pays for it.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextmanager
def _preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Give back the caller's random generators (Python, NumPy, torch CPU and CUDA) and the
    model's train/eval mode."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train(was_training)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool) -> Any:
    """One index per (paths, defaults): indexing the built-in tasks reads thousands of YAML
    files, too slow to repeat every epoch."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def task_manager(
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool | None = None,
) -> Any:
    """The ``lm_eval`` TaskManager that knows every name in ``tasks``.

    ``include_defaults=None`` indexes the harness's built-in tasks only when ``include_path``
    does not define them all. An unknown name is a ValueError that lists it.
    """
    if include_path is None:
        paths: tuple[str, ...] = ()
    elif isinstance(include_path, (str, Path)):
        paths = (str(include_path),)
    else:
        paths = tuple(str(p) for p in include_path)
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"lm-eval include_path is not a directory: {p}")
    if include_defaults is None:
        if paths:
            local = _task_manager(paths, False)
            if all(t in local.all_tasks for t in tasks):
                return local
        include_defaults = True
    tm = _task_manager(paths, include_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        where = f" in {', '.join(paths)}" if paths else ""
        scope = " or the built-in tasks" if include_defaults and paths else ""
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: not defined{where}{scope}")
    return tm


def _number(x: Any) -> float | None:
    """A metric value as a float; the harness writes "N/A" for a stderr it did not compute."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``simple_evaluate``'s results as rows {task, metric, value, stderr, samples,
    num_fewshot}. A metric with a filter other than "none" is named "metric,filter"."""
    rows = []
    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key:
                continue  # alias, name, sample_len
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            value = _number(value)
            if value is None:
                continue
            stderr = _number(metrics.get(f"{metric}_stderr,{filt}"))
            rows.append({
                "task": task,
                "metric": metric if filt == "none" else f"{metric},{filt}",
                "value": value,
                "stderr": None if stderr is None or math.isnan(stderr) else stderr,
                "samples": n_samples.get(task, {}).get("effective"),
                "num_fewshot": n_shot.get(task),
            })
    return rows


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int = 1,
    include_defaults: bool | None = None,
) -> list[dict[str, Any]] | None:
    """Accuracy (and the tasks' other metrics) of ``model`` on lm-eval ``tasks``.

    ``model`` is a Hugging Face causal LM where it already is (its parameters' device);
    ``tokenizer`` the tokenizer object it was trained with. ``num_fewshot``: shots for every
    task (None: each task's default; the harness keeps 0 for a task whose YAML fixes 0).
    ``limit``: the first N documents per task (a float < 1: that fraction), for smoke runs;
    published numbers use all. Returns one row per (task or group, metric); None in a process
    whose ``LOCAL_RANK`` is not 0, where the harness evaluates but leaves the results to
    local rank 0 (its torchrun convention). That is what a sharded (FSDP) model needs: every
    rank calls this with the same arguments and runs the same forward passes, each one a
    collective (trainers/zeroshot.py).
    """
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tm = task_manager(list(tasks), include_path, include_defaults)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _preserved_state(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=False,
        )
    return None if results is None else result_rows(results)
