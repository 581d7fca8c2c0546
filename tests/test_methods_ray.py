"""The pruning methods, layer-wise rules and recovery objectives through real Ray sweeps: every
combination runs end to end and its rows say which recipe they are."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from sweep.config import load_config
from sweep.layout import SweepLayout
from sweep.results import EPOCHS_FILE, TRIALS_FILE, results_dir
from sweep.runner import run_sweep

pytestmark = pytest.mark.ray

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
ONE_POINT = ["grid.sparsity=[0.5]", "grid.batch_size=[2]", "train.num_epochs=1"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def _tables(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    res = results_dir(sweep_dir)
    return (pq.read_table(res / TRIALS_FILE).to_pylist(), pq.read_table(res / EPOCHS_FILE).to_pylist())


def test_methods_by_layerwise_rule(cluster, tmp_path):
    cfg = load_config(TINY, ONE_POINT + [
        "name=methods", "grid.method=[magnitude,wanda,sparsegpt]", "grid.layerwise=[uniform,owl]",
        "prune.calibration.samples=16", "checkpoint.enabled=false",
    ])
    assert run_sweep(cfg, tmp_path, address=None, dry_run=False) == 0
    trials, epochs = _tables(tmp_path / "methods")
    got = {(t["method"], t["layerwise"]) for t in trials}
    assert got == {(m, r) for m in ("magnitude", "wanda", "sparsegpt") for r in ("uniform", "owl")}
    assert all(t["status"] == "completed" for t in trials)
    for t in trials:
        assert t["trial_id"] == f"{t['method']}-{t['layerwise']}-s0.5-b2"
        # Measured on the weights: exactly 0.5 overall, OWL included (its mean is the target).
        assert t["sparsity_actual"] == pytest.approx(0.5, abs=2e-3), t["trial_id"]
        calibrated = t["method"] != "magnitude" or t["layerwise"] == "owl"
        assert (t["calibration"] is not None) == calibrated, t["trial_id"]
        if calibrated:
            assert json.loads(t["calibration"])["samples"] == 16
    assert {(e["trial_id"], e["epoch"]) for e in epochs} == {(t["trial_id"], k) for t in trials for k in (0, 1)}
    assert {e["layerwise"] for e in epochs} == {"uniform", "owl"}
    # SparseGPT's pruned weights were prepared once and the trial started from them, not from
    # the dense weights under SparseGPT's masks.
    layout = SweepLayout(tmp_path / "methods")
    mask = layout.mask("sparsegpt", None, 0.5)
    assert layout.pruned_weights(mask).is_file()
    assert not layout.pruned_weights(layout.mask("wanda", None, 0.5)).exists()
    baseline = next(e["perplexity"] for e in epochs
                    if e["trial_id"] == "sparsegpt-uniform-s0.5-b2" and e["epoch"] == 0)
    assert _perplexity(layout, mask, with_weights=True) == pytest.approx(baseline, rel=1e-6)
    assert _perplexity(layout, mask, with_weights=False) != pytest.approx(baseline, rel=1e-3)
    owl_log = (layout.logs / "wanda-owl-s0.5-b2.log").read_text()
    assert "layer-wise targets (owl, per block)" in owl_log


def _perplexity(layout: SweepLayout, mask: Path, with_weights: bool) -> float:
    from safetensors.torch import load_file

    from eval.perplexity import evaluate
    from trainers.model import load_model
    from trainers.prune import apply_masks, load_layer_weights, load_masks
    from trainers.spec import ModelConfig

    model_dir = next(d for d in (layout.root.parent / ".cache" / "models").iterdir()
                     if not d.name.startswith("."))
    model = load_model(ModelConfig(name_or_path=str(model_dir)))
    if with_weights:
        load_layer_weights(model, load_file(str(layout.pruned_weights(mask))))
    apply_masks(model, load_masks(mask))
    windows = load_file(str(layout.eval_windows))
    return evaluate(model, windows["input_ids"], windows["labels"], batch_size=8)["perplexity"]


def test_recovery_objectives(cluster, tmp_path):
    cfg = load_config(TINY, ONE_POINT + ["name=objectives", "grid.distill=[none,logits,squarehead]"])
    assert run_sweep(cfg, tmp_path, address=None, dry_run=False) == 0
    trials, epochs = _tables(tmp_path / "objectives")
    assert sorted(t["trial_id"] for t in trials) == ["s0.5-b2-ce", "s0.5-b2-logits", "s0.5-b2-squarehead"]
    assert {t["distill"] for t in trials} == {"none", "logits", "squarehead"}
    assert all(t["status"] == "completed" for t in trials)
    assert {e["distill"] for e in epochs} == {"none", "logits", "squarehead"}
    final = {t["distill"]: t["final_perplexity"] for t in trials}
    baseline = {t["distill"]: t["baseline_perplexity"] for t in trials}
    assert len(set(baseline.values())) == 1  # one pruned model, three objectives
    assert all(final[k] < baseline[k] for k in final)  # each objective recovers
    assert len({round(v, 6) for v in final.values()}) == 3  # and they differ
    log = (SweepLayout(tmp_path / "objectives").logs / "s0.5-b2-squarehead.log").read_text()
    assert "recovery by distillation: squarehead" in log and "teacher" in log
