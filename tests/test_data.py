"""Training data order: packing, the per-rank split of a global batch, full coverage of each
pass, determinism per seed, resume at any step, and micro-batch splits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sweep.plan import grad_accum_steps
from trainers.data import micro_batches, pack_blocks, worker_batch

N_BLOCKS = 24


def global_batch(step: int, batch: int, world: int, seed: int = 0) -> list[int]:
    """The union over ranks of one step's shares, in rank order."""
    out: list[int] = []
    for rank in range(world):
        out += worker_batch(step, batch, N_BLOCKS, seed, rank, world)
    return out


def steps(first: int, count: int, batch: int = 4, seed: int = 0) -> list[list[int]]:
    return [worker_batch(s, batch, N_BLOCKS, seed, 0, 1) for s in range(first, first + count)]


# ---------------------------------------------------------------------------------------------
# pack_blocks


@pytest.mark.parametrize(
    "n_tokens, seq_len, n_blocks", [(10, 5, 2), (14, 5, 2), (5, 5, 1), (64, 8, 8)]
)
def test_pack_blocks_shape_and_tail_drop(n_tokens, seq_len, n_blocks):
    tokens = torch.arange(n_tokens, dtype=torch.int32)
    blocks = pack_blocks(tokens, seq_len)
    assert blocks.shape == (n_blocks, seq_len)
    assert blocks.dtype == torch.long
    assert torch.equal(blocks.flatten(), torch.arange(n_blocks * seq_len))


def test_pack_blocks_too_short():
    with pytest.raises(ValueError, match="4 tokens.*5"):
        pack_blocks(torch.arange(4), 5)


# ---------------------------------------------------------------------------------------------
# worker_batch


@pytest.mark.parametrize("batch", [4, 8])
@pytest.mark.parametrize("step", [0, 1, 5, 13])
def test_ranks_together_give_the_single_process_batch(step, batch):
    single = worker_batch(step, batch, N_BLOCKS, 0, 0, 1)
    assert len(single) == batch
    for world in (2, 4):
        assert global_batch(step, batch, world) == single


def test_ranks_get_disjoint_equal_shares():
    shares = [worker_batch(3, 8, N_BLOCKS, 0, r, 4) for r in range(4)]
    assert [len(s) for s in shares] == [2, 2, 2, 2]
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize("batch", [1, 4, 5, 7])
def test_each_pass_covers_every_block_once(batch):
    # Enough steps for three full passes; a step may straddle two passes.
    n_steps = -(-3 * N_BLOCKS // batch)
    samples = [i for s in steps(0, n_steps, batch) for i in s]
    for p in range(3):
        one_pass = samples[p * N_BLOCKS : (p + 1) * N_BLOCKS]
        assert sorted(one_pass) == list(range(N_BLOCKS)), f"pass {p}"


def test_passes_are_reshuffled():
    samples = [i for s in steps(0, 2 * N_BLOCKS // 4) for i in s]
    assert samples[:N_BLOCKS] != samples[N_BLOCKS:]
    assert samples[:N_BLOCKS] != list(range(N_BLOCKS))  # shuffled, not the text order


def test_deterministic_per_seed():
    assert steps(0, 10, seed=3) == steps(0, 10, seed=3)


def test_seeds_give_different_orders():
    assert steps(0, 6, seed=0) != steps(0, 6, seed=1)


@pytest.mark.parametrize("k", [1, 5, 6, 11])
def test_resume_at_step_k_continues_the_sequence(k):
    uninterrupted = steps(0, 20)
    assert steps(0, k) + steps(k, 20 - k) == uninterrupted


def test_each_block_equally_often_over_whole_passes():
    counts = Counter(i for s in steps(0, 4 * N_BLOCKS // 8, batch=8) for i in s)
    assert set(counts.values()) == {4} and len(counts) == N_BLOCKS


# ---------------------------------------------------------------------------------------------
# micro_batches


@pytest.mark.parametrize(
    "n, accum, sizes",
    [
        (8, 1, [8]),
        (8, 2, [4, 4]),
        (8, 4, [2, 2, 2, 2]),
        (5, 3, [2, 2, 1]),
        (5, 5, [1] * 5),
        (1, 1, [1]),
    ],
)
def test_micro_batch_sizes(n, accum, sizes):
    chunks = micro_batches(list(range(n)), accum)
    assert [len(c) for c in chunks] == sizes


@pytest.mark.parametrize("share", range(1, 13))
@pytest.mark.parametrize("micro", [None, 1, 2, 3, 5])
def test_micro_batches_match_the_planned_accumulation(share, micro):
    """With the accumulation the plan computes: exactly ``accum`` passes, none empty, none over
    the micro-batch size, order kept."""
    accum = grad_accum_steps(share, 1, micro)
    indices = [10 + i for i in range(share)]
    chunks = micro_batches(indices, accum)
    assert len(chunks) == accum
    assert all(chunks)
    assert max(len(c) for c in chunks) <= (micro or share)
    assert [i for c in chunks for i in c] == indices
