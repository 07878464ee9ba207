"""Decoding a zarr v3 array of one chunk straight from its stored objects, without zarr's event loop.

The reducer writes every reduced array as a single chunk with zarr's default codecs
(``zarr_store._write_array``). Reading the nine of them through zarr cost ~5 ms on the 2-core
development machine for a few KB of data: each array's metadata is parsed into zarr's objects and
its codec pipeline built, every chunk is a task on zarr's event loop, and each zstd decode is
handed to a worker thread (``asyncio.to_thread``). Here an array whose metadata is exactly what
this module knows is decoded in this thread with numcodecs, the codec implementations zarr itself
calls (``zarr.codecs.zstd``, ``zarr.codecs.vlen_utf8``), following the zarr v3 specification:

* ``regular`` chunk grid whose one chunk is the whole array (or an array with no element),
  ``default`` chunk key encoding, no storage transformer;
* a ``float``/``int``/``uint`` data type with the ``bytes`` codec, or ``string`` with ``vlen-utf8``,
  either optionally followed by ``zstd``.

A missing chunk reads as the array's fill value, as in zarr (which writes no chunk equal to it:
an all-zero count array has none). Anything else (another codec or data type, several chunks, a
fill value in hex, a size that does not match the shape) returns None: the caller reads that
array through zarr, which gives what it always gave, errors included.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["decode_single_chunk", "group_attributes"]

# The numeric data types of the zarr v3 core specification (their names are numpy's).
_NUMERIC = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                      "float16", "float32", "float64"})
_ENDIAN = {"little": "<", "big": ">"}
# Members of array metadata this module understands; any other (an extension) leaves it to zarr.
_ARRAY_KEYS = frozenset({"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                         "fill_value", "codecs", "attributes", "storage_transformers", "dimension_names"})
_GROUP_KEYS = frozenset({"zarr_format", "node_type", "attributes", "consolidated_metadata"})


class _Declined(Exception):
    """The metadata or chunk is not of the simple kind decoded here: zarr reads it."""


def group_attributes(raw: bytes) -> dict[str, Any] | None:
    """The attributes of a v3 group from its ``zarr.json``; None when it is not a plain v3 group
    (the caller then opens it through zarr)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not doc.keys() <= _GROUP_KEYS or doc.get("zarr_format") != 3 \
            or doc.get("node_type") != "group" or not isinstance(doc.get("attributes", {}), dict):
        return None
    return dict(doc.get("attributes", {}))


def decode_single_chunk(objects: Mapping[str, bytes], path: str) -> np.ndarray | None:
    """The array at ``path`` (its ``zarr.json`` must be in ``objects``, keyed like the store),
    decoded from ``objects`` as zarr would give it (a writable array of the native dtype); None
    when it is not an array of the kind this module decodes."""
    try:
        meta = json.loads(objects[f"{path}/zarr.json"])
        shape, dtype, codecs, key = _parse(meta)
    except (_Declined, ValueError, TypeError, KeyError, AttributeError):
        return None
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    chunk = objects.get(f"{path}/{key}")
    try:
        if chunk is None:  # never written, or written equal to the fill value (zarr skips those)
            return np.full(shape, _fill_value(meta.get("fill_value"), dtype), dtype=dtype)
        return _decode(chunk, shape, dtype, codecs)
    except (_Declined, ValueError, TypeError, OverflowError, RuntimeError):
        return None  # a damaged chunk or an unusual fill value: zarr's result, errors included


def _parse(meta: Any) -> tuple[tuple[int, ...], np.dtype[Any], tuple[Any, ...], str]:
    """Shape, native dtype, codecs and the one chunk's key of simple array metadata."""
    if not isinstance(meta, dict) or not meta.keys() <= _ARRAY_KEYS or meta.get("zarr_format") != 3 \
            or meta.get("node_type") != "array" or meta.get("storage_transformers", []):
        raise _Declined
    shape = tuple(meta["shape"])
    if not all(type(n) is int and n >= 0 for n in shape):
        raise _Declined
    grid = meta["chunk_grid"]
    if grid.get("name") != "regular" or (0 not in shape and tuple(grid["configuration"]["chunk_shape"]) != shape):
        raise _Declined
    encoding = meta["chunk_key_encoding"]
    separator = encoding.get("configuration", {}).get("separator", "/")
    if encoding.get("name") != "default" or separator not in ("/", "."):
        raise _Declined
    key = separator.join(["c", *("0" for _ in shape)])
    data_type, codecs = meta["data_type"], tuple(meta["codecs"])
    names = [c.get("name") for c in codecs]
    if data_type in _NUMERIC and names in (["bytes"], ["bytes", "zstd"]):
        endian = (codecs[0].get("configuration") or {}).get("endian")
        native = np.dtype(data_type)
        if endian not in _ENDIAN and not (endian is None and native.itemsize == 1):
            raise _Declined
        return shape, native, codecs, key
    if data_type == "string" and names in (["vlen-utf8"], ["vlen-utf8", "zstd"]):
        return shape, _string_dtype(), codecs, key
    raise _Declined


def _decode(chunk: bytes, shape: tuple[int, ...], dtype: np.dtype[Any], codecs: tuple[Any, ...]) -> np.ndarray:
    if codecs[-1]["name"] == "zstd":
        conf = codecs[-1].get("configuration") or {}
        chunk = bytes(_zstd(int(conf.get("level", 0)), bool(conf.get("checksum", False))).decode(chunk))
    count = int(np.prod(shape))
    if codecs[0]["name"] == "vlen-utf8":
        from numcodecs.vlen import VLenUTF8

        strings = VLenUTF8().decode(chunk)
        if strings.size != count:
            raise _Declined
        return strings.reshape(shape).astype(dtype)
    endian = (codecs[0].get("configuration") or {}).get("endian")
    stored = dtype.newbyteorder(_ENDIAN[endian]) if endian else dtype
    if len(chunk) != count * stored.itemsize:
        raise _Declined
    # astype copies: the array owns writable memory, as zarr's does (callers may change it).
    return np.frombuffer(chunk, dtype=stored).astype(dtype).reshape(shape)


_SPECIAL_FLOATS = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}


def _fill_value(value: Any, dtype: np.dtype[Any]) -> Any:
    """A fill value as the v3 specification writes it for the data types decoded here (a float's
    hex form is left to zarr)."""
    if dtype.kind == "f" and (type(value) in (int, float) or value in _SPECIAL_FLOATS):
        return _SPECIAL_FLOATS.get(value, value)
    if dtype.kind in "iu" and type(value) is int:
        return value
    if dtype.kind == "T" and type(value) is str:
        return value
    raise _Declined


@functools.cache
def _zstd(level: int, checksum: bool) -> Any:
    from numcodecs.zstd import Zstd

    return Zstd(level=level, checksum=checksum)  # as zarr.codecs.zstd builds it


@functools.cache
def _string_dtype() -> np.dtype[Any]:
    """The dtype zarr gives string arrays (numpy's StringDType on numpy 2)."""
    from zarr.dtype import VariableLengthUTF8

    return np.dtype(VariableLengthUTF8().to_native_dtype())
