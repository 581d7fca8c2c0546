"""The baseline (epoch 0) measured once per recipe in preparation, without Ray: the file is what
each trial of the recipe would have measured, bit for bit (one process, and two FSDP ranks),
every trial of the recipe reads the same file whatever its batch size, and a trial it does not
fit evaluates the baseline itself."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

import sweep.prep
from sweep.config import from_dict
from sweep.layout import SweepLayout
from sweep.plan import build_specs, expand
from sweep.prep import prepare
from trainers.core import TrialCore
from trainers.loop import LocalHooks, baseline
from trainers.trial_log import TrialLog

ROOT = Path(__file__).resolve().parents[1]
# Two evaluation sets, no tasks; two recipes (sparsity) of two trials each (batch size).
GRID = {"sparsity": [0.5, 0.8], "batch_size": [2, 4]}
KEYS = ("perplexity", "nll", "tokens", "windows")


def _config(workers: int):
    data = yaml.safe_load((ROOT / "configs" / "tiny-metrics.yaml").read_text())
    data["eval"].pop("tasks")
    data["grid"], data["resources"]["workers"] = GRID, workers
    return from_dict(data)


def _prepare(cfg, root: Path) -> tuple:
    """``prepare`` with every baseline measurement counted (the masks file it was for)."""
    calls: list[str] = []
    measure = sweep.prep.measure_baseline

    def counted(prep, *args):
        calls.append(prep.masks)
        return measure(prep, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep.prep, "measure_baseline", counted)
        plans = expand(cfg)
        layout = SweepLayout(root / cfg.name)
        prep = prepare(cfg, str(layout.root), str(root / ".cache"), plans, threads=1)
    return prep, build_specs(cfg, plans, layout, prep.prepared), layout, calls


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One worker per trial: what a trial in this process (one rank) measures."""
    root = tmp_path_factory.mktemp("baseline")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the notes set's path is relative to the repository
        yield (*_prepare(_config(1), root), root)


def _record(spec) -> dict:
    return json.loads(Path(spec.prepared.baseline).read_text())


def _own(spec) -> dict:
    """The trial's own evaluation of its pruned model on every set (no file to read)."""
    core = TrialCore(dataclasses.replace(
        spec, prepared=dataclasses.replace(spec.prepared, baseline=None), progress_bar=False))
    core.build()
    return {name: core.evaluate(name) for name in core.sets}


def test_each_recipe_is_measured_once_and_read_by_all_its_trials(prepared):
    prep, specs, layout, calls, root = prepared
    assert sorted(Path(c).name for c in calls) == ["magnitude-s0.5.safetensors",
                                                   "magnitude-s0.8.safetensors"]
    files = {tid: spec.prepared.baseline for tid, spec in specs.items()}
    assert files["s0.5-b2"] == files["s0.5-b4"] == str(
        layout.baseline(layout.mask("magnitude", None, 0.5)))
    assert files["s0.8-b2"] == files["s0.8-b4"] != files["s0.5-b2"]
    assert sorted(p.name for p in layout.masks_dir.glob("*.baseline.json")) == [
        "magnitude-s0.5.baseline.json", "magnitude-s0.8.baseline.json"]
    record = _record(specs["s0.5-b2"])
    assert list(record["sets"]) == ["pydoc", "notes"]  # the primary first
    assert (record["eval_batch_size"], record["workers"], record["device"]) == (8, 1, "cpu")
    assert len(prep.baselines) == 2 and all("baseline (epoch 0) magnitude-s0." in line
                                            for line in prep.baselines)
    # A resumed sweep reads them again instead of measuring.
    again, _, _, calls = _prepare(_config(1), root)
    assert calls == [] and all(line.endswith(".baseline.json") and "; reused" in line
                               for line in again.baselines)


def test_the_prepared_baseline_is_the_trials_own_evaluation_bit_for_bit(prepared):
    _, specs, _, _, _ = prepared
    for tid in ("s0.5-b2", "s0.5-b4", "s0.8-b4"):
        record, own = _record(specs[tid]), _own(specs[tid])
        assert list(own) == list(record["sets"])
        for name, ev in own.items():
            assert {k: record["sets"][name][k] for k in KEYS} == {k: ev[k] for k in KEYS}, name


