"""Reading and writing a store location: zarr's own store for the arrays, plus the few whole-object
operations the stats store needs (commit records, ``_selected.json``, presence, listing, removal).

* local (a path or ``file://``): ``zarr.storage.LocalStore``; a whole object is written to a
  temporary sibling and renamed over the old one (``stats_store.atomic``), as before.
* ``s3://``: ``zarr.storage.FsspecStore`` over an s3fs file system; a whole object is one PUT,
  which S3 makes visible whole or not at all (there is no rename). A commit record is written
  after the chunk it indexes, into the slot the committed generation does not use
  (``stats_store.commit``), so a torn or missing write is never visible as committed.

Both count what they move (``IoCounts``): requests, bytes and the seconds spent waiting for them,
for benchmarks comparing local disk with object storage.
"""

from __future__ import annotations

import atexit
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from stats_store.atomic import atomic_write
from stats_store.errors import StatsStoreError
from stats_store.location import StoreLocation
from stats_store.remote_errors import S3FS_RETRIES, remote_error, s3_storage_options

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import Buffer, BufferPrototype


@dataclass
class IoCounts:
    """Requests, bytes and request-seconds of one open store (mutable: every request adds to it).

    ``seconds`` sums each request's wait, so concurrent requests of zarr's event loop overlap:
    compare it between stores, do not read it as wall time.
    """

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def snapshot(self) -> "IoCounts":
        return replace(self)

    def add_read(self, nbytes: int, seconds: float) -> None:
        self.reads, self.bytes_read, self.seconds = self.reads + 1, self.bytes_read + nbytes, self.seconds + seconds

    def add_reads(self, objects: Iterable[bytes], seconds: float) -> None:
        """Objects read together (one listing and their reads), ``seconds`` for all of them."""
        for data in objects:
            self.reads, self.bytes_read = self.reads + 1, self.bytes_read + len(data)
        self.seconds += seconds

    def add_write(self, nbytes: int, seconds: float) -> None:
        self.writes, self.bytes_written = self.writes + 1, self.bytes_written + nbytes
        self.seconds += seconds


def _counting_store(inner: "Store", counts: IoCounts) -> "Store":
    """``inner`` wrapped so that zarr's gets and sets add to ``counts``."""
    from zarr.storage import WrapperStore

    class CountingStore(WrapperStore[Any]):
        def _with_store(self, store: Any) -> "CountingStore":
            return CountingStore(store)  # zarr re-wraps for read-only views: keep counting

        async def get(self, key: str, prototype: "BufferPrototype",
                      byte_range: "ByteRequest | None" = None) -> "Buffer | None":
            start = time.perf_counter()
            out = await self._store.get(key, prototype, byte_range)
            counts.add_read(len(out) if out is not None else 0, time.perf_counter() - start)
            return out

        async def set(self, key: str, value: "Buffer") -> None:
            start = time.perf_counter()
            await self._store.set(key, value)
            counts.add_write(len(value), time.perf_counter() - start)

    return CountingStore(inner)


