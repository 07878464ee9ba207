"""Tokens per module (rows seen at inputs[0]) through commits and reduces, old stores without them,
and the selected-module inventory (modules selected whether or not data reached them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from stats_store.records import Measurement, ModuleStats
from orchestrator.entry.stats_store_cli import main
from stats_store.zarr_store import ZarrStatsStore
from stats_store.metadata import RunMeta
from stats_store.reshard import reshard
from stats_store.shard_map import ShardSpec
from stats_store.store import CommittedStore, MemoryStatsStore

E0, E1 = "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.1.gate_proj"


def _stats(tokens: dict[str, int], calls: int = 1) -> Measurement:
    one = np.array([1.0], np.float32)
    return Measurement(modules={n: ModuleStats(n, "linear", [one * (t + 1)], None, {}, calls, num_tokens=t)
                                for n, t in tokens.items()})


def _zarr(tmp_path: Path, meta: RunMeta) -> CommittedStore:
    return ZarrStatsStore.open_run(tmp_path / "s", meta)


def _memory(_tmp_path: Path, meta: RunMeta) -> CommittedStore:
    return MemoryStatsStore(meta)


@pytest.mark.parametrize("make", [_zarr, _memory], ids=["zarr", "memory"])
def test_tokens_add_over_dp_groups_and_flushes_and_take_the_max_within_a_tp_group(
        make: Callable[[Path, RunMeta], CommittedStore], tmp_path: Path) -> None:
    store = make(tmp_path, RunMeta("cfg", "fp", dp=2, tp=2))
    # dp group 0 (shards 0, 1) ran batch 0 then batch 2; group 1 (shards 2, 3) ran batch 1.
    # The tp ranks of a group see the same rows: 30 tokens reached E0 in batch 0, 7 in batch 2.
    for shard in (0, 1):
        store.commit(store.write_shard(ShardSpec(shard, 4, 2), _stats({E0: 30, E1: 2}), [0]))
        store.commit(store.write_shard(ShardSpec(shard, 4, 2), _stats({E0: 7}), [2]))
    for shard in (2, 3):
        store.commit(store.write_shard(ShardSpec(shard, 4, 2), _stats({E0: 11, E1: 5}), [1]))
    want = {E0: 30 + 7 + 11, E1: 2 + 5}
    assert store.read_shard(0).modules[E0].num_tokens == 37  # flushes add
    assert {n: s.num_tokens for n, s in store.merged().modules.items()} == want
    assert {n: s.num_tokens for n, s in store.reduce().modules.items()} == want
    assert {n: s.num_tokens for n, s in store.read_reduced().modules.items()} == want
    if isinstance(store, ZarrStatsStore):
        reopened = ZarrStatsStore.open(store.path)
        assert {n: s.num_tokens for n, s in reopened.read_reduced().modules.items()} == want


def test_tp_ranks_are_one_view_of_the_same_rows_not_added(tmp_path: Path) -> None:
    store = ZarrStatsStore.open_run(tmp_path / "tp", RunMeta("cfg", "fp", tp=4))
    for rank in range(4):
        store.commit(store.write_shard(ShardSpec(rank, 4, 4), _stats({E0: 96}), [0]))
    assert store.reduce().modules[E0].num_tokens == 96


def test_resharded_counts_reduce_back_to_the_same_tokens(tmp_path: Path) -> None:
    global_stats = _stats({E0: 40, E1: 9})
    store = ZarrStatsStore.open_run(tmp_path / "r", RunMeta("cfg", "fp", tp=2))
    for spec, m in reshard(global_stats, 2, {}):
        assert {n: s.num_tokens for n, s in m.modules.items()} == {E0: 40, E1: 9}
        store.commit(store.write_shard(spec, m, [0]))
    assert {n: s.num_tokens for n, s in store.reduce().modules.items()} == {E0: 40, E1: 9}


def test_a_store_written_before_tokens_were_counted_opens_with_zero_tokens(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = ZarrStatsStore.open_run(tmp_path / "old", RunMeta("cfg", "fp"))
    store.commit(store.write_shard(ShardSpec(0, 1), _stats({E0: 5, E1: 3}), [0]))
    store.reduce()
    # Make it what the code before this change wrote: no num_tokens in commit records, no array.
    for record in (store.path / "_commits").glob("shard-*.json"):
        doc = json.loads(record.read_text())
        for m in doc["modules"].values():
            del m["num_tokens"]
        record.write_text(json.dumps(doc))
    shutil.rmtree(store.path / "reduced" / "module_num_tokens")
    old = ZarrStatsStore.open(tmp_path / "old")
    assert old.reduced_is_current()
    assert {n: s.num_tokens for n, s in old.read_reduced().modules.items()} == {E0: 0, E1: 0}
    assert {n: s.num_tokens for n, s in old.merged().modules.items()} == {E0: 0, E1: 0}
    assert old.selected_modules() is None  # no inventory either
    assert main(["ls", str(tmp_path / "old"), "--json"]) == 0
    assert {m["name"]: m["num_tokens"] for m in json.loads(capsys.readouterr().out)["modules"]} == {E0: 0, E1: 0}
    # A new flush on top of the old record counts from 0.
    old.commit(old.write_shard(ShardSpec(0, 1), _stats({E0: 4}), [1]))
    assert old.reduce().modules[E0].num_tokens == 4


def test_ls_and_show_print_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ZarrStatsStore.open_run(tmp_path / "s", RunMeta("cfg", "fp"))
    store.commit(store.write_shard(ShardSpec(0, 1), _stats({E0: 12, E1: 0}), [0]))
    store.reduce()
    assert main(["ls", str(tmp_path / "s"), "--json"]) == 0
    assert {m["name"]: m["num_tokens"] for m in json.loads(capsys.readouterr().out)["modules"]} == {E0: 12, E1: 0}
    assert main(["show", str(tmp_path / "s"), E0, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_tokens"] == 12
    assert main(["ls", str(tmp_path / "s")]) == 0 and main(["show", str(tmp_path / "s"), E0]) == 0
    assert "12 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("make", [_zarr, _memory], ids=["zarr", "memory"])
def test_the_selected_inventory_is_the_union_of_what_was_recorded(
        make: Callable[[Path, RunMeta], CommittedStore], tmp_path: Path) -> None:
    store = make(tmp_path, RunMeta("cfg", "fp"))
    assert store.selected_modules() is None
    assert store.record_selected([E0, "lm_head"]) == [E0, "lm_head"]
    assert store.record_selected(["lm_head", E1]) == [E0, "lm_head", E1]  # a resumed run adds, never drops
    assert store.selected_modules() == [E0, "lm_head", E1]
    if isinstance(store, ZarrStatsStore):
        assert ZarrStatsStore.open(store.path).selected_modules() == [E0, "lm_head", E1]
        assert ZarrStatsStore.open_run(store.path, RunMeta("cfg", "fp")).selected_modules() == [E0, "lm_head", E1]
    empty = make(tmp_path / "e", RunMeta("cfg", "fp"))
    assert empty.record_selected([]) == [] and empty.selected_modules() == []
