"""The stats store: one conformance class run against every implementation, then zarr-only
behaviour (run identity, format checks, two OS processes, a shard killed before its commit).
The zarr store runs both in a local directory and on a real S3-protocol server (moto on
127.0.0.1, ``tests.s3_server``): the ``where`` fixture gives the root of either.

Reference values come from full (tp=1) tensors computed here with numpy; shards see slices of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zarr

from stats_store.records import Measurement, ModuleStats
from stats_store.location import parse_location
from stats_store.store_io import open_io
from stats_store.zarr_store import ZarrStatsStore, store_path
from stats_store.metadata import FORMAT_VERSION, RunMeta
from stats_store.shard_map import ShardSpec, channel_slice
from stats_store.store import CommittedStore, MemoryStatsStore
from stats_store.errors import (
    DuplicateBatchError,
    RunMismatchError,
    ShardSpecError,
    StaleReducedError,
    StoreFormatError,
    StoreNotFoundError,
    TornWriteError,
)
from tests.s3_server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# (name, out_features, in_features): out 6 does not divide by tp=4 (shards of 1, 2, 1, 2 channels).
LINEARS = (("model.layers.0.mlp.up_proj", 6, 4), ("model.layers.0.mlp.down_proj", 4, 6))
MATMUL = "model.layers.0.self_attn.matmul_qk"


def _batch(seed: int, batch: int, in_features: int) -> np.ndarray:
    return np.random.default_rng([seed, batch, in_features]).normal(0, 3, (3, in_features)).astype(np.float32)


def _weight(seed: int, out_f: int, in_f: int) -> np.ndarray:
    return np.random.default_rng([seed, out_f, in_f, 7]).normal(0, 1, (out_f, in_f)).astype(np.float32)


def shard_stats(seed: int, batches: list[int], index: int, dp: int, tp: int) -> tuple[ShardSpec, Measurement]:
    """What shard ``index`` of a dp x tp run measures over ``batches`` (its dp group's share).

    Linears are column-parallel: the weight's and the output's channels are split, the
    per-channel input is replicated. The matmul's per-tensor inputs are replicated.
    """
    tp_rank = index % tp
    mine = [b for b in batches if b % dp == index // tp]
    slices = {}
    m = Measurement(num_samples=len(mine))
    for name, out_f, in_f in LINEARS:
        sl = channel_slice(out_f, tp_rank, tp)
        slices[(name, "params.weight")] = slices[(name, "outputs.0")] = sl
        w = _weight(seed, out_f, in_f)
        xs = [_batch(seed, b, in_f) for b in mine]
        ins = np.max([np.abs(x).max(axis=0) for x in xs], axis=0) if xs else None
        outs = np.max([np.abs(x @ w.T)[:, sl.start : sl.stop].max(axis=0) for x in xs], axis=0) if xs else None
        m.modules[name] = ModuleStats(
            name, "linear", [ins], [outs] if outs is not None else None,
            {"weight": np.abs(w[sl.start : sl.stop]).max(axis=1)}, len(mine),
        )
    if mine:
        a = np.max([np.abs(_batch(seed, b, 5)).max() for b in mine])
        b_ = np.max([np.abs(_batch(seed, b, 2)).max() for b in mine])
        m.modules[MATMUL] = ModuleStats(MATMUL, "matmul", [np.array([a]), np.array([b_])], None, {}, len(mine),
                                        {"inputs.0": 1} if tp_rank == 0 else {})
    return ShardSpec(index, dp * tp, tp, slices), m


def reference(seed: int, batches: list[int]) -> Measurement:
    """The tp=1, dp=1 measurement of the same batches, from the full tensors."""
    return shard_stats(seed, batches, 0, 1, 1)[1]


def assert_same_stats(got: Measurement, want: Measurement) -> None:
    assert set(got.modules) == set(want.modules)
    for name, w in want.modules.items():
        g = got.modules[name]
        assert g.op_type == w.op_type and g.num_samples == w.num_samples, name
        assert set(g.tensors()) == set(w.tensors()), name
        for label, value in w.tensors().items():
            np.testing.assert_array_equal(g.tensors()[label], value, err_msg=f"{name} {label}")


def write_all(store: CommittedStore, seed: int, batches: list[int], dp: int, tp: int) -> None:
    for k in range(dp * tp):
        spec, m = shard_stats(seed, batches, k, dp, tp)
        store.commit(store.write_shard(spec, m, [b for b in batches if b % dp == k // tp]))


class StoreConformance:
    """Behaviour every ``StatsStore`` implementation must have."""

    make: Callable[..., CommittedStore]

    @pytest.fixture
    def new_store(self, tmp_path: Path) -> Callable[..., CommittedStore]:
        def make(dp: int = 1, tp: int = 1) -> CommittedStore:
            return self.make(tmp_path, RunMeta("cfg-1", {"model": "tiny", "params": 3}, dp=dp, tp=tp))

        return make

    @pytest.mark.parametrize(("dp", "tp"), [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)])
    def test_reduced_equals_the_one_card_measurement(self, new_store, dp: int, tp: int) -> None:
        store = new_store(dp, tp)
        write_all(store, 0, list(range(6)), dp, tp)
        reduced = store.reduce()
        assert_same_stats(reduced, reference(0, list(range(6))))
        assert reduced.num_samples == 6
        assert reduced.modules[MATMUL].nonfinite == {"inputs.0": dp}  # one tp group counts once
        assert_same_stats(store.read_reduced(), reduced)

    def test_written_but_uncommitted_shard_is_invisible(self, new_store) -> None:
        store = new_store(1, 2)
        spec0, m0 = shard_stats(0, [0, 1], 0, 1, 2)
        spec1, m1 = shard_stats(0, [0, 1], 1, 1, 2)
        store.commit(store.write_shard(spec0, m0, [0, 1]))
        store.write_shard(spec1, m1, [0, 1])  # no commit: a crash here
        assert set(store.commits()) == {0}
        reduced = store.reduce()
        w = reduced.modules[LINEARS[0][0]].params["weight"]
        sl = spec0.slices[(LINEARS[0][0], "params.weight")]
        np.testing.assert_array_equal(w[sl.start : sl.stop], m0.modules[LINEARS[0][0]].params["weight"])
        assert np.isnan(w[sl.stop :]).all()

    def test_streaming_flushes_only_raise_values_and_add_counts(self, new_store) -> None:
        store = new_store()
        for part in ([0, 1], [2, 3], [4]):
            spec, m = shard_stats(0, part, 0, 1, 1)
            store.commit(store.write_shard(spec, m, part))
        assert store.commits()[0].generation == 3
        assert store.commits()[0].batch_ids == (0, 1, 2, 3, 4)
        assert_same_stats(store.reduce(), reference(0, [0, 1, 2, 3, 4]))

    def test_a_module_first_seen_in_a_later_flush_joins_the_shards_chunk(self, new_store) -> None:
        store = new_store()
        spec, m = shard_stats(0, [0, 1], 0, 1, 1)
        early = Measurement(modules={LINEARS[0][0]: m.modules[LINEARS[0][0]]}, num_samples=2)
        store.commit(store.write_shard(spec, early, [0, 1]))
        spec, m2 = shard_stats(0, [2], 0, 1, 1)
        store.commit(store.write_shard(spec, m2, [2]))  # adds down_proj and the matmul
        want, late = reference(0, [0, 1, 2]), reference(0, [2])
        for name in (LINEARS[1][0], MATMUL):  # measured in batch 2 only
            want.modules[name] = late.modules[name]
        reduced = store.reduce()
        assert_same_stats(reduced, want)
        assert reduced.num_samples == 3

    def test_a_retried_flush_changes_nothing(self, new_store) -> None:
        store = new_store()
        spec, m = shard_stats(0, [0, 1], 0, 1, 1)
        store.commit(store.write_shard(spec, m, [0, 1]))
        pending = store.write_shard(spec, m, [1, 0])
        assert pending.noop and store.commit(pending).generation == 1
        assert_same_stats(store.reduce(), reference(0, [0, 1]))

    def test_a_flush_repeating_some_batches_is_refused(self, new_store) -> None:
        store = new_store()
        spec, m = shard_stats(0, [0, 1], 0, 1, 1)
        store.commit(store.write_shard(spec, m, [0, 1]))
        with pytest.raises(DuplicateBatchError, match=r"shard 0: batches \[1\] were committed before"):
            store.write_shard(spec, m, [1, 2])

    def test_reduce_is_idempotent(self, new_store) -> None:
        store = new_store(2, 2)
        write_all(store, 1, list(range(4)), 2, 2)
        first = store.reduce()
        assert_same_stats(store.reduce(), first)
        assert_same_stats(store.read_reduced(), first)

    def test_read_reduced_refuses_stale_arrays(self, new_store) -> None:
        store = new_store()
        with pytest.raises(StaleReducedError, match="run `stats-store reduce"):
            store.read_reduced()
        spec, m = shard_stats(0, [0], 0, 1, 1)
        store.commit(store.write_shard(spec, m, [0]))
        store.reduce()
        spec, m = shard_stats(0, [1], 0, 1, 1)
        store.commit(store.write_shard(spec, m, [1]))
        assert not store.reduced_is_current()  # type: ignore[attr-defined]
        with pytest.raises(StaleReducedError, match="shard generations"):
            store.read_reduced()

    def test_interrupted_second_flush_leaves_the_first_visible(self, new_store) -> None:
        store = new_store()
        spec, m = shard_stats(0, [0, 1], 0, 1, 1)
        store.commit(store.write_shard(spec, m, [0, 1]))
        spec, m2 = shard_stats(0, [2, 3], 0, 1, 1)
        store.write_shard(spec, m2, [2, 3])  # generation 2 written, never committed
        assert_same_stats(store.reduce(), reference(0, [0, 1]))
        store.commit(store.write_shard(spec, m2, [2, 3]))  # the restarted shard redoes it
        assert_same_stats(store.reduce(), reference(0, [0, 1, 2, 3]))

    def test_a_committed_chunk_changed_afterwards_is_detected(self, new_store) -> None:
        store = new_store()
        spec, m = shard_stats(0, [0], 0, 1, 1)
        rec = store.commit(store.write_shard(spec, m, [0]))
        self.damage(store, MATMUL, "inputs.1", 0, rec.slot)
        with pytest.raises(TornWriteError, match=rf"shard 0 chunk of {MATMUL} inputs.1 \(generation 1\)"):
            store.reduce()

    def test_damaged_reduced_values_are_refused_not_read(self, new_store) -> None:
        store = new_store()
        spec, m = shard_stats(0, [0], 0, 1, 1)
        store.commit(store.write_shard(spec, m, [0]))
        store.reduce()
        self.damage_reduced(store)
        with pytest.raises(TornWriteError, match="reduced statistics do not match their checksum.*stats-store reduce"):
            store.read_reduced()
        store.reduce()  # rebuilding from the committed shards repairs it
        assert_same_stats(store.read_reduced(), reference(0, [0]))

    def test_a_shard_of_another_topology_is_refused(self, new_store) -> None:
        store = new_store(1, 2)
        spec, m = shard_stats(0, [0], 0, 1, 4)
        with pytest.raises(ShardSpecError, match="num_shards=4, tp=4 does not match the run's dp=1, tp=2"):
            store.write_shard(spec, m, [0])

    def test_read_shard_gives_local_or_global_coordinates(self, new_store) -> None:
        store = new_store(1, 4)
        write_all(store, 2, [0, 1], 1, 4)
        spec, want = shard_stats(2, [0, 1], 3, 1, 4)
        assert_same_stats(store.read_shard(3), want)
        name = LINEARS[0][0]
        glob = store.read_shard(3, local=False).modules[name].params["weight"]
        sl = spec.slices[(name, "params.weight")]
        assert glob.shape == (6,) and np.isnan(glob[: sl.start]).all()

    def damage(self, store: CommittedStore, module: str, label: str, shard: int, slot: int) -> None:
        raise NotImplementedError

    def damage_reduced(self, store: CommittedStore) -> None:
        raise NotImplementedError


class TestMemoryStore(StoreConformance):
    @staticmethod
    def make(tmp_path: Path, meta: RunMeta) -> CommittedStore:
        return MemoryStatsStore(meta)

    def damage(self, store, module, label, shard, slot):  # type: ignore[no-untyped-def]
        t = store.commits()[shard].modules[module].tensors[label]
        store._chunks[(shard, slot)][t.offset : t.offset + t.length] += 1  # type: ignore[attr-defined]

    def damage_reduced(self, store):  # type: ignore[no-untyped-def]
        store._reduced[0].values[0] += 1  # type: ignore[attr-defined]


def zarr_root(location: str) -> zarr.Group:
    """The store's root group, opened with plain zarr through the location's own zarr store."""
    return zarr.open_group(open_io(parse_location(location)).zarr_store(), mode="r+", use_consolidated=False)


class TestZarrStore(StoreConformance):
    @staticmethod
    def make(tmp_path: Path, meta: RunMeta) -> CommittedStore:
        return ZarrStatsStore.open_run(tmp_path / "out" / "measure", meta)

    def damage(self, store, module, label, shard, slot):  # type: ignore[no-untyped-def]
        t = store.commits()[shard].modules[module].tensors[label]
        arr = zarr_root(store.location)[f"shards/shard-{shard:05d}-slot-{slot}"]
        arr[t.offset : t.offset + t.length] = arr[t.offset : t.offset + t.length] + 1

    def damage_reduced(self, store):  # type: ignore[no-untyped-def]
        arr = zarr_root(store.location)["reduced/values"]
        arr[0] = arr[0] + 1


class TestS3ZarrStore(TestZarrStore):
    """The same behaviour with the store under an s3:// prefix of a fresh bucket."""

    @pytest.fixture(autouse=True)
    def _bucket(self, s3_bucket: str) -> None:  # noqa: F811
        self.bucket = s3_bucket

    def make(self, tmp_path: Path, meta: RunMeta) -> CommittedStore:  # type: ignore[override]
        return ZarrStatsStore.open_run(f"s3://{self.bucket}/out/measure", meta)


# ---- zarr only: run identity and format ----------------------------------------------------------
META = RunMeta("cfg-1", {"model": "tiny", "params": 3}, dp=1, tp=2, device_kind="cpu")


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The root the store goes under: a local directory, or a fresh bucket on the S3 test server."""
    return str(tmp_path) if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"


def test_store_path_appends_zarr_to_the_prefix(tmp_path: Path) -> None:
    assert store_path(tmp_path / "out" / "measure") == tmp_path / "out" / "measure.zarr"
    assert store_path("stats") == Path("stats.zarr")
    assert store_path(tmp_path / "x.zarr") == tmp_path / "x.zarr"


def test_layout_is_plain_zarr_with_metadata_and_consolidation(where: str) -> None:
    store = ZarrStatsStore.open_run(f"{where}/m", META)
    write_all(store, 0, [0, 1], 1, 2)
    reduced = store.reduce()
    root = zarr.open_group(open_io(parse_location(f"{where}/m")).zarr_store(), mode="r", use_consolidated=True)
    attrs = root.attrs.asdict()
    assert attrs["format_version"] == 2 and attrs["topology"] == {"dp": 1, "tp": 2}
    assert attrs["model_fingerprint"] == {"model": "tiny", "params": 3} and attrs["config_hash"] == "cfg-1"
    assert root["reduced"].attrs["shards"] == {"0": {"num_samples": 2, "batches_done": 2},
                                                "1": {"num_samples": 2, "batches_done": 2}}
    record = json.loads(open_io(parse_location(f"{where}/m")).read("_commits/shard-00001.json") or b"")
    weight = record["modules"][LINEARS[0][0]]["tensors"]["params.weight"]
    assert weight["slice"] == [3, 6, 6]
    # Shard 1's chunk: one array, one chunk, its own 3 weight channels at the recorded offset.
    chunk = root["shards/shard-00001-slot-1"]
    assert chunk.shape == (record["size"],) and chunk.chunks == chunk.shape
    w = _weight(0, 6, 4)
    np.testing.assert_array_equal(chunk[weight["offset"] : weight["offset"] + 3], np.abs(w[3:]).max(axis=1))
    # The reduced index, read with plain zarr, locates every module's global tensors in `values`.
    values = root["reduced/values"][...]
    names = list(root["reduced/module_name"][...])
    assert names == list(reduced.modules)
    labels, index = root["reduced/tensor_label"][...], root["reduced/tensor_index"][...]
    for label, (row, offset, length) in zip(labels, index):
        want = reduced.modules[names[row]].tensors()[str(label)]
        np.testing.assert_array_equal(values[offset : offset + length], want)
    assert sorted(map(tuple, index[:, 1:])) == sorted(
        (off, n) for off, n in zip(np.cumsum([0, *index[:-1, 2]]), index[:, 2]))  # back to back, no gap


def test_reopening_the_same_run_resumes_it(where: str) -> None:
    store = ZarrStatsStore.open_run(f"{where}/m", META)
    spec, m = shard_stats(0, [0], 0, 1, 2)
    store.commit(store.write_shard(spec, m, [0]))
    again = ZarrStatsStore.open_run(f"{where}/m", META)
    assert [r["run"] for r in again.runs()] == [0, 1]
    assert again.commits()[0].batch_ids == (0,)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_fingerprint": {"model": "other"}}, "another model fingerprint"),
        ({"config_hash": "cfg-2"}, "config_hash='cfg-1', this run has 'cfg-2'"),
        ({"tp": 4}, "tp=2, this run has 4"),
    ],
)
def test_a_different_run_at_the_same_path_is_refused(where: str, change: dict, match: str) -> None:
    ZarrStatsStore.open_run(f"{where}/m", META)
    other = RunMeta(**{**META.__dict__, **change})
    with pytest.raises(RunMismatchError, match=match) as err:
        ZarrStatsStore.open_run(f"{where}/m", other)
    assert "another dump_stats_path" in str(err.value) and "--overwrite" in str(err.value)
    assert f"{where}/m.zarr" in str(err.value)


def test_overwrite_replaces_only_a_stats_store(where: str) -> None:
    ZarrStatsStore.open_run(f"{where}/m", META)
    other = RunMeta("cfg-9", "fp-9")
    assert ZarrStatsStore.open_run(f"{where}/m", other, overwrite=True).meta == other
    zarr.open_group(open_io(parse_location(f"{where}/foreign")).zarr_store(), mode="w")
    with pytest.raises(StoreFormatError, match="not a stats store; refusing to overwrite"):
        ZarrStatsStore.open_run(f"{where}/foreign", META, overwrite=True)


def test_open_checks_presence_format_version_and_fingerprint(where: str) -> None:
    with pytest.raises(StoreNotFoundError, match=r"no stats store at .*nothing\.zarr") as err:
        ZarrStatsStore.open(f"{where}/nothing")
    assert isinstance(err.value, FileNotFoundError)
    ZarrStatsStore.open_run(f"{where}/m", META)
    with pytest.raises(RunMismatchError, match="another model"):
        ZarrStatsStore.open(f"{where}/m", expect_fingerprint={"model": "other"})
    assert ZarrStatsStore.open(f"{where}/m", expect_fingerprint={"params": 3, "model": "tiny"}).meta == META
    zarr_root(f"{where}/m").attrs["format_version"] = 99
    with pytest.raises(StoreFormatError, match=f"format version 99, this code reads version {FORMAT_VERSION}"):
        ZarrStatsStore.open(f"{where}/m")


def test_check_fingerprint_on_an_open_store(where: str) -> None:
    store = ZarrStatsStore.open_run(f"{where}/m", META)
    store.check_fingerprint({"params": 3, "model": "tiny"})  # key order does not matter
    with pytest.raises(RunMismatchError, match=r"holds statistics of another model .*expected \{\"model\":\"other\"\}"):
        ZarrStatsStore.open(f"{where}/m").check_fingerprint({"model": "other"})


def test_read_tree_gives_every_object_under_a_prefix_by_its_key(where: str) -> None:
    store = ZarrStatsStore.open_run(f"{where}/m", RunMeta("cfg-1", "fp", dp=1, tp=1))
    spec, m = shard_stats(0, [0], 0, 1, 1)
    store.commit(store.write_shard(spec, m, [0]))
    store.reduce()
    io = open_io(parse_location(f"{where}/m"))
    tree = io.read_tree("reduced")
    assert {"reduced/zarr.json", "reduced/values/zarr.json", "reduced/module_name/zarr.json"} <= set(tree)
    assert all(k.startswith("reduced/") for k in tree)
    assert tree["reduced/zarr.json"] == io.read("reduced/zarr.json")
    assert io.read_tree("nothing") == {}


@pytest.mark.parametrize("array", ["tensor_index", "values", "module_name"])
def test_a_missing_reduced_array_is_named_with_what_to_do(where: str, array: str) -> None:
    store = ZarrStatsStore.open_run(f"{where}/m", RunMeta("cfg-1", "fp", dp=1, tp=1))
    spec, m = shard_stats(0, [0], 0, 1, 1)
    store.commit(store.write_shard(spec, m, [0]))
    store.reduce()
    del zarr_root(f"{where}/m")["reduced"][array]  # the summary still names the latest commits
    with pytest.raises(TornWriteError, match=r"reduced statistics of the latest commits are incomplete.*stats-store reduce"):
        ZarrStatsStore.open(f"{where}/m").read_reduced()
    store.reduce()
    assert_same_stats(ZarrStatsStore.open(f"{where}/m").read_reduced(), reference(0, [0]))


def test_a_format_1_store_is_refused_with_what_to_do(where: str) -> None:
    ZarrStatsStore.open_run(f"{where}/m", META)
    zarr_root(f"{where}/m").attrs["format_version"] = 1  # the group-per-module layout
    with pytest.raises(StoreFormatError, match="format version 1, .*measure again into another dump_stats_path"):
        ZarrStatsStore.open_run(f"{where}/m", META)


@pytest.mark.parametrize("name", ["a/b", "__x", "..", "model.layers.0.mlp.experts.7.w1 (fused)"])
def test_any_module_name_round_trips(where: str, name: str) -> None:
    """Module names are index entries, not zarr node names: '/' or dots need no escaping."""
    store = ZarrStatsStore.open_run(f"{where}/m", RunMeta("c", "f"))
    m = Measurement(modules={name: ModuleStats(name, "linear", [np.array([1.5], np.float32)])})
    store.commit(store.write_shard(ShardSpec(0, 1), m, [0]))
    store.reduce()
    again = ZarrStatsStore.open(f"{where}/m").read_reduced()
    assert list(again.modules) == [name] and again.modules[name].inputs[0].tolist() == [1.5]


# ---- zarr only: other OS processes ------------------------------------------------------------------
WRITER = """
import os, sys
from stats_store.zarr_store import ZarrStatsStore
from tests.stats_store.test_store import shard_stats
path, index, dp, tp, die = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
batches = list(range(8))
store = ZarrStatsStore.open(path)
for part in (batches[:4], batches[4:]):  # two streaming flushes
    spec, m = shard_stats(3, part, index, dp, tp)
    pending = store.write_shard(spec, m, [b for b in part if b % dp == index // tp])
    if die:
        os._exit(17)  # killed between the chunk write and the commit
    store.commit(pending)
"""


def _spawn(path: Path | str, index: int, dp: int, tp: int, die: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(index), str(dp), str(tp), "1" if die else "0"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen) -> int:
    """Wait for a writer, closing its pipes; show its stderr when it failed unexpectedly."""
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, 17):
        print(err)
    return proc.returncode


def test_two_processes_write_shards_concurrently(where: str) -> None:
    ZarrStatsStore.open_run(f"{where}/m", RunMeta("c", "f", dp=1, tp=2))
    procs = [_spawn(f"{where}/m.zarr", k, 1, 2) for k in range(2)]  # the environment names the endpoint
    assert [_finish(p) for p in procs] == [0, 0]
    assert_same_stats(ZarrStatsStore.open(f"{where}/m").reduce(), reference(3, list(range(8))))


def test_a_shard_killed_before_its_commit_leaves_nothing_and_reruns_cleanly(where: str) -> None:
    ZarrStatsStore.open_run(f"{where}/m", RunMeta("c", "f", dp=2, tp=1))
    first = _spawn(f"{where}/m.zarr", 0, 2, 1)
    killed = _spawn(f"{where}/m.zarr", 1, 2, 1, die=True)
    assert _finish(first) == 0 and _finish(killed) == 17
    store = ZarrStatsStore.open(f"{where}/m")
    assert set(store.commits()) == {0}
    only_first = reference(3, [0, 2, 4, 6])  # dp group 0's batches
    assert_same_stats(store.reduce(), only_first)
    assert _finish(_spawn(f"{where}/m.zarr", 1, 2, 1)) == 0
    assert_same_stats(store.reduce(), reference(3, list(range(8))))