def test_the_trial_reports_the_prepared_baseline_without_evaluating(prepared, tmp_path,
                                                                     monkeypatch):
    _, specs, _, _, _ = prepared
    spec = dataclasses.replace(specs["s0.5-b4"], log_path=str(tmp_path / "t.log"),
                               export_dir=None, progress_path=None)
    record = _record(spec)
    core, hooks = TrialCore(spec), LocalHooks(None)
    core.build()
    with monkeypatch.context() as mp:
        mp.setattr(TrialCore, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        baseline(core, hooks, TrialLog(spec.plan.trial_id, spec.log_path, enabled=True))
    (report,) = hooks.reports
    primary = record["sets"]["pydoc"]
    assert report["epoch"] == 0 and report["loss"] is None
    assert report["perplexity"] == report["baseline_perplexity"] == primary["perplexity"]
    assert report["best_perplexity"] == primary["perplexity"] and report["best_epoch"] == 0
    assert report["eval_s"] == primary["seconds"] and report["eval_tokens"] == primary["tokens"]
    assert report["evals"] == {name: {k: ev[k] for k in ("perplexity", "tokens", "windows",
                                                        "seconds")}
                               for name, ev in record["sets"].items()}
    assert "windows, 1008 tokens, measured once in preparation (" in (tmp_path / "t.log").read_text()
    assert core.st.history == [{"epoch": 0, "perplexity": primary["perplexity"], "loss": None}]


@pytest.mark.parametrize("change", ["no file", "other batch"])
def test_a_trial_the_file_does_not_fit_evaluates_its_baseline(prepared, change):
    _, specs, _, _, _ = prepared
    spec = specs["s0.5-b2"]
    if change == "no file":  # a spec built by a test or a benchmark
        spec = dataclasses.replace(spec, prepared=dataclasses.replace(spec.prepared, baseline=None))
    else:
        spec = dataclasses.replace(spec, eval_batch_size=4)
    spec = dataclasses.replace(spec, log_path=None, export_dir=None, progress_path=None,
                               progress_bar=False)
    core, hooks = TrialCore(spec), LocalHooks(None)
    core.build()
    assert core.shared_baseline() is None
    baseline(core, hooks, TrialLog(spec.plan.trial_id, None, enabled=False))
    want = _record(specs["s0.5-b2"])["sets"]["pydoc"]["perplexity"]
    assert hooks.reports[0]["perplexity"] == pytest.approx(want, rel=1e-9)


def _two_ranks(rank: int, world: int, store: str, specs: list, out: str) -> None:
    """Each spec's trial on two gloo ranks: its own evaluation of every set, and whether the
    ranks agree to read the prepared file."""
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    got = {}
    for spec in specs:
        core = TrialCore(spec, rank, world)
        core.build()
        got[spec.plan.trial_id] = {"read": core.shared_baseline() is not None,
                                   "own": {name: core.evaluate(name) for name in core.sets}}
    if rank == 0:
        Path(out).write_text(json.dumps(got))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_fsdp.py: gloo threads can abort the interpreter's teardown


def test_a_resume_with_two_workers_measures_again_as_two_ranks_evaluate(prepared, tmp_path):
    """The same sweep resumed with 2 workers: preparation measures each recipe again, splitting
    the windows as the trial's 2 FSDP ranks do, and both ranks read the file; what it holds is
    what the ranks measure themselves, bit for bit."""
    import torch.multiprocessing as mp

    root = tmp_path / "resume"
    shutil.copytree(prepared[4], root)
    prep, specs, layout, calls = _prepare(_config(2), root)
    assert len(calls) == 2 and not any("; reused" in line for line in prep.baselines)
    chosen = [dataclasses.replace(specs["s0.5-b4"], progress_bar=False)]
    assert all(_record(s)["workers"] == 2 for s in chosen)
    out = tmp_path / "out.json"
    mp.spawn(_two_ranks, args=(2, str(tmp_path / "store"), chosen, str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    for spec in chosen:
        record = _record(spec)
        assert got[spec.plan.trial_id]["read"]
        for name, ev in got[spec.plan.trial_id]["own"].items():
            assert {k: record["sets"][name][k] for k in KEYS} == {k: ev[k] for k in KEYS}, name
