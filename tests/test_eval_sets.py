"""Evaluation sets: each protocol against a plain re-statement of its reference loader (Wanda's
get_c4, GPTQ/SparseGPT's older get_c4, the sequential WikiText-2/PTB protocol) on a small
stand-in for C4's first validation shard, with a tokenizer that adds a BOS token so
per-document and whole-text tokenization differ."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from eval.perplexity import IGNORE_INDEX
from eval.sets import EvalSet, c4, load_documents, wikitext2, windows_for
from eval.text import TextSource
from trainers.model import byte_tokenizer

L = 32  # tokens per window in these tests
SHARD = "c4-validation.00000-of-00008.json.gz"
WORDS = "the of a model sparse weight prune layer token window text data mask".split()


def bos_tokenizer():
    """Byte tokenizer (one token per byte) that prepends <bos>, like Llama's."""
    tok = byte_tokenizer()
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    return tok


def stand_in_docs(n: int = 60, seed: int = 0) -> list[str]:
    """Documents of 3 to 80 bytes: most shorter than a window, some longer, none exactly
    L tokens long with the BOS (the reference fails on those)."""
    g = random.Random(seed)
    docs = []
    while len(docs) < n:
        doc = " ".join(g.choice(WORDS) for _ in range(g.randint(1, 14)))
        if len(doc.encode()) + 1 != L:
            docs.append(doc)
    return docs


def write_shard(directory: Path, docs: list[str]) -> Path:
    """The published shard's format: gzipped JSON lines with text, timestamp and url."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SHARD
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            row = {"text": doc, "timestamp": "2019-04-25T12:00:00Z", "url": f"https://x/{i}"}
            f.write(json.dumps(row) + "\n")
    return path


def read_shard(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def ref_eval_windows(valenc: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The reference perplexity loop's windows: nsamples = numel // seqlen, consecutive."""
    nsamples = valenc.numel() // seqlen
    return torch.cat([valenc[:, i * seqlen : (i + 1) * seqlen] for i in range(nsamples)])


def ref_c4_wanda(valdata: list[str], tokenizer, seqlen: int, n_docs=1100, n_windows=256):
    """Wanda lib/data.py get_c4, validation part."""
    valenc = tokenizer(" ".join(valdata[:n_docs]), return_tensors="pt")
    valenc = valenc.input_ids[:, : (n_windows * seqlen)]
    return ref_eval_windows(valenc, seqlen)


