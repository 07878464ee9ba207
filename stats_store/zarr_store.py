"""The zarr implementation of the stats store and its on-disk layout (format version 2).

For ``dump_stats_path = <dir>/<prefix>`` the store is ``<dir>/<prefix>.zarr``::

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
    _commits/shard-<k>.json            commit records (written to a temp file, then os.replace); each
                                       is also the index of its chunk (module, label, op type, merge,
                                       slice, offset, length, checksum)
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
attributes are written when a run is opened. Consolidated metadata is refreshed after each
reduce, for other zarr readers; this code always reads the live metadata.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import warnings
from types import MappingProxyType
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stats_store.atomic import atomic_write_json
from stats_store.metadata import STORE_KIND, CommitRecord, RunMeta, canonical_json
from stats_store.packing import ModuleEntry, Packed
from stats_store.store import CommittedStore, StoreCapabilities
from stats_store.errors import RunMismatchError, StoreFormatError, StoreNotFoundError

COMMITS_DIR = "_commits"
SELECTED_FILE = "_selected.json"
SHARDS_GROUP = "shards"
REDUCED_GROUP = "reduced"
ZARR_SUFFIX = ".zarr"


def store_path(dump_stats_path: str | Path) -> Path:
    """``<dir>/<prefix>`` → ``<dir>/<prefix>.zarr`` (a path already ending in .zarr is kept)."""
    p = Path(dump_stats_path)
    return p if p.name.endswith(ZARR_SUFFIX) else p.with_name(p.name + ZARR_SUFFIX)


def _consolidate(path: Path) -> None:
    # zarr warns that consolidated metadata is not in the v3 spec yet, and that _commits is not a
    # zarr node; both are expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(path))


class ZarrStatsStore(CommittedStore):
    """A stats store in a zarr v3 directory; safe for one writer process per shard."""

    capabilities = StoreCapabilities(persistent=True, multi_process=True, path_based=True)

    def __init__(self, path: Path, meta: RunMeta) -> None:
        self.path = path
        self.location = str(path)
        self._meta = meta
        self._root = zarr.open_group(str(path), mode="r+", use_consolidated=False)

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, expect_fingerprint: Any = None) -> "ZarrStatsStore":
        """Open an existing store (shards, reducer, readers); check format and, if given, the model."""
        path = store_path(path)
        meta = cls._read_meta(path)
        if expect_fingerprint is not None and canonical_json(expect_fingerprint) != canonical_json(
            meta.model_fingerprint
        ):
            raise RunMismatchError(
                f"{path} holds statistics of another model (fingerprint {canonical_json(meta.model_fingerprint)[:120]}, "
                f"expected {canonical_json(expect_fingerprint)[:120]}); point dump_stats_path at this model's store"
            )
        return cls(path, meta)

    @classmethod
    def open_run(cls, path: str | Path, meta: RunMeta, overwrite: bool = False) -> "ZarrStatsStore":
        """Create the store for a run, or resume the same run (same model, config and topology).

        A store of another run is an error unless ``overwrite`` is set, which deletes that store
        (and only a stats store: anything else at the path is refused).
        """
        path = store_path(path)
        if path.exists() and overwrite:
            cls._remove_store(path)
        if path.exists():
            old = cls._read_meta(path)
            cls._check_same_run(path, old, meta)
            store = cls(path, old)
        else:
            root = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={**meta.to_json(), "runs": []})
            root.create_group(SHARDS_GROUP)
            (path / COMMITS_DIR).mkdir()
            store = cls(path, meta)
        runs = list(store._root.attrs.get("runs", []))
        runs.append({"run": len(runs), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "config_hash": meta.config_hash, "device_kind": meta.device_kind})
        store._root.attrs["runs"] = runs
        return store

    @staticmethod
    def _read_meta(path: Path) -> RunMeta:
        if not (path / "zarr.json").is_file():
            raise StoreNotFoundError(
                f"no stats store at {path} (no zarr.json); run a measurement with dump_stats_path="
                f"{str(path)[: -len(ZARR_SUFFIX)]} or `stats-store import-inc` first"
            )
        attrs = zarr.open_group(str(path), mode="r", use_consolidated=False).attrs.asdict()
        return RunMeta.from_json(attrs, str(path))

    @staticmethod
    def _check_same_run(path: Path, old: RunMeta, new: RunMeta) -> None:
        fixes = "use another dump_stats_path, or pass --overwrite (overwrite=True) to replace it"
        if canonical_json(old.model_fingerprint) != canonical_json(new.model_fingerprint):
            raise RunMismatchError(f"{path} holds statistics of another model fingerprint; {fixes}")
        for key in ("config_hash", "dp", "tp", "observer"):
            if getattr(old, key) != getattr(new, key):
                raise RunMismatchError(
                    f"{path} was measured with {key}={getattr(old, key)!r}, this run has {getattr(new, key)!r}; {fixes}"
                )

    @staticmethod
    def _remove_store(path: Path) -> None:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {}) if (path / "zarr.json").is_file() else {}
        if attrs.get("kind") != STORE_KIND:
            raise StoreFormatError(f"{path} exists and is not a stats store; refusing to overwrite it")
        shutil.rmtree(path)

    # ---- storage primitives ----------------------------------------------------------------------
    @property
    def meta(self) -> RunMeta:
        return self._meta

    def _commit_path(self, shard: int) -> Path:
        return self.path / COMMITS_DIR / f"shard-{shard:05d}.json"

    def _read_commit(self, shard: int) -> CommitRecord | None:
        p = self._commit_path(shard)
        if not p.is_file():
            return None
        return CommitRecord.from_json(json.loads(p.read_text(encoding="utf-8")))

    def _write_commit(self, record: CommitRecord) -> None:
        atomic_write_json(self._commit_path(record.shard), record.to_json())

    def chunk_path(self, shard: int, slot: int) -> str:
        """The zarr path (inside the store) of a shard's chunk array in one slot."""
        return f"{SHARDS_GROUP}/shard-{shard:05d}-slot-{slot}"

    def _write_chunk(self, shard: int, slot: int, chunk: np.ndarray) -> None:
        # A new array each flush (the slot's old one holds a superseded generation): its shape
        # follows the shard's tensor set, which may grow between flushes.
        self._root.create_array(self.chunk_path(shard, slot), shape=chunk.shape, chunks=chunk.shape, dtype="float32",
                                fill_value=np.nan, compressors=None, overwrite=True)[...] = chunk

    def _read_chunk(self, shard: int, slot: int) -> np.ndarray:
        path = self.chunk_path(shard, slot)
        if path not in self._root:
            return np.zeros(0, dtype=np.float32)  # the checksum check reports it as damaged
        return np.asarray(self._root[path][...])  # type: ignore[index]

    def _write_reduced(self, packed: Packed, summary: dict[str, Any]) -> None:
        red = self._root.require_group(REDUCED_GROUP)
        red.attrs.put({})  # no summary while the arrays change: readers see "not reduced", never a mix
        for name, value in _index_arrays(packed).items():
            _write_array(red, name, value)
        _write_array(red, "values", packed.values, compressors=None)
        red.attrs.put(summary)  # last: a reader trusts the arrays only when it matches the commits
        _consolidate(self.path)

    def _read_summary(self) -> dict[str, Any] | None:
        if REDUCED_GROUP not in self._root:
            return None
        return self._root[REDUCED_GROUP].attrs.asdict() or None

    def _read_reduced(self) -> Packed | None:
        red = self._root[REDUCED_GROUP]
        arrays = {name: np.asarray(red[name][...]) for name in (*_INDEX_NAMES, "values")}  # type: ignore[index]
        if _TOKENS in red:  # stores reduced before tokens were counted have no such array: 0 tokens
            arrays[_TOKENS] = np.asarray(red[_TOKENS][...])  # type: ignore[index]
        return _packed_from_arrays(arrays)

    def _read_selected(self) -> list[str] | None:
        p = self.path / SELECTED_FILE
        if not p.is_file():
            return None
        return [str(n) for n in json.loads(p.read_text(encoding="utf-8"))["modules"]]

    def _write_selected(self, names: list[str]) -> None:
        atomic_write_json(self.path / SELECTED_FILE, {"modules": names})

    def runs(self) -> list[dict[str, Any]]:
        return list(self._root.attrs.get("runs", []))


