"""The trial without Ray: the sweep's own preparation and specs, the trial core and its loop in
one process (``LocalHooks``). The same code runs inside Ray Train workers (trainers/worker.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

import trainers.sparse_state as sparse_state
from sweep.callbacks import ResultsCallback
from sweep.config import load_config
from sweep.layout import SweepLayout
from sweep.plan import build_specs, expand
from sweep.prep import prepare
from sweep.results import EPOCHS_SCHEMA
from trainers.core import TrialCore
from trainers.loop import LocalHooks, run_trial
from trainers.metrics import EPOCH_COLUMNS, IDENTITY_FIELDS, EvalReport, columns_from
from trainers.sparse_state import (
    CheckpointWriteError,
    IncompleteCheckpointError,
    is_complete,
    is_sparse_checkpoint,
)
from trainers.spec import TrialPlan

TRIAL = "s0.5-b2"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """configs/tiny.yaml prepared once (model cache, tokens, windows, masks, dense), no Ray."""
    root = tmp_path_factory.mktemp("storage")
    cfg = load_config("configs/tiny.yaml")
    plans = expand(cfg)
    layout = SweepLayout(root / cfg.name)
    prep = prepare(cfg, str(layout.root), str(root / ".cache" / "models"), plans, threads=1)
    specs = build_specs(cfg, plans, layout, prep.prepared)
    return cfg, layout, prep, specs


def _spec(prepared, **changes):
    return dataclasses.replace(prepared[3][TRIAL], **changes)


def test_specs_carry_the_plan_and_the_prepared_files(prepared):
    cfg, layout, prep, specs = prepared
    assert sorted(specs) == sorted(p.trial_id for p in expand(cfg))
    spec = specs[TRIAL]
    assert spec.plan.sparsity == 0.5 and spec.plan.batch_size == 2
    assert spec.prepared.masks == str(layout.mask("magnitude", None, 0.5))
    assert spec.prepared.dense_perplexity == pytest.approx(prep.dense["perplexity"])
    assert spec.train is cfg.train and spec.log_path == str(layout.trial_log(TRIAL))
    # Frozen: a trial cannot change what it was told.
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seq_len = 1


def test_a_whole_trial_runs_without_ray(prepared, tmp_path):
    spec = _spec(prepared, log_path=str(tmp_path / "t.log"),
                 progress_path=str(tmp_path / "t.progress.json"), export_dir=str(tmp_path / "export"))
    hooks = LocalHooks(tmp_path / "ckpt")
    run_trial(TrialCore(spec), hooks)
    evals = [r for r in hooks.reports if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert [r["steps"] for r in evals] == [0, 8, 16]
    assert evals[-1]["perplexity"] < evals[0]["perplexity"]  # training recovers
    assert all(r["sparsity_actual"] == pytest.approx(0.5, abs=1e-3) for r in evals)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert "summary: baseline" in (tmp_path / "t.log").read_text()


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The trial run start to end (how it checkpoints does not change what it computes)."""
    whole = LocalHooks(tmp_path_factory.mktemp("whole") / "ckpt")
    run_trial(TrialCore(_spec(prepared)), whole)
    return whole


def _checkpointing(prepared, **changes):
    spec = _spec(prepared)
    return dataclasses.replace(spec, checkpoint=dataclasses.replace(spec.checkpoint, **changes))


def _evals(hooks: LocalHooks) -> list[dict]:
    return [r for r in hooks.reports if r["kind"] == "eval"]


def _assert_same_end(resumed: LocalHooks, whole: LocalHooks) -> None:
    final, again = _evals(whole)[-1], _evals(resumed)[-1]
    for key in ("perplexity", "loss", "steps", "sparsity_actual", "best_perplexity"):
        assert again[key] == final[key], key


# 8 steps per epoch. Written now, the epoch-1 checkpoint (step 8) is there when step 12 fails.
# Written in the background, a checkpoint is sent after the first step at which its write has
# finished (at the latest at the next save point): with one every 4 steps, a failure at step
# 13 finds step 8's sent, and step 12's too if its write finished within step 13 (timing).
RESUME_CASES = {
    "dense": ({"format": "dense"}, 12, ([8],)),
    "sparse": ({"async_": False}, 12, ([8],)),
    "sparse-async": ({"every_steps": 4}, 13, ([4, 8], [4, 8, 12])),
    "sparse-async-staging": ({"every_steps": 4, "background_staging": True}, 13,
                             ([4, 8], [4, 8, 12])),
}


