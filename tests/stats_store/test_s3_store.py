"""The stats store on S3-protocol object storage: locations, where the endpoint and credentials come
from, and the bad cases, each one line naming the URL and what to do, with nothing measured lost.

Everything runs against a real server (moto, ``python -m moto.server`` on 127.0.0.1, with IAM
authentication on; ``tests.s3_server``). The endpoint "goes away" by closing a TCP gate in front
of it: the server, and what it holds, stays up, so what was committed can be checked afterwards.
The behaviour every store shares runs on S3 in ``test_store.py`` and ``test_cli.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.configuration.fp8_config import Fp8Config
from orchestrator.entry.stats_store_cli import main
from orchestrator.errors import ConfigError
from stats_store.errors import (RunMismatchError, StoreAccessError, StoreLocationError, StoreNotFoundError,
                                StoreUnreachableError)
from stats_store.location import parse_location
from stats_store.metadata import RunMeta
from stats_store.remote_errors import MAX_ATTEMPTS
from stats_store.zarr_store import ZarrStatsStore
from tests.s3_server import ISOLATED, Gate, S3Server, point_env_at, s3_bucket, s3_env, s3_gate, s3_server  # noqa: F401
from tests.stats_store.test_store import assert_same_stats, reference, shard_stats

META = RunMeta("cfg-1", {"model": "tiny", "params": 3}, dp=1, tp=1, device_kind="cpu")
# A refused connection fails after MAX_ATTEMPTS attempts with botocore's standard backoff (at most
# 1 s, then 2 s); measured 2.9-6.5 s here. The bound leaves room for a loaded machine.
GIVE_UP_S = 30.0


def flush(store: ZarrStatsStore, batches: list[int]) -> None:
    spec, m = shard_stats(0, batches, 0, 1, 1)
    store.commit(store.write_shard(spec, m, batches))


def one_line(err: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)
    return text


# ---- locations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "url", "scheme", "path"), [
    ("out/m", "out/m.zarr", "file", "out/m.zarr"),
    ("out/m.zarr", "out/m.zarr", "file", "out/m.zarr"),
    ("file:///data/out/m", "file:///data/out/m.zarr", "file", "/data/out/m.zarr"),
    ("file://localhost/data/m.zarr/", "file:///data/m.zarr", "file", "/data/m.zarr"),
    ("s3://bucket-1/dir/m", "s3://bucket-1/dir/m.zarr", "s3", "bucket-1/dir/m.zarr"),
    ("S3://bucket-1/m.zarr/", "s3://bucket-1/m.zarr", "s3", "bucket-1/m.zarr"),
])
def test_a_store_location_is_the_prefix_with_zarr_appended(value: str, url: str, scheme: str, path: str) -> None:
    loc = parse_location(value)
    assert (loc.url, loc.scheme, loc.path) == (url, scheme, path)
    assert parse_location(loc.url) == loc  # what shards receive (the URL) opens the same store


BAD_LOCATIONS = [
    ("gs://bucket-1/m", r"scheme gs:// is not supported; use a local path, file:///abs/path/prefix or s3://bucket/"),
    ("s3://bucket-1", r"names a bucket but no prefix inside it; use s3://bucket-1/dir/prefix"),
    ("s3://Bucket_1/m", r"'Bucket_1' is not a valid bucket name"),
    ("s3://bucket-1/a//m", r"empty, '\.' or '\.\.' path segments are not allowed"),
    ("s3://bucket-1/a/../m", r"empty, '\.' or '\.\.' path segments are not allowed"),
    ("s3://bucket-1/m?versionId=3", r"no \?query or #fragment"),
    ("file://otherhost/data/m", r"file URLs name this machine only"),
]


@pytest.mark.parametrize(("value", "match"), BAD_LOCATIONS)
def test_an_unsupported_location_is_refused_naming_it(value: str, match: str) -> None:
    with pytest.raises(StoreLocationError, match=match) as err:
        parse_location(value)
    one_line(err, repr(value))
    with pytest.raises(ConfigError, match=f"Fp8Config key 'dump_stats_path': store location .*{match}"):
        Fp8Config.from_dict({"dump_stats_path": value})
    assert main(["ls", value]) == 2  # the CLI: one line, status 2


def test_an_s3_dump_stats_path_loads_without_credentials_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    point_env_at(monkeypatch, {**ISOLATED, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})  # nothing listens
    assert Fp8Config.from_dict({"dump_stats_path": "s3://bucket-1/dir/m"}).dump_stats_path == "s3://bucket-1/dir/m"


# ---- endpoint and credentials from the environment ---------------------------------------------------
def test_objects_land_on_the_environments_endpoint_in_the_zarr_layout(s3_env: S3Server, s3_bucket: str) -> None:
    store = ZarrStatsStore.open_run(f"s3://{s3_bucket}/dir/m", META)
    flush(store, [0, 1])
    assert store.location == f"s3://{s3_bucket}/dir/m.zarr" and store.path is None
    assert not store.capabilities.path_based
    assert s3_env.keys(s3_bucket) == [f"dir/m.zarr/{k}" for k in (
        "_commits/shard-00000.json", "shards/shard-00000-slot-1/c/0", "shards/shard-00000-slot-1/zarr.json",
        "shards/zarr.json", "zarr.json")]


def test_a_profile_gives_the_endpoint_and_the_credentials(s3_server: S3Server, s3_bucket: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS_ENDPOINT_URL and no keys in the environment: ~/.aws-style files and AWS_PROFILE."""
    (tmp_path / "config").write_text(f"[profile stats]\nendpoint_url = {s3_server.endpoint}\n")
    (tmp_path / "credentials").write_text(f"[stats]\naws_access_key_id = {s3_server.access_key}\n"
                                          f"aws_secret_access_key = {s3_server.secret_key}\n")
    point_env_at(monkeypatch, {**ISOLATED, "AWS_CONFIG_FILE": str(tmp_path / "config"),
                               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_PROFILE": "stats"})
    flush(ZarrStatsStore.open_run(f"s3://{s3_bucket}/m", META), [0])
    assert_same_stats(ZarrStatsStore.open(f"s3://{s3_bucket}/m").merged(), reference(0, [0]))


def test_io_counts_are_the_same_traffic_on_local_disk_and_s3(s3_bucket: str, tmp_path: Path) -> None:
    """The figures benchmarks compare: the same requests and bytes wherever the store is."""
    counts = []
    for where in (str(tmp_path), f"s3://{s3_bucket}"):
        store = ZarrStatsStore.open_run(f"{where}/m", META)
        before = store.io_counts()
        flush(store, [0, 1])
        flush(store, [2])
        after = store.io_counts()
        counts.append((after.reads - before.reads, after.writes - before.writes,
                       after.bytes_read - before.bytes_read, after.bytes_written - before.bytes_written))
        assert after.seconds > before.seconds
    assert counts[0] == counts[1]
    chunk_bytes = 4 * sum(v.size for s in reference(0, [0]).modules.values() for v in s.tensors().values())
    assert counts[0][3] > 2 * chunk_bytes  # two chunks and two commit records at least


# ---- bad cases ---------------------------------------------------------------------------------------
def test_a_missing_bucket_is_one_line_naming_the_url_and_what_to_do(s3_env: S3Server,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = "s3://no-such-bucket-7/dir/m"
    for open_ in (lambda: ZarrStatsStore.open_run(url, META), lambda: ZarrStatsStore.open(url)):
        with pytest.raises(StoreNotFoundError) as err:
            open_()
        one_line(err, f"{url}.zarr: bucket 'no-such-bucket-7' does not exist at endpoint {s3_env.endpoint}",
                 "aws s3 mb s3://no-such-bucket-7")
    assert main(["reduce", url]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith(f"stats-store reduce: {url}.zarr: bucket") and err_text.count("\n") == 1


@pytest.mark.parametrize("wrong", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_wrong_credentials_are_one_line_and_lose_nothing(s3_bucket: str, wrong: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{s3_bucket}/m"
    flush(ZarrStatsStore.open_run(url, META), [0, 1])
    good = dict(os.environ)
    monkeypatch.setenv(wrong, "AKIAWRONGWRONGWRONG0")
    for open_ in (lambda: ZarrStatsStore.open(url), lambda: ZarrStatsStore.open_run(url, META)):
        with pytest.raises(StoreAccessError) as err:
            open_()
        one_line(err, f"{url}.zarr: endpoint", "refused the request", "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                 f"s3://{s3_bucket}")
        assert isinstance(err.value, PermissionError)
    monkeypatch.setenv(wrong, good[wrong])
    store = ZarrStatsStore.open(url)
    assert [r["run"] for r in store.runs()] == [0]  # the refused open_run changed nothing
    assert_same_stats(store.merged(), reference(0, [0, 1]))


def test_no_credentials_at_all_is_one_line(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    point_env_at(monkeypatch, {**ISOLATED, "AWS_ENDPOINT_URL": s3_server.endpoint})
    with pytest.raises(StoreAccessError) as err:
        ZarrStatsStore.open("s3://any-bucket/m")
    one_line(err, "s3://any-bucket/m.zarr: Unable to locate credentials", "AWS_PROFILE", "never come from the config")


def test_a_store_written_by_another_model_is_refused(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/m"
    flush(ZarrStatsStore.open_run(url, META), [0])
    with pytest.raises(RunMismatchError) as err:
        ZarrStatsStore.open(url, expect_fingerprint={"model": "other"})
    one_line(err, f"{url}.zarr holds statistics of another model", "point dump_stats_path at this model's store")
    other = RunMeta("cfg-1", {"model": "other"}, dp=1, tp=1, device_kind="cpu")
    with pytest.raises(RunMismatchError) as err:
        ZarrStatsStore.open_run(url, other)
    one_line(err, f"{url}.zarr holds statistics of another model fingerprint", "another dump_stats_path", "--overwrite")
    assert_same_stats(ZarrStatsStore.open(url).merged(), reference(0, [0]))


def _gone(gate: Gate, action: object) -> str:
    """Close the endpoint, run ``action``; it must fail with one line within GIVE_UP_S."""
    gate.close()
    start = time.monotonic()
    try:
        with pytest.raises(StoreUnreachableError) as err:
            action()  # type: ignore[operator]
    finally:
        gate.open()
    assert time.monotonic() - start < GIVE_UP_S
    assert isinstance(err.value, ConnectionError)
    return one_line(err, f"endpoint {gate.endpoint} did not answer", f"{MAX_ATTEMPTS} attempts",
                    "check AWS_ENDPOINT_URL", "rerun the same command")


def test_an_endpoint_gone_between_chunk_and_commit_leaves_the_last_commit_and_keeps_the_stats(
        s3_server: S3Server, s3_gate: Gate) -> None:
    url = f"s3://{s3_server.new_bucket()}/m"
    store = ZarrStatsStore.open_run(url, META)
    flush(store, [0, 1])
    spec, m = shard_stats(0, [2, 3], 0, 1, 1)
    pending = store.write_shard(spec, m, [2, 3])  # generation 2's chunk is written...
    assert f"{url}.zarr" in _gone(s3_gate, lambda: store.commit(pending))  # ...its commit is not
    assert store.commits()[0].generation == 1  # no half-visible commit: generation 1 whole
    assert_same_stats(ZarrStatsStore.open(url).merged(), reference(0, [0, 1]))
    store.commit(pending)  # the shard kept what it measured: retrying the commit publishes it
    assert_same_stats(store.reduce(), reference(0, [0, 1, 2, 3]))


def test_an_endpoint_gone_during_a_chunk_write_or_a_reduce_changes_nothing_committed(
        s3_server: S3Server, s3_gate: Gate) -> None:
    url = f"s3://{s3_server.new_bucket()}/m"
    store = ZarrStatsStore.open_run(url, META)
    flush(store, [0, 1])
    store.reduce()
    spec, m = shard_stats(0, [2], 0, 1, 1)
    _gone(s3_gate, lambda: store.write_shard(spec, m, [2]))
    _gone(s3_gate, store.reduce)
    _gone(s3_gate, lambda: ZarrStatsStore.open(url))
    assert store.commits()[0].generation == 1
    assert_same_stats(store.read_reduced(), reference(0, [0, 1]))
    flush(store, [2])  # the rerun redoes the batch
    assert_same_stats(store.reduce(), reference(0, [0, 1, 2]))
    np.testing.assert_array_equal(store.commits()[0].batch_ids, [0, 1, 2])
