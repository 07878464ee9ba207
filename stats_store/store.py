"""The stats store: a small protocol, the commit/reduce logic shared by every implementation, and
the in-memory implementation. The zarr implementation is in ``stats_store.layout``.

Life of a run: the coordinator opens the store for the run (``ZarrStatsStore.open_run``), every
shard writes its chunk (``write_shard``) and publishes it (``commit``), possibly many times while
streaming; the reducer (``reduce``) merges the committed shards into global arrays; readers call
``read_reduced``. Only committed generations are ever read, and each committed chunk is verified
against the checksum in its commit record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from shards.measurement import Measurement, ModuleStats
from stats_store.commit import PendingCommit, build_flush
from stats_store.metadata import CommitRecord, RunMeta, canonical_json, row_checksum
from stats_store.reduce import get_merge, reduce_count, reduce_over_shards
from stats_store.shard_map import ShardSpec
from stats_store.store_errors import ShardSpecError, StaleReducedError, TornWriteError

Rows = Mapping[tuple[str, str], np.ndarray]


@dataclass(frozen=True)
class StoreCapabilities:
    """What an implementation offers; callers test these flags, never the class.

    Attributes:
        persistent: survives the process (a restarted driver can resume from it).
        multi_process: shards in other OS processes may write to it concurrently.
        path_based: it has a filesystem path (CLI, INC export next to it).
    """

    persistent: bool
    multi_process: bool
    path_based: bool


class StatsStore(Protocol):
    """What the orchestrator, the shards and the CLI use."""

    capabilities: StoreCapabilities
    location: str

    @property
    def meta(self) -> RunMeta: ...

    def write_shard(
        self, spec: ShardSpec, stats: Measurement, batch_ids: Sequence[int], merges: Mapping[str, str] | None = None
    ) -> PendingCommit: ...

    def commit(self, pending: PendingCommit) -> CommitRecord: ...

    def commits(self) -> dict[int, CommitRecord]: ...

    def read_shard(self, index: int, local: bool = True) -> Measurement: ...

    def reduce(self) -> Measurement: ...

    def read_reduced(self) -> Measurement: ...

    def runs(self) -> list[dict[str, Any]]: ...


def module_stats_from_tensors(
    name: str, op_type: str, tensors: Mapping[str, np.ndarray], num_samples: int, nonfinite: Mapping[str, int]
) -> ModuleStats:
    """Rebuild a ``ModuleStats`` from label → vector (``inputs.0``, ``outputs.2``, ``params.weight``)."""
    inputs: dict[int, np.ndarray] = {}
    outputs: dict[int, np.ndarray] = {}
    params: dict[str, np.ndarray] = {}
    for label, value in tensors.items():
        kind, _, key = label.partition(".")
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        if kind == "inputs":
            inputs[int(key)] = vec
        elif kind == "outputs":
            outputs[int(key)] = vec
        elif kind == "params":
            params[key] = vec
        else:
            raise ShardSpecError(f"module {name}: tensor label {label!r} is not inputs.N, outputs.N or params.NAME")
    return ModuleStats(
        name=name,
        op_type=op_type,
        inputs=[inputs.get(i) for i in range(max(inputs) + 1)] if inputs else [],
        outputs=[outputs.get(i) for i in range(max(outputs) + 1)] if outputs else None,
        params=params,
        num_samples=num_samples,
        nonfinite=dict(nonfinite),
    )


class CommittedStore:
    """The logic every implementation shares, over five storage primitives (the ``_`` methods)."""

    capabilities: StoreCapabilities
    location: str

    # ---- storage primitives, provided by each implementation -------------------------------
    @property
    def meta(self) -> RunMeta:
        raise NotImplementedError

    def _read_commit(self, shard: int) -> CommitRecord | None:
        raise NotImplementedError

    def _write_commit(self, record: CommitRecord) -> None:
        raise NotImplementedError

    def _write_rows(self, shard: int, slot: int, rows: Rows, record: CommitRecord) -> None:
        raise NotImplementedError

    def _read_rows(self, module: str, label: str) -> np.ndarray:
        """All rows of one tensor: ``(num_shards, 2, global_len)``."""
        raise NotImplementedError

    def _write_reduced(self, reduced: Measurement, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def _read_reduced(self) -> tuple[Measurement, dict[str, Any]] | None:
        raise NotImplementedError

    def runs(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ---- shared logic ------------------------------------------------------------------------
    def write_shard(
        self, spec: ShardSpec, stats: Measurement, batch_ids: Sequence[int], merges: Mapping[str, str] | None = None
    ) -> PendingCommit:
        """Write the shard's next generation (its chunks only); invisible until ``commit``.

        ``stats`` holds the statistics of ``batch_ids`` only: values merge with the shard's
        committed ones (max for max-abs, so later flushes only raise values), counts add.
        """
        meta = self.meta
        if spec.num_shards != meta.num_shards or spec.tp != meta.tp:
            raise ShardSpecError(
                f"{self.location}: shard spec num_shards={spec.num_shards}, tp={spec.tp} does not match the run's "
                f"dp={meta.dp}, tp={meta.tp}; open a store for this topology"
            )
        prev = self._read_commit(spec.index)
        rows, pending = build_flush(prev, spec, stats, batch_ids, self._committed_row_reader(prev), merges)
        if not pending.noop:
            self._write_rows(spec.index, pending.record.slot, rows, pending.record)
        return pending

    def commit(self, pending: PendingCommit) -> CommitRecord:
        """Publish a written generation: after this, readers and the reducer see it."""
        if not pending.noop:
            self._write_commit(pending.record)
        return pending.record

    def commits(self) -> dict[int, CommitRecord]:
        """Every shard's latest commit (shards that never committed are absent)."""
        out = {}
        for k in range(self.meta.num_shards):
            rec = self._read_commit(k)
            if rec is not None:
                out[k] = rec
        return out

    def _committed_row_reader(self, prev: CommitRecord | None):  # type: ignore[no-untyped-def]
        def read(module: str, label: str, shard: int, slot: int) -> np.ndarray:
            assert prev is not None
            return self._verified(prev, module, label, self._read_rows(module, label))

        return read

    def _verified(self, rec: CommitRecord, module: str, label: str, all_rows: np.ndarray) -> np.ndarray:
        """The committed row of ``rec`` for one tensor, checked against the commit's checksum."""
        row = np.asarray(all_rows[rec.shard, rec.slot], dtype=np.float32)
        expected = rec.modules[module].tensors[label].checksum
        if row_checksum(row) != expected:
            raise TornWriteError(
                f"{self.location}: shard {rec.shard} chunk of {module} {label} (generation {rec.generation}) does not "
                "match its commit record: it was written after the commit or damaged; re-run shard "
                f"{rec.shard} from its last good state, or measure again into another dump_stats_path"
            )
        return row

    def read_shard(self, index: int, local: bool = True) -> Measurement:
        """One shard's committed statistics; ``local`` cuts per-channel values to its slice."""
        rec = self._read_commit(index)
        out = Measurement(observer=self.meta.observer, num_samples=rec.num_samples if rec else 0)
        if rec is None:
            return out
        for name, mod in rec.modules.items():
            tensors = {}
            for label, t in mod.tensors.items():
                row = self._verified(rec, name, label, self._read_rows(name, label))
                tensors[label] = row[t.slice.start : t.slice.stop] if (local and t.slice) else row
            out.modules[name] = module_stats_from_tensors(name, mod.op_type, tensors, mod.num_samples, mod.nonfinite)
        return out

    def reduce(self) -> Measurement:
        """Merge every committed shard into the global arrays and write them; idempotent."""
        result, summary = self._merge_commits()
        self._write_reduced(result, summary)
        return result

    def merged(self) -> Measurement:
        """The global statistics of the latest commits, computed without writing anything."""
        return self._merge_commits()[0]

    def _merge_commits(self) -> tuple[Measurement, dict[str, Any]]:
        meta = self.meta
        commits = self.commits()
        result = Measurement(observer=meta.observer)
        names: list[str] = []
        for rec in commits.values():
            names += [n for n in rec.modules if n not in names]
        for name in names:
            result.modules[name] = self._reduce_module(name, commits, meta.tp)
        result.num_samples = reduce_count({k: r.num_samples for k, r in commits.items()}, meta.tp)
        summary = {
            "generations": {str(k): r.generation for k, r in sorted(commits.items())},
            "num_samples": result.num_samples,
            "modules": list(result.modules),
            "shards": {
                str(k): {"num_samples": r.num_samples, "batches_done": len(r.batch_ids)}
                for k, r in sorted(commits.items())
            },
        }
        return result, summary

    def _reduce_module(self, name: str, commits: Mapping[int, CommitRecord], tp: int) -> ModuleStats:
        present = {k: r.modules[name] for k, r in commits.items() if name in r.modules}
        op_types = {m.op_type for m in present.values()}
        if len(op_types) != 1:
            raise ShardSpecError(f"{self.location}: module {name} has op types {sorted(op_types)} on different shards")
        labels: list[str] = []
        for m in present.values():
            labels += [lb for lb in m.tensors if lb not in labels]
        tensors = {}
        for label in labels:
            holders = {k: m.tensors[label] for k, m in present.items() if label in m.tensors}
            merge_names = {t.merge for t in holders.values()}
            if len(merge_names) != 1:
                raise ShardSpecError(f"{self.location}: {name} {label} declares merges {sorted(merge_names)}")
            all_rows = self._read_rows(name, label)
            rows = {k: self._verified(commits[k], name, label, all_rows) for k in holders}
            tensors[label] = reduce_over_shards(rows, get_merge(merge_names.pop(), f"{name} {label}"), tp)
        nonfinite_labels = {lb for m in present.values() for lb in m.nonfinite}
        nonfinite = {lb: reduce_count({k: m.nonfinite.get(lb, 0) for k, m in present.items()}, tp)
                     for lb in sorted(nonfinite_labels)}
        samples = reduce_count({k: m.num_samples for k, m in present.items()}, tp)
        return module_stats_from_tensors(name, op_types.pop(), tensors, samples, nonfinite)

    def reduced_is_current(self) -> bool:
        """True when the reduced arrays hold exactly the shards' latest commits."""
        got = self._read_reduced()
        current = {str(k): r.generation for k, r in sorted(self.commits().items())}
        return got is not None and got[1].get("generations") == current

    def read_reduced(self) -> Measurement:
        """The global statistics; refuses reduced arrays older than the latest commits."""
        got = self._read_reduced()
        current = {str(k): r.generation for k, r in sorted(self.commits().items())}
        if got is None or got[1].get("generations") != current:
            have = "none" if got is None else canonical_json(got[1].get("generations"))
            raise StaleReducedError(
                f"{self.location}: reduced statistics (shard generations {have}) are not those of the latest "
                f"commits {canonical_json(current)}; run `stats-store reduce {self.location}` or store.reduce()"
            )
        return got[0]

    def summary(self) -> dict[str, Any] | None:
        """The reducer's summary (generations, per-shard sample counts), None before a reduce."""
        got = self._read_reduced()
        return None if got is None else got[1]