_INDEX_NAMES = ("module_name", "module_op_type", "module_num_samples", "tensor_label", "tensor_index",
                "nonfinite_label", "nonfinite_index")
_TOKENS = "module_num_tokens"  # optional on read (added after format 2 first shipped)


def _write_array(group: zarr.Group, name: str, value: np.ndarray, **kwargs: Any) -> None:
    chunks = tuple(max(n, 1) for n in value.shape)  # one chunk (zarr needs a positive chunk shape)
    arr = group.create_array(name, shape=value.shape, chunks=chunks, dtype=value.dtype if value.dtype.kind != "U" else str,
                             overwrite=True, **kwargs)
    if value.size:
        arr[...] = value


def _index_arrays(packed: Packed) -> dict[str, np.ndarray]:
    """The index of a packed set as the arrays of the layout."""
    mods = packed.modules
    tensors = [(row, label, off, n) for row, m in enumerate(mods) for label, off, n in m.tensors]
    nonfinite = [(row, label, count) for row, m in enumerate(mods) for label, count in m.nonfinite.items()]
    return {
        "module_name": np.array([m.name for m in mods], dtype=str),
        "module_op_type": np.array([m.op_type for m in mods], dtype=str),
        "module_num_samples": np.array([m.num_samples for m in mods], dtype=np.int64),
        _TOKENS: np.array([m.num_tokens for m in mods], dtype=np.int64),
        "tensor_label": np.array([t[1] for t in tensors], dtype=str),
        "tensor_index": np.array([(t[0], t[2], t[3]) for t in tensors], dtype=np.int64).reshape(-1, 3),
        "nonfinite_label": np.array([f[1] for f in nonfinite], dtype=str),
        "nonfinite_index": np.array([(f[0], f[2]) for f in nonfinite], dtype=np.int64).reshape(-1, 2),
    }


def _packed_from_arrays(a: dict[str, np.ndarray]) -> Packed:
    """Inverse of ``_index_arrays`` (plus the values)."""
    names, ops, samples = a["module_name"].tolist(), a["module_op_type"].tolist(), a["module_num_samples"].tolist()
    tokens = a[_TOKENS].tolist() if _TOKENS in a else [0] * len(names)
    tensors: list[list[tuple[str, int, int]]] = [[] for _ in names]
    for label, (row, off, n) in zip(a["tensor_label"].tolist(), a["tensor_index"].tolist()):
        tensors[row].append((label, off, n))
    nonfinite: list[dict[str, int]] = [{} for _ in names]
    for label, (row, count) in zip(a["nonfinite_label"].tolist(), a["nonfinite_index"].tolist()):
        nonfinite[row][label] = count
    entries = tuple(ModuleEntry(n, o, s, MappingProxyType(f), tuple(t), k)
                    for n, o, s, f, t, k in zip(names, ops, samples, nonfinite, tensors, tokens))
    return Packed(np.asarray(a["values"], dtype=np.float32), entries)
