"""``--storage`` as an object-store URI, against a local S3 server (moto).

The unit tests check the store's pieces (push, pull, the lock-protected pull a worker does, the
fail-fast check, reading results from a URI). The ``ray`` test runs a sweep whose only storage
is the bucket: a trial fails for good after its epoch-1 checkpoint, the local staging copy is
deleted (a different machine), and ``sweep resume <URI>`` must finish the sweep from the
checkpoint held in the bucket, with every row once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sweep.results import EPOCHS_FILE, TRIALS_FILE, ResultsWriter
from trainers.storage import COMPLETE, Remote, StorageError, Store, staging_root

moto_server = pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; yields a function giving a fresh bucket's URI."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    def bucket(prefix: str = "sweeps") -> str:
        name = f"b{uuid.uuid4().hex[:12]}"
        return (f"s3://{name}/{prefix}?endpoint_override={host}:{port}&scheme=http"
                "&allow_bucket_creation=true")

    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def staging(tmp_path, monkeypatch):
    path = tmp_path / "staging"
    monkeypatch.setenv("SWEEP_STAGING", str(path))
    return path


def keys(remote: Remote) -> set[str]:
    from pyarrow import fs as pafs

    root = remote.path()
    infos = remote.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_uri_parts_and_pickling(s3):
    import pickle

    r = Remote("s3://bkt/a/b?endpoint_override=h:1&scheme=http")
    assert (r.name, r.display("x/y"), r.parent().base) == ("b", "s3://bkt/a/b/x/y", "s3://bkt/a")
    assert r.child("c").uri == "s3://bkt/a/b/c?endpoint_override=h:1&scheme=http"
    remote = Remote(s3())
    assert remote.fs is not None  # opened: holds a live filesystem and credentials
    copy = pickle.loads(pickle.dumps(remote))
    assert copy == remote and copy._fs is None  # reopened from the URI in each process


def test_push_pull_round_trip_and_directory_replacement(s3, staging):
    store = Store.open(s3())
    assert store.local == staging_root(store.remote) and str(store.local).startswith(str(staging))
    store.check()
    d = store.local / "sw" / "export" / "t1"
    d.mkdir(parents=True)
    (d / "a.bin").write_bytes(b"1" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("b")
    f = store.local / "sw" / "sweep.json"
    f.write_text("{}")
    store.push(d, f)
    assert keys(store.remote) == {"sw/export/t1/a.bin", "sw/export/t1/sub/b.txt",
                                  f"sw/export/t1/{COMPLETE}", "sw/sweep.json"}
    (d / "sub" / "b.txt").unlink()
    (d / "c.txt").write_text("c")
    store.push(d)  # a directory is replaced, not merged
    assert {k for k in keys(store.remote) if k.startswith("sw/export")} == {
        "sw/export/t1/a.bin", "sw/export/t1/c.txt", f"sw/export/t1/{COMPLETE}"}
    assert store.display(d) == f"{store.remote.base}/sw/export/t1"

    shutil.rmtree(store.local)  # another machine: nothing local
    assert store.exists(d) and not d.exists()
    assert store.pull(d) and (d / "a.bin").read_bytes() == b"1" * 1000
    assert not store.pull(store.local / "sw" / "missing")
    assert not list(d.parent.glob(".pull-*"))  # no temporary left behind


def test_ensure_pulls_once_under_a_lock_and_refuses_an_interrupted_upload(s3, staging):
    store = Store.open(s3())
    model = store.local / ".cache" / "models" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"x" * 4096)
    store.push_missing(model)
    shutil.rmtree(store.local)
    results, errors = [], []

    def worker():
        try:
            results.append(store.ensure(model))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [model] * 4
    assert (model / "model.safetensors").read_bytes() == b"x" * 4096

    # An upload that died half-way has no completion marker: push_missing redoes it, and a
    # worker never trains on half a model.
    store.remote.fs.delete_file(store.remote.path(f".cache/models/m/{COMPLETE}"))
    shutil.rmtree(store.local)
    with pytest.raises(FileNotFoundError, match="interrupted upload"):
        store.ensure(model)
    assert not model.exists()
    with pytest.raises(FileNotFoundError, match="neither"):
        store.ensure(store.local / "prep" / "nothing.safetensors")


def test_a_plain_directory_store_does_nothing_extra(tmp_path):
    store = Store.open(str(tmp_path))
    f = tmp_path / "x.txt"
    f.write_text("x")
    store.push(f)
    store.check()
    assert store.ensure(f) == f and store.display(f) == str(f)
    assert store.ray_storage(tmp_path / "tune") == {"storage_path": str(tmp_path / "tune")}


def test_bad_uris_fail_fast_with_exit_2_before_ray(s3, tmp_path):
    bad_scheme = "nosuchfs://bucket/x"
    # A bucket that does not exist, without permission to create it.
    no_bucket = s3().replace("&allow_bucket_creation=true", "")
    for uri in (bad_scheme, no_bucket):
        proc = subprocess.run(
            [sys.executable, "-m", "sweep.cli", "run", str(TINY), "--storage", uri],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "SWEEP_STAGING": str(tmp_path)},
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert uri.split("?")[0] in proc.stderr
        assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    with pytest.raises(StorageError, match="nosuchfs"):
        Store.open(bad_scheme).check()


def test_results_are_read_from_a_uri(s3, staging):
    from sweep.api import load

    uri = s3()
    store = Store.open(uri)
    for name in ("one", "two"):
        writer = ResultsWriter(store.local / name, on_write=store.push)
        writer.upsert_trial({"sweep": name, "trial_id": "t", "status": "completed"})
        writer.upsert_epoch({"sweep": name, "trial_id": "t", "epoch": 0, "perplexity": 9.5})
    assert {"one/results/trials.parquet", "two/results/epochs.parquet"} <= keys(store.remote)
    shutil.rmtree(store.local)
    both = load(uri)
    assert sorted(both.trials["sweep"]) == ["one", "two"]
    one = load(Remote(uri).child("one").uri)
    assert list(one.epochs["perplexity"]) == [9.5] and list(one.trials["sweep"]) == ["one"]
    with pytest.raises(FileNotFoundError, match="no results"):
        load(Remote(uri).child("none").uri)


# ---------------------------------------------------------------------------------------------
# A whole sweep in a bucket


def _cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
def test_sweep_in_a_bucket_survives_the_loss_of_its_machine(s3, tmp_path):
    uri = s3()
    remote = Remote(uri)
    env = {**os.environ, "SWEEP_STAGING": str(tmp_path / "machine-a")}
    args = ["run", str(TINY), "--storage", uri, "--sparsity", "0.5", "--set", "grid.batch_size=[2, 4]",
            "--set", "train.base_samples=48", "--set", "checkpoint.every_steps=4",
            "--set", "failure.worker_max_failures=0", "--set", "failure.trial_max_failures=0"]
    # s0.5-b2 (24 steps per epoch) fails for good at step 30, after its step-28 checkpoint.
    first = _cli(args, {**env, "SWEEP_INJECT_FAILURE": "s0.5-b2:30"})
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    stored = keys(remote.child("tiny"))
    for key in ("sweep.yaml", "sweep.json", "results/epochs.parquet", "results/trials.parquet",
                "logs/sweep.log", "logs/s0.5-b2.log", "export/s0.5-b4/model.safetensors",
                "prep/train_tokens.safetensors", "prep/eval_windows.safetensors",
                "prep/masks/magnitude-s0.5.safetensors"):
        assert key in stored, key
    assert any(k.startswith("train/train-s0.5-b2/checkpoint_") for k in stored)
    assert any(k.startswith("tune/") for k in stored)
    assert any(k.startswith(".cache/models/") for k in keys(remote))

    trials = {t["trial_id"]: t for t in _read(remote, TRIALS_FILE)}
    assert trials["s0.5-b2"]["status"] == "errored"
    assert trials["s0.5-b4"]["status"] == "completed"
    assert trials["s0.5-b4"]["best_checkpoint"] == f"{remote.base}/tiny/export/s0.5-b4"

    # Machine A is gone: resume from the bucket alone, on a machine with an empty staging.
    env_b = {**os.environ, "SWEEP_STAGING": str(tmp_path / "machine-b")}
    shutil.rmtree(tmp_path / "machine-a")
    resumed = _cli(["resume", remote.child("tiny").uri], env_b)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    epochs = _read(remote, EPOCHS_FILE)
    pairs = [(r["trial_id"], r["epoch"]) for r in epochs]
    assert sorted(pairs) == [(t, e) for t in ("s0.5-b2", "s0.5-b4") for e in (0, 1, 2)]
    trials = {t["trial_id"]: t for t in _read(remote, TRIALS_FILE)}
    assert {t["status"] for t in trials.values()} == {"completed"}
    log = _read_text(remote, "tiny/logs/s0.5-b2.log")
    # The bucket's checkpoint: step 28's, sent once its background write finished on both
    # ranks (trainers/saving.py); if the failure at step 30 came first, the epoch end's (24).
    assert re.search(r"resumed from checkpoint: epoch 1, step (28|24)\b", log), log[-2000:]
    query = _cli(["query", remote.child("tiny").uri, "select count(*) as n from epochs",
                  "--format", "csv"], env_b)
    assert query.returncode == 0 and query.stdout.split()[-1] == "6", query.stdout + query.stderr


def _read(remote: Remote, name: str) -> list[dict]:
    with remote.fs.open_input_file(remote.path(f"tiny/results/{name}")) as f:
        return pq.read_table(f).to_pylist()


def _read_text(remote: Remote, rel: str) -> str:
    with remote.fs.open_input_stream(remote.path(rel)) as f:
        return f.read().decode()
