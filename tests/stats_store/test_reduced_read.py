"""What ``read_reduced`` reads besides the conformance tests of ``test_store``: reduced arrays the
fast decoder declines go through zarr with the same result, the commit generation read from a
record's first members equals the whole parse, and a local tree read equals ``os.walk``'s."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from stats_store.location import parse_location
from stats_store.metadata import RunMeta
from stats_store.store_io import open_io
from stats_store.zarr_store import ZarrStatsStore, _leading_member
from tests.s3_server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from tests.stats_store.test_store import assert_same_stats, reference, shard_stats, zarr_root


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path) if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"


@pytest.mark.parametrize("rewrite", ["tensor_index", "values", "module_name"])
def test_reduced_arrays_in_another_encoding_are_read_through_zarr(where: str, rewrite: str) -> None:
    """A reduced array of several gzip chunks (not what the reducer writes) reads the same."""
    store = ZarrStatsStore.open_run(f"{where}/m", RunMeta("cfg", "fp", dp=1, tp=1))
    spec, m = shard_stats(0, [0, 1], 0, 1, 1)
    store.commit(store.write_shard(spec, m, [0, 1]))
    store.reduce()
    group = zarr_root(f"{where}/m")["reduced"]
    value = np.asarray(group[rewrite][...])
    arr = group.create_array(rewrite, shape=value.shape, dtype=value.dtype, overwrite=True,
                             chunks=tuple(max(1, n // 2) for n in value.shape), compressors=GzipCodec())
    arr[...] = value
    assert_same_stats(ZarrStatsStore.open(f"{where}/m").read_reduced(), reference(0, [0, 1]))


RECORDS: list[Any] = [
    {"shard": 0, "generation": 7, "modules": {"a": {"generation": 1}}},
    {"modules": {"generation": 1, "x": [1, {"generation": 2}]}, "generation": 8},  # nested keys first
    {"batch_ids": list(range(2000)), "generation": 9},  # past the first 4 KB: parsed whole
    {"shard": 0, "generation": 12345678901234567890},
    {"sh\"ard": "\\u00e9 ü}", "generation": -1},
    {"name": "é" * 3000, "generation": 3},  # UTF-8 unescaped: the 4 KB cut splits a character...
    {"names": "é" * 3000, "generation": 4},  # ...or not
]


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("indent, ascii_only", [(None, True), (2, False)])
def test_the_generation_read_from_the_first_members_is_json_s(record: Any, indent: int | None,
                                                              ascii_only: bool) -> None:
    raw = json.dumps(record, indent=indent, ensure_ascii=ascii_only).encode()
    assert _leading_member(raw, "generation") == json.loads(raw)["generation"]


def test_a_number_cut_at_the_read_limit_is_read_whole() -> None:
    raw = json.dumps({"generation": 1234567}).encode()
    cut = raw.index(b"1234567") + 3  # the first bytes end inside the number
    assert _leading_member(raw, "generation", within=cut) == 1234567


@pytest.mark.parametrize("raw, error", [(b'{"shard": 0, "gener', json.JSONDecodeError),
                                        (b'{"shard": 0}', KeyError), (b"[1, 2]", TypeError)])
def test_a_record_without_a_generation_fails_as_json_does(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        _leading_member(raw, "generation")


def test_local_read_tree_reads_what_os_walk_lists_summary_first(tmp_path: Path) -> None:
    files = {"g/zarr.json": b"{}", "g/a/zarr.json": b"a", "g/a/c/0": b"\x00\x01", "g/b/c/0/0": b"b00",
             "g/b/c/0/1": b"b01", "g/b/zarr.json": b"", "other/x": b"x"}
    for key, data in files.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)
    (tmp_path / "g" / "linked").symlink_to(tmp_path / "other")  # a linked directory is not entered
    tree = open_io(parse_location(str(tmp_path), store=False)).read_tree("g")
    walked = {os.path.relpath(os.path.join(d, f), tmp_path): (Path(d) / f).read_bytes()
              for d, _, fs in os.walk(tmp_path / "g") for f in fs}
    assert tree == walked == {k: v for k, v in files.items() if k.startswith("g/")}
    assert next(iter(tree)) == "g/zarr.json"  # a directory's files before its subdirectories
