"""``sweep status`` and the dry run's estimates: what a person learns of a sweep without Ray.

The status is read from files a real sweep writes (sweep.yaml from the tiny config, results
through the real ``ResultsWriter``, rank 0's progress heartbeat in ``trainers.loop.Progress``'s
format, the driver lease of ``sweep.lease``) and checked against figures computed here by
hand. The estimates are checked against what the code they predict actually produces:
evaluation windows, a checkpoint written by ``trainers.checkpoint``, GGUF and safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from sweep import status as st
from sweep.cli import main
from sweep.config import to_dict
from sweep.estimate import (
    CHECKPOINT_BYTES_PER_PARAM,
    count_parameters,
    disk_line,
    estimate,
    eval_tokens_per_evaluation,
    format_estimate,
    gguf_parameters,
    safetensors_parameters,
)
from sweep.layout import SweepLayout
from sweep.plan import expand
from sweep.results import ResultsWriter
from sweep.runner import config_from_args
from trainers.loop import Progress

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
SEQ = 64  # tiny.yaml: data.seq_len

# s0.5-b4 (4 steps/epoch, 2 epochs) is running: epoch 1 evaluated at wall 9 s after the
# baseline at wall 2 s, at 1024 tokens/s; its heartbeat says 6 of 8 steps.
RUN_WALL = (2.0, 9.0)
RUN_TPS = 1024.0


def _cfg():
    return config_from_args(str(TINY), [], {})


def _epoch(tid: str, b: int, epoch: int, ppl: float, wall: float, tps: float | None) -> dict:
    spe = 16 // b
    return {"sweep": "tiny", "trial_id": tid, "method": "magnitude", "sparsity": 0.5 if "0.5" in tid else 0.8,
            "batch_size": b, "epoch": epoch, "perplexity": ppl, "steps": epoch * spe,
            "samples": epoch * spe * b, "tokens": epoch * spe * b * SEQ, "wall_s": wall,
            "tokens_per_s": tps, "timestamp": T0}


def _trial(tid: str, b: int, status: str, done: int, **extra) -> dict:
    return {"sweep": "tiny", "trial_id": tid, "method": "magnitude", "batch_size": b,
            "sparsity": 0.5 if "0.5" in tid else 0.8, "steps_per_epoch": 16 // b, "num_epochs": 2,
            "epochs_completed": done, "status": status, "updated_at": T0, **extra}


def write_sweep(root: Path) -> SweepLayout:
    """The tiny sweep mid-run: s0.5-b2 completed, s0.5-b4 running, s0.8-b2 errored, s0.8-b4
    pending."""
    cfg = _cfg()
    layout = SweepLayout(root / cfg.name)
    layout.logs.mkdir(parents=True)
    layout.config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    w = ResultsWriter(layout.root)
    for e, (ppl, wall, tps) in enumerate([(259.6, 3.0, None), (109.7, 5.0, 1500.0), (54.0, 7.0, 1800.0)]):
        w.upsert_epoch(_epoch("s0.5-b2", 2, e, ppl, wall, tps))
    w.upsert_trial(_trial("s0.5-b2", 2, "completed", 2, baseline_perplexity=259.6,
                          final_perplexity=54.0, best_perplexity=54.0, best_epoch=2, wall_s=7.0))
    w.upsert_epoch(_epoch("s0.5-b4", 4, 0, 259.6, RUN_WALL[0], None))
    w.upsert_epoch(_epoch("s0.5-b4", 4, 1, 143.8, RUN_WALL[1], RUN_TPS))
    w.upsert_trial(_trial("s0.5-b4", 4, "running", 1, baseline_perplexity=259.6,
                          final_perplexity=143.8, best_perplexity=143.8, best_epoch=1))
    w.upsert_trial(_trial("s0.8-b2", 2, "errored", 0, stop_reason="RuntimeError: boom"))
    w.upsert_trial(_trial("s0.8-b4", 4, "pending", 0))
    return layout


def beat(layout: SweepLayout, tid: str, epoch: int, step: int, t: float) -> None:
    """Rank 0's heartbeat, written by the real writer."""
    p = Progress(str(layout.progress(tid)))
    p(epoch, step)
    p.close()
    # Progress stamps time.time(); pin it so the test controls the rate.
    rec = json.loads(layout.progress(tid).read_text())
    rec["time"] = t
    layout.progress(tid).write_text(json.dumps(rec).ljust(128))


