"""Zero-shot tasks through lm-evaluation-harness, offline: a 20-item multiple-choice task from
local files (tests/data/tasks) on a tiny random Llama with the byte tokenizer. run_tasks must
give what `lm_eval` gives for the same model saved to a directory, and what scoring every
choice by hand gives; and leave the caller's random state and train mode as they were."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from eval.tasks import run_tasks, task_manager
from trainers.model import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "data" / "tasks"
TASK = "next_word_local"
LIMIT = 15


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: the local task must not need it. The YAML's data_files path is relative to
    the repository root (the harness passes it to datasets as written)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def tiny():
    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    return model, tok


def items(limit: int) -> list[dict]:
    lines = (TASKS_DIR / "next_word.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:limit]]


def by_hand(model, tok, docs: list[dict]) -> dict[str, list[float]]:
    """Per item: 1.0 when the choice with the highest summed log-probability of
    " " + choice after the question is the answer (acc), and the same with the sum divided
    by the choice's length in characters (acc_norm)."""
    acc, acc_norm = [], []
    with torch.no_grad():
        for doc in docs:
            ctx = tok(doc["question"])["input_ids"]
            lls = []
            for choice in doc["choices"]:
                cont = tok(" " + choice)["input_ids"]
                ids = torch.tensor([ctx + cont])
                logp = F.log_softmax(model(ids[:, :-1]).logits[0].double(), dim=-1)
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
                lls.append(logp[pos, torch.tensor(cont)].sum().item())
            norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
            acc.append(float(int(np.argmax(lls)) == doc["answer"]))
            acc_norm.append(float(int(np.argmax(norm)) == doc["answer"]))
    return {"acc": acc, "acc_norm": acc_norm}


def mean_stderr(xs: list[float]) -> float:
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def test_run_tasks_matches_lm_eval_and_a_hand_count(tiny, tmp_path):
    import lm_eval

    model, tok = tiny
    started = time.perf_counter()
    rows = run_tasks(model, tok, [TASK], num_fewshot=0, limit=LIMIT, include_path=TASKS_DIR)
    elapsed = time.perf_counter() - started
    got = {r["metric"]: r for r in rows}
    assert set(got) == {"acc", "acc_norm"}
    assert all(r["task"] == TASK and r["samples"] == LIMIT and r["num_fewshot"] == 0
               for r in rows)

    # Independent: every choice scored with the model directly.
    hand = by_hand(model, tok, items(LIMIT))
    for metric, per_item in hand.items():
        assert got[metric]["value"] == pytest.approx(sum(per_item) / LIMIT, abs=0)
        torch.testing.assert_close(got[metric]["stderr"], mean_stderr(per_item))

    # The harness run as a user would: the model saved to a directory, model="hf".
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    direct = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "device": "cpu"}, tasks=[TASK],
        num_fewshot=0, limit=LIMIT, task_manager=task_manager([TASK], TASKS_DIR),
        log_samples=False,
    )["results"][TASK]
    for metric in ("acc", "acc_norm"):
        assert got[metric]["value"] == direct[f"{metric},none"]
        assert got[metric]["stderr"] == direct[f"{metric}_stderr,none"]
    # 15 items x 3 choices on a 2-layer model of width 32: the harness's own cost dominates.
    assert elapsed < 30, f"run_tasks took {elapsed:.1f} s"


def test_caller_state_is_given_back(tiny, monkeypatch):
    """The harness seeds every global generator and sets eval mode; training after an
    evaluation must continue its own random stream in its own mode."""
    model, tok = tiny
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    model.train()
    try:
        rows = run_tasks(model, tok, [TASK], limit=3, include_path=TASKS_DIR)
        assert model.training
        assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected
    finally:
        model.eval()
    assert {r["samples"] for r in rows} == {3}

    # Another local rank: the harness evaluates but leaves the results to local rank 0.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_tasks(model, tok, [TASK], limit=2, include_path=TASKS_DIR) is None


def test_unknown_task_is_named(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task: not defined in"):
        run_tasks(model, tok, [TASK, "no_such_task"], include_path=TASKS_DIR,
                  include_defaults=False)
    with pytest.raises(FileNotFoundError, match="include_path is not a directory"):
        run_tasks(model, tok, [TASK], include_path=TASKS_DIR / "missing")
