"""Decoding one-chunk zarr arrays from their stored objects: what zarr itself reads back from the
same files is the reference; anything outside the simple kind is declined (None), never guessed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

from stats_store.chunk_decode import decode_single_chunk, group_attributes
from stats_store.reduced_group import REDUCED_GROUP


def _objects(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` keyed by its path inside it, as a store lists its objects."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _write(root: Path, value: np.ndarray, **kwargs: Any) -> zarr.Array:
    arr = zarr.create_array(zarr.storage.LocalStore(root), name="a", shape=value.shape,
                            dtype=value.dtype if value.dtype.kind != "U" else str,
                            chunks=kwargs.pop("chunks", tuple(max(n, 1) for n in value.shape)), **kwargs)
    if value.size:
        arr[...] = value
    return arr


RNG = np.random.default_rng(0)
SIMPLE = {
    "float32 stored as is": (RNG.normal(size=1000).astype(np.float32), {"compressors": None}),
    "float32 with NaN and inf, zstd": (np.array([1.5, np.nan, -np.inf, 0.0], np.float32), {}),
    "int64 2-D, zstd": (RNG.integers(-2**40, 2**40, size=(7, 3)), {}),
    "float64 big-endian": (RNG.normal(size=13), {"serializer": BytesCodec(endian="big"), "compressors": None}),
    "uint8": (np.arange(200, dtype=np.uint8), {}),
    "int16 zstd with checksum": (np.arange(-50, 50, dtype=np.int16), {"compressors": ZstdCodec(level=3, checksum=True)}),
    "0-d": (np.array(2.25, dtype=np.float32), {}),
    "empty 1-D": (np.zeros(0, np.int64), {}),
    "empty 2-D": (np.zeros((0, 2), np.int64), {}),
    "strings, zstd": (np.array(["model.layers.0.mlp", "", "ä/ü €", "inputs.0"]), {}),
    "strings stored as is": (np.array(["a", "bb", "ccc"]), {"compressors": None}),
    "empty strings array": (np.array([], dtype=str), {}),
    "'.' chunk key separator": (np.arange(6, dtype=np.int32).reshape(2, 3),
                                {"chunk_key_encoding": {"name": "default", "separator": "."}}),
}


@pytest.mark.parametrize("value, kwargs", SIMPLE.values(), ids=SIMPLE.keys())
def test_decoded_arrays_equal_what_zarr_reads(tmp_path: Path, value: np.ndarray, kwargs: dict[str, Any]) -> None:
    arr = _write(tmp_path, value, **kwargs)
    want = np.asarray(arr[...])
    got = decode_single_chunk(_objects(tmp_path), "a")
    assert got is not None
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.flags.writeable  # as zarr's: a caller may change what it read


@pytest.mark.parametrize("value, fill", [(np.full(5, np.nan, np.float32), np.nan),
                                         (np.full(5, -np.inf, np.float64), -np.inf),
                                         (np.zeros((2, 3), np.int64), 0), (np.full(4, 7, np.int64), 7),
                                         (np.array(["", ""]), ""), (np.array(["x", "x"]), "x")],
                         ids=["NaN", "-inf", "0 (counts no module saw)", "7", "empty string", "a string"])
def test_an_array_equal_to_its_fill_value_has_no_chunk_and_reads_as_it(tmp_path: Path, value: np.ndarray,
                                                                        fill: Any) -> None:
    arr = _write(tmp_path, value, fill_value=fill)
    assert not (tmp_path / "a" / "c").exists()  # zarr writes no chunk equal to the fill value
    got = decode_single_chunk(_objects(tmp_path), "a")
    assert got is not None and got.dtype == np.asarray(arr[...]).dtype
    np.testing.assert_array_equal(got, np.asarray(arr[...]))


def _rewrite_meta(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = root / "a" / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _damage_chunk(root: Path) -> None:
    chunk = root / "a" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])


VALUES = np.arange(40, dtype=np.float32)
DECLINED: dict[str, tuple[dict[str, Any], Callable[[Path], None] | None]] = {
    "several chunks": ({"chunks": (16,)}, None),
    "gzip": ({"compressors": GzipCodec()}, None),
    "a checksum codec": ({"compressors": [ZstdCodec(), Crc32cCodec()]}, None),
    "sharding": ({"chunks": (8,), "shards": (40,)}, None),
    "v2 chunk keys": ({"chunk_key_encoding": {"name": "v2", "separator": "."}}, None),
    "an extension member": ({}, lambda root: _rewrite_meta(root, lambda m: m.update(
        {"my_extension": {"name": "x", "must_understand": True}}))),
    "a damaged chunk": ({"compressors": None}, _damage_chunk),
    "a fill value in hex, chunk missing": ({"fill_value": np.nan}, lambda root: (
        (root / "a" / "c" / "0").unlink(), _rewrite_meta(root, lambda m: m.update({"fill_value": "0x7fc00000"})))),
    "metadata that is not JSON": ({}, lambda root: (root / "a" / "zarr.json").write_text("{")),
}


@pytest.mark.parametrize("kwargs, then", DECLINED.values(), ids=DECLINED.keys())
def test_other_arrays_are_declined(tmp_path: Path, kwargs: dict[str, Any], then: Callable[[Path], None] | None) -> None:
    _write(tmp_path, VALUES, **kwargs)
    if then is not None:
        then(tmp_path)
    assert decode_single_chunk(_objects(tmp_path), "a") is None


@pytest.mark.parametrize("doc, want", [
    ({"zarr_format": 3, "node_type": "group", "attributes": {"generations": {"0": 2}}}, {"generations": {"0": 2}}),
    ({"zarr_format": 3, "node_type": "group"}, {}),
    ({"zarr_format": 3, "node_type": "group", "attributes": {}, "consolidated_metadata": None}, {}),
    ({"zarr_format": 3, "node_type": "array", "attributes": {}}, None),
    ({"zarr_format": 2, "node_type": "group", "attributes": {}}, None),
    ({"zarr_format": 3, "node_type": "group", "attributes": {}, "unknown": 1}, None),
    ([1, 2], None),
])
def test_group_attributes_of_plain_v3_groups_only(doc: Any, want: dict[str, Any] | None) -> None:
    assert group_attributes(json.dumps(doc).encode()) == want
    assert group_attributes(b"{not json") is None


def test_a_reduced_group_written_by_the_store_is_decoded_without_zarr(tmp_path: Path) -> None:
    """The fast path must hold for what the reducer writes, or every convert is slow again."""
    from stats_store.records import Measurement, ModuleStats
    from stats_store.metadata import RunMeta
    from stats_store.shard_map import ShardSpec
    from stats_store.zarr_store import ZarrStatsStore

    store = ZarrStatsStore.open_run(tmp_path / "m", RunMeta("c", "f"))
    m = Measurement(modules={"l": ModuleStats("l", "linear", [np.array([1.5, 2.0], np.float32)], None,
                                              {"weight": np.array([0.5], np.float32)}, 1, {"inputs.0": 2})})
    store.commit(store.write_shard(ShardSpec(0, 1), m, [0]))
    store.reduce()
    root = tmp_path / "m.zarr"
    objects = _objects(root)
    arrays = sorted({k.split("/")[1] for k in objects if k.startswith(f"{REDUCED_GROUP}/") and k.count("/") >= 2})
    assert len(arrays) == 9
    for name in arrays:
        got = decode_single_chunk(objects, f"{REDUCED_GROUP}/{name}")
        assert got is not None, name
        np.testing.assert_array_equal(got, np.asarray(zarr.open_array(root / REDUCED_GROUP / name)[...]))
    assert group_attributes(objects[f"{REDUCED_GROUP}/zarr.json"])["generations"] == {"0": 1}
