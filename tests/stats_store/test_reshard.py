"""Re-sharding global statistics to other tp sizes, checked against the full tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stats_store.records import Measurement, ModuleStats
from stats_store.zarr_store import ZarrStatsStore
from stats_store.metadata import RunMeta
from stats_store.reshard import SplitRule, reshard, split_rules_from_commits
from stats_store.shard_map import ChannelSlice, channel_slice
from stats_store.store import MemoryStatsStore
from stats_store.errors import ReshardError
from tests.stats_store.test_store import LINEARS, assert_same_stats, reference, write_all

BATCHES = list(range(5))


@pytest.mark.parametrize(
    ("length", "world", "granule", "expected"),
    [
        (8, 2, 1, [(0, 4), (4, 8)]),
        (6, 4, 1, [(0, 1), (1, 3), (3, 4), (4, 6)]),  # non-divisor: floor(r*6/4)
        (12, 2, 3, [(0, 6), (6, 12)]),  # whole heads of 3
        (12, 3, 4, [(0, 4), (4, 8), (8, 12)]),
        (15, 2, 3, [(0, 6), (6, 15)]),  # 5 heads over 2 ranks: 2 and 3
    ],
)
def test_channel_slice_rule(length: int, world: int, granule: int, expected: list[tuple[int, int]]) -> None:
    got = [channel_slice(length, r, world, granule) for r in range(world)]
    assert [(s.start, s.stop) for s in got] == expected
    assert all(s.global_len == length for s in got)
    # The slices tile the axis exactly, in order.
    assert np.concatenate([np.arange(length)[s.start : s.stop] for s in got]).tolist() == list(range(length))


@pytest.mark.parametrize(
    ("length", "world", "granule", "match"),
    [
        (6, 8, 1, r"6 unit\(s\) of 1 channel\(s\) cannot be split over tp=8; use tp <= 6"),
        (6, 2, 4, "6 channels are not whole units of 4"),
        (12, 4, 6, r"2 unit\(s\) of 6 channel\(s\) cannot be split over tp=4"),
    ],
)
def test_channel_slice_refuses_shapes_that_do_not_split(length: int, world: int, granule: int, match: str) -> None:
    with pytest.raises(ReshardError, match="^q_proj outputs.0: " + match):
        channel_slice(length, 0, world, granule, what="q_proj outputs.0")


def _tp_store(tp: int, shards: list) -> MemoryStatsStore:  # type: ignore[type-arg]
    store = MemoryStatsStore(RunMeta("c", "f", tp=tp))
    for spec, stats in shards:
        store.commit(store.write_shard(spec, stats, BATCHES))
    return store


def test_tp4_to_tp2_to_tp1_equals_the_tp1_measurement(tmp_path: Path) -> None:
    measured = ZarrStatsStore.open_run(tmp_path / "tp4", RunMeta("c", "f", tp=4))
    write_all(measured, 5, BATCHES, 1, 4)
    split = split_rules_from_commits(measured.commits())
    assert split[(LINEARS[0][0], "outputs.0")] == SplitRule()
    assert (LINEARS[0][0], "inputs.0") not in split  # replicated per-channel input
    tp2 = _tp_store(2, reshard(measured.reduce(), 2, split))
    tp1 = reshard(tp2.reduce(), 1, split)
    assert len(tp1) == 1 and set(tp1[0][0].slices) == set(split)
    assert all(sl == ChannelSlice(0, sl.global_len, sl.global_len) for sl in tp1[0][0].slices.values())
    assert_same_stats(tp1[0][1], reference(5, BATCHES))


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_each_rank_gets_its_slice_of_split_channels_and_global_per_tensor_values(tp: int) -> None:
    full = reference(6, BATCHES)
    split = {(name, lb): SplitRule() for name, _, _ in LINEARS for lb in ("params.weight", "outputs.0")}
    shards = reshard(full, tp, split)
    assert [s.index for s, _ in shards] == list(range(tp))
    for spec, stats in shards:
        for name, out_f, _ in LINEARS:
            lo, hi = spec.tp_rank * out_f // tp, (spec.tp_rank + 1) * out_f // tp
            np.testing.assert_array_equal(stats.modules[name].params["weight"], full.modules[name].params["weight"][lo:hi])
            np.testing.assert_array_equal(stats.modules[name].inputs[0], full.modules[name].inputs[0])
        for name, m in full.modules.items():
            assert stats.modules[name].num_samples == m.num_samples


def test_resharded_shards_reduce_back_to_the_global_stats_with_dp() -> None:
    full = reference(7, BATCHES)
    split = {(LINEARS[1][0], "outputs.0"): SplitRule(granule=2)}
    shards = reshard(full, 2, split, dp=2)
    assert [(s.dp_rank, s.tp_rank) for s, _ in shards] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    store = MemoryStatsStore(RunMeta("c", "f", dp=2, tp=2))
    for spec, stats in shards:
        store.commit(store.write_shard(spec, stats, [spec.dp_rank]))
    reduced = store.reduce()
    for name, m in full.modules.items():
        for label, value in m.tensors().items():
            np.testing.assert_array_equal(reduced.modules[name].tensors()[label], value)


def test_a_split_tensor_that_cannot_be_cut_is_refused() -> None:
    full = Measurement(modules={"lm_head": ModuleStats("lm_head", "linear", [np.ones(3, np.float32)])})
    with pytest.raises(ReshardError, match=r"lm_head inputs.0: 3 unit\(s\) .* tp=4"):
        reshard(full, 4, lambda module, label: SplitRule())


def test_a_callable_split_rule_is_asked_per_tensor() -> None:
    full = reference(1, [0])
    asked: list[tuple[str, str]] = []

    def rule(module: str, label: str) -> SplitRule | None:
        asked.append((module, label))
        return None

    (spec, stats), = reshard(full, 1, rule)
    assert spec.slices == {}
    assert set(asked) == {(n, lb) for n, m in full.modules.items() for lb, v in m.tensors().items() if v.size > 1}
    assert_same_stats(stats, full)
