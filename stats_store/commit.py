"""Making a shard's contribution visible atomically, and building the next generation of a flush.

Commit = write the record to a temporary file in the same directory, flush it to disk, then
``os.replace`` it onto ``shard-<k>.json``: readers see the old record or the new one, never half.
A flush merges the shard's committed values with the new ones (each tensor by its declared merge),
so later flushes only raise max-abs values.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from shards.measurement import Measurement, ModuleStats
from stats_store.metadata import CommitRecord, ModuleCommit, TensorCommit, row_checksum
from stats_store.reduce import VALUE_MERGE, get_merge
from stats_store.shard_map import ShardSpec
from stats_store.store_errors import DuplicateBatchError, ShardSpecError

RowReader = Callable[[str, str, int, int], np.ndarray]  # (module, label, shard, slot) -> row


def atomic_write_json(path: Path, value: Any) -> None:
    """Write JSON to ``path`` via a temporary sibling and ``os.replace`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed (and re-raised)


@dataclass(frozen=True)
class PendingCommit:
    """Chunks written for a generation that is not visible yet; ``commit`` publishes it.

    ``noop`` is set when every batch of the flush was committed before (a retried flush): nothing
    was written and committing changes nothing.
    """

    record: CommitRecord
    noop: bool = False


def _global_row(stats_value: np.ndarray, spec: ShardSpec, module: str, label: str) -> tuple[np.ndarray, int]:
    """Place a shard's vector into global coordinates (NaN outside its slice)."""
    value = np.asarray(stats_value, dtype=np.float32).reshape(-1)
    sl = spec.slice_of(module, label)
    if sl is None:
        return value.copy(), value.size
    if value.size != sl.size:
        raise ShardSpecError(
            f"shard {spec.index}: {module} {label} has {value.size} channels but its slice "
            f"[{sl.start}, {sl.stop}) holds {sl.size}; fix the shard map"
        )
    row = np.full(sl.global_len, np.nan, dtype=np.float32)
    row[sl.start : sl.stop] = value
    return row, sl.global_len


def _check_batches(prev: CommitRecord | None, shard: int, batch_ids: Sequence[int]) -> bool:
    """True when every batch was committed before (a retried flush); raise on a partial overlap."""
    done = set(prev.batch_ids) if prev else set()
    new = set(batch_ids)
    if new and new <= done:
        return True
    overlap = sorted(new & done)
    if overlap:
        raise DuplicateBatchError(
            f"shard {shard}: batches {overlap[:10]} were committed before but {sorted(new - done)[:10]} are new; "
            "a flush must hold only new batches (or exactly a committed set, when retried)"
        )
    return False


def build_flush(
    prev: CommitRecord | None,
    spec: ShardSpec,
    stats: Measurement,
    batch_ids: Sequence[int],
    read_row: RowReader,
    merges: Mapping[str, str] | None = None,
) -> tuple[dict[tuple[str, str], np.ndarray], PendingCommit]:
    """The rows of the shard's next generation and its (not yet written) commit record.

    Args:
        prev: the shard's current commit, None before its first.
        spec: the shard and its channel slices.
        stats: statistics of ``batch_ids`` only (counts are added; values merged).
        batch_ids: the batches this flush covers.
        read_row: reads a committed row (already checksum-verified) of ``prev``.
        merges: merge name per tensor label (``"inputs.0"``); default ``"max"``.
    """
    if _check_batches(prev, spec.index, batch_ids):
        assert prev is not None
        return {}, PendingCommit(prev, noop=True)
    generation = (prev.generation if prev else 0) + 1
    rows: dict[tuple[str, str], np.ndarray] = {}
    modules: dict[str, ModuleCommit] = {}
    names = list(prev.modules) if prev else []
    names += [n for n in stats.modules if n not in names]
    for name in names:
        old = prev.modules.get(name) if prev else None
        modules[name] = _flush_module(name, old, stats.modules.get(name), spec, prev, read_row, merges or {}, rows)
    samples = stats.num_samples if stats.num_samples is not None else len(batch_ids)
    record = CommitRecord(
        shard=spec.index,
        generation=generation,
        batch_ids=tuple(sorted(set(batch_ids) | set(prev.batch_ids if prev else ()))),
        num_samples=(prev.num_samples if prev else 0) + samples,
        modules=MappingProxyType(modules),
    )
    return rows, PendingCommit(record)


def _flush_module(
    name: str,
    old: ModuleCommit | None,
    new: ModuleStats | None,
    spec: ShardSpec,
    prev: CommitRecord | None,
    read_row: RowReader,
    merges: Mapping[str, str],
    rows: dict[tuple[str, str], np.ndarray],
) -> ModuleCommit:
    """Merge one module's committed tensors with its new ones; fill ``rows``; return its commit."""
    if old and new and new.op_type != old.op_type:
        raise ShardSpecError(
            f"shard {spec.index}: module {name} was committed as op type {old.op_type!r}, now {new.op_type!r}"
        )
    new_tensors = new.tensors() if new else {}
    labels = list(old.tensors) if old else []
    labels += [lb for lb in new_tensors if lb not in labels]
    tensors: dict[str, TensorCommit] = {}
    for label in labels:
        committed = old.tensors.get(label) if old else None
        merge_name = committed.merge if committed else merges.get(label, VALUE_MERGE)
        merge = get_merge(merge_name, f"{name} {label}")
        row: np.ndarray | None = None
        global_len = committed.global_len if committed else 0
        if committed is not None and prev is not None:
            row = read_row(name, label, spec.index, prev.slot)
        if label in new_tensors:
            fresh, global_len = _global_row(new_tensors[label], spec, name, label)
            if row is not None and row.size != fresh.size:
                raise ShardSpecError(
                    f"shard {spec.index}: {name} {label} had {row.size} global channels, now {fresh.size}"
                )
            row = fresh if row is None else merge.other_batches(row, fresh).astype(np.float32)
        assert row is not None
        row = np.where(np.isnan(row), np.float32(np.nan), row).astype(np.float32)  # canonical NaN bits
        rows[(name, label)] = row
        tensors[label] = TensorCommit(merge_name, row_checksum(row), global_len, spec.slice_of(name, label))
    counts = dict(old.nonfinite) if old else {}
    for label, n in (new.nonfinite if new else {}).items():
        counts[label] = counts.get(label, 0) + int(n)
    return ModuleCommit(
        op_type=new.op_type if new else old.op_type,  # type: ignore[union-attr]
        num_samples=(old.num_samples if old else 0) + (new.num_samples if new else 0),
        nonfinite=MappingProxyType(counts),
        tensors=MappingProxyType(tensors),
    )