@pytest.mark.parametrize("changes, fail_at, sent", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_from_a_checkpoint_equals_the_uninterrupted_trial(
        prepared, uninterrupted, tmp_path, monkeypatch, changes, fail_at, sent):
    spec = _checkpointing(prepared, **changes)
    cut = LocalHooks(tmp_path / "cut")
    monkeypatch.setenv("SWEEP_INJECT_FAILURE", f"{TRIAL}:{fail_at}")  # mid epoch 2
    with pytest.raises(RuntimeError, match="injected failure"):
        run_trial(TrialCore(spec), cut)
    monkeypatch.delenv("SWEEP_INJECT_FAILURE")
    assert cut.checkpoints in sent
    assert is_sparse_checkpoint(tmp_path / "cut") == (changes.get("format") != "dense")
    resumed = LocalHooks(tmp_path / "cut")
    run_trial(TrialCore(spec), resumed)

    assert [r["epoch"] for r in _evals(resumed)] == [2]  # epochs 0 and 1 were not redone
    if cut.checkpoints[-1] == 12:  # it resumed from the last one sent: no step-12 save again
        assert 12 not in resumed.checkpoints
    assert resumed.checkpoints[-1] == 16  # the last one is sent at the trial's end
    _assert_same_end(resumed, uninterrupted)


def test_a_failed_background_write_leaves_the_previous_checkpoint(
        prepared, uninterrupted, tmp_path, monkeypatch):
    """The write of step 12 dies after its data and before its marker: the trial fails at its
    next save point, the unfinished directory is refused, and the resume starts from step 8
    (sent at step 12) and ends as the uninterrupted trial does."""
    spec = _checkpointing(prepared, every_steps=4)
    real, calls = sparse_state.dcp.save, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        real(*args, **kwargs)
        if len(calls) == 3:
            raise OSError("disk gone")

    monkeypatch.setattr(sparse_state.dcp, "save", dies_on_the_third)
    cut = LocalHooks(tmp_path / "cut")
    with pytest.raises(CheckpointWriteError):
        run_trial(TrialCore(spec), cut)
    monkeypatch.setattr(sparse_state.dcp, "save", real)
    assert cut.checkpoints == [4, 8]
    unfinished = tmp_path / ".cut.tmp"
    assert (unfinished / ".metadata").is_file() and not is_complete(unfinished)
    with pytest.raises(IncompleteCheckpointError):
        is_sparse_checkpoint(unfinished)

    resumed = LocalHooks(tmp_path / "cut")
    run_trial(TrialCore(spec), resumed)
    assert resumed.reports[0] == {"kind": "step", "epoch": 1, "steps": 12,
                                  "perplexity": _evals(uninterrupted)[1]["perplexity"]}
    _assert_same_end(resumed, uninterrupted)


def test_one_row_definition_gives_report_callback_and_schema():
    assert EPOCHS_SCHEMA.names == [c.name for c in EPOCH_COLUMNS]
    reported = {f.name for f in dataclasses.fields(EvalReport)} | set(IDENTITY_FIELDS)
    assert set(columns_from("report")) <= reported
    assert set(columns_from("plan")) <= {f.name for f in dataclasses.fields(TrialPlan)}


def test_the_callback_maps_a_report_to_a_full_row(prepared):
    plan = prepared[3][TRIAL].plan
    report = EvalReport(epoch=1, perplexity=50.0, eval_tokens=10, eval_s=0.1, steps=8, samples=16,
                        tokens=1024, sparsity_actual=0.5, baseline_perplexity=100.0,
                        best_perplexity=50.0, best_epoch=1, wall_s=3.0, mem_peak_mb=10.0, lr=1e-3,
                        loss=4.0, tokens_per_s=100.0, epoch_steps=8).to_dict()
    report["node_id"] = "n1"
    row = ResultsCallback("/nonexistent/tiny", "tiny", "m", 200.0, [plan]).epoch_row(plan, report)
    assert set(row) == set(EPOCHS_SCHEMA.names)
    assert row["improvement_pct"] == pytest.approx(50.0)
    assert row["trial_id"] == TRIAL and row["node_id"] == "n1" and row["loss"] == 4.0
    assert row["pattern"] is None  # unstructured
    assert not [k for k, v in row.items() if v is None and k != "pattern"], row
    assert math.isclose(row["sparsity"], 0.5)


def _two_ranks(rank: int, world: int, store: str, spec, root: str, out: str) -> None:
    """One rank of the trial run whole, cut at step 13 (async, every 4 steps) and resumed,
    the ranks sharing each LocalHooks directory."""
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    whole, cut, resumed = (LocalHooks(Path(root) / name) for name in ("whole", "cut", "cut"))
    run_trial(TrialCore(spec, rank, world), whole)
    os.environ["SWEEP_INJECT_FAILURE"] = f"{TRIAL}:13"
    try:
        run_trial(TrialCore(spec, rank, world), cut)
    except RuntimeError as e:
        assert "injected failure" in str(e)
    del os.environ["SWEEP_INJECT_FAILURE"]
    run_trial(TrialCore(spec, rank, world), resumed)
    if rank == 0:
        Path(out).write_text(json.dumps({name: {"reports": h.reports, "checkpoints": h.checkpoints}
                                         for name, h in [("whole", whole), ("cut", cut),
                                                         ("resumed", resumed)]}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_fsdp.py: gloo threads can abort the interpreter's teardown


def test_two_ranks_resume_from_a_background_checkpoint_exactly(prepared, tmp_path):
    """The trial's 2 FSDP ranks (configs/tiny.yaml has workers: 2) save sparse checkpoints in
    the background; the resumed trial ends bit for bit as the uninterrupted one."""
    import json

    import torch.multiprocessing as mp

    spec = _checkpointing(prepared, every_steps=4)
    assert spec.plan.workers == 2
    out = tmp_path / "out.json"
    mp.spawn(_two_ranks, args=(2, str(tmp_path / "store"), spec, str(tmp_path), str(out)),
             nprocs=2, join=True)
    got = {name: LocalHooks() for name in ("whole", "cut", "resumed")}
    for name, h in got.items():
        h.reports, h.checkpoints = (json.loads(out.read_text())[name][k]
                                    for k in ("reports", "checkpoints"))
    assert got["whole"].checkpoints == [4, 8, 12, 16]
    assert got["cut"].checkpoints == [4, 8]
    assert [r["epoch"] for r in _evals(got["resumed"])] == [2]
    _assert_same_end(got["resumed"], got["whole"])
