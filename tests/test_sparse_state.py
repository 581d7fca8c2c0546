"""Sparse, asynchronous training checkpoints (trainers.sparse_state).

Restores are checked for bit equality (torch.equal) against the state the trainer had when it
saved, and a resumed step against the uninterrupted one: a sparse checkpoint is only worth its
bytes if it is exact. Masks are built here independently of trainers.prune.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import trainers.sparse_state as ss
from trainers.checkpoint import save_training_state
from trainers.parallel import local, shard_masks, shard_model
from trainers.sparse_state import (
    AsyncCheckpointer,
    CheckpointWriteError,
    IncompleteCheckpointError,
    is_complete,
    latest_complete,
    load_sparse_state,
    save_sparse_state,
)
from trainers.step import train_step

SEQ, N_BLOCKS, LR = 16, 8, 1e-2
CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def make_masks(model, sparsity) -> dict[str, torch.Tensor]:
    """Keep-masks of every Linear in the blocks: the largest |W| of the layer, or with "2:4"
    the 2 largest of every 4 consecutive inputs of a row."""
    masks = {}
    for name, mod in model.named_modules():
        if ".layers." in name and isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach().abs()
            if sparsity == "2:4":
                groups = w.reshape(w.shape[0], -1, 4)
                top = groups.topk(2, dim=-1).indices
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
                masks[name] = keep.reshape(w.shape)
            else:
                flat = w.flatten()
                keep = torch.ones_like(flat, dtype=torch.bool)
                keep[torch.argsort(flat, stable=True)[: int(round(sparsity * flat.numel()))]] = False
                masks[name] = keep.view_as(w)
    return masks


def blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (N_BLOCKS, SEQ), generator=g)


def setup(masks, seed: int = 0, masked: bool = True):
    """A (masked) model, its AdamW and the pruned positions (one process: whole tensors)."""
    model = tiny_model(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name in masks and masked:
                mod.weight.mul_(masks[name])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    return model, opt, shard_masks(model, masks)


def step(model, opt, pruned, i: int) -> float:
    rows = [(2 * i) % N_BLOCKS, (2 * i + 1) % N_BLOCKS]
    return train_step(model, opt, blocks(), [rows], pruned, LR, 1.0, CPU)


def snapshot(model, opt) -> dict:
    """Every tensor of model and optimizer state, cloned (local shards under FSDP2)."""
    out = {f"model/{k}": local(v).detach().clone() for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim/{names[p]}/{k}"] = local(v).detach().clone()
    return out


def assert_equal_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def trained(masks, steps: int = 2):
    model, opt, pruned = setup(masks)
    for i in range(steps):
        step(model, opt, pruned, i)
    return model, opt, pruned


def distcp_bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".distcp")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, "2:4"])
def test_round_trip_is_exact_and_stores_kept_values_only(tmp_path, sparsity):
    masks = make_masks(tiny_model(), sparsity)
    model, opt, pruned = trained(masks)
    want = snapshot(model, opt)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    loop = {"epoch": 1, "step": 2, "best": 3.5, "history": [{"epoch": 0, "loss": None}]}
    save_sparse_state(tmp_path / "new", model, opt, pruned, loop)
    save_training_state(tmp_path / "today", model, opt, loop)

    # Other initial weights, not even masked, and an empty Adam state: the load must zero the
    # pruned positions itself.
    model2, opt2, pruned2 = setup(masks, seed=7, masked=False)
    torch.manual_seed(999)
    assert load_sparse_state(tmp_path / "new", model2, opt2, pruned2) == loop
    assert_equal_states(snapshot(model2, opt2), want)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(torch.get_rng_state(), rng)

    # The masked tensors are stored as their kept values only, nothing dense besides.
    meta = dcp.FileSystemReader(str(tmp_path / "new")).read_metadata().state_dict_metadata
    n_pruned = 0
    for name, keep in masks.items():
        fqn = f"{name}.weight"
        assert f"model.{fqn}" not in meta and f"optim.state.{fqn}.exp_avg" not in meta
        for kind in ("weight", "exp_avg", "exp_avg_sq"):
            assert list(meta[f"sparse.rank0.{fqn}.{kind}"].size) == [int(keep.sum())]
        n_pruned += int((~keep).sum())
    # Against today's dense format: 3 fp32 tensors' pruned entries (12 bytes each) are saved,
    # less a few hundred bytes of per-item framing.
    saved = distcp_bytes(tmp_path / "today") - distcp_bytes(tmp_path / "new")
    assert saved >= 12 * n_pruned - 4096
    assert saved <= 12 * n_pruned + 4096


def test_resumed_step_equals_uninterrupted_step(tmp_path):
    masks = make_masks(tiny_model(), 0.9)
    model, opt, pruned = trained(masks, steps=3)
    save_sparse_state(tmp_path / "c", model, opt, pruned, {"step": 3})
    loss = step(model, opt, pruned, 3)
    want = snapshot(model, opt)

    model2, opt2, pruned2 = setup(masks, seed=5)
    load_sparse_state(tmp_path / "c", model2, opt2, pruned2)
    assert step(model2, opt2, pruned2, 3) == loss
    assert_equal_states(snapshot(model2, opt2), want)


def test_nonzero_at_pruned_position_is_refused(tmp_path):
    masks = make_masks(tiny_model(), 0.5)
    model, opt, pruned = trained(masks, steps=1)
    name = next(iter(masks))
    where = pruned[name].nonzero()[0]
    with torch.no_grad():
        opt.state[model.get_submodule(name).weight]["exp_avg"][tuple(where)] = 1e-3
    with pytest.raises(ValueError, match=f"{name}.weight exp_avg"):
        save_sparse_state(tmp_path / "c", model, opt, pruned, {})
    assert not is_complete(tmp_path / "c")
    with AsyncCheckpointer(model, opt, pruned) as ckpt:  # verifies its first save
        with pytest.raises(ValueError, match=f"{name}.weight exp_avg"):
            ckpt.save(tmp_path / "d", {})
        assert not ckpt.in_flight


class GatedSave:
    """Stands in for dcp.save in the writer: records start/end and holds the write until
    released, so a test can act while a write is in flight."""

    def __init__(self, real):
        self.real, self.release, self.events, self.lock = real, threading.Event(), [], threading.Lock()
        self.active = self.max_active = 0

    def __call__(self, sd, **kw):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.events.append(("start", kw["storage_writer"].path.name))
        assert self.release.wait(30)
        try:
            return self.real(sd, **kw)
        finally:
            with self.lock:
                self.active -= 1
                self.events.append(("end", kw["storage_writer"].path.name))


@pytest.mark.parametrize("background_staging", [False, True])
def test_async_save_snapshots_the_state_before_training_goes_on(tmp_path, monkeypatch,
                                                                 background_staging):
    masks = make_masks(tiny_model(), 0.5)
    model, opt, pruned = trained(masks)
    want = snapshot(model, opt)
    gate = GatedSave(dcp.save)
    monkeypatch.setattr(ss.dcp, "save", gate)
    done = []
    with AsyncCheckpointer(model, opt, pruned, background_staging=background_staging) as ckpt:
        ckpt.save(tmp_path / "a", {"step": 2},
                  on_done=lambda d: done.append((d, threading.current_thread())))
        step(model, opt, pruned, 2)  # training moves on while the write waits
        assert ckpt.in_flight and not done
        gate.release.set()
        assert ckpt.wait() == tmp_path / "a"
        assert done == [(tmp_path / "a", threading.main_thread())]
    assert not torch.equal(snapshot(model, opt)["model/lm_head.weight"], want["model/lm_head.weight"])
    model2, opt2, pruned2 = setup(masks, seed=3)
    assert load_sparse_state(tmp_path / "a", model2, opt2, pruned2) == {"step": 2}
    assert_equal_states(snapshot(model2, opt2), want)


def test_background_staging_holds_the_optimizer_step_until_copied(tmp_path, monkeypatch):
    masks = make_masks(tiny_model(), 0.9)
    model, opt, pruned = trained(masks)
    want = snapshot(model, opt)
    release = threading.Event()
    real_pack = ss._pack

    def held_pack(*args):
        assert release.wait(30)
        return real_pack(*args)

    monkeypatch.setattr(ss, "_pack", held_pack)
    ckpt = AsyncCheckpointer(model, opt, pruned, background_staging=True)
    ckpt.save(tmp_path / "a", {"step": 2})  # returns before the copy is taken
    stepping = threading.Thread(target=step, args=(model, opt, pruned, 2))
    stepping.start()
    stepping.join(0.5)
    assert stepping.is_alive()  # forward and backward ran; optimizer.step() waits for the copy
    release.set()
    stepping.join(30)
    assert not stepping.is_alive() and ckpt.staging_wait_s > 0
    ckpt.close()
    assert not torch.equal(snapshot(model, opt)["model/lm_head.weight"], want["model/lm_head.weight"])
    model2, opt2, pruned2 = setup(masks, seed=3)
    load_sparse_state(tmp_path / "a", model2, opt2, pruned2)
    assert_equal_states(snapshot(model2, opt2), want)
    assert not opt._optimizer_step_pre_hooks  # close() removed the hook


def test_a_finished_write_is_sent_after_the_next_step_not_at_the_next_save(tmp_path, monkeypatch):
    """``finished`` is False while the write runs and True once it is on disk; the save
    point's ``poll`` after a training step then sends it (trainers/saving.py), so a crash
    after that step resumes from it rather than from the checkpoint before."""
    from types import SimpleNamespace

    from trainers.saving import SavingHooks

    masks = make_masks(tiny_model(), 0.5)
    model, opt, pruned = trained(masks)
    release = threading.Event()
    real_save = ss.dcp.save

    def held_save(*args, **kwargs):
        assert release.wait(30)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ss.dcp, "save", held_save)
    sent = []

    class Hooks(SavingHooks):
        def send(self, core, metrics, checkpoint):
            sent.append(checkpoint)

    with AsyncCheckpointer(model, opt, pruned) as ckpt:
        core = SimpleNamespace(checkpointer=ckpt)
        assert not ckpt.finished()  # nothing in flight
        ckpt.save(tmp_path / "a", {"step": 2}, on_done=lambda d: sent.append(d))
        step(model, opt, pruned, 2)
        Hooks().poll(core)
        assert ckpt.in_flight and not ckpt.finished() and sent == []  # still writing
        release.set()
        deadline = time.time() + 30
        while ckpt.in_flight and time.time() < deadline:
            time.sleep(0.01)
        step(model, opt, pruned, 3)
        Hooks().poll(core)
        assert sent == [tmp_path / "a"] and is_complete(tmp_path / "a")
        assert not ckpt.finished()  # sent: nothing in flight any more


def test_only_one_save_in_flight(tmp_path, monkeypatch):
    masks = make_masks(tiny_model(), 0.5)
    model, opt, pruned = trained(masks, steps=1)
    gate = GatedSave(dcp.save)
    monkeypatch.setattr(ss.dcp, "save", gate)
    done = []
    ckpt = AsyncCheckpointer(model, opt, pruned)
    ckpt.save(tmp_path / "a", {"step": 1}, on_done=done.append)
    second = threading.Thread(
        target=ckpt.save, args=(tmp_path / "b", {"step": 1}), kwargs={"on_done": done.append}
    )
    second.start()
    second.join(0.5)
    assert second.is_alive()  # blocked behind the first write, which is held
    assert gate.events == [("start", "a")] and done == []
    gate.release.set()
    second.join(30)
    assert not second.is_alive()
    ckpt.close()
    assert gate.events == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
    assert gate.max_active == 1
    assert done == [tmp_path / "a", tmp_path / "b"]


def test_failed_write_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    masks = make_masks(tiny_model(), 0.9)
    model, opt, pruned = trained(masks)
    want = snapshot(model, opt)
    done = []
    ckpt = AsyncCheckpointer(model, opt, pruned)
    ckpt.save(tmp_path / "a", {"step": 2}, on_done=done.append)
    ckpt.wait()
    step(model, opt, pruned, 2)
    real = dcp.save

    def crash_mid_write(sd, **kw):
        real({"model": sd["model"]}, **kw)  # some data files on disk, then the disk fails
        raise OSError("simulated: no space left on device")

    monkeypatch.setattr(ss.dcp, "save", crash_mid_write)
    ckpt.save(tmp_path / "b", {"step": 3}, on_done=done.append)
    with pytest.raises(CheckpointWriteError) as err:
        ckpt.wait()
    assert isinstance(err.value.__cause__, OSError)
    assert done == [tmp_path / "a"]  # no callback for the failed write
    assert any((tmp_path / "b").iterdir()) and not is_complete(tmp_path / "b")
    assert latest_complete(tmp_path) == tmp_path / "a"
    with pytest.raises(IncompleteCheckpointError):
        load_sparse_state(tmp_path / "b", *setup(masks, seed=3))
    model2, opt2, pruned2 = setup(masks, seed=3)
    assert load_sparse_state(tmp_path / "a", model2, opt2, pruned2) == {"step": 2}
    assert_equal_states(snapshot(model2, opt2), want)

    monkeypatch.setattr(ss.dcp, "save", real)  # the checkpointer still works after a failure
    ckpt.save(tmp_path / "c", {"step": 3}, on_done=done.append)
    ckpt.close()
    assert done == [tmp_path / "a", tmp_path / "c"] and latest_complete(tmp_path) == tmp_path / "c"
    with pytest.raises(FileExistsError):  # never overwrite a complete checkpoint in place
        save_sparse_state(tmp_path / "c", model, opt, pruned, {})


def _killed_during_write(root: str) -> None:
    """Child process: one complete checkpoint, then the process dies inside the next write."""
    torch.set_num_threads(1)
    from pathlib import Path

    masks = make_masks(tiny_model(), 0.5)
    model, opt, pruned = trained(masks)
    torch.save(snapshot(model, opt), Path(root) / "want.pt")
    save_sparse_state(Path(root) / "a", model, opt, pruned, {"step": 2})
    step(model, opt, pruned, 2)
    real = dcp.save

    def die(sd, **kw):
        real(sd, **kw)  # data and .metadata written, marker not yet
        os._exit(3)

    ss.dcp.save = die
    ckpt = AsyncCheckpointer(model, opt, pruned)
    ckpt.save(Path(root) / "b", {"step": 3})
    ckpt.wait()
    os._exit(0)  # not reached


def test_process_killed_during_write_leaves_previous_checkpoint(tmp_path):
    proc = mp.get_context("spawn").Process(target=_killed_during_write, args=(str(tmp_path),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3
    assert (tmp_path / "b" / ".metadata").exists() and not is_complete(tmp_path / "b")
    assert latest_complete(tmp_path) == tmp_path / "a"
    masks = make_masks(tiny_model(), 0.5)
    model2, opt2, pruned2 = setup(masks, seed=3)
    assert load_sparse_state(tmp_path / "a", model2, opt2, pruned2) == {"step": 2}
    assert_equal_states(snapshot(model2, opt2), torch.load(tmp_path / "want.pt", weights_only=True))


def _fsdp_worker(rank: int, world: int, store: str, root: str, masks, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from pathlib import Path

    def build(seed):
        model = tiny_model(seed)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name in masks:
                    mod.weight.mul_(masks[name])
        shard_model(model, model.model.layers, mixed_precision=False)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        return model, opt, shard_masks(model, masks)

    def fsdp_step(model, opt, pruned, i):
        rows = [(4 * i + 2 * rank) % N_BLOCKS, (4 * i + 2 * rank + 1) % N_BLOCKS]
        return train_step(model, opt, blocks(), [rows], pruned, LR, 1.0, CPU)

    model, opt, pruned = build(0)
    for i in range(2):
        fsdp_step(model, opt, pruned, i)
    ok = []
    for n, background in enumerate((False, True)):
        want = snapshot(model, opt)
        done = []
        ckpt = AsyncCheckpointer(model, opt, pruned, background_staging=background)
        ckpt.save(Path(root) / f"c{n}", {"step": 2 + n}, on_done=done.append)
        loss = fsdp_step(model, opt, pruned, 2 + n)  # FSDP collectives while the save runs
        after = snapshot(model, opt)
        ckpt.close()

        model2, opt2, pruned2 = build(11)
        state = load_sparse_state(Path(root) / f"c{n}", model2, opt2, pruned2)
        restored = snapshot(model2, opt2)
        ok.append(restored.keys() == want.keys()
                  and all(torch.equal(restored[k], want[k]) for k in want))
        loss2 = fsdp_step(model2, opt2, pruned2, 2 + n)
        resumed = snapshot(model2, opt2)
        ok.append(loss2 == loss and all(torch.equal(resumed[k], after[k]) for k in after))
        ok += [done == [Path(root) / f"c{n}"], state == {"step": 2 + n}]
    kept = {f"{n}.weight": int((~w).sum()) for n, w in pruned.items()}
    flags = torch.tensor(ok, dtype=torch.int32)
    gathered = [torch.zeros_like(flags) for _ in range(world)]
    dist.all_gather(gathered, flags)
    kept_all = [None] * world
    dist.all_gather_object(kept_all, kept)
    if rank == 0:
        torch.save({"flags": [g.tolist() for g in gathered], "kept": kept_all}, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_fsdp.py: gloo threads can abort the interpreter's teardown


def test_two_gloo_ranks_async_save_and_resume(tmp_path):
    masks = make_masks(tiny_model(), 0.5)
    out = str(tmp_path / "out.pt")
    t0 = time.perf_counter()
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path), masks, out),
             nprocs=2, join=True)
    assert time.perf_counter() - t0 < 300
    got = torch.load(out, weights_only=True)
    assert got["flags"] == [[1] * 8, [1] * 8]
    # Each rank stored its own shard's kept values; together they are every kept weight.
    meta = dcp.FileSystemReader(str(tmp_path / "c1")).read_metadata().state_dict_metadata
    for name, keep in masks.items():
        fqn = f"{name}.weight"
        sizes = [int(meta[f"sparse.rank{r}.{fqn}.weight"].size[0]) for r in range(2)]
        assert sizes == [got["kept"][r][fqn] for r in range(2)]
        assert sum(sizes) == int(keep.sum())
