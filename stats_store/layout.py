"""The zarr implementation of the stats store and its on-disk layout.

For ``dump_stats_path = <dir>/<prefix>`` the store is ``<dir>/<prefix>.zarr``::

    zarr.json                      root attributes: kind, format_version, config_hash,
                                   model_fingerprint, topology {dp, tp}, device_kind, observer, runs
    modules/<module name>/         one group per measured module (attribute op_type)
        shards/<label>             float32 (num_shards, 2, global_len), chunks (1, 1, global_len),
                                   fill NaN, attribute merge: row [k, g % 2] = shard k, generation g
        reduced/<label>            float32 (global_len,): the reducer's global value
        reduced (group attributes) num_samples, nonfinite: the reducer's counts
    summary (group attributes)     shard generations reduced, per-shard sample counts
    _commits/shard-<k>.json        commit records (written to a temp file, then os.replace)

Labels are ``inputs.N``, ``outputs.N``, ``params.weight``. Every chunk has one writer (its shard),
reduced arrays and summaries have one writer (the reducer), root attributes are written when a run
is opened. Consolidated metadata is refreshed after each reduce, for other zarr readers; this code
always reads the live metadata.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from shards.measurement import Measurement
from stats_store.commit import atomic_write_json
from stats_store.metadata import STORE_KIND, CommitRecord, RunMeta, canonical_json
from stats_store.store import CommittedStore, Rows, StoreCapabilities, module_stats_from_tensors
from stats_store.store_errors import RunMismatchError, ShardSpecError, StoreFormatError, StoreNotFoundError

COMMITS_DIR = "_commits"
ZARR_SUFFIX = ".zarr"


def store_path(dump_stats_path: str | Path) -> Path:
    """``<dir>/<prefix>`` → ``<dir>/<prefix>.zarr`` (a path already ending in .zarr is kept)."""
    p = Path(dump_stats_path)
    return p if p.name.endswith(ZARR_SUFFIX) else p.with_name(p.name + ZARR_SUFFIX)


def _check_node_name(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith("__") or set(name) == {"."}:
        raise ShardSpecError(f"{what} {name!r} cannot name a zarr group (empty, '/', leading '__' or only dots)")
    return name


def _consolidate(path: Path) -> None:
    # zarr warns that consolidated metadata is not in the v3 spec yet, and that _commits is not a
    # zarr node; both are expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(path))


def _require_group(parent: zarr.Group, name: str, attributes: dict[str, Any]) -> zarr.Group:
    """The child group ``name``, created with ``attributes`` when missing.

    Shards create the same groups with the same attributes; zarr writes each metadata document
    atomically, so when two creators race both write identical documents.
    """
    if name in parent:
        return parent[name]  # type: ignore[return-value]
    try:
        return parent.create_group(name, attributes=attributes)
    except zarr.errors.ContainsGroupError:
        return parent[name]  # type: ignore[return-value]


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
            root.create_group("modules")
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

    def _module_group(self, module: str) -> zarr.Group:
        return self._root["modules"][_check_node_name(module, "module name")]  # type: ignore[return-value]

    def _write_rows(self, shard: int, slot: int, rows: Rows, record: CommitRecord) -> None:
        modules = self._root["modules"]
        for (module, label), row in rows.items():
            name = _check_node_name(module, "module name")
            op_type = record.modules[module].op_type
            # Every shard creates the same groups and arrays with the same metadata; zarr writes
            # each metadata document atomically, so concurrent creators agree.
            group = _require_group(modules, name, {"op_type": op_type})  # type: ignore[arg-type]
            if group.attrs.get("op_type") != op_type:
                raise ShardSpecError(f"{self.path}: module {module} is stored as {group.attrs.get('op_type')!r}, not {op_type!r}")
            arr = self._shard_array(group, module, _check_node_name(label, "tensor label"), row.size,
                                    record.modules[module].tensors[label].merge)
            arr[shard, slot, :] = row

    def _shard_array(self, group: zarr.Group, module: str, label: str, size: int, merge: str) -> zarr.Array:
        shards = _require_group(group, "shards", {})
        n = self._meta.num_shards
        if label not in shards:
            try:
                return shards.create_array(label, shape=(n, 2, size), chunks=(1, 1, size), dtype="float32",
                                           fill_value=np.nan, attributes={"merge": merge}, overwrite=False)
            except zarr.errors.ContainsArrayError:
                pass  # another shard created it a moment ago: check it like any existing array
        arr = shards[label]
        if arr.shape != (n, 2, size):  # type: ignore[union-attr]
            raise ShardSpecError(
                f"{self.path}: {module} {label} is stored with shape {arr.shape}, a shard wrote {size} channels "  # type: ignore[union-attr]
                f"(expected {(n, 2, size)}); every shard must use global coordinates"
            )
        return arr  # type: ignore[return-value]

    def _read_rows(self, module: str, label: str) -> np.ndarray:
        return np.asarray(self._module_group(module)["shards"][label][...])  # type: ignore[index]

    def _write_reduced(self, reduced: Measurement, summary: dict[str, Any]) -> None:
        for name, stats in reduced.modules.items():
            red = self._module_group(name).require_group("reduced")
            for label, value in stats.tensors().items():
                arr = red.create_array(label, shape=value.shape, dtype="float32", fill_value=np.nan, overwrite=True)
                arr[...] = value
            red.attrs.put({"num_samples": stats.num_samples, "nonfinite": dict(stats.nonfinite)})
        # The summary goes last: a reader trusts the reduced arrays only when it matches the commits.
        self._root.require_group("summary").attrs.put(summary)
        _consolidate(self.path)

    def _read_reduced(self) -> tuple[Measurement, dict[str, Any]] | None:
        if "summary" not in self._root:
            return None
        summary = self._root["summary"].attrs.asdict()
        out = Measurement(observer=self._meta.observer, num_samples=summary.get("num_samples"))
        modules = self._root["modules"]
        for name in summary.get("modules", []):  # the reducer's order (discovery order)
            group = modules[name]
            red = group["reduced"]  # type: ignore[index]
            tensors = {label: np.asarray(a[...]) for label, a in red.arrays()}  # type: ignore[union-attr]
            attrs = red.attrs.asdict()
            out.modules[name] = module_stats_from_tensors(
                name, str(group.attrs["op_type"]), tensors, int(attrs["num_samples"]), attrs.get("nonfinite", {})
            )
        return out, summary

    def runs(self) -> list[dict[str, Any]]:
        return list(self._root.attrs.get("runs", []))

    def module_names(self) -> list[str]:
        """Modules any shard has written (committed or not), sorted."""
        return sorted(self._root["modules"].group_keys())  # type: ignore[union-attr]
