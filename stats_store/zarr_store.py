"""The zarr implementation of the stats store and its layout (format version 2).

For ``dump_stats_path = <dir>/<prefix>`` the store is ``<dir>/<prefix>.zarr``: a local directory,
or, for ``s3://bucket/dir/prefix``, the objects under ``s3://bucket/dir/prefix.zarr/`` (see
``stats_store.location``; the keys below are the same on both)::

    zarr.json                          root attributes: kind, format_version, config_hash,
                                       model_fingerprint, topology {dp, tp}, device_kind, observer, runs
    shards/shard-<k>-slot-<s>          float32 (n,), one chunk, no compression: shard k's packed
                                       generation g (slot s = g % 2): its own channels of every
                                       tensor, back to back, indexed by its commit record
    reduced/values                     float32 (N,), one chunk: every module's global tensors
    reduced/module_name, module_op_type          str (M,)   the modules, in discovery order
    reduced/module_num_samples                   int64 (M,)
    reduced/module_num_tokens                    int64 (M,)   rows seen at inputs[0] (tokens routed
                                                 to an expert); absent in stores written before
                                                 it was counted, which read as 0
    reduced/tensor_label                         str (T,)   e.g. inputs.0, outputs.1, params.weight
    reduced/tensor_index                         int64 (T, 3): module row, offset, length in values
    reduced/nonfinite_label                      str (F,)   NaN/Inf counts, only where non-zero
    reduced/nonfinite_index                      int64 (F, 2): module row, count
    reduced (group attributes)         the reducer's summary: shard generations reduced, counts;
                                       written last, and cleared while a reduce rewrites the arrays
    _commits/shard-<k>.json            commit records, each one whole object (locally a temp file, then
                                       os.replace; on S3 one PUT); each is also the index of its chunk
                                       (module, label, op type, merge, slice, offset, length, checksum)
    _selected.json                     the modules the run selected for measuring, called or not
                                       (``record_selected``; union over calls; written like a
                                       commit record). Absent in stores that never recorded it.

Why packed, not a group per module with an array per tensor (format 1): zarr costs about 1 ms
per group, 2.3 ms per array created, 2.2 ms per chunk written and 4 ms per array read on the
2-core development machine, so format 1 spent minutes on big models while numpy needs
milliseconds. Measured there with format 1: importing the 961-module Llama-2-70B INC file took
31 s (write 13.7 s, reduce 17.6 s) and reading its reduced statistics 2.9 s. With this layout a
shard's flush is one chunk write, a reduce is one chunk read per shard plus numpy and ~8 array
writes, whatever the number of modules. Measured with this layout (same machine, shared with
other jobs, ``torch.set_num_threads(1)``): ``stats-store import-inc`` of the 961-module file 0.10 s,
of the 4,502-module DeepSeek-R1 file 0.42 s; ``reduce`` of 80 layers x 7 linears x 8 shards with
per-channel weights/outputs (Llama-70B shapes) 0.55 s (bench/bench_inc_import.py,
bench/bench_store_reduce.py). A module-oriented view stays: the index gives
each module's slice of ``values`` (``read_reduced()``, ``stats-store show MODULE``).

Every chunk has one writer (its shard), the reduced arrays one writer (the reducer), root
attributes are written when a run is opened. Nothing relies on a rename: a commit record is
written after its chunk, into the slot the committed generation does not use, so on object
storage (no rename) a torn or missing chunk write is never visible as committed either.
Consolidated metadata is refreshed after each reduce, for other zarr readers; this code always
reads the live metadata.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import zarr

from stats_store.atomic import COMPACT_SEPARATORS
from stats_store.location import ZARR_SUFFIX, StoreLocation, parse_location
from stats_store.metadata import STORE_KIND, CommitRecord, RunMeta, canonical_json
from stats_store.packing import Packed
from stats_store.reduced_group import REDUCED_GROUP, read_reduced_objects, write_reduced_arrays
from stats_store.store import CommittedStore, StoreCapabilities
from stats_store.store_io import IoCounts, StoreIO, open_io
from stats_store.errors import RunMismatchError, StoreFormatError, StoreNotFoundError

__all__ = ["ZARR_SUFFIX", "ZarrStatsStore", "store_exists", "store_path", "stores_in"]

COMMITS_DIR = "_commits"
SELECTED_FILE = "_selected.json"
SHARDS_GROUP = "shards"
ROOT_META = "zarr.json"

Where = str | Path | StoreLocation
_F = TypeVar("_F", bound=Callable[..., Any])


def store_path(dump_stats_path: str | Path) -> Path:
    """``<dir>/<prefix>`` → ``<dir>/<prefix>.zarr`` (a path already ending in .zarr is kept); local only."""
    return parse_location(dump_stats_path).local_path


def store_exists(where: Where) -> bool:
    """Whether anything is at the store location of ``where`` (a stats store or not)."""
    io = open_io(parse_location(where))
    with io.errors():
        return io.exists()


def stores_in(directory: Where) -> list[StoreLocation] | None:
    """The stores directly inside ``directory``; None when it is not a directory of stores (a store
    itself, or a ``dump_stats_path`` prefix)."""
    loc = parse_location(directory, store=False)
    io = open_io(loc)
    with io.errors():
        if loc.name.endswith(ZARR_SUFFIX) or not io.exists() or io.read(ROOT_META) is not None:
            return None
        return [loc.child(n) for n in io.list_dir() if n.endswith(ZARR_SUFFIX)]


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's insignificant whitespace
_DECODER = json.JSONDecoder()


def _leading_member(raw: bytes, key: str, within: int = 4096) -> Any:
    """``json.loads(raw)[key]`` for a JSON object whose member ``key`` comes within its first
    ``within`` bytes (a commit record's generation, written second): only the members up to it
    are parsed, not the index of every tensor that follows (most of a convert's read). Anything
    else (``key`` later, not an object, not JSON) is parsed whole, with json's errors. A key
    given twice gives its first value here (json's last); records never repeat a key."""
    try:
        text = raw[:within].decode("utf-8")
        i = _WHITESPACE.match(text).end()  # type: ignore[union-attr]
        if text[i] != "{":
            raise ValueError
        while True:
            i = _WHITESPACE.match(text, i + 1).end()  # type: ignore[union-attr]
            if text[i] != '"':
                raise ValueError
            name, i = json.decoder.scanstring(text, i + 1)
            i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
            if text[i] != ":":
                raise ValueError
            value, i = _DECODER.raw_decode(text, _WHITESPACE.match(text, i + 1).end())  # type: ignore[union-attr]
            i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
            if text[i] not in ",}":  # also refuses a number the cut at ``within`` may have shortened
                raise ValueError
            if name == key:
                return value
            if text[i] == "}":
                raise ValueError
    except (ValueError, IndexError):
        return json.loads(raw)[key]


def _json_bytes(value: Any) -> bytes:
    # json.dumps without indent is json's C encoder: commit records of big models are MBs.
    return json.dumps(value, separators=COMPACT_SEPARATORS).encode("utf-8")


def _remote(method: _F) -> _F:
    """Run a storage primitive with the location's errors translated (s3: one line naming the URL)."""

    @functools.wraps(method)
    def wrapper(self: "ZarrStatsStore", *args: Any, **kwargs: Any) -> Any:
        with self._io.errors():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class ZarrStatsStore(CommittedStore):
    """A stats store in zarr v3, in a local directory or under an s3:// prefix; safe for one writer
    process per shard.

    Attributes:
        location: the store's URL or path as the user names it (every message shows it).
        path: the local directory; None for a store on object storage.
    """

    capabilities = StoreCapabilities(persistent=True, multi_process=True, path_based=True)

    def __init__(self, io: StoreIO, meta: RunMeta) -> None:
        self._io = io
        self.location = io.location.url
        self.path = io.location.local_path if io.location.is_local else None
        if not io.location.is_local:
            self.capabilities = StoreCapabilities(persistent=True, multi_process=True, path_based=False)
        self._meta = meta
        self._zarr = io.zarr_store()

    @functools.cached_property
    def _root(self) -> zarr.Group:
        # Opened at first use: reading the reduced statistics (convert) never needs it, and opening
        # it is a round trip to zarr's event loop (a request on S3).
        with self._io.errors():
            return zarr.open_group(self._zarr, mode="r+", use_consolidated=False)

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Where, expect_fingerprint: Any = None) -> "ZarrStatsStore":
        """Open an existing store (shards, reducer, readers); check format and, if given, the model."""
        io = open_io(parse_location(path))
        store = cls(io, cls._read_meta(io))
        if expect_fingerprint is not None:
            store.check_fingerprint(expect_fingerprint)
        return store

    def check_fingerprint(self, expected: Any) -> None:
        """Refuse a store measured on another model (``RunMismatchError`` naming both fingerprints)."""
        stored = self._meta.model_fingerprint
        if canonical_json(expected) != canonical_json(stored):
            raise RunMismatchError(
                f"{self.location} holds statistics of another model (fingerprint {canonical_json(stored)[:120]}, "
                f"expected {canonical_json(expected)[:120]}); point dump_stats_path at this model's store"
            )

    @classmethod
    def open_run(cls, path: Where, meta: RunMeta, overwrite: bool = False) -> "ZarrStatsStore":
        """Create the store for a run, or resume the same run (same model, config and topology).

        A store of another run is an error unless ``overwrite`` is set, which deletes that store
        (and only a stats store: anything else at the path is refused).
        """
        io = open_io(parse_location(path))
        with io.errors():
            raw = io.read(ROOT_META)
            if overwrite and (raw is not None or io.exists()):
                cls._remove_store(io, raw)
                raw = None
            if raw is not None or io.exists():
                old = cls._read_meta(io)
                cls._check_same_run(io.location, old, meta)
                store = cls(io, old)
            else:
                root = zarr.open_group(io.zarr_store(), mode="w-", zarr_format=3,
                                       attributes={**meta.to_json(), "runs": []})
                root.create_group(SHARDS_GROUP)
                store = cls(io, meta)
            runs = list(store._root.attrs.get("runs", []))
            runs.append({"run": len(runs), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "config_hash": meta.config_hash, "device_kind": meta.device_kind})
            store._root.attrs["runs"] = runs
        return store

    @staticmethod
    def _root_attrs(io: StoreIO, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StoreFormatError(f"{io.location}: {ROOT_META} is not JSON ({e}); pick another dump_stats_path") from e
        return dict(doc.get("attributes", {})) if isinstance(doc, dict) else {}

    @classmethod
    def _read_meta(cls, io: StoreIO) -> RunMeta:
        with io.errors():
            raw = io.read(ROOT_META)
        if raw is None:
            raise StoreNotFoundError(
                f"no stats store at {io.location} (no {ROOT_META}); run a measurement with dump_stats_path="
                f"{io.location.prefix_url} or `stats-store import-inc` first"
            )
        return RunMeta.from_json(cls._root_attrs(io, raw), io.location.url)

    @staticmethod
    def _check_same_run(where: StoreLocation, old: RunMeta, new: RunMeta) -> None:
        fixes = "use another dump_stats_path, or pass --overwrite (overwrite=True) to replace it"
        if canonical_json(old.model_fingerprint) != canonical_json(new.model_fingerprint):
            raise RunMismatchError(f"{where} holds statistics of another model fingerprint; {fixes}")
        for key in ("config_hash", "dp", "tp", "observer"):
            if getattr(old, key) != getattr(new, key):
                raise RunMismatchError(
                    f"{where} was measured with {key}={getattr(old, key)!r}, this run has {getattr(new, key)!r}; {fixes}"
                )

    @classmethod
    def _remove_store(cls, io: StoreIO, raw: bytes | None) -> None:
        if cls._root_attrs(io, raw).get("kind") != STORE_KIND:
            raise StoreFormatError(f"{io.location} exists and is not a stats store; refusing to overwrite it")
        io.remove_all()

    # ---- storage primitives ----------------------------------------------------------------------
    @property
    def meta(self) -> RunMeta:
        return self._meta

    def io_counts(self) -> IoCounts:
        """Requests, bytes and request-seconds this store object has spent so far (a copy)."""
        return self._io.counts.snapshot()

    @staticmethod
    def _commit_key(shard: int) -> str:
        return f"{COMMITS_DIR}/shard-{shard:05d}.json"

    @_remote
    def _read_commit(self, shard: int) -> CommitRecord | None:
        raw = self._io.read(self._commit_key(shard))
        return None if raw is None else CommitRecord.from_json(json.loads(raw))

    @_remote
    def _write_commit(self, record: CommitRecord) -> None:
        # One whole object, written after the chunk it indexes: an atomic rename locally, one PUT
        # on S3 (visible whole or not at all). Either way readers see the old record or the new.
        self._io.put(self._commit_key(record.shard), _json_bytes(record.to_json()))

    def chunk_path(self, shard: int, slot: int) -> str:
        """The zarr path (inside the store) of a shard's chunk array in one slot."""
        return f"{SHARDS_GROUP}/shard-{shard:05d}-slot-{slot}"

    def _chunk_array(self, shard: int, slot: int) -> Any:
        try:
            return self._root[self.chunk_path(shard, slot)]
        except KeyError:
            return None

    @_remote
    def _write_chunk(self, shard: int, slot: int, chunk: np.ndarray) -> None:
        # The slot's array holds a superseded generation: overwrite it. Its shape follows the
        # shard's tensor set, which may grow between flushes; only then is the array created anew
        # (on S3 that costs ~12 requests, writing into the existing array one PUT).
        arr = self._chunk_array(shard, slot)
        if arr is None or arr.shape != chunk.shape:
            arr = self._root.create_array(self.chunk_path(shard, slot), shape=chunk.shape, chunks=chunk.shape,
                                          dtype="float32", fill_value=np.nan, compressors=None, overwrite=True)
        arr[...] = chunk

    @_remote
    def _read_chunk(self, shard: int, slot: int) -> np.ndarray:
        arr = self._chunk_array(shard, slot)
        if arr is None:
            return np.zeros(0, dtype=np.float32)  # the checksum check reports it as damaged
        return np.asarray(arr[...])

    @_remote
    def _write_reduced(self, packed: Packed, summary: dict[str, Any]) -> None:
        red = self._root.require_group(REDUCED_GROUP)
        red.attrs.put({})  # no summary while the arrays change: readers see "not reduced", never a mix
        write_reduced_arrays(red, packed)
        red.attrs.put(summary)  # last: a reader trusts the arrays only when it matches the commits
        # zarr warns that consolidated metadata is not in the v3 spec yet, and that _commits is not
        # a zarr node; both are expected here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            zarr.consolidate_metadata(self._zarr)

    @_remote
    def _read_summary(self) -> dict[str, Any] | None:
        if REDUCED_GROUP not in self._root:
            return None
        return self._root[REDUCED_GROUP].attrs.asdict() or None

    @_remote
    def _read_reduced(self) -> Packed | None:
        return self._read_summary_and_reduced()[1]

    @_remote
    def _read_summary_and_reduced(self) -> tuple[dict[str, Any] | None, Packed | None]:
        # The reduced group's objects are fetched in one go (locally plain file reads, on S3 one
        # listing and concurrent GETs), then decoded from memory (``stats_store.reduced_group``).
        # Read array by array through zarr's own store, each read cost a round trip to zarr's
        # event loop and ~1 ms of thread hand-offs locally, a request latency each on S3. The
        # check of the summary against the commits and of the values against their checksum is
        # the caller's, as for reads one by one.
        return read_reduced_objects(self._io.read_tree(REDUCED_GROUP))

    @_remote
    def _read_generation(self, shard: int) -> int | None:
        # Only the generation: the staleness check of a read needs nothing else of a record that
        # indexes every tensor (tens of KB, and most of its parse).
        raw = self._io.read(self._commit_key(shard))
        return None if raw is None else int(_leading_member(raw, "generation"))

    @_remote
    def _read_selected(self) -> list[str] | None:
        raw = self._io.read(SELECTED_FILE)
        return None if raw is None else [str(n) for n in json.loads(raw)["modules"]]

    @_remote
    def _write_selected(self, names: list[str]) -> None:
        self._io.put(SELECTED_FILE, _json_bytes({"modules": names}))

    @_remote
    def runs(self) -> list[dict[str, Any]]:
        return list(self._root.attrs.get("runs", []))
