"""Parameters are stored by data-parallel group 0 only (``stats_store.commit``): every dp group holds
the same weights, so the other groups' copies would only multiply the store's largest tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stats_store.metadata import RunMeta
from stats_store.records import Measurement, ModuleStats
from stats_store.shard_map import ShardSpec, channel_slice
from stats_store.store import CommittedStore, MemoryStatsStore
from stats_store.zarr_store import ZarrStatsStore

DP, TP, OUT = 3, 2, 6


def _weight(tp_rank: int) -> np.ndarray:
    """The per-output-channel weight max-abs of a tp rank's slice (the same in every dp group)."""
    sl = channel_slice(OUT, tp_rank, TP)
    return np.arange(sl.start, sl.stop, dtype=np.float32) + np.float32(0.25)


def _shard(k: int) -> tuple[ShardSpec, Measurement]:
    dp_rank, tp_rank = divmod(k, TP)
    sl = channel_slice(OUT, tp_rank, TP)
    x = np.float32([10.0 * dp_rank + tp_rank + 1])
    m = Measurement(num_samples=2, modules={"lin": ModuleStats("lin", "linear", [x], None, {"weight": _weight(tp_rank)}, 2)})
    return ShardSpec(k, DP * TP, TP, {("lin", "params.weight"): sl}), m


@pytest.fixture(params=["memory", "zarr"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CommittedStore:
    meta = RunMeta("cfg", "fp", dp=DP, tp=TP)
    return MemoryStatsStore(meta) if request.param == "memory" else ZarrStatsStore.open_run(tmp_path / "s", meta)


def test_only_dp_group_0_stores_parameters_and_the_reduce_is_unchanged(store: CommittedStore) -> None:
    for k in range(DP * TP):
        spec, m = _shard(k)
        store.commit(store.write_shard(spec, m, [k // TP * 2, k // TP * 2 + 1]))
    commits = store.commits()
    for k, rec in commits.items():
        labels = set(rec.modules["lin"].tensors)
        assert labels == ({"inputs.0", "params.weight"} if k < TP else {"inputs.0"}), k
        assert rec.size == (1 + OUT // TP if k < TP else 1)
    reduced = store.reduce().modules["lin"]
    np.testing.assert_array_equal(reduced.params["weight"], np.concatenate([_weight(r) for r in range(TP)]))
    assert reduced.inputs[0].tolist() == [10.0 * (DP - 1) + TP]  # inputs of every group still count
    assert reduced.num_samples == 2 * DP


def test_a_later_flush_of_group_0_keeps_its_parameters(store: CommittedStore) -> None:
    spec, m = _shard(0)
    store.commit(store.write_shard(spec, m, [0]))
    later = Measurement(num_samples=1, modules={"lin": ModuleStats("lin", "linear", [np.float32([99.0])], None, {}, 1)})
    store.commit(store.write_shard(spec, later, [1]))
    got = store.read_shard(0).modules["lin"]
    np.testing.assert_array_equal(got.params["weight"], _weight(0))
    assert got.inputs[0].tolist() == [99.0]