def test_status_of_a_running_sweep(tmp_path):
    layout = write_sweep(tmp_path)
    beat(layout, "s0.5-b4", 1, 6, 1000.0)
    reader = st.StatusReader(layout.root)
    s = reader.read()
    by = {t.trial_id: t for t in s.trials}
    assert [t.trial_id for t in s.trials] == [p.trial_id for p in expand(_cfg())]
    assert s.counts == {"done": 1, "running": 1, "pending": 1, "errored": 1}
    assert not s.finished and s.prep is None

    done = by["s0.5-b2"]
    assert (done.status, done.step, done.total_steps, done.epoch) == ("completed", 16, 16, 2)
    assert (done.last_perplexity, done.best_perplexity, done.best_epoch) == (54.0, 54.0, 2)
    assert done.eta_s is None
    assert by["s0.8-b2"].stop_reason == "RuntimeError: boom"
    assert (by["s0.8-b4"].status, by["s0.8-b4"].step) == ("pending", 0)

    run = by["s0.5-b4"]
    assert (run.epoch, run.step, run.total_steps) == (2, 6, 8)
    assert (run.last_perplexity, run.best_perplexity) == (143.8, 143.8)
    # One heartbeat seen: the rate is the last epoch's, 1024 tok/s = 4 steps/s at 4 x 64
    # tokens a step. Epoch 1 took 7 s of wall time, 1 s of it training 1024 tokens: a 6 s
    # evaluation. Left: 2 steps and one evaluation.
    assert run.tokens_per_s == pytest.approx(RUN_TPS)
    eval_s = (RUN_WALL[1] - RUN_WALL[0]) - 4 * 4 * SEQ / RUN_TPS
    assert run.eta_s == pytest.approx(2 / (RUN_TPS / (4 * SEQ)) + eval_s)

    # A second heartbeat 0.5 s after the first, one step on: 2 steps/s from the heartbeats.
    beat(layout, "s0.5-b4", 1, 7, 1000.5)
    run = {t.trial_id: t for t in reader.read().trials}["s0.5-b4"]
    assert run.step == 7
    assert run.tokens_per_s == pytest.approx(2.0 * 4 * SEQ)
    assert run.eta_s == pytest.approx(1 / 2.0 + eval_s)

    # A heartbeat of an earlier attempt (behind the results) never moves the step back.
    beat(layout, "s0.5-b4", 0, 3, 1001.0)
    run = {t.trial_id: t for t in st.StatusReader(layout.root).read().trials}["s0.5-b4"]
    assert run.step == 4 and run.epoch == 1


