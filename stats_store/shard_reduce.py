"""The reducer: committed shard chunks → one packed global vector (``stats_store.packing``).

The global index is built from the commit records: modules in first-seen order over the shards
(in shard order), tensors in first-seen label order, each ``global_len`` channels long. A tensor
whose merge is a NaN-ignoring max (``reduce.is_nan_max``) is merged in place: every shard's stored
values go through ``np.fmax`` into their global positions (NaN before any shard writes): long
tensors (per-channel vectors) one slice each, short ones (per-tensor values: thousands per shard)
gathered into one indexed ``fmax`` per shard, so a shard costs a few numpy calls, not one per
tensor. This is exactly ``reduce_over_shards`` over NaN-padded global rows, because ``fmax`` is
commutative, associative and ignores NaN. Other merges go through ``reduce_over_shards``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from stats_store.metadata import CommitRecord, TensorCommit
from stats_store.packing import ModuleEntry, Packed
from stats_store.reduce import get_merge, is_nan_max, reduce_count, reduce_over_shards
from stats_store.errors import ShardSpecError


@dataclass(frozen=True)
class _GlobalTensor:
    merge: str
    global_len: int
    offset: int
    nan_max: bool  # merged in place by np.fmax (``reduce.is_nan_max``)


# Pieces shorter than this are gathered into one indexed fmax per shard; longer ones are fmax'ed
# as slices (an index array per element would cost more than the call it saves).
_SLICE_MIN = 256


def _global_index(
    commits: Mapping[int, CommitRecord], where: str
) -> tuple[dict[str, tuple[str, dict[str, _GlobalTensor]]], int]:
    """Module → (op type, label → global tensor), and the total length; checks shards agree."""
    seen: dict[str, tuple[str, dict[str, TensorCommit]]] = {}
    for rec in commits.values():
        for name, mod in rec.modules.items():
            op_type, tensors = seen.setdefault(name, (mod.op_type, {}))
            if mod.op_type != op_type:
                raise ShardSpecError(f"{where}: module {name} has op types {sorted({op_type, mod.op_type})} on different shards")
            for label, t in mod.tensors.items():
                first = tensors.setdefault(label, t)
                if t.merge != first.merge:
                    raise ShardSpecError(f"{where}: {name} {label} declares merges {sorted({t.merge, first.merge})}")
                if t.global_len != first.global_len:
                    raise ShardSpecError(
                        f"{where}: {name} {label} has {first.global_len} global channels on one shard and "
                        f"{t.global_len} on another; every shard must use global coordinates"
                    )
    index: dict[str, tuple[str, dict[str, _GlobalTensor]]] = {}
    offset = 0
    for name, (op_type, tensors) in seen.items():
        placed = {}
        for label, t in tensors.items():
            placed[label] = _GlobalTensor(t.merge, t.global_len, offset, is_nan_max(get_merge(t.merge, f"{name} {label}")))
            offset += t.global_len
        index[name] = (op_type, placed)
    return index, offset


def _fmax_pieces(values: np.ndarray, chunk: np.ndarray, src: list[int], dst: list[int], lengths: list[int]) -> None:
    """``values[d:d+n] = fmax(values[d:d+n], chunk[s:s+n])`` for every piece (pieces never overlap)."""
    n = np.asarray(lengths, dtype=np.int64)
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    long = n >= _SLICE_MIN
    for a, b, m in zip(s[long].tolist(), d[long].tolist(), n[long].tolist()):
        np.fmax(values[b : b + m], chunk[a : a + m], out=values[b : b + m])
    short = ~long
    if short.any():
        ns = n[short]
        within = np.arange(int(ns.sum())) - np.repeat(np.cumsum(ns) - ns, ns)  # 0..n-1 inside each piece
        si, di = np.repeat(s[short], ns) + within, np.repeat(d[short], ns) + within
        values[di] = np.fmax(values[di], chunk[si])


def reduce_shards(
    commits: Mapping[int, CommitRecord], chunks: Mapping[int, np.ndarray], tp: int, where: str
) -> Packed:
    """Merge every shard's (verified) chunk into the global packed statistics.

    Args:
        commits: each shard's latest commit (its chunk's index).
        chunks: each shard's packed chunk, checked against its commit.
        tp: tensor-parallel size (tp ranks of one dp group saw the same batches).
        where: the store, for error messages.
    """
    index, total = _global_index(commits, where)
    values = np.full(total, np.nan, dtype=np.float32)
    other: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for k, rec in commits.items():
        src: list[int] = []
        dst: list[int] = []
        lengths: list[int] = []
        for name, mod in rec.modules.items():
            placed = index[name][1]
            for label, t in mod.tensors.items():
                g = placed[label]
                if g.nan_max:
                    src.append(t.offset)
                    dst.append(g.offset + (t.slice.start if t.slice else 0))
                    lengths.append(t.length)
                else:
                    other.setdefault((name, label), {})[k] = _global_row(chunks[k][t.offset : t.offset + t.length], t)
        _fmax_pieces(values, chunks[k], src, dst, lengths)
    for (name, label), rows in other.items():
        g = index[name][1][label]
        values[g.offset : g.offset + g.global_len] = reduce_over_shards(rows, get_merge(g.merge), tp)
    return Packed(values, tuple(_entry(name, op_type, placed, commits, tp) for name, (op_type, placed) in index.items()))


def _global_row(stored: np.ndarray, t: TensorCommit) -> np.ndarray:
    """A shard's stored values in global coordinates (NaN outside its slice)."""
    if t.slice is None:
        return stored
    row = np.full(t.global_len, np.nan, dtype=np.float32)
    row[t.slice.start : t.slice.stop] = stored
    return row


def _entry(name: str, op_type: str, placed: Mapping[str, _GlobalTensor], commits: Mapping[int, CommitRecord],
           tp: int) -> ModuleEntry:
    """One module's index entry with its counts merged over the shards that hold it."""
    present = {k: r.modules[name] for k, r in commits.items() if name in r.modules}
    labels = sorted({lb for m in present.values() for lb in m.nonfinite})
    nonfinite = {lb: reduce_count({k: m.nonfinite.get(lb, 0) for k, m in present.items()}, tp) for lb in labels}
    samples = reduce_count({k: m.num_samples for k, m in present.items()}, tp)
    tokens = reduce_count({k: m.num_tokens for k, m in present.items()}, tp)
    tensors = tuple((label, g.offset, g.global_len) for label, g in placed.items())
    return ModuleEntry(name, op_type, samples, MappingProxyType(nonfinite), tensors, tokens)