def ref_c4_sparsegpt(valdata: list[str], tokenizer, seqlen: int, nsamples=256, seed=0):
    """GPTQ/SparseGPT datautils.py get_c4, validation part, on the global random module."""
    random.seed(seed)
    valenc = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(valdata) - 1)
            tmp = tokenizer(valdata[i], return_tensors="pt")
            if tmp.input_ids.shape[1] >= seqlen:
                break
        i = random.randint(0, tmp.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        valenc.append(tmp.input_ids[:, i:j])
    return ref_eval_windows(torch.hstack(valenc), seqlen)


@pytest.fixture
def global_random():
    """The reference uses the global random module: give other tests their state back."""
    state = random.getstate()
    yield
    random.setstate(state)


@pytest.fixture
def shard(tmp_path) -> Path:
    return write_shard(tmp_path / "c4", stand_in_docs())


def test_c4_wanda_matches_reference(shard):
    tok, docs = bos_tokenizer(), read_shard(shard)
    # A prefix of the documents and fewer windows than the joined text holds: both cuts act.
    es = c4(str(shard), "c4_wanda", token_length=L)
    cut = EvalSet("c4", es.text, "c4_wanda", L, max_windows=5, documents=30)
    ids, labels = windows_for(cut, tok)
    assert len(tok(" ".join(docs[:30]))["input_ids"]) > 6 * L
    torch.testing.assert_close(ids, ref_c4_wanda(docs, tok, L, n_docs=30, n_windows=5))
    torch.testing.assert_close(labels, ids)
    assert (ids == tok.bos_token_id).sum() == 1  # tokenized once: one BOS, at the start
    # The defaults (1100 documents, 256 windows) on a shard shorter than both.
    ids, _ = windows_for(es, tok)
    torch.testing.assert_close(ids, ref_c4_wanda(docs, tok, L))
    assert ids.shape == (len(tok(" ".join(docs))["input_ids"]) // L, L)


def test_c4_sparsegpt_matches_reference(shard, global_random):
    tok, docs = bos_tokenizer(), read_shard(shard)
    es = c4(str(shard), "c4_sparsegpt", token_length=L)
    state = random.getstate()
    ids, labels = windows_for(es, tok)
    assert random.getstate() == state  # its own generator, not the global one
    expected = ref_c4_sparsegpt(docs, tok, L)
    assert ids.shape == (256, L)
    torch.testing.assert_close(ids, expected)
    torch.testing.assert_close(labels, ids)
    # Another seed and sample count: the same draws as the reference under that seed, and
    # other windows than seed 0's.
    seeded = EvalSet("c4", es.text, "c4_sparsegpt", L, max_windows=20, seed=3)
    ids3, _ = windows_for(seeded, tok)
    torch.testing.assert_close(ids3, ref_c4_sparsegpt(docs, tok, L, nsamples=20, seed=3))
    assert not torch.equal(ids3, ids[:20])
    # documents: draw from a prefix of the shard only.
    prefix = EvalSet("c4", es.text, "c4_sparsegpt", L, max_windows=10, documents=25)
    ids_p, _ = windows_for(prefix, tok)
    torch.testing.assert_close(ids_p, ref_c4_sparsegpt(docs[:25], tok, L, nsamples=10))


def test_c4_sparsegpt_document_of_exactly_one_window(tmp_path, global_random):
    tok = bos_tokenizer()
    exact = "x" * (L - 1)  # L tokens with the BOS
    docs = ["short one", exact, "tiny", "also short"]
    path = write_shard(tmp_path, docs)
    with pytest.raises(ValueError):  # the reference: randint(0, -1), an empty range
        ref_c4_sparsegpt(docs, tok, L, nsamples=3)
    ids, _ = windows_for(EvalSet("c4", TextSource("file", path=str(path)), "c4_sparsegpt", L,
                                 max_windows=3), tok)
    whole = torch.tensor(tok(exact)["input_ids"])
    torch.testing.assert_close(ids, whole.expand(3, L))


def test_c4_sparsegpt_without_a_long_document_fails(tmp_path):
    path = write_shard(tmp_path, ["short", "still short"])
    es = EvalSet("c4", TextSource("file", path=str(path)), "c4_sparsegpt", L)
    with pytest.raises(ValueError, match="none of the 2 documents has 32 tokens"):
        windows_for(es, bos_tokenizer())


def test_sequential_file_stride_and_separator(tmp_path):
    tok = bos_tokenizer()
    text = "\n\n".join(stand_in_docs(20))
    txt = tmp_path / "test.txt"
    txt.write_bytes(text.encode())
    es = EvalSet("plain", TextSource("file", path=str(txt)), "sequential", L, stride=24,
                 max_windows=4)
    ids, labels = windows_for(es, tok)
    tokens = torch.tensor(tok(text)["input_ids"])
    starts = list(range(0, tokens.numel() - L + 1, 24))[:4]
    assert len(starts) == 4
    torch.testing.assert_close(ids, torch.stack([tokens[s : s + L] for s in starts]))
    # The first window scores all its tokens; later ones only the 24 new ones.
    torch.testing.assert_close(labels[0], ids[0])
    assert (labels[1:, : L - 24] == IGNORE_INDEX).all()
    torch.testing.assert_close(labels[1:, L - 24 :], ids[1:, L - 24 :])

    # SparseGPT's PTB: documents joined with one space, tokenized once, no overlap.
    docs = stand_in_docs(12, seed=1)
    jsonl = tmp_path / "ptb.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": d}) + "\n" for d in docs))
    ptb = EvalSet("ptb", TextSource("file", path=str(jsonl), text_field="sentence"),
                  "sequential", L, separator=" ", documents=10)
    ids, labels = windows_for(ptb, tok)
    torch.testing.assert_close(ids, ref_eval_windows(tok(" ".join(docs[:10]),
                                                         return_tensors="pt").input_ids, L))
    torch.testing.assert_close(labels, ids)


def test_documents_from_a_local_dataset_directory(shard, monkeypatch):
    """The shard's directory as a datasets dataset: the split is named from the file name."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = TextSource("dataset", dataset=str(shard.parent), dataset_config=None,
                     split="validation")
    assert load_documents(src, limit=7) == read_shard(shard)[:7]
    tok = bos_tokenizer()
    from_dataset, _ = windows_for(EvalSet("c4", src, "c4_wanda", L), tok)
    from_file, _ = windows_for(c4(str(shard), "c4_wanda", L), tok)
    torch.testing.assert_close(from_dataset, from_file)


def test_bad_documents_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with 'text'"):
        load_documents(TextSource("file", path=str(bad)))
    plain = tmp_path / "c4.txt"
    plain.write_text("one text")
    with pytest.raises(ValueError, match="documents are read from JSON lines"):
        windows_for(c4(str(plain)), bos_tokenizer())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protocol": "c4_wanda", "stride": 16}, "stride applies to the sequential protocol"),
        ({"stride": 33}, r"stride must be in \[1, token_length=32\]"),
        ({"documents": 5}, "documents needs a separator"),
        ({"protocol": "c4_sparsegpt", "separator": " "}, "separator applies to the sequential"),
        ({"protocol": "c4_wanda", "text": TextSource("pydoc_topics")}, "has no documents"),
        ({"protocol": "c4_wanda", "text": TextSource("file", path="x.json", max_chars=9)},
         "max_chars cuts one text"),
        ({"max_windows": 0, "token_length": 1}, "token_length must be >= 2.*max_windows must"),
        ({"protocol": "c4_new"}, "protocol must be one of"),
    ],
)
def test_inconsistent_sets_are_refused(kwargs, message):
    args = {"name": "s", "text": TextSource("file", path="x.json"), "token_length": L} | kwargs
    with pytest.raises(ValueError, match=message):
        EvalSet(**args)


def test_wikitext2_is_the_reference_test_split():
    es = wikitext2(token_length=L)
    assert (es.name, es.protocol, es.token_length, es.stride) == ("wikitext2", "sequential", L, None)
    assert (es.text.source, es.text.dataset, es.text.dataset_config, es.text.split,
            es.text.text_field) == ("dataset", "wikitext", "wikitext-2-raw-v1", "test", "text")
    assert es.window_count is None and es.document_count is None
