"""Run metadata and commit records of the stats store, and their JSON form.

The run metadata (format version, config hash, model fingerprint, topology, device kind, observer)
lives in the attributes of the store's root group. A commit record is one shard's latest visible
contribution: its generation, the batches done, its counts, and the index of the one packed chunk
it wrote (per tensor: merge, channel slice, offset and length in the chunk, checksum), with a
checksum of the whole chunk, so that a chunk changed after the commit is detected instead of read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from stats_store.shard_map import ChannelSlice
from stats_store.errors import StoreFormatError

# 1: one zarr group per module, one array per tensor label. 2: one packed chunk per shard flush.
FORMAT_VERSION = 2
STORE_KIND = "fp8-orchestrator/stats-store"


def canonical_json(value: Any) -> str:
    """The stable text of a JSON value (sorted keys): fingerprints compare by this."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RunMeta:
    """What identifies a run; a store holds exactly one (its re-runs and resumes included).

    Attributes:
        config_hash: hash of the measurement-relevant config, given by the caller.
        model_fingerprint: string or JSON-able dict from the caller (names, shapes, dtypes, content hash).
        dp: data-parallel size.
        tp: tensor-parallel size.
        device_kind: the kind of card that measured (``cpu``, ``cuda``, ``gaudi2``...).
        observer: observer name (part of INC file names).
    """

    config_hash: str
    model_fingerprint: Any
    dp: int = 1
    tp: int = 1
    device_kind: str = "cpu"
    observer: str = "maxabs"

    @property
    def num_shards(self) -> int:
        return self.dp * self.tp

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": STORE_KIND,
            "format_version": FORMAT_VERSION,
            "config_hash": self.config_hash,
            "model_fingerprint": self.model_fingerprint,
            "topology": {"dp": self.dp, "tp": self.tp},
            "device_kind": self.device_kind,
            "observer": self.observer,
        }

    @classmethod
    def from_json(cls, attrs: Mapping[str, Any], where: str) -> "RunMeta":
        """Read root attributes, refusing other formats with a message naming ``where``."""
        if attrs.get("kind") != STORE_KIND:
            raise StoreFormatError(
                f"{where} is a zarr store but not a stats store (root attribute kind={attrs.get('kind')!r}); "
                "pick another dump_stats_path"
            )
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{where} has stats-store format version {version!r}, this code reads version {FORMAT_VERSION}; "
                "measure again into another dump_stats_path, or use the fp8-orchestrator version that wrote it"
            )
        topo = attrs["topology"]
        return cls(
            config_hash=str(attrs["config_hash"]),
            model_fingerprint=attrs["model_fingerprint"],
            dp=int(topo["dp"]),
            tp=int(topo["tp"]),
            device_kind=str(attrs["device_kind"]),
            observer=str(attrs["observer"]),
        )


def row_checksum(row: np.ndarray) -> str:
    """SHA-256 of a float32 row as stored (NaNs canonicalised by the writer)."""
    # hashlib reads the contiguous float32 buffer directly: no copy of large chunks.
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32)).hexdigest()


@dataclass(frozen=True)
class TensorCommit:
    """One committed tensor of one shard.

    Attributes:
        merge: the merge declaration's name (``stats_store.reduce``).
        checksum: ``row_checksum`` of the stored values.
        global_len: channels of the global (tp=1) tensor.
        slice: the shard's part of the global channel axis; None: the whole axis.
        offset: where the stored values start in the shard's packed chunk. Only the shard's own
            channels are stored: ``length`` values (the slice's size, or ``global_len``).
    """

    merge: str
    checksum: str
    global_len: int
    slice: ChannelSlice | None = None
    offset: int = 0

    @property
    def length(self) -> int:
        return self.slice.size if self.slice is not None else self.global_len


@dataclass(frozen=True)
class ModuleCommit:
    """One module of one shard's commit: op type, counts (calls, NaN/Inf, tokens) and tensors.

    ``num_tokens`` (rows seen at ``inputs[0]``) is absent from records written before it was
    counted; they read as 0.
    """

    op_type: str
    num_samples: int
    nonfinite: Mapping[str, int] = field(default_factory=dict)
    tensors: Mapping[str, TensorCommit] = field(default_factory=dict)
    num_tokens: int = 0


@dataclass(frozen=True)
class CommitRecord:
    """A shard's latest visible contribution.

    Generation ``g`` lives in slot ``g % 2`` of the shard's chunks, so writing generation ``g + 1``
    never touches what generation ``g`` committed. The record is also the index of that chunk.

    Attributes:
        shard: shard index.
        generation: 1 for the first flush, +1 per flush.
        batch_ids: ids of the batches whose statistics this generation holds.
        num_samples: top-level samples (batches) seen by this shard.
        modules: per module what was committed.
        size: number of float32 values in the packed chunk.
        checksum: ``row_checksum`` of the whole chunk (the fast check; per-tensor checksums
            name the tensor when it fails).
    """

    shard: int
    generation: int
    batch_ids: tuple[int, ...]
    num_samples: int
    modules: Mapping[str, ModuleCommit]
    size: int = 0
    checksum: str = ""

    @property
    def slot(self) -> int:
        return self.generation % 2

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "generation": self.generation,
            "batch_ids": list(self.batch_ids),
            "num_samples": self.num_samples,
            "size": self.size,
            "checksum": self.checksum,
            "modules": {
                name: {
                    "op_type": m.op_type,
                    "num_samples": m.num_samples,
                    "num_tokens": m.num_tokens,
                    "nonfinite": dict(m.nonfinite),
                    "tensors": {
                        label: {
                            "merge": t.merge,
                            "checksum": t.checksum,
                            "global_len": t.global_len,
                            "slice": t.slice.to_json() if t.slice else None,
                            "offset": t.offset,
                        }
                        for label, t in m.tensors.items()
                    },
                }
                for name, m in self.modules.items()
            },
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CommitRecord":
        modules = {
            name: ModuleCommit(
                op_type=m["op_type"],
                num_samples=int(m["num_samples"]),
                nonfinite=MappingProxyType({k: int(v) for k, v in m["nonfinite"].items()}),
                tensors=MappingProxyType(
                    {
                        label: TensorCommit(
                            t["merge"],
                            t["checksum"],
                            int(t["global_len"]),
                            ChannelSlice.from_json(t["slice"]) if t["slice"] else None,
                            int(t["offset"]),
                        )
                        for label, t in m["tensors"].items()
                    }
                ),
                num_tokens=int(m.get("num_tokens", 0)),
            )
            for name, m in d["modules"].items()
        }
        return cls(
            shard=int(d["shard"]),
            generation=int(d["generation"]),
            batch_ids=tuple(int(b) for b in d["batch_ids"]),
            num_samples=int(d["num_samples"]),
            modules=MappingProxyType(modules),
            size=int(d["size"]),
            checksum=str(d["checksum"]),
        )
