"""Perplexity protocol: windows, NLL sums against an independent computation, sharding, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval.perplexity import (
    IGNORE_INDEX,
    PAD_WINDOW,
    evaluate,
    make_windows,
    nll_sum,
    nll_sum_sharded,
    perplexity,
    shard_windows,
)
from eval.text import TextSource
from sweep.eval_cmd import add_eval_arguments, run_eval

VOCAB = 300



@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(1))


def reference_nll(model, input_ids, labels) -> tuple[float, int]:
    """Window by window with the model's own loss (HF's mean cross entropy) x scored tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, lab in zip(input_ids, labels, strict=True):
            loss = model(input_ids=ids[None], labels=lab[None]).loss
            n = int((lab[1:] != IGNORE_INDEX).sum())
            total += float(loss.double()) * n
            count += n
    return total, count


# --- windows -------------------------------------------------------------------------------


def test_non_overlapping_windows_drop_the_partial_tail(tokens):
    ids, labels = make_windows(tokens, 16, 16)
    assert ids.shape == (150 // 16, 16) and ids.dtype == torch.long
    for k in range(ids.shape[0]):
        assert torch.equal(ids[k], tokens[16 * k : 16 * k + 16])
    assert torch.equal(labels, ids)


def test_overlapping_windows_mask_already_scored_context(tokens):
    ids, labels = make_windows(tokens, 16, 6)
    assert ids.shape == ((150 - 16) // 6 + 1, 16)
    assert torch.equal(labels[0], ids[0])
    assert (labels[1:, :10] == IGNORE_INDEX).all()
    assert torch.equal(labels[1:, 10:], ids[1:, 10:])
    # Every token from position 1 to the end of the last window is scored exactly once.
    scored = [6 * k + t for k in range(ids.shape[0]) for t in range(1, 16) if labels[k, t] >= 0]
    assert scored == list(range(1, 6 * (ids.shape[0] - 1) + 16))


def test_max_windows_and_invalid_inputs(tokens):
    assert make_windows(tokens, 16, 8, max_windows=3)[0].shape == (3, 16)
    assert make_windows(tokens[:16], 16, 16)[0].shape == (1, 16)
    with pytest.raises(ValueError, match="15 tokens, fewer than one window of 16"):
        make_windows(tokens[:15], 16, 16)
    with pytest.raises(ValueError, match="stride"):
        make_windows(tokens, 16, 17)
    with pytest.raises(ValueError, match="token_length"):
        make_windows(tokens, 1, 1)


# --- NLL against the independent computation -----------------------------------------------


@pytest.mark.parametrize(
    "token_length,stride,batch_size",
    [(16, 16, 1), (16, 16, 4), (16, 6, 1), (16, 6, 4), (32, 32, 3)],
)
def test_evaluate_matches_reference(model, tokens, token_length, stride, batch_size):
    ids, labels = make_windows(tokens, token_length, stride)
    assert ids.shape[0] % batch_size or batch_size == 1  # uneven last batch where batched
    want_nll, want_count = reference_nll(model, ids, labels)
    got = evaluate(model, ids, labels, batch_size=batch_size)
    assert got["tokens"] == want_count
    assert got["windows"] == ids.shape[0]
    torch.testing.assert_close(
        torch.tensor(got["nll"], dtype=torch.float64),
        torch.tensor(want_nll, dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )
    assert got["perplexity"] == pytest.approx(math.exp(want_nll / want_count), rel=1e-6)


def test_scored_token_counts(model, tokens):
    ids, labels = make_windows(tokens, 16, 16)
    assert nll_sum(model, ids, labels)[1] == ids.shape[0] * 15  # 15 predictions per window
    ids, labels = make_windows(tokens, 16, 6)
    assert nll_sum(model, ids, labels)[1] == 15 + 6 * (ids.shape[0] - 1)


def test_restores_training_mode_and_reports_progress(model, tokens, capsys):
    ids, labels = make_windows(tokens, 16, 16)
    seen: list[int] = []
    model.train()
    try:
        nll_sum(model, ids, labels, batch_size=4, progress=seen.append)
        assert model.training
    finally:
        model.eval()
    assert seen == [4, 8, 9]
    evaluate(model, ids, labels, progress=True)
    assert "9/9" in capsys.readouterr().err
    assert perplexity(0.0, 5) == 1.0


# --- sharding ------------------------------------------------------------------------------


def test_shard_windows_pads_every_rank_to_the_same_count():
    assert shard_windows(9, 0, 2) == [0, 2, 4, 6, 8]
    assert shard_windows(9, 1, 2) == [1, 3, 5, 7, PAD_WINDOW]
    assert [shard_windows(2, r, 4) for r in range(4)] == [[0], [1], [PAD_WINDOW], [PAD_WINDOW]]
    shards = [shard_windows(10, r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert sorted(i for s in shards for i in s if i != PAD_WINDOW) == list(range(10))
    with pytest.raises(ValueError):
        shard_windows(4, 2, 2)


@pytest.mark.parametrize("world_size,stride", [(2, 16), (2, 6), (4, 16)])
def test_sharded_evaluation_equals_unsharded(model, tokens, world_size, stride):
    ids, labels = make_windows(tokens, 16, stride)
    want_nll, want_count = nll_sum(model, ids, labels)
    parts: list[torch.Tensor] = []
    forwards: list[int] = []

    def fake_all_reduce(t: torch.Tensor) -> None:
        assert t.dtype == torch.float64 and t.shape == (2,)
        parts.append(t.clone())  # each simulated rank contributes its local [nll, count]

    for rank in range(world_size):
        calls = []
        hook = model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        try:
            nll_sum_sharded(
                model, ids, labels, rank, world_size, batch_size=2, all_reduce=fake_all_reduce
            )
        finally:
            hook.remove()
        forwards.append(len(calls))
    assert len(set(forwards)) == 1  # same number of forwards on every rank (FSDP lockstep)
    total = torch.stack(parts).sum(0)
    assert int(total[1]) == want_count
    torch.testing.assert_close(
        total[0], torch.tensor(want_nll, dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_sharded_needs_all_reduce(model, tokens):
    ids, labels = make_windows(tokens, 16, 16)
    with pytest.raises(ValueError, match="all_reduce"):
        nll_sum_sharded(model, ids, labels, 0, 2)


# --- text --------------------------------------------------------------------------------


def test_pydoc_topics_parts_and_max_chars():
    from pydoc_data.topics import topics

    from eval.text import load_text

    keys = sorted(topics)
    every = load_text(TextSource(source="pydoc_topics", part="all"))
    held_out = load_text(TextSource(source="pydoc_topics", part="eval"))
    train = load_text(TextSource(source="pydoc_topics", part="train"))
    assert held_out == "\n\n".join(str(topics[k]) for k in keys[::10])
    assert train == "\n\n".join(str(topics[k]) for i, k in enumerate(keys) if i % 10)
    assert every == "\n\n".join(str(topics[k]) for k in keys)
    assert load_text(TextSource(source="pydoc_topics", part="eval", max_chars=50)) == held_out[:50]


def test_dataset_rows_are_joined_and_files_read_verbatim(tmp_path):
    from eval.text import load_text

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.txt").write_text("first row\nsecond row\n", encoding="utf-8")
    src = TextSource(source="dataset", dataset=str(tmp_path / "ds"), dataset_config=None)
    assert load_text(src) == "first row\n\nsecond row"
    (tmp_path / "t.txt").write_bytes("  é\r\nx\n".encode())
    assert load_text(TextSource(source="file", path=str(tmp_path / "t.txt"))) == "  é\r\nx\n"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(TextSource(source="file", path=str(tmp_path / "nope.txt")))


def test_tokenize_text_once_without_length_warning(caplog):
    from eval.perplexity import tokenize_text
    from trainers.model import byte_tokenizer

    tok = byte_tokenizer()
    tok.model_max_length = 8
    ids = tokenize_text(tok, "a text longer than eight tokens")
    assert ids.dtype == torch.long and ids.shape == (31,)
    assert "longer than" not in caplog.text


# --- sweep eval ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from trainers.model import materialize
    from trainers.spec import ModelConfig

    mc = ModelConfig(
        config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        },
        tokenizer="byte",
        init_seed=3,
    )
    return materialize(mc, tmp_path_factory.mktemp("cache"))


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_eval_prints_json_last(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 10, encoding="utf-8")
    args = _eval_args(
        "--model",
        str(tiny_model_dir),
        "--text-file",
        str(text),
        "--token-length",
        "64",
        "--stride",
        "32",
        "--max-windows",
        "5",
        "--batch-size",
        "2",
        "--no-progress",
        "--threads",
        "1",
    )
    assert run_eval(args) == 0
    out = capsys.readouterr()
    record = json.loads(out.out.strip().splitlines()[-1])
    assert record["windows"] == 5 and record["tokens"] == 63 + 4 * 32
    assert record["token_length"] == 64 and record["stride"] == 32
    assert record["text_tokens"] == 450  # the byte tokenizer: one token per byte
    for key in ("perplexity", "nll", "model", "seconds", "tokens_per_s"):
        assert key in record
    assert record["perplexity"] == pytest.approx(math.exp(record["nll"] / record["tokens"]))
    assert "perplexity" in out.err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--text-file", "{tmp}/missing.txt"], "missing.txt"),
        (["--text-file", "{tmp}/t.txt", "--token-length", "8", "--stride", "9"], "--stride"),
        (["--text-file", "{tmp}/t.txt", "--token-length", "64"], "fewer than one window"),
        (["--text-file", "{tmp}/t.txt", "--model", "{tmp}/no-model"], "no-model"),
    ],
)
def test_run_eval_invalid_input_exits_2(tiny_model_dir, tmp_path, capsys, argv, needle):
    (tmp_path / "t.txt").write_text("short text", encoding="utf-8")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(tiny_model_dir), *argv]
    assert run_eval(_eval_args(*argv, "--no-progress")) == 2
    assert needle in capsys.readouterr().err