def test_format_and_json(tmp_path, capsys):
    layout = write_sweep(tmp_path)
    beat(layout, "s0.5-b4", 1, 6, 1000.0)
    assert main(["status", str(layout.root)]) == 0
    out = capsys.readouterr().out
    assert "4 trials: 1 done, 1 running, 1 pending, 1 errored" in out
    row = next(line for line in out.splitlines() if line.startswith("s0.5-b4"))
    assert row.split()[:4] == ["s0.5-b4", "running", "2/2", "6/8"]
    assert main(["status", str(layout.root), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"done": 1, "running": 1, "pending": 1, "errored": 1}
    assert {t["trial_id"]: t["step"] for t in data["trials"]} == {
        "s0.5-b2": 16, "s0.5-b4": 6, "s0.8-b2": 0, "s0.8-b4": 0}
    line = st.status_line(st.StatusReader(layout.root).read())
    assert "s0.5-b4 ep 2/2 step 6/8, 1,024 tok/s, ppl 143.8, ETA" in line


def test_watch_ends_with_the_sweep(tmp_path, capsys):
    """--watch (not a terminal) prints each refresh and returns once every trial ended and no
    driver is alive."""
    layout = write_sweep(tmp_path)
    w = ResultsWriter(layout.root)
    for tid in ("s0.5-b4", "s0.8-b4"):
        w.upsert_trial({"trial_id": tid, "status": "completed", "epochs_completed": 2})
    assert main(["status", str(layout.root), "--watch", "0.5", "--format", "json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["finished"] is True


def test_status_of_a_missing_sweep(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert "not a sweep" in capsys.readouterr().err


def test_preparing_before_any_result(tmp_path):
    cfg = _cfg()
    layout = SweepLayout(tmp_path / cfg.name)
    layout.root.mkdir()
    layout.config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    s = st.StatusReader(layout.root).read()
    assert s.prep == "model and training tokens"
    assert [t.status for t in s.trials] == ["pending"] * 4
    layout.prep.mkdir()
    for path in (layout.train_tokens, layout.eval_windows):
        path.write_bytes(b"x")
    assert st.StatusReader(layout.root).read().prep == "dense perplexity"


def _lease(layout: SweepLayout, **fields) -> None:
    me = psutil.Process(os.getpid())
    record = {"host": socket.gethostname(), "pid": me.pid, "pid_started": me.create_time(),
              "attempt": 1, "token": "t", "ttl_s": 60.0, "started_at": time.time(),
              "renewed_at": time.time(), **fields}
    (layout.root / "driver.lease").write_text(json.dumps(record))


def test_driver_from_the_lease(tmp_path, monkeypatch):
    layout = write_sweep(tmp_path)
    _lease(layout)
    d = st.driver_status(layout)
    assert (d.host, d.pid, d.alive) == (socket.gethostname(), os.getpid(), True)
    _lease(layout, renewed_at=time.time() - 600)
    d = st.driver_status(layout)
    assert d.alive is False and "not renewed" in d.detail
    # Without sweep.lease the file is still read; without the file the driver is unknown.
    import sweep

    monkeypatch.setitem(sys.modules, "sweep.lease", None)
    monkeypatch.delattr(sweep, "lease", raising=False)
    d = st.driver_status(layout)
    assert d.alive is False and "not renewed" in d.detail
    _lease(layout)
    assert st.driver_status(layout).alive is True
    (layout.root / "driver.lease").unlink()
    assert st.driver_status(layout).alive is None


def test_driver_of_a_real_lease(tmp_path):
    lease = pytest.importorskip("sweep.lease")
    layout = write_sweep(tmp_path)
    held = lease.acquire(None, layout.root, ttl_s=30)
    try:
        d = st.StatusReader(layout.root).read().driver
        assert (d.host, d.pid, d.alive) == (socket.gethostname(), os.getpid(), True)
    finally:
        held.release()
    assert st.StatusReader(layout.root).read().driver.alive is False


def test_eta_rules():
    # 10 steps at 2 steps/s and 2 evaluations of 3 s.
    assert st.trial_eta(10, 2, 2.0, 3.0, None, 5) == pytest.approx(11.0)
    # No rate: whole epochs at their wall time (10 steps = 2 epochs of 5 at 8 s).
    assert st.trial_eta(10, 2, None, None, 8.0, 5) == pytest.approx(16.0)
    assert st.trial_eta(10, 2, None, None, None, 5) is None
    assert st.trial_eta(0, 0, None, None, None, 5) == 0.0
    rows = [{"epoch": 0, "wall_s": 2.0, "tokens_per_s": None},
            {"epoch": 1, "wall_s": 9.0, "tokens_per_s": 512.0},
            {"epoch": 2, "wall_s": 14.0, "tokens_per_s": 1024.0}]
    wall, eval_s = st.epoch_timing(rows, tokens_per_epoch=1024)
    assert wall == pytest.approx(6.0) and eval_s == pytest.approx(5.0)
    # A restart (wall time begins again) is not an epoch's duration.
    wall, _ = st.epoch_timing(rows[:2] + [{"epoch": 2, "wall_s": 1.0, "tokens_per_s": 1.0}], 1024)
    assert wall == pytest.approx(7.0)


# ---------------------------------------------------------------------------------------------
# The dry run's estimates


def test_eval_tokens_match_the_windows():
    """Tokens one evaluation scores, against the labels ``make_windows`` builds."""
    from eval.perplexity import IGNORE_INDEX, make_windows

    tokens = torch.arange(1000)
    for length, stride, k in [(64, 64, 16), (64, 32, 9), (128, 16, None), (10, 10, 1)]:
        _, labels = make_windows(tokens, length, stride, k)
        scored = int((labels[:, 1:] != IGNORE_INDEX).sum())  # position 0 predicts nothing
        assert eval_tokens_per_evaluation(length, stride, labels.shape[0]) == scored


def test_estimate_of_the_tiny_sweep(tmp_path):
    cfg = _cfg()
    plans = expand(cfg)
    est = estimate(cfg, plans)
    from trainers.model import build_model

    n = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert est.params.n == n
    for t, p in zip(est.trials, plans, strict=True):
        assert t.steps == p.steps_per_epoch * p.num_epochs
        assert t.train_tokens == t.steps * p.batch_size * cfg.data.seq_len
        assert t.eval_tokens == 3 * (63 + 15 * 63)  # baseline + 2 epochs, 16 windows of 64
        # Sparse (the default format): 12 bytes per parameter outside the pruned layers'
        # weights and per kept weight of them.
        masked = est.params.masked
        kept = masked - round(p.sparsity * masked)
        assert 0 < masked < n and t.checkpoint_bytes == cfg.checkpoint.keep_last * 12 * (n - masked + kept)
        assert t.export_bytes == 4 * n
    text = format_estimate(est)
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.split()[1:3] == [f"{sum(t.steps for t in est.trials):,}", "8,192"]
    assert f"{n:,} parameters" in text and "at most 1,008 per evaluation" in text
    dense = estimate(config_from_args(str(TINY), ["checkpoint.format=dense"], {}), plans)
    assert {t.checkpoint_bytes for t in dense.trials} == {cfg.checkpoint.keep_last * 12 * n}
    off = config_from_args(str(TINY), ["checkpoint.enabled=false", "checkpoint.export_best=false"], {})
    est = estimate(off, plans)
    assert est.total("checkpoint_bytes") == 0 and "checkpoints off" in disk_line(est)


def test_checkpoint_size_is_what_is_written(tmp_path):
    """12 bytes per parameter: the real training checkpoint of a model after an AdamW step."""
    from trainers.checkpoint import save_training_state
    from trainers.spec import ModelConfig

    cfg_dict = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 259, "max_position_embeddings": 64}
    from trainers.model import build_model

    model = build_model(ModelConfig(config=cfg_dict))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 259, (1, 8)), labels=torch.randint(0, 259, (1, 8))).loss.backward()
    opt.step()
    save_training_state(tmp_path / "ckpt", model, opt, {"epoch": 1})
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    n = count_parameters(ModelConfig(config=cfg_dict)).n
    assert n == sum(p.numel() for p in model.parameters())
    predicted = n * CHECKPOINT_BYTES_PER_PARAM
    assert predicted <= written <= predicted * 1.05, (predicted, written)


def test_sparse_checkpoint_size_is_what_is_written(tmp_path):
    """The sparse format (the default): 12 bytes per parameter outside the pruned layers and
    per kept weight of them, against the real checkpoint of a pruned model after AdamW steps."""
    from sweep.estimate import checkpoint_bytes
    from trainers.model import build_model
    from trainers.parallel import shard_masks
    from trainers.prune import apply_masks, magnitude_masks
    from trainers.sparse_state import save_sparse_state
    from trainers.spec import ModelConfig
    from trainers.step import train_step

    # Big enough that DCP's per-tensor framing (about 2 KB a tensor) is within the 5%.
    cfg_dict = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 259, "max_position_embeddings": 64}
    params = count_parameters(ModelConfig(config=cfg_dict))
    model = build_model(ModelConfig(config=cfg_dict))
    masks = magnitude_masks(model, 0.7)
    assert params.masked == sum(m.numel() for m in masks.values())
    apply_masks(model, masks)
    pruned = shard_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 259, (4, 16))
    for _ in range(2):
        train_step(model, opt, data, [[0, 1]], pruned, 1e-3, 1.0, torch.device("cpu"))
    save_sparse_state(tmp_path / "ckpt", model, opt, pruned, {"epoch": 1})
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    predicted = checkpoint_bytes(params, 0.7)
    assert predicted < 0.6 * params.n * CHECKPOINT_BYTES_PER_PARAM
    assert predicted <= written <= predicted * 1.05, (predicted, written)


