"""The stats store: a small protocol, the commit/reduce logic shared by every implementation, and
the in-memory implementation. The zarr implementation is in ``stats_store.zarr_store``.

Life of a run: the coordinator opens the store for the run (``ZarrStatsStore.open_run``), every
shard writes its chunk (``write_shard``) and publishes it (``commit``), possibly many times while
streaming; the reducer (``reduce``) merges the committed shards into global arrays; readers call
``read_reduced``. Only committed generations are ever read, and each committed chunk is verified
against the checksum in its commit record.

Every implementation stores one packed chunk per shard flush (``stats_store.commit``) and one
packed global vector per reduce (``stats_store.packing``); the logic here works on those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from stats_store.records import Measurement
from stats_store.commit import PendingCommit, build_flush
from stats_store.gc_pause import without_gc_pauses
from stats_store.metadata import CommitRecord, RunMeta, canonical_json, row_checksum
from stats_store.packing import Packed, module_stats_from_tensors
from stats_store.reduce import reduce_count
from stats_store.shard_map import ShardSpec
from stats_store.shard_reduce import reduce_shards
from stats_store.errors import ShardSpecError, StaleReducedError, TornWriteError

__all__ = ["CommittedStore", "MemoryStatsStore", "StatsStore", "StoreCapabilities", "module_stats_from_tensors"]


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

    def record_selected(self, names: Sequence[str]) -> list[str]: ...

    def selected_modules(self) -> list[str] | None: ...


class CommittedStore:
    """The logic every implementation shares, over a few storage primitives (the ``_`` methods)."""

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

    def _write_chunk(self, shard: int, slot: int, chunk: np.ndarray) -> None:
        """Store a shard's packed chunk in one of its two slots (overwriting that slot)."""
        raise NotImplementedError

    def _read_chunk(self, shard: int, slot: int) -> np.ndarray:
        raise NotImplementedError

    def _write_reduced(self, packed: Packed, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def _read_reduced(self) -> Packed | None:
        raise NotImplementedError

    def _read_summary(self) -> dict[str, Any] | None:
        """The reducer's summary; None before the first reduce (or while one is writing)."""
        raise NotImplementedError

    def _read_summary_and_reduced(self) -> tuple[dict[str, Any] | None, Packed | None]:
        """The summary and the reduced arrays (None without a summary, or when an array is
        missing); an implementation may read them together."""
        summary = self._read_summary()
        return summary, (self._read_reduced() if summary is not None else None)

    def _read_generation(self, shard: int) -> int | None:
        """The generation of a shard's latest commit (None: never committed); an implementation may
        read it without building the whole record."""
        rec = self._read_commit(shard)
        return None if rec is None else rec.generation

    def _read_selected(self) -> list[str] | None:
        """The recorded selected-module inventory; None when none was ever recorded."""
        raise NotImplementedError

    def _write_selected(self, names: list[str]) -> None:
        raise NotImplementedError

    def runs(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ---- shared logic ------------------------------------------------------------------------
    @without_gc_pauses
    def write_shard(
        self, spec: ShardSpec, stats: Measurement, batch_ids: Sequence[int], merges: Mapping[str, str] | None = None
    ) -> PendingCommit:
        """Write the shard's next generation (its chunk only); invisible until ``commit``.

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
        chunk, pending = build_flush(prev, spec, stats, batch_ids, lambda: self._verified_chunk(prev), merges)
        if not pending.noop and chunk.size:
            self._write_chunk(spec.index, pending.record.slot, chunk)
        return pending

    def commit(self, pending: PendingCommit) -> CommitRecord:
        """Publish a written generation: after this, readers and the reducer see it."""
        if not pending.noop:
            self._write_commit(pending.record)
        return pending.record

    @without_gc_pauses
    def commits(self) -> dict[int, CommitRecord]:
        """Every shard's latest commit (shards that never committed are absent)."""
        out = {}
        for k in range(self.meta.num_shards):
            rec = self._read_commit(k)
            if rec is not None:
                out[k] = rec
        return out

    def module_names(self) -> list[str]:
        """Modules any shard has committed, sorted."""
        return sorted({name for rec in self.commits().values() for name in rec.modules})

    def record_selected(self, names: Sequence[str]) -> list[str]:
        """Record the modules a run selected for measuring, whether or not data reaches them (a MoE
        expert no token was routed to is never called, so it has no commit); the union with what
        was recorded before, in first-recorded order, which is returned. Written by the driver."""
        old = self._read_selected()
        merged = list(dict.fromkeys([*(old or []), *names]))
        if merged != old:
            self._write_selected(merged)
        return merged

    def selected_modules(self) -> list[str] | None:
        """The modules recorded by :meth:`record_selected`; None when the store has no inventory
        (written before it was recorded, or imported from INC files)."""
        return self._read_selected()

    def _verified_chunk(self, rec: CommitRecord | None) -> np.ndarray:
        """The chunk ``rec`` committed, checked against its checksums (the whole chunk, then per tensor)."""
        if rec is None or rec.size == 0:
            return np.zeros(0, dtype=np.float32)
        chunk = np.asarray(self._read_chunk(rec.shard, rec.slot), dtype=np.float32)
        if chunk.size == rec.size and row_checksum(chunk) == rec.checksum:
            return chunk
        for module, mod in rec.modules.items():
            for label, t in mod.tensors.items():
                if row_checksum(chunk[t.offset : t.offset + t.length]) != t.checksum:
                    raise self._torn(rec, f"{module} {label}")
        raise self._torn(rec, f"{chunk.size} values (committed {rec.size})")

    def _torn(self, rec: CommitRecord, what: str) -> TornWriteError:
        return TornWriteError(
            f"{self.location}: shard {rec.shard} chunk of {what} (generation {rec.generation}) does not "
            "match its commit record: it was written after the commit or damaged; re-run shard "
            f"{rec.shard} from its last good state, or measure again into another dump_stats_path"
        )

    @without_gc_pauses
    def read_shard(self, index: int, local: bool = True) -> Measurement:
        """One shard's committed statistics; ``local`` cuts per-channel values to its slice."""
        rec = self._read_commit(index)
        out = Measurement(observer=self.meta.observer, num_samples=rec.num_samples if rec else 0)
        if rec is None:
            return out
        chunk = self._verified_chunk(rec)
        for name, mod in rec.modules.items():
            tensors = {}
            for label, t in mod.tensors.items():
                stored = chunk[t.offset : t.offset + t.length]
                if local or t.slice is None:
                    tensors[label] = stored
                else:
                    tensors[label] = np.full(t.global_len, np.nan, dtype=np.float32)
                    tensors[label][t.slice.start : t.slice.stop] = stored
            out.modules[name] = module_stats_from_tensors(name, mod.op_type, tensors, mod.num_samples, mod.nonfinite,
                                                          mod.num_tokens)
        return out

    @without_gc_pauses
    def reduce(self) -> Measurement:
        """Merge every committed shard into the global arrays and write them; idempotent."""
        packed, summary = self._merge_commits()
        self._write_reduced(packed, summary)
        return packed.to_measurement(self.meta.observer, summary["num_samples"])

    @without_gc_pauses
    def merged(self) -> Measurement:
        """The global statistics of the latest commits, computed without writing anything."""
        packed, summary = self._merge_commits()
        return packed.to_measurement(self.meta.observer, summary["num_samples"])

    def _merge_commits(self) -> tuple[Packed, dict[str, Any]]:
        commits = self.commits()
        chunks = {k: self._verified_chunk(rec) for k, rec in commits.items()}
        packed = reduce_shards(commits, chunks, self.meta.tp, self.location)
        num_samples = reduce_count({k: r.num_samples for k, r in commits.items()}, self.meta.tp)
        summary = {
            "generations": {str(k): r.generation for k, r in sorted(commits.items())},
            # The reduced values feed the scales directly: a damaged array must be detected on read.
            "values_checksum": row_checksum(packed.values),
            "num_samples": num_samples,
            "num_modules": len(packed.modules),
            "shards": {
                str(k): {"num_samples": r.num_samples, "batches_done": len(r.batch_ids)}
                for k, r in sorted(commits.items())
            },
        }
        return packed, summary

    def _generations(self) -> dict[str, int]:
        generations = {str(k): self._read_generation(k) for k in range(self.meta.num_shards)}
        return {k: g for k, g in generations.items() if g is not None}

    def reduced_is_current(self) -> bool:
        """True when the reduced arrays hold exactly the shards' latest commits."""
        summary = self._read_summary()
        return summary is not None and summary.get("generations") == self._generations()

    @without_gc_pauses
    def read_reduced(self) -> Measurement:
        """The global statistics; refuses reduced arrays older than the latest commits."""
        return self._read_current_reduced(self._generations())

    def _read_current_reduced(self, current: dict[str, int]) -> Measurement:
        summary, packed = self._read_summary_and_reduced()
        if summary is None or summary.get("generations") != current:
            have = "none" if summary is None else canonical_json(summary.get("generations"))
            raise StaleReducedError(
                f"{self.location}: reduced statistics (shard generations {have}) are not those of the latest "
                f"commits {canonical_json(current)}; run `stats-store reduce {self.location}` or store.reduce()"
            )
        if packed is None:
            raise TornWriteError(
                f"{self.location}: the reduced statistics of the latest commits are incomplete (an array is "
                f"missing); run `stats-store reduce {self.location}` to rebuild them from the committed shards"
            )
        if row_checksum(packed.values) != summary.get("values_checksum"):
            raise TornWriteError(
                f"{self.location}: the reduced statistics do not match their checksum (damaged after the "
                f"reduce); run `stats-store reduce {self.location}` to rebuild them from the committed shards"
            )
        return packed.to_measurement(self.meta.observer, summary.get("num_samples"))

    @without_gc_pauses
    def current(self) -> tuple[Measurement, bool]:
        """The global statistics of the latest commits, and whether the reduced arrays held them.

        Reads the reduced arrays when they are current (one read), else merges the shards.
        """
        try:
            return self._read_current_reduced(self._generations()), True
        except StaleReducedError:
            return self.merged(), False

    def summary(self) -> dict[str, Any] | None:
        """The reducer's summary (generations, per-shard sample counts), None before a reduce."""
        return self._read_summary()


class MemoryStatsStore(CommittedStore):
    """A store held in this process (unit tests, single-process runs that need no file)."""

    capabilities = StoreCapabilities(persistent=False, multi_process=False, path_based=False)

    def __init__(self, meta: RunMeta, location: str = "memory://stats") -> None:
        self._meta = meta
        self.location = location
        self._commits: dict[int, CommitRecord] = {}
        self._chunks: dict[tuple[int, int], np.ndarray] = {}
        self._reduced: tuple[Packed, dict[str, Any]] | None = None
        self._selected: list[str] | None = None

    @property
    def meta(self) -> RunMeta:
        return self._meta

    def _read_commit(self, shard: int) -> CommitRecord | None:
        return self._commits.get(shard)

    def _write_commit(self, record: CommitRecord) -> None:
        self._commits[record.shard] = record

    def _write_chunk(self, shard: int, slot: int, chunk: np.ndarray) -> None:
        self._chunks[(shard, slot)] = np.array(chunk, dtype=np.float32, copy=True)

    def _read_chunk(self, shard: int, slot: int) -> np.ndarray:
        return self._chunks[(shard, slot)].copy()

    def _write_reduced(self, packed: Packed, summary: dict[str, Any]) -> None:
        self._reduced = (Packed(packed.values.copy(), packed.modules), dict(summary))

    def _read_reduced(self) -> Packed | None:
        if self._reduced is None:
            return None
        packed = self._reduced[0]
        return Packed(packed.values.copy(), packed.modules)  # callers may change what they get

    def _read_summary(self) -> dict[str, Any] | None:
        return None if self._reduced is None else dict(self._reduced[1])

    def _read_selected(self) -> list[str] | None:
        return None if self._selected is None else list(self._selected)

    def _write_selected(self, names: list[str]) -> None:
        self._selected = list(names)

    def runs(self) -> list[dict[str, Any]]:
        return [{"run": 0, "config_hash": self._meta.config_hash, "device_kind": self._meta.device_kind}]
