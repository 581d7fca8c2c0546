"""bench/gpu.py, the prepared GPU check, run on CPU with a tiny OPT so it is known to work
before a GPU is lent (where it runs unchanged with the OPT-350m shape)."""

from __future__ import annotations

import json

import pytest

from bench import gpu


def test_the_gpu_check_runs_on_cpu_and_keeps_the_masks(tmp_path):
    out = tmp_path / "gpu.json"
    got = gpu.main(["--shape", "tiny", "--device", "cpu", "--seq", "64", "--batch", "4",
                    "--micro-batch", "2", "--warmup", "1", "--steps", "3", "--eval-windows", "4",
                    "--eval-batch", "2", "--checkpoint-repeats", "2",
                    "--checkpoint-dir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == got
    assert got["device"] == "cpu" and got["micro_batches"] == 2
    # The product's step kept the pruned weights at zero through AdamW.
    assert got["sparsity_after_training"] == pytest.approx(0.5, abs=1e-3)
    assert got["train_tokens_per_s"] > 0 and got["eval_tokens_per_s"] > 0
    assert got["eval_windows"] == 4
    assert got["train_mfu"] is None  # no chip peak on CPU: no made-up utilization
    ck = got["checkpoint"]  # the checkpoint figures make bench has, on the same state
    assert ck["sparse_bytes"] < ck["dense_bytes"] and ck["bytes_ratio"] < 1
    assert ck["async_stall_s"]["n"] == 2 and ck["dense_sync_s"]["min"] > 0


def test_the_opt350m_shape_has_opt350m_size():
    from transformers import OPTConfig

    cfg = OPTConfig(**gpu.SHAPES["opt350m"])
    # 331M parameters (facebook/opt-350m): counted from the config's shapes without building it.
    d, f, L, V, P, e = (cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers, cfg.vocab_size,
                        cfg.max_position_embeddings, cfg.word_embed_proj_dim)
    block = 4 * (d * d + d) + 2 * (d * f) + f + d + 2 * 2 * d
    n = V * e + (P + 2) * d + 2 * (d * e) + L * block
    assert 325e6 < n < 335e6
