"""The trial without Ray: the sweep's own preparation and specs, the trial core and its loop in
one process (``LocalHooks``). The same code runs inside Ray Train workers (trainers/worker.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sweep.callbacks import ResultsCallback
from sweep.config import load_config
from sweep.layout import SweepLayout
from sweep.plan import build_specs, expand
from sweep.prep import prepare
from sweep.results import EPOCHS_SCHEMA
from trainers.core import TrialCore
from trainers.loop import LocalHooks, run_trial
from trainers.metrics import EPOCH_COLUMNS, IDENTITY_FIELDS, EvalReport, columns_from
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


def test_resume_from_a_checkpoint_equals_the_uninterrupted_trial(prepared, tmp_path, monkeypatch):
    whole = LocalHooks(tmp_path / "whole")
    run_trial(TrialCore(_spec(prepared)), whole)

    cut = LocalHooks(tmp_path / "cut")
    monkeypatch.setenv("SWEEP_INJECT_FAILURE", f"{TRIAL}:12")  # mid epoch 2, after epoch 1's save
    with pytest.raises(RuntimeError, match="injected failure"):
        run_trial(TrialCore(_spec(prepared)), cut)
    monkeypatch.delenv("SWEEP_INJECT_FAILURE")
    resumed = LocalHooks(tmp_path / "cut")
    run_trial(TrialCore(_spec(prepared)), resumed)

    assert [r["epoch"] for r in resumed.reports] == [2]  # epochs 0 and 1 were not redone
    final, again = whole.reports[-1], resumed.reports[-1]
    for key in ("perplexity", "loss", "steps", "sparsity_actual", "best_perplexity"):
        assert again[key] == final[key], key


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
