"""Evaluation and training text: where it comes from and how it becomes one token stream.

The contract's perplexity protocol tokenizes the whole text once (not per line or per
window), so windows cross document boundaries exactly as in SparseGPT/Wanda.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sweep.config import TextSource

# The separator the reference projects put between dataset rows ("\n\n".join(test["text"])).
ROW_SEPARATOR = "\n\n"


def _pydoc_topics(part: str) -> str:
    """CPython's bundled documentation topics: real English text that needs no download."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part == "eval":
        keys = [k for i, k in enumerate(keys) if i % 10 == 0]
    elif part == "train":
        keys = [k for i, k in enumerate(keys) if i % 10 != 0]
    elif part != "all":
        raise ValueError(f"pydoc_topics part must be 'all', 'train' or 'eval', got {part!r}")
    return ROW_SEPARATOR.join(str(topics[k]) for k in keys)


def _dataset_text(src: TextSource) -> str:
    """Rows of one split joined like the reference projects do."""
    import datasets

    if not src.dataset:
        raise ValueError("a dataset text source needs a dataset name or directory")
    ds = datasets.load_dataset(src.dataset, src.dataset_config, split=src.split)
    if src.text_field not in ds.column_names:
        raise ValueError(
            f"dataset {src.dataset!r} split {src.split!r} has no column {src.text_field!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    return ROW_SEPARATOR.join(ds[src.text_field])


def load_text(src: TextSource) -> str:
    """The text of ``src`` as one string, cut to ``src.max_chars`` characters."""
    if src.source == "file":
        if not src.path:
            raise ValueError("a file text source needs a path")
        path = Path(src.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
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


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text as a 1-D LongTensor, tokenized once.

    The tokenizer's default special tokens are kept (the protocol: whatever a user of the
    tokenizer gets). ``verbose=False`` silences the "longer than the maximum sequence
    length" warning: the stream is cut into windows afterwards, never fed whole.
    """
    ids = tokenizer(text, return_tensors=None, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
