"""Pre-flight checks (sweep/preflight.py), table-driven, no Ray: text files (existence, UTF-8
with the offset of the first bad byte, emptiness), windows against the perplexity module's
own windowing, model types against transformers' registry, and the storage directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eval.text import TextSource
from sweep.preflight import _CHUNK, check_model_type, check_storage_dir, check_text, check_windows


def first_bad_byte(data: bytes) -> int | None:
    """Independent reference: a one-shot decode of the whole file."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return None


# (file content, expected problem fragment or None); offsets checked against first_bad_byte.
TEXTS = [
    ("valid ascii", b"hello world\n", None),
    ("valid multibyte", "pruning — 50 % sparsité 🙂".encode(), None),
    ("empty", b"", "is empty"),
    ("whitespace", b" \n\t\r\n", "holds only whitespace"),
    ("latin-1 byte", b"hello \xff world", "byte offset 6 (invalid start byte)"),
    ("truncated at the end", b"abc\xe2\x82", "byte offset 3 (unexpected end of data)"),
    ("bad continuation", b"ab\xc3\x28cd", "byte offset 2 (invalid continuation byte)"),
    # A valid 2-byte character across the first chunk boundary, then a bad byte after it.
    ("across the chunk boundary", b"a" * (_CHUNK - 1) + "é".encode() + b"\xff",
     f"byte offset {_CHUNK + 1} (invalid start byte)"),
    # A 3-byte character cut by the chunk boundary and broken in the next chunk.
    ("broken across the boundary", b"a" * (_CHUNK - 1) + b"\xe2\x82x",
     f"byte offset {_CHUNK - 1} (invalid continuation byte)"),
]


@pytest.mark.parametrize("name, data, expect", TEXTS, ids=[t[0] for t in TEXTS])
def test_check_text_file(tmp_path, name, data, expect):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    problems = check_text(TextSource(source="file", path=str(path)), "data.train")
    if expect is None:
        assert problems == [] and first_bad_byte(data) is None
        return
    assert len(problems) == 1 and problems[0].startswith(f"data.train.path: {path}")
    assert expect in problems[0], problems
    bad = first_bad_byte(data)
    if "byte offset" in expect:
        assert f"byte offset {bad} " in problems[0]


@pytest.mark.parametrize("src, expect", [
    (TextSource(source="file", path="/nonexistent/corpus.txt"),
     "eval.text.path: file not found: /nonexistent/corpus.txt"),
    (TextSource(source="file", path=None), "eval.text.path: required"),
    (TextSource(source="file", path="DIR"), "is not a regular file"),
    (TextSource(source="pydoc_topics", part="eval"), None),
    (TextSource(source="dataset", dataset="wikitext"), None),  # the hub: checked when loaded
    (TextSource(source="dataset", dataset="./no/such/dataset"),
     "eval.text.dataset: local dataset directory not found"),
])
def test_check_text_sources(tmp_path, src, expect):
    if src.path == "DIR":
        src = TextSource(source="file", path=str(tmp_path))
    problems = check_text(src, "eval.text")
    assert problems == [] if expect is None else (len(problems) == 1 and expect in problems[0])


@pytest.mark.parametrize("n_tokens, length, stride", [
    (100, 64, 64), (64, 64, 64), (63, 64, 64), (0, 64, 64), (64, 64, 32), (65, 64, 1),
    (10, 2, 1), (1, 2, 1),
])
def test_check_windows_agrees_with_make_windows(n_tokens, length, stride):
    import torch

    from eval.perplexity import make_windows

    problems = check_windows(n_tokens, length, stride, "eval.token_length", text_key="eval.text")
    try:
        make_windows(torch.arange(n_tokens), length, stride)
        windows_ok = True
    except ValueError:
        windows_ok = False
    assert (problems == []) == windows_ok
    if problems:
        (p,) = problems
        head = f"eval.token_length={length}: the text (eval.text) has {n_tokens} tokens"
        assert p.startswith(head)
        assert "eval.text.max_chars" in p


def test_check_windows_for_training_blocks():
    (p,) = check_windows(100, 128, 128, "data.seq_len", text_key="data.train")
    assert p.startswith("data.seq_len=128: the text (data.train) has 100 tokens")
    assert "a smaller data.seq_len" in p


@pytest.mark.parametrize("config, expect", [
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}, None),
    ({"model_type": "opt"}, None),
    ({"model_type": "lama"}, "model.config.model_type: 'lama' is not a model type"),
    ({"model_type": "gpt-2"}, "closest: gpt2"),
    ({"model_type": "t5"}, "'t5' has no causal language model"),
    ({}, "model.config.model_type: required"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5},
     "model.config: not a valid llama config"),
])
def test_check_model_type(config, expect):
    problems = check_model_type(config, "model.config")
    if expect is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expect in problems[0], problems


def test_unknown_model_type_lists_the_closest_names():
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    (p,) = check_model_type({"model_type": "lama"}, "model.config")
    closest = difflib.get_close_matches("lama", list(CONFIG_MAPPING_NAMES), n=3)
    assert "llama" in closest and p.endswith(f"closest: {', '.join(closest)}")


def test_check_storage_dir(tmp_path):
    assert check_storage_dir(tmp_path) == []
    assert check_storage_dir(tmp_path / "new" / "deeper") == []  # created later, not now
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == []  # the probe left nothing

    regular = tmp_path / "file"
    regular.write_text("x")
    (p,) = check_storage_dir(regular)
    assert p == f"--storage: {regular} is a regular file, not a directory; give a directory"
    (p,) = check_storage_dir(regular / "sweeps", key="SWEEP_DIR")
    assert p.startswith(f"SWEEP_DIR: {regular / 'sweeps'} cannot be created: {regular}")


def test_check_storage_dir_not_writable(tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "sweeps"
    else:  # root writes through permissions: use a filesystem that refuses files
        target = Path("/sys/sweeps")
        if os.access("/sys", os.W_OK) and not check_storage_dir(target):
            pytest.skip("no unwritable directory available to root here")
    (p,) = check_storage_dir(target)
    assert p.startswith(f"--storage: {target} is not writable (its nearest existing parent")
