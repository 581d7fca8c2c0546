"""Where sweeps live: a local (or shared-filesystem) directory, or an object-store URI.

``--storage`` names the storage root; SWEEP_DIR is ``<root>/<name>`` and the model cache is
``<root>/.cache/models``. For a URI (``s3://bucket/prefix``, ``gs://...``, anything
``pyarrow.fs.FileSystem.from_uri`` opens, with its query options such as
``?endpoint_override=host:9000&scheme=http``):

- Ray Tune's experiment and every Train checkpoint go straight to the URI (Ray's own
  ``storage_filesystem``), so a resumed trial restores from the bucket on any node;
- every file of ours is written to a local staging copy of the root and pushed to the URI as
  soon as it is complete: the results tables after each write, ``sweep.yaml``/``sweep.json``,
  the sweep and trial logs, the best-model exports, the prepared data and the model cache;
- a process that needs a prepared file its node lacks (a worker on another node, a resume on a
  fresh machine) pulls it once, under a file lock, into its own staging copy.

The staging root is ``$SWEEP_STAGING/<hash of the URI>`` (default ``~/.cache/sweep/staging``).
It is a cache: deleting it loses nothing that was pushed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock
from pyarrow import fs as pafs

STAGING_ENV = "SWEEP_STAGING"
# Written last into every pushed directory: a directory without it is an interrupted push.
COMPLETE = ".sweep-complete"
DEFAULT_STAGING = "~/.cache/sweep/staging"


class StorageError(ValueError):
    """A ``--storage`` URI that cannot be opened or written: the user's input, reported with
    exit code 2 like any other invalid input."""


def is_uri(raw: str) -> bool:
    """An object-store URI (``s3://...``); ``file://`` and plain paths are local directories."""
    return "://" in str(raw) and not str(raw).startswith("file://")


class Remote:
    """One URI, its pyarrow filesystem opened lazily (and never pickled: credentials stay in
    the environment of each process, not in Ray's pickles)."""

    def __init__(self, uri: str):
        base, _, query = uri.partition("?")
        self.base, self.query = base.rstrip("/"), query
        self._fs = self._root = None

    def __getstate__(self):
        return {"base": self.base, "query": self.query, "_fs": None, "_root": None}

    def __eq__(self, other):
        return isinstance(other, Remote) and (self.base, self.query) == (other.base, other.query)

    def __repr__(self):
        return f"Remote({self.base!r})"

    @property
    def uri(self) -> str:
        return self.base + (f"?{self.query}" if self.query else "")

    @property
    def name(self) -> str:
        return self.base.rsplit("/", 1)[-1]

    def child(self, name: str) -> Remote:
        return Remote(f"{self.base}/{name}" + (f"?{self.query}" if self.query else ""))

    def parent(self) -> Remote:
        return Remote(self.base.rsplit("/", 1)[0] + (f"?{self.query}" if self.query else ""))

    def _open(self):
        if self._fs is None:
            try:
                self._fs, self._root = pafs.FileSystem.from_uri(self.uri)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                raise StorageError(f"--storage {self.base}: cannot open it: {e}") from e
            self._root = self._root.rstrip("/")
        return self._fs, self._root

    @property
    def fs(self):
        return self._open()[0]

    def path(self, rel: str = "") -> str:
        root = self._open()[1]
        return f"{root}/{rel}".rstrip("/") if rel else root

    def display(self, rel: str = "") -> str:
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    def kind(self, rel: str):
        t = self.fs.get_file_info(self.path(rel)).type
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t)

    def check(self) -> None:
        """Fail fast (exit 2, before Ray starts) when the URI cannot be written."""
        probe = self.path(".sweep-write-probe")
        try:
            self.fs.create_dir(self.path())
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"--storage {self.base}: cannot write there: {e}") from e

    def push(self, local: Path, rel: str) -> None:
        """Copy a file, or a directory's files, to ``rel`` (a directory is replaced)."""
        dest = self.path(rel)
        if local.is_dir():
            if self.kind(rel) == "dir":
                self.fs.delete_dir(dest)
            self.fs.create_dir(dest)
        else:
            self.fs.create_dir(dest.rsplit("/", 1)[0])
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        if local.is_dir():
            with self.fs.open_output_stream(f"{dest}/{COMPLETE}") as f:
                f.write(b"")

    def pull(self, rel: str, local: Path) -> bool:
        """Copy ``rel`` (file or directory) to ``local``, through a temporary sibling renamed
        into place, so a reader never sees half a copy. False when the URI has no ``rel``."""
        kind = self.kind(rel)
        if kind is None:
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".pull-{local.name}-", dir=local.parent))
        try:
            target = tmp / local.name
            if kind == "dir":
                target.mkdir()
            pafs.copy_files(self.path(rel), str(target), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            if local.is_dir() and kind == "dir":
                shutil.rmtree(local)
            os.replace(target, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True


def staging_root(remote: Remote) -> Path:
    digest = hashlib.sha1(remote.base.encode()).hexdigest()[:12]
    return Path(os.environ.get(STAGING_ENV) or DEFAULT_STAGING).expanduser() / digest


class Store:
    """A storage root: ``local`` is where files are written on this machine; ``remote`` the
    URI they are pushed to (None for a plain directory, where every method is a no-op).
    Paths are local paths under ``local``; the remote key is the same relative path."""

    def __init__(self, local: Path, remote: Remote | None = None):
        self.local, self.remote = Path(local), remote

    @classmethod
    def open(cls, raw: str) -> Store:
        if raw.startswith("file://"):
            raw = raw[len("file://"):]
        if is_uri(raw):
            remote = Remote(raw)
            return cls(staging_root(remote), remote)
        return cls(Path(raw).expanduser().resolve())

    def __repr__(self):
        return f"Store({self.local}, {self.remote!r})"

    def rel(self, path: Path) -> str | None:
        try:
            return Path(path).relative_to(self.local).as_posix()
        except ValueError:
            return None  # outside the root (a user's own model directory): never synced

    def display(self, path: Path) -> str:
        """How a path is named to users and in result rows: its URI when remote."""
        rel = self.rel(path)
        return self.remote.display(rel) if self.remote and rel is not None else str(path)

    def check(self) -> None:
        if self.remote:
            self.remote.check()

    def push(self, *paths: Path) -> None:
        for path in paths:
            rel = self.rel(path)
            if self.remote and rel is not None and Path(path).exists():
                self.remote.push(Path(path), rel)

    def push_missing(self, *paths: Path) -> None:
        """Push what the URI does not hold complete yet (prepared files never change)."""
        for path in paths:
            path, rel = Path(path), self.rel(path)
            if not (self.remote and rel is not None and path.exists()):
                continue
            if not self.remote.kind(f"{rel}/{COMPLETE}" if path.is_dir() else rel):
                self.remote.push(path, rel)

    def pull(self, path: Path) -> bool:
        rel = self.rel(path)
        return bool(self.remote and rel is not None and self.remote.pull(rel, Path(path)))

    def exists(self, path: Path) -> bool:
        rel = self.rel(path)
        if self.remote and rel is not None:
            return self.remote.kind(rel) is not None
        return Path(path).exists()

    def ensure(self, path: Path) -> Path:
        """``path`` present on this machine: pulled from the URI once when missing (a worker
        on a node that did not prepare the sweep). Concurrent callers wait on one lock."""
        path = Path(path)
        if path.exists() or not self.remote or self.rel(path) is None:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / f".{path.name}.lock")):
            if not path.exists() and not self.pull(path):
                raise FileNotFoundError(f"{self.display(path)} is in neither {path} nor the store")
            if path.is_dir() and not (path / COMPLETE).exists():
                shutil.rmtree(path)
                raise FileNotFoundError(f"{self.display(path)}: an interrupted upload (no {COMPLETE})")
        return path

    def ray_storage(self, path: Path) -> dict:
        """``storage_path`` (and ``storage_filesystem``) for a Ray RunConfig rooted at ``path``."""
        rel = self.rel(path)
        if self.remote and rel is not None:
            return {"storage_path": self.remote.path(rel), "storage_filesystem": self.remote.fs}
        return {"storage_path": str(path)}
