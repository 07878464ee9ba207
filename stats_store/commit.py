"""Making a shard's contribution visible atomically, and building the next generation of a flush.

Commit = write the record to a temporary file in the same directory, flush it to disk, then
``os.replace`` it onto ``shard-<k>.json`` (``stats_store.atomic``, called by the zarr store); on
object storage one PUT of the whole record (``stats_store.store_io``): readers see the old record
or the new one, never half.
A flush merges the shard's committed values with the new ones (each tensor by its declared merge),
so later flushes only raise max-abs values, and packs the result into one float32 chunk: the
shard's own channels of every tensor, back to back, indexed by the commit record.

Parameters (``params.*``, the weights' max-abs) are stored by data-parallel group 0 only. Every
dp group holds the same weights, so the other groups' copies would change no reduced value (the
max over groups of equal vectors) while multiplying the store's largest tensors by dp: for
Llama-3.1-405B at dp=8 x tp=8 they are 7/8 of 1.6 GB (``bench/bench_405b.py``). A shard of
group 0 keeps its params in every generation, so once it has committed they stay readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np

from stats_store.records import Measurement, ModuleStats
from stats_store.metadata import CommitRecord, ModuleCommit, TensorCommit, row_checksum
from stats_store.reduce import MERGES, VALUE_MERGE, get_merge
from stats_store.shard_map import ChannelSlice, ShardSpec
from stats_store.errors import DuplicateBatchError, ShardSpecError

ChunkReader = Callable[[], np.ndarray]  # the previous generation's packed chunk, verified


@dataclass(frozen=True)
class PendingCommit:
    """Chunks written for a generation that is not visible yet; ``commit`` publishes it.

    ``noop`` is set when every batch of the flush was committed before (a retried flush): nothing
    was written and committing changes nothing.
    """

    record: CommitRecord
    noop: bool = False


def _local_values(value: np.ndarray, spec: ShardSpec, module: str, label: str) -> tuple[np.ndarray, int]:
    """A shard's vector as stored (its own channels) and the global channel count."""
    vec = np.asarray(value, dtype=np.float32).reshape(-1)
    sl = spec.slice_of(module, label)
    if sl is None:
        return vec, vec.size
    if vec.size != sl.size:
        raise ShardSpecError(
            f"shard {spec.index}: {module} {label} has {vec.size} channels but its slice "
            f"[{sl.start}, {sl.stop}) holds {sl.size}; fix the shard map"
        )
    return vec, sl.global_len


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


PARAMS_PREFIX = "params."  # labels of a module's parameters (``ModuleStats.tensors``)


def _stored(tensors: Mapping[str, np.ndarray], spec: ShardSpec) -> Mapping[str, np.ndarray]:
    """The tensors this shard stores: all of them in dp group 0, all but the parameters elsewhere."""
    if spec.dp_rank == 0:
        return tensors
    return {label: v for label, v in tensors.items() if not label.startswith(PARAMS_PREFIX)}


# (label, merge name, global_len, slice, stored values) of one tensor of the next generation
_Tensor = tuple[str, str, int, ChannelSlice | None, np.ndarray]


def build_flush(
    prev: CommitRecord | None,
    spec: ShardSpec,
    stats: Measurement,
    batch_ids: Sequence[int],
    read_prev: ChunkReader,
    merges: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, PendingCommit]:
    """The packed chunk of the shard's next generation and its (not yet written) commit record.

    Args:
        prev: the shard's current commit, None before its first.
        spec: the shard and its channel slices.
        stats: statistics of ``batch_ids`` only (counts are added; values merged).
        batch_ids: the batches this flush covers.
        read_prev: reads ``prev``'s chunk (already checksum-verified); called only when needed.
        merges: merge name per tensor label (``"inputs.0"``); default ``"max"``.
    """
    if _check_batches(prev, spec.index, batch_ids):
        assert prev is not None
        return np.zeros(0, dtype=np.float32), PendingCommit(prev, noop=True)
    old_chunk = read_prev() if prev is not None and prev.size else np.zeros(0, dtype=np.float32)
    names = list(prev.modules) if prev else []
    names += [n for n in stats.modules if n not in names]
    flushed = {}
    for name in names:
        old = prev.modules.get(name) if prev else None
        flushed[name] = _flush_module(name, old, stats.modules.get(name), spec, old_chunk, merges or {})
    chunk, modules = _pack(flushed)
    samples = stats.num_samples if stats.num_samples is not None else len(batch_ids)
    record = CommitRecord(
        shard=spec.index,
        generation=(prev.generation if prev else 0) + 1,
        batch_ids=tuple(sorted(set(batch_ids) | set(prev.batch_ids if prev else ()))),
        num_samples=(prev.num_samples if prev else 0) + samples,
        modules=MappingProxyType(modules),
        size=int(chunk.size),
        checksum=row_checksum(chunk),
    )
    return chunk, PendingCommit(record)


