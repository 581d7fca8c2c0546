"""Perplexity as pure functions of (model, token windows).

The protocol (README, "Perplexity protocol"): windows of ``token_length`` tokens start
every ``stride`` tokens; only full windows are kept (the trailing partial window is dropped,
as SparseGPT and Wanda do); with overlapping windows the tokens already scored by the
previous window are context only (label -100). ``perplexity = exp(sum NLL / scored tokens)``
with the sum in float64, so the number does not depend on batch size or on how the windows
are split across ranks. Nothing here knows about Ray or FSDP: sharded evaluation takes an
``all_reduce`` callable.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

IGNORE_INDEX = -100
# shard_windows marks the padding a rank evaluates only to keep forwards in lockstep.
PAD_WINDOW = -1

Progress = bool | Callable[[int], None] | None


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text as a 1-D LongTensor, tokenized once.

    The tokenizer's default special tokens are kept (the protocol: whatever a user of the
    tokenizer gets). ``verbose=False`` silences the "longer than the maximum sequence
    length" warning: the stream is cut into windows afterwards, never fed whole.
    """
    ids = tokenizer(text, return_tensors=None, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(
    tokens: torch.Tensor, token_length: int, stride: int, max_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into full windows: ``(input_ids [N, L], labels [N, L])``."""
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
    if token_length < 2:
        raise ValueError(f"token_length must be >= 2, got {token_length}")
    if not 1 <= stride <= token_length:
        raise ValueError(
            f"stride must be in [1, token_length={token_length}], got {stride} "
            "(a larger stride would leave tokens between windows unscored)"
        )
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    n_tokens = tokens.numel()
    if n_tokens < token_length:
        raise ValueError(
            f"the text has {n_tokens} tokens, fewer than one window of {token_length} "
            "(use a longer text or a shorter token_length)"
        )
    begins = list(range(0, n_tokens - token_length + 1, stride))
    if max_windows is not None:
        begins = begins[:max_windows]
    input_ids = torch.stack([tokens[b : b + token_length] for b in begins]).long()
    labels = input_ids.clone()
    # Positions the previous window already scored are context only.
    labels[1:, : token_length - stride] = IGNORE_INDEX
    return input_ids, labels


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give the caller back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL (float64) and scored-token count; one row at a time to bound the
    float32 copy of the logits (vocab x length per row)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    count = 0
    for row_logits, row_labels in zip(logits, labels, strict=True):
        # Position t predicts token t + 1.
        target = row_labels[1:]
        nll = F.cross_entropy(
            row_logits[:-1].float(), target, ignore_index=IGNORE_INDEX, reduction="none"
        )
        total += nll.double().sum()
        count += int((target != IGNORE_INDEX).sum())
    return total, count


def _progress_callback(
    progress: Progress, n_windows: int
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(update(n_done), close()) for a tqdm bar on stderr, a user callable, or nothing."""
    if progress is True:
        bar = tqdm(total=n_windows, desc="perplexity", unit="window", file=sys.stderr)
        return (lambda n_done: bar.update(n_done - bar.n)), bar.close
    if callable(progress):
        return progress, lambda: None
    return (lambda n_done: None), lambda: None


def nll_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1,
    progress: Progress = None,
) -> tuple[float, int]:
    """Sum of token NLL (float64) and number of scored tokens over all windows.

    Computed from the logits rather than the model's own loss: HF losses are means whose
    reduction has changed across versions, and a sum is what aggregates exactly across
    batches and ranks. ``progress``: True for a tqdm bar on stderr, or a callable(n_done).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if input_ids.shape != labels.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ"
        )
    device = _model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    n_windows = input_ids.shape[0]
    update, close = _progress_callback(progress, n_windows)
    try:
        with _eval_mode(model), torch.no_grad():
            for start in range(0, n_windows, batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                lab = labels[start : start + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                batch_total, batch_count = _batch_nll(logits, lab)
                total += batch_total
                count += batch_count
                update(min(start + batch_size, n_windows))
    finally:
        close()
    return float(total.item()), count


def shard_windows(n_windows: int, rank: int, world_size: int) -> list[int]:
    """Window indices for one rank: ``rank, rank + world_size, ...``, padded with
    ``PAD_WINDOW`` so every rank gets ``ceil(n_windows / world_size)`` entries.

    FSDP needs every rank to run the same number of forwards (each forward all-gathers
    parameters collectively); padded entries must not count.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    per_rank = -(-n_windows // world_size)
    indices = [rank + k * world_size for k in range(per_rank)]
    return [i if i < n_windows else PAD_WINDOW for i in indices]


def nll_sum_sharded(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    rank: int,
    world_size: int,
    batch_size: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    progress: Progress = None,
) -> tuple[float, int]:
    """(NLL sum, scored tokens) over all windows, each rank evaluating its share.

    Padding windows are a copy of window 0 with every label -100, so they run a forward but
    add nothing. ``all_reduce`` sums a float64 tensor ``[nll, count]`` in place across ranks
    (e.g. ``torch.distributed.all_reduce``); it is required when ``world_size > 1``.
    """
    if world_size > 1 and all_reduce is None:
        raise ValueError("world_size > 1 needs an all_reduce to sum the ranks' results")
    indices = shard_windows(input_ids.shape[0], rank, world_size)
    rows = torch.tensor([max(i, 0) for i in indices], dtype=torch.long)
    padded = torch.tensor([i == PAD_WINDOW for i in indices], dtype=torch.bool)
    local_labels = labels[rows].clone()
    local_labels[padded] = IGNORE_INDEX
    nll, count = nll_sum(model, input_ids[rows], local_labels, batch_size, progress)
    totals = torch.tensor([nll, float(count)], dtype=torch.float64, device=_model_device(model))
    if all_reduce is not None:
        all_reduce(totals)
    return float(totals[0].item()), int(round(totals[1].item()))


def perplexity(nll: float, count: int) -> float:
    """exp of the mean NLL per scored token."""
    if count <= 0:
        raise ValueError("no scored tokens: perplexity is undefined")
    return math.exp(nll / count)


def evaluate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    progress: Progress = False,
) -> dict[str, float | int]:
    """Perplexity of ``model`` over the windows: ``{perplexity, nll, tokens, windows}``."""
    if world_size > 1:
        nll, count = nll_sum_sharded(
            model, input_ids, labels, rank, world_size, batch_size, all_reduce, progress
        )
    else:
        nll, count = nll_sum(model, input_ids, labels, batch_size, progress)
    return {
        "perplexity": perplexity(nll, count),
        "nll": nll,
        "tokens": count,
        "windows": int(input_ids.shape[0]),
    }
