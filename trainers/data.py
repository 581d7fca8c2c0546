"""Training data: packed token blocks in a deterministic order.

The order is a pure function of (seed, global sample index): sample ``s`` comes from pass
``s // n_blocks`` over the data, whose order is a seeded permutation. So the data position of
a trial is just its optimizer step, and a run resumed at step k sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def pack_blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """1-D tokens -> [n_blocks, seq_len] (the trailing partial block is dropped)."""
    n_blocks = tokens.numel() // seq_len
    if n_blocks < 1:
        raise ValueError(
            f"the training text has {tokens.numel()} tokens, fewer than one block of {seq_len}"
        )
    return tokens[: n_blocks * seq_len].reshape(n_blocks, seq_len).long()


@lru_cache(maxsize=8)
def _permutation(n_blocks: int, seed: int, data_pass: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + data_pass)
    return torch.randperm(n_blocks, generator=g)


def sample_blocks(first_sample: int, count: int, n_blocks: int, seed: int) -> list[int]:
    """Block indices of global samples [first_sample, first_sample + count)."""
    out = []
    for s in range(first_sample, first_sample + count):
        out.append(int(_permutation(n_blocks, seed, s // n_blocks)[s % n_blocks]))
    return out


def worker_batch(
    step: int, batch_size: int, n_blocks: int, seed: int, rank: int, world_size: int
) -> list[int]:
    """This worker's share of the global batch of optimizer step ``step`` (0-based): the
    global batch is samples [step * batch_size, (step + 1) * batch_size), split into equal
    contiguous slices, one per rank."""
    per_worker = batch_size // world_size
    first = step * batch_size + rank * per_worker
    return sample_blocks(first, per_worker, n_blocks, seed)


def micro_batches(indices: list[int], accum: int) -> list[list[int]]:
    """Split a worker's share into ``accum`` nearly equal micro-batches (none empty)."""
    size = -(-len(indices) // accum)
    return [indices[i : i + size] for i in range(0, len(indices), size)]