class StoreIO(Protocol):
    """An opened location: what ``ZarrStatsStore`` needs besides zarr's arrays."""

    location: StoreLocation
    counts: IoCounts

    def zarr_store(self) -> "Store": ...

    def read(self, key: str) -> bytes | None: ...

    def read_tree(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix/``, keyed by its key in the store (none: an empty dict)."""
        ...

    def put(self, key: str, data: bytes) -> None: ...

    def exists(self) -> bool: ...

    def list_dir(self) -> list[str]: ...

    def remove_all(self) -> None: ...

    def errors(self) -> AbstractContextManager[None]: ...


class LocalIO:
    """A local directory: plain file reads, atomic rename for whole objects, ``LocalStore`` for zarr."""

    def __init__(self, location: StoreLocation) -> None:
        self.location, self.counts = location, IoCounts()
        self.root = location.local_path

    def zarr_store(self) -> "Store":
        from zarr.storage import LocalStore

        return _counting_store(LocalStore(self.root), self.counts)

    def read(self, key: str) -> bytes | None:
        start = time.perf_counter()
        try:
            data = (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        self.counts.add_read(len(data), time.perf_counter() - start)
        return data

    def read_tree(self, prefix: str) -> dict[str, bytes]:
        start = time.perf_counter()
        out: dict[str, bytes] = {}
        _read_dir(os.path.join(self.root, prefix), prefix.strip("/"), out)
        self.counts.add_reads(out.values(), time.perf_counter() - start)
        return out

    def put(self, key: str, data: bytes) -> None:
        start = time.perf_counter()
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
        self.counts.add_write(len(data), time.perf_counter() - start)

    def exists(self) -> bool:
        return self.root.exists()

    def list_dir(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def remove_all(self) -> None:
        shutil.rmtree(self.root)

    @contextmanager
    def errors(self) -> Iterator[None]:
        yield  # local OS errors already name their file


def _read_dir(path: str, key: str, out: dict[str, bytes]) -> None:
    """Every file under the directory ``path`` into ``out``, keyed ``key/<relative path>`` with
    ``/`` separators, in ``os.walk``'s order (a directory's files before its subdirectories: the
    reduced group's summary is read before its arrays); symlinked directories are not entered.
    One ``scandir`` per directory: ``os.walk`` and ``relpath`` cost twice as much, and a convert
    reads the reduced group's ~20 files this way."""
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return  # absent (or removed since its parent was listed): nothing under it
    subdirs = []
    for entry in entries:
        child = f"{key}/{entry.name}" if key else entry.name
        if entry.is_dir():
            if not entry.is_symlink():
                subdirs.append((entry.path, child))
            continue
        try:
            with open(entry.path, "rb") as f:
                out[child] = f.read()
        except FileNotFoundError:
            continue  # removed since the listing (a concurrent rewrite): absent, as for a read
    for sub, child in subdirs:
        _read_dir(sub, child, out)


# One s3fs file system per process and AWS environment: creating its client costs ~0.4 s (botocore
# loads its service model), and every shard and CLI command opens stores several times.
_FILE_SYSTEMS: dict[tuple[Any, ...], Any] = {}


def _s3_filesystem() -> Any:
    """The asynchronous s3fs file system for the current AWS environment (endpoint, keys, profile)."""
    import s3fs

    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    fs = _FILE_SYSTEMS.get(key)
    if fs is None:
        if not _FILE_SYSTEMS:
            atexit.register(_close_file_systems)
        fs = s3fs.S3FileSystem(asynchronous=True, **s3_storage_options())
        fs.retries = S3FS_RETRIES  # s3fs's own retry loop (a class attribute, default 5)
        _FILE_SYSTEMS[key] = fs
    return fs


def _close_file_systems() -> None:
    """Close the clients at exit (asynchronous s3fs instances leave that to their owner)."""
    from zarr.core.sync import sync

    for fs in _FILE_SYSTEMS.values():
        creator = getattr(fs, "_s3creator", None)
        if creator is not None:
            try:
                sync(creator.__aexit__(None, None, None), timeout=5)
            except Exception as e:  # at exit, a client that cannot close cleanly only costs a warning
                warnings.warn(f"closing the S3 client at exit: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=1)
    _FILE_SYSTEMS.clear()


class S3IO:
    """Objects under an s3:// prefix, through the s3fs file system of zarr's ``FsspecStore``."""

    def __init__(self, location: StoreLocation) -> None:
        from zarr.storage import FsspecStore

        self.location, self.counts = location, IoCounts()
        with self.errors():
            self.fs = _s3_filesystem()  # asynchronous: run on zarr's event loop like zarr's own requests
            self._store = FsspecStore(self.fs, path=location.path)

    def zarr_store(self) -> "Store":
        return _counting_store(self._store, self.counts)

    def _key(self, key: str) -> str:
        return f"{self.location.path}/{key}" if key else self.location.path

    def _run(self, coro: Any) -> Any:
        from zarr.core.sync import sync

        with self.errors():
            return sync(coro)

    def read(self, key: str) -> bytes | None:
        start = time.perf_counter()
        try:
            data: bytes = self._run(self.fs._cat_file(self._key(key)))
        except StatsStoreError:
            raise  # a missing bucket (StoreNotFoundError, also a FileNotFoundError) is not a missing key
        except FileNotFoundError:
            return None
        self.counts.add_read(len(data), time.perf_counter() - start)
        return data

    def read_tree(self, prefix: str) -> dict[str, bytes]:
        start = time.perf_counter()

        async def fetch() -> dict[str, bytes]:
            # One listing, then the GETs concurrently (s3fs batches them).
            paths = await self.fs._find(self._key(prefix))
            return await self.fs._cat(paths, on_error="omit") if paths else {}

        found: dict[str, bytes] = self._run(fetch())
        root = self.location.path.rstrip("/") + "/"
        out = {path.removeprefix(root): data for path, data in found.items() if isinstance(data, bytes)}
        self.counts.add_reads(out.values(), time.perf_counter() - start)
        return out

    def put(self, key: str, data: bytes) -> None:
        start = time.perf_counter()
        # One PUT (a multipart upload from 100 MiB, which S3 also publishes only when complete):
        # the object is visible whole or not at all.
        self._run(self.fs._pipe_file(self._key(key), data))
        self.counts.add_write(len(data), time.perf_counter() - start)

    def exists(self) -> bool:
        return bool(self.list_dir())

    def list_dir(self) -> list[str]:
        try:
            names: Iterable[str] = self._run(self.fs._ls(self._key(""), detail=False))
        except StatsStoreError:
            raise
        except FileNotFoundError:
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def remove_all(self) -> None:
        self._run(self.fs._rm(self._key(""), recursive=True))

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn an s3fs/botocore failure into the store's one-line error (see ``remote_errors``)."""
        try:
            yield
        except Exception as exc:
            mapped = remote_error(exc, self.location)
            if mapped is None:
                raise
            raise mapped from exc


def open_io(location: StoreLocation) -> StoreIO:
    """I/O for ``location``; opening contacts nothing (the first request does)."""
    return LocalIO(location) if location.is_local else S3IO(location)
