"""Named evaluation sets: a text source plus the protocol that turns it into token windows.

Pruning papers report perplexity on several corpora side by side, and each corpus comes with
its own way of cutting windows. A set names its protocol so a result says which paper's
numbers it reproduces:

``sequential``
    The whole text tokenized once, full windows of ``token_length`` every ``stride`` tokens
    (``eval.perplexity.make_windows``), at most ``max_windows``. This is SparseGPT's and
    Wanda's WikiText-2 test protocol (rows joined with ``"\\n\\n"``, ``eval.text``). With
    ``separator`` the source's documents (the first ``documents``) are joined with it
    instead: SparseGPT's PTB test set is its sentences joined with ``" "``.

``c4_wanda``
    Wanda's ``get_c4`` (and SparseGPT's current ``get_c4``, formerly ``get_c4_new``): the
    first 1100 documents of C4's first validation shard joined with a single space,
    tokenized once, cut to the first ``256 * token_length`` tokens, then consecutive
    non-overlapping windows. ``documents`` and ``max_windows`` override 1100 and 256.

``c4_sparsegpt``
    The older loader of GPTQ and SparseGPT (``get_c4``): 256 samples drawn with Python's
    ``random`` seeded with 0. Each sample draws a document index uniformly over the whole
    shard (``randint(0, n_docs - 1)``), tokenizes that document alone, redraws until it has
    at least ``token_length`` tokens, then draws a start in ``[0, n_tokens - token_length -
    1]`` and takes ``token_length`` tokens from there. ``seed``, ``documents`` (a prefix of
    the shard to draw from) and ``max_windows`` (the number of samples) override 0, all and
    256. A document of exactly ``token_length`` tokens makes the reference fail (its start
    range is empty); here it is taken whole without a start draw, as GPTQModel does.

The C4 protocols read documents, not one text: a JSON-lines file (optionally gzipped, the
shard ``c4-validation.00000-of-00008.json.gz`` as published: one object per line with
``"text"``) or a ``datasets`` dataset, one row per document. Windows are scored whole
(labels = inputs); perplexity is then ``eval.perplexity.evaluate`` as for any window set.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from eval.perplexity import make_windows, tokenize_text
from eval.text import TextSource, dataset_rows, load_text, source_file

Protocol = Literal["sequential", "c4_wanda", "c4_sparsegpt"]
PROTOCOLS: tuple[str, ...] = ("sequential", "c4_wanda", "c4_sparsegpt")

# The reference loaders' constants (Wanda lib/data.py get_c4; GPTQ/SparseGPT datautils.py).
WANDA_C4_DOCUMENTS = 1100
C4_WINDOWS = 256
C4_JOIN = " "

JSON_LINES_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


@dataclass(frozen=True)
class EvalSet:
    # The name results are reported under (e.g. "wikitext2", "c4").
    name: str
    # Where the text comes from; the C4 protocols need documents (a JSON-lines file or a
    # dataset), see load_documents.
    text: TextSource
    protocol: Protocol = "sequential"
    # Tokens per window.
    token_length: int = 2048
    # sequential only: tokens between window starts (None: token_length, no overlap).
    stride: int | None = None
    # At most this many windows (None: all for sequential, 256 for the C4 protocols).
    max_windows: int | None = None
    # c4_sparsegpt only: the seed of the sampling RNG (the reference hard-codes 0).
    seed: int = 0
    # Use only the first this many documents (None: 1100 for c4_wanda, all otherwise).
    documents: int | None = None
    # sequential only: join the source's documents with this string instead of reading the
    # source as one text (SparseGPT's PTB: " ").
    separator: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"evaluation set {self.name!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency at once, so a config can report them together."""
        out = []
        if self.protocol not in PROTOCOLS:
            out.append(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.token_length < 2:
            out.append(f"token_length must be >= 2, got {self.token_length}")
        if self.stride is not None:
            if self.protocol != "sequential":
                out.append(f"stride applies to the sequential protocol only ({self.protocol} "
                           "windows never overlap)")
            elif not 1 <= self.stride <= self.token_length:
                out.append(f"stride must be in [1, token_length={self.token_length}], "
                           f"got {self.stride}")
        if self.max_windows is not None and self.max_windows < 1:
            out.append(f"max_windows must be >= 1, got {self.max_windows}")
        if self.documents is not None and self.documents < 1:
            out.append(f"documents must be >= 1, got {self.documents}")
        if self.separator is not None and self.protocol != "sequential":
            out.append("separator applies to the sequential protocol only")
        if self.protocol == "sequential" and self.separator is None and self.documents is not None:
            out.append("documents needs a separator with the sequential protocol (without "
                       "one the source is read as one text)")
        reads_documents = self.protocol != "sequential" or self.separator is not None
        if reads_documents and self.text.source == "pydoc_topics":
            out.append("the pydoc_topics source has no documents; use a JSON-lines file or "
                       "a dataset")
        if reads_documents and self.text.max_chars is not None:
            out.append("max_chars cuts one text; bound a set of documents with documents "
                       "and max_windows")
        return out

    @property
    def window_count(self) -> int | None:
        """The number of windows asked for (None: every full window)."""
        if self.max_windows is not None or self.protocol == "sequential":
            return self.max_windows
        return C4_WINDOWS

    @property
    def document_count(self) -> int | None:
        """The number of leading documents read (None: all)."""
        if self.documents is None and self.protocol == "c4_wanda":
            return WANDA_C4_DOCUMENTS
        return self.documents


def _is_json_lines(path: Path) -> bool:
    return path.name.lower().endswith(JSON_LINES_SUFFIXES)


def _json_lines_documents(path: Path, field: str, limit: int | None) -> list[str]:
    """The ``field`` of each JSON object, one per line, in file order."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    docs: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with {field!r}")
            docs.append(row[field])
    return docs


def load_documents(src: TextSource, limit: int | None = None) -> list[str]:
    """The source's documents in order, at most ``limit``: the lines of a JSON-lines file
    (``src.text_field`` of each object) or the rows of a dataset split."""
    if src.source == "file":
        path = source_file(src)
        if not _is_json_lines(path):
            raise ValueError(
                f"{path}: documents are read from JSON lines ({', '.join(JSON_LINES_SUFFIXES)}); "
                "a plain text file is one text (use the sequential protocol)"
            )
        return _json_lines_documents(path, src.text_field, limit)
    if src.source == "dataset":
        return dataset_rows(src, limit)
    raise ValueError(f"the {src.source!r} text source has no documents")


def _sequential(es: EvalSet, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if es.separator is None:
        text = load_text(es.text)
    else:
        text = es.separator.join(load_documents(es.text, es.document_count))
    tokens = tokenize_text(tokenizer, text)
    return make_windows(tokens, es.token_length, es.stride or es.token_length, es.max_windows)


def _c4_wanda(es: EvalSet, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    docs = load_documents(es.text, es.document_count)
    tokens = tokenize_text(tokenizer, C4_JOIN.join(docs))
    tokens = tokens[: es.window_count * es.token_length]
    return make_windows(tokens, es.token_length, es.token_length)


def _c4_sparsegpt(es: EvalSet, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    docs = load_documents(es.text, es.document_count)
    if not docs:
        raise ValueError(f"evaluation set {es.name!r}: the source has no documents")
    length = es.token_length
    # A private generator: the same stream as the reference's random.seed(seed) followed by
    # module-level calls, without touching the caller's global random state.
    rng = random.Random(es.seed)
    long_docs: dict[int, torch.Tensor] = {}
    short_docs: set[int] = set()
    windows = []
    for _ in range(es.window_count):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i in long_docs:
                break
            if i not in short_docs:
                ids = tokenize_text(tokenizer, docs[i])
                if ids.numel() >= length:
                    long_docs[i] = ids
                    break
                short_docs.add(i)
                if len(short_docs) == len(docs):
                    raise ValueError(
                        f"evaluation set {es.name!r}: none of the {len(docs)} documents has "
                        f"{length} tokens (the reference would loop forever)"
                    )
        ids = long_docs[i]
        start = rng.randint(0, ids.numel() - length - 1) if ids.numel() > length else 0
        windows.append(ids[start : start + length])
    input_ids = torch.stack(windows).long()
    return input_ids, input_ids.clone()


def windows_for(es: EvalSet, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [N, L], labels [N, L])`` of the set under its protocol, ready for
    ``eval.perplexity.evaluate``. Every document or text is tokenized with the tokenizer's
    default special tokens, as the reference loaders call it."""
    if es.protocol == "sequential":
        return _sequential(es, tokenizer)
    if es.protocol == "c4_wanda":
        return _c4_wanda(es, tokenizer)
    if es.protocol == "c4_sparsegpt":
        return _c4_sparsegpt(es, tokenizer)
    raise ValueError(f"unknown protocol {es.protocol!r}")


def wikitext2(token_length: int = 2048, max_windows: int | None = None) -> EvalSet:
    """WikiText-2 raw test split from the hub, as SparseGPT and Wanda evaluate it."""
    src = TextSource(source="dataset", dataset="wikitext", dataset_config="wikitext-2-raw-v1",
                     split="test")
    return EvalSet("wikitext2", src, "sequential", token_length, max_windows=max_windows)


def c4(path: str, protocol: Literal["c4_wanda", "c4_sparsegpt"] = "c4_wanda",
       token_length: int = 2048, name: str = "c4") -> EvalSet:
    """C4 from a local copy of ``en/c4-validation.00000-of-00008.json.gz`` (allenai/c4)."""
    return EvalSet(name, TextSource(source="file", path=path), protocol, token_length)