def test_parameters_from_file_headers(tmp_path):
    from gguf import GGUFWriter
    from safetensors.torch import save_file

    shapes = {"token_embd.weight": (259, 32), "blk.0.attn_q.weight": (32, 32), "output_norm.weight": (32,)}
    w = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for name, shape in shapes.items():
        w.add_tensor(name, torch.zeros(shape, dtype=torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_parameters(tmp_path / "m.gguf") == sum(math.prod(s) for s in shapes.values())

    d = tmp_path / "hf"
    d.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(259, 32), "lm_head.weight": torch.zeros(259, 32),
               "model.norm.weight": torch.zeros(32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert safetensors_parameters(d) == 2 * 259 * 32 + 32
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert safetensors_parameters(d) == 259 * 32 + 32


def test_hub_model_offline_is_unknown():
    from trainers.spec import ModelConfig

    p = count_parameters(ModelConfig(name_or_path="no-such-org/no-such-model-xyz"))
    assert p.n is None and "not in the local Hugging Face cache" in p.how


def test_status_of_a_sweep_in_an_object_store(tmp_path):
    """A URI sweep is read through the store: sweep.yaml and the results are pulled into an
    empty staging copy (a ``file://`` remote stands in for the bucket)."""
    from trainers.storage import Remote, Store

    write_sweep(tmp_path / "bucket")
    store = Store(tmp_path / "staging", Remote(f"file://{tmp_path / 'bucket'}"))
    s = st.StatusReader(store.local / "tiny", store, where="s3://b/tiny", pull=True).read()
    assert s.counts == {"done": 1, "running": 1, "pending": 1, "errored": 1}
    assert s.where == "s3://b/tiny"
