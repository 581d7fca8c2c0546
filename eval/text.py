"""Evaluation and training text: where it comes from and how it becomes one token stream.

The perplexity protocol (README, "Perplexity protocol") tokenizes the whole text once (not per line or per
window), so windows cross document boundaries exactly as in SparseGPT/Wanda.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics
from typing import Literal

# The separator the reference projects put between dataset rows ("\n\n".join(test["text"])).
ROW_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSource:
    # Where the text comes from: a local text file (verbatim), a datasets dataset (rows joined
    # with "\n\n"), or the Python docs topics that ship with CPython (no download at all).
    source: Literal["file", "dataset", "pydoc_topics"] = "dataset"
    # source=file: path to a UTF-8 text file (relative paths are relative to the working directory).
    path: str | None = None
    # source=dataset: hub name or local directory for datasets.load_dataset.
    dataset: str | None = "wikitext"
    # source=dataset: the dataset's configuration name, split, and text column.
    dataset_config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"
    # source=pydoc_topics: "train" is 9 of every 10 topics, "eval" every 10th, "all" everything.
    part: Literal["all", "train", "eval"] = "all"
    # Keep only the first max_chars characters (None: all).
    max_chars: int | None = None


def _pydoc_topics(part: str) -> str:
    """CPython's bundled documentation topics: real English text that needs no download."""
    keys = sorted(topics)
    if part == "eval":
        keys = [k for i, k in enumerate(keys) if i % 10 == 0]
    elif part == "train":
        keys = [k for i, k in enumerate(keys) if i % 10 != 0]
    elif part != "all":
        raise ValueError(f"pydoc_topics part must be 'all', 'train' or 'eval', got {part!r}")
    return ROW_SEPARATOR.join(str(topics[k]) for k in keys)


def dataset_rows(src: TextSource, limit: int | None = None) -> list[str]:
    """The text column of one split of a datasets dataset (its first ``limit`` rows)."""
    import datasets  # heavy, and needed only for dataset sources

    if not src.dataset:
        raise ValueError("a dataset text source needs a dataset name or directory")
    ds = datasets.load_dataset(src.dataset, src.dataset_config, split=src.split)
    if src.text_field not in ds.column_names:
        raise ValueError(
            f"dataset {src.dataset!r} split {src.split!r} has no column {src.text_field!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    return list(rows[src.text_field])


def _dataset_text(src: TextSource) -> str:
    """Rows of one split joined like the reference projects do."""
    return ROW_SEPARATOR.join(dataset_rows(src))


def source_file(src: TextSource) -> Path:
    """The existing file of a file text source (ValueError / FileNotFoundError naming it)."""
    if not src.path:
        raise ValueError("a file text source needs a path")
    path = Path(src.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path


def load_text(src: TextSource) -> str:
    """The text of ``src`` as one string, cut to ``src.max_chars`` characters."""
    if src.source == "file":
        path = source_file(src)
        # Bytes, then decode: read_text would translate "\r\n" and the text must be verbatim.
        text = path.read_bytes().decode("utf-8")
    elif src.source == "dataset":
        text = _dataset_text(src)
    elif src.source == "pydoc_topics":
        text = _pydoc_topics(src.part)
    else:
        raise ValueError(f"unknown text source {src.source!r}")
    if src.max_chars is not None:
        text = text[: src.max_chars]
    return text