class MemoryStatsStore(CommittedStore):
    """A store held in this process (unit tests, single-process runs that need no file)."""

    capabilities = StoreCapabilities(persistent=False, multi_process=False, path_based=False)

    def __init__(self, meta: RunMeta, location: str = "memory://stats") -> None:
        self._meta = meta
        self.location = location
        self._commits: dict[int, CommitRecord] = {}
        self._rows: dict[tuple[str, str], np.ndarray] = {}
        self._reduced: tuple[Measurement, dict[str, Any]] | None = None

    @property
    def meta(self) -> RunMeta:
        return self._meta

    def _read_commit(self, shard: int) -> CommitRecord | None:
        return self._commits.get(shard)

    def _write_commit(self, record: CommitRecord) -> None:
        self._commits[record.shard] = record

    def _write_rows(self, shard: int, slot: int, rows: Rows, record: CommitRecord) -> None:
        for (module, label), row in rows.items():
            key = (module, label)
            if key not in self._rows:
                self._rows[key] = np.full((self._meta.num_shards, 2, row.size), np.nan, dtype=np.float32)
            if self._rows[key].shape[2] != row.size:
                raise ShardSpecError(
                    f"{self.location}: {module} {label} has {self._rows[key].shape[2]} global channels; "
                    f"shard {shard} wrote {row.size}"
                )
            self._rows[key][shard, slot] = row

    def _read_rows(self, module: str, label: str) -> np.ndarray:
        return self._rows[(module, label)].copy()

    def _write_reduced(self, reduced: Measurement, summary: dict[str, Any]) -> None:
        self._reduced = (reduced, summary)

    def _read_reduced(self) -> tuple[Measurement, dict[str, Any]] | None:
        return self._reduced

    def runs(self) -> list[dict[str, Any]]:
        return [{"run": 0, "config_hash": self._meta.config_hash, "device_kind": self._meta.device_kind}]
