"""The reduced group of a zarr stats store: its arrays written from a packed set, and read back
from the group's objects.

The layout (``stats_store.zarr_store`` describes it whole): ``values`` and the index arrays
``module_*``, ``tensor_*``, ``nonfinite_*``, each one chunk, and the reducer's summary as the
group's attributes. Reading takes the group's objects as fetched in one go (``StoreIO.read_tree``)
and decodes them in this thread (``stats_store.chunk_decode``); an array or a summary that
decoder declines is read by zarr from the same objects, in one round trip to zarr's event loop.
"""

from __future__ import annotations

import asyncio
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import zarr
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import AsyncGroup
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

from stats_store.chunk_decode import decode_single_chunk, group_attributes
from stats_store.packing import ModuleEntry, Packed

__all__ = ["REDUCED_GROUP", "read_reduced_objects", "write_reduced_arrays"]

REDUCED_GROUP = "reduced"
_INDEX_NAMES = ("module_name", "module_op_type", "module_num_samples", "tensor_label", "tensor_index",
                "nonfinite_label", "nonfinite_index")
_TOKENS = "module_num_tokens"  # optional on read (added after format 2 first shipped)
_REQUIRED = (*_INDEX_NAMES, "values")
_NAMES = (*_REQUIRED, _TOKENS)

Arrays = dict[str, np.ndarray | None]


def write_reduced_arrays(group: zarr.Group, packed: Packed) -> None:
    """Write ``packed`` as the group's arrays (not its summary), each one chunk."""
    for name, value in _index_arrays(packed).items():
        _write_array(group, name, value)
    _write_array(group, "values", packed.values, compressors=None)


def read_reduced_objects(objects: Mapping[str, bytes]) -> tuple[dict[str, Any] | None, Packed | None]:
    """The summary (None when absent or empty) and the packed set (None when an array is
    missing) held by the reduced group's ``objects``, keyed by their keys in the store."""
    summary, arrays = _decode(objects)
    if summary is None or any(arrays.get(name) is None for name in _REQUIRED):
        return summary, None
    if arrays.get(_TOKENS) is None:  # stores reduced before tokens were counted have none: 0 tokens
        del arrays[_TOKENS]
    return summary, _packed_from_arrays(arrays)  # type: ignore[arg-type]


def _decode(objects: Mapping[str, bytes]) -> tuple[dict[str, Any] | None, Arrays]:
    """The group's attributes (None when absent or empty) and arrays (None when absent)."""
    arrays: Arrays = {}
    declined = []
    for name in _NAMES:
        path = f"{REDUCED_GROUP}/{name}"
        arrays[name] = None
        if f"{path}/zarr.json" in objects:
            arrays[name] = decode_single_chunk(objects, path)
            if arrays[name] is None:
                declined.append(name)
    raw = objects.get(f"{REDUCED_GROUP}/zarr.json")
    attrs = None if raw is None else group_attributes(raw)
    summary_declined = raw is not None and attrs is None
    if declined or summary_declined:
        prototype = default_buffer_prototype()
        snapshot = MemoryStore({k: prototype.buffer.from_bytes(v) for k, v in objects.items()}, read_only=True)
        zarr_attrs, decoded = sync(_read_with_zarr(snapshot, declined, summary_declined))
        arrays.update(decoded)
        if summary_declined:
            return zarr_attrs, arrays
    return attrs or None, arrays


async def _read_with_zarr(store: Any, names: list[str], with_summary: bool) -> tuple[dict[str, Any] | None, Arrays]:
    """Through zarr: the group's attributes (None when absent, empty or not asked for) and the
    arrays ``names`` (None when absent), every request issued at once on its event loop."""
    group = StorePath(store, REDUCED_GROUP)

    async def summary() -> dict[str, Any] | None:
        if not with_summary:
            return None
        try:
            opened = await AsyncGroup.open(group, zarr_format=3, use_consolidated=False)
        except FileNotFoundError:
            return None
        return dict(opened.attrs) or None

    async def array(name: str) -> np.ndarray | None:
        try:
            arr = await AsyncArray.open(group / name, zarr_format=3)
        except FileNotFoundError:
            return None
        return np.asarray(await arr.getitem(...))

    attrs, *values = await asyncio.gather(summary(), *(array(n) for n in names))
    return attrs, dict(zip(names, values))


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