def _pack(flushed: Mapping[str, tuple[ModuleCommit, list[_Tensor]]]) -> tuple[np.ndarray, dict[str, ModuleCommit]]:
    """One chunk of every module's tensors, and the module commits indexing it (with checksums)."""
    pieces = [t[4] for _, tensors in flushed.values() for t in tensors]
    chunk = np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros(0, dtype=np.float32)
    chunk[np.isnan(chunk)] = np.float32(np.nan)  # canonical NaN bits: checksums compare bytes
    modules: dict[str, ModuleCommit] = {}
    offset = 0
    for name, (module, tensors) in flushed.items():
        index = {}
        for label, merge_name, global_len, sl, values in tensors:
            stored = chunk[offset : offset + values.size]
            index[label] = TensorCommit(merge_name, row_checksum(stored), global_len, sl, offset)
            offset += values.size
        modules[name] = ModuleCommit(module.op_type, module.num_samples, module.nonfinite, MappingProxyType(index),
                                     module.num_tokens)
    return chunk, modules


def _flush_module(
    name: str,
    old: ModuleCommit | None,
    new: ModuleStats | None,
    spec: ShardSpec,
    old_chunk: np.ndarray,
    merges: Mapping[str, str],
) -> tuple[ModuleCommit, list[_Tensor]]:
    """Merge one module's committed tensors with its new ones: its counts and its stored tensors."""
    if old and new and new.op_type != old.op_type:
        raise ShardSpecError(
            f"shard {spec.index}: module {name} was committed as op type {old.op_type!r}, now {new.op_type!r}"
        )
    new_tensors = _stored(new.tensors(), spec) if new else {}
    labels = list(old.tensors) if old else []
    labels += [lb for lb in new_tensors if lb not in labels]
    tensors: list[_Tensor] = []
    for label in labels:
        committed = old.tensors.get(label) if old else None
        merge_name = committed.merge if committed else merges.get(label, VALUE_MERGE)
        merge = MERGES.get(merge_name) or get_merge(merge_name, f"{name} {label}")  # the message only when unknown
        sl = spec.slice_of(name, label)
        row: np.ndarray | None = None
        global_len = committed.global_len if committed else 0
        if committed is not None:
            if committed.slice != sl:
                raise ShardSpecError(
                    f"shard {spec.index}: {name} {label} was committed with slice {committed.slice}, now {sl}; "
                    "a shard keeps its channel slices for the whole run"
                )
            row = old_chunk[committed.offset : committed.offset + committed.length]
        if label in new_tensors:
            fresh, fresh_len = _local_values(new_tensors[label], spec, name, label)
            if committed is not None and fresh_len != global_len:
                raise ShardSpecError(
                    f"shard {spec.index}: {name} {label} had {global_len} global channels, now {fresh_len}"
                )
            global_len = fresh_len
            row = fresh if row is None else np.asarray(merge.other_batches(row, fresh), dtype=np.float32)
        assert row is not None
        tensors.append((label, merge_name, global_len, sl, row))
    counts = dict(old.nonfinite) if old else {}
    for label, n in (new.nonfinite if new else {}).items():
        counts[label] = counts.get(label, 0) + int(n)
    module = ModuleCommit(
        op_type=new.op_type if new else old.op_type,  # type: ignore[union-attr]
        num_samples=(old.num_samples if old else 0) + (new.num_samples if new else 0),
        nonfinite=MappingProxyType(counts),
        num_tokens=(old.num_tokens if old else 0) + (int(new.num_tokens) if new else 0),
    )
    return module, tensors
