"""The merge declarations and the reduction over shards, against explicit loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stats_store.reduce import MERGES, get_merge, reduce_count, reduce_over_shards
from stats_store.errors import UnknownMergeError

values = st.lists(
    st.one_of(st.just(float("nan")), st.floats(0, 1e6, allow_nan=False, width=32)), min_size=3, max_size=3
)


def _brute_max(rows: dict[int, list[float]]) -> list[float]:
    out = []
    for j in range(3):
        present = [r[j] for r in rows.values() if not np.isnan(r[j])]
        out.append(max(present) if present else float("nan"))
    return out


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 7), values, min_size=1, max_size=8), st.sampled_from([1, 2, 4]))
def test_max_is_elementwise_max_of_present_values(rows: dict[int, list[float]], tp: int) -> None:
    got = reduce_over_shards({k: np.array(v, np.float32) for k, v in rows.items()}, MERGES["max"], tp)
    np.testing.assert_array_equal(got, np.array(_brute_max(rows), np.float32))


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, 7), values, min_size=1, max_size=8))
def test_max_ignores_order_and_repetition(rows: dict[int, list[float]]) -> None:
    arrays = {k: np.array(v, np.float32) for k, v in rows.items()}
    once = reduce_over_shards(arrays, MERGES["max"], 1)
    shuffled = dict(reversed(list(arrays.items())))
    twice = reduce_over_shards({**{k + 8: v for k, v in arrays.items()}, **shuffled}, MERGES["max"], 1)
    np.testing.assert_array_equal(once, twice)


def test_sum_adds_present_values_and_keeps_nan_where_none() -> None:
    rows = {0: np.array([1, np.nan, np.nan], np.float32), 1: np.array([2, 3, np.nan], np.float32)}
    np.testing.assert_array_equal(reduce_over_shards(rows, MERGES["sum"], 1), [3, 3, np.nan])


@pytest.mark.parametrize(
    ("counts", "tp", "expected"),
    [
        ({0: 5}, 1, 5),
        ({0: 5, 1: 7}, 1, 12),  # two data-parallel groups: different batches add
        ({0: 5, 1: 5}, 2, 5),  # one tp group: the same batches are counted once
        ({0: 4, 1: 4, 2: 6, 3: 6}, 2, 10),  # dp=2 x tp=2
        ({1: 3, 3: 2}, 2, 5),  # only some ranks committed
    ],
)
def test_counts_max_within_tp_group_and_sum_over_groups(counts: dict[int, int], tp: int, expected: int) -> None:
    assert reduce_count(counts, tp) == expected


def test_unknown_merge_lists_the_known_ones() -> None:
    with pytest.raises(UnknownMergeError, match=r"layer0 inputs\.0: unknown merge 'mean'.*max, sum, count"):
        get_merge("mean", "layer0 inputs.0")


# ---- the packed reducer (stats_store.shard_reduce) against brute force over global rows -------------
def _packed_run(seed: int, dp: int, tp: int, merge: str):  # type: ignore[no-untyped-def]
    """Commits and chunks of a dp x tp run (random values, NaNs, a split and a replicated tensor,
    a module only some shards hold) and, per (module, label), each storing shard's global row."""
    from stats_store.records import Measurement, ModuleStats
    from stats_store.commit import build_flush
    from stats_store.shard_map import ShardSpec, channel_slice

    rng = np.random.default_rng(seed)
    commits, chunks, rows = {}, {}, {}
    for k in range(dp * tp):
        sl = channel_slice(7, k % tp, tp)
        w = rng.random(sl.size).astype(np.float32)
        x = rng.random(5).astype(np.float32)
        x[rng.random(5) < 0.3] = np.nan
        m = Measurement(modules={"a": ModuleStats("a", "linear", [x], None, {"weight": w}, 1)})
        if k % 2:
            m.modules["b"] = ModuleStats("b", "matmul", [np.float32([k + 0.5]), np.float32([np.nan])], None, {}, 1)
        spec = ShardSpec(k, dp * tp, tp, {("a", "params.weight"): sl})
        chunks[k], pending = build_flush(None, spec, m, [k], lambda: np.zeros(0, np.float32),
                                         {"inputs.0": merge, "params.weight": merge, "inputs.1": merge})
        commits[k] = pending.record
        full_w = np.full(7, np.nan, np.float32)
        full_w[sl.start : sl.stop] = w
        # Parameters are stored by dp group 0 only (the other groups hold the same weights).
        for (name, label), v in {("a", "inputs.0"): x, ("a", "params.weight"): full_w}.items():
            if label == "inputs.0" or k < tp:
                rows.setdefault((name, label), {})[k] = v
        for label, v in m.modules["b"].tensors().items() if "b" in m.modules else []:
            rows.setdefault(("b", label), {})[k] = v
    return commits, chunks, rows


@pytest.mark.parametrize("merge", ["max", "sum"])
@pytest.mark.parametrize(("dp", "tp"), [(1, 1), (1, 4), (2, 2), (3, 1)])
def test_packed_reduce_equals_reduce_over_global_rows(merge: str, dp: int, tp: int) -> None:
    from stats_store.shard_reduce import reduce_shards

    commits, chunks, rows = _packed_run(dp * 10 + tp, dp, tp, merge)
    packed = reduce_shards(commits, chunks, tp, "test")
    got = packed.to_measurement("maxabs", None)
    assert list(got.modules) == (["a", "b"] if dp * tp > 1 else ["a"])
    for (name, label), per_shard in rows.items():
        groups: dict[int, np.ndarray] = {}
        for k in sorted(per_shard):
            v = per_shard[k]
            g = k // tp
            groups[g] = v.copy() if g not in groups else _explicit(merge, groups[g], v)  # tp ranks first
        want = None
        for g in sorted(groups):
            want = groups[g] if want is None else _explicit(merge, want, groups[g])
        np.testing.assert_array_equal(got.modules[name].tensors()[label], want, err_msg=f"{name} {label}")
    assert got.modules["a"].num_samples == dp  # count merge: max within a tp group, sum over groups


def _explicit(merge: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = []
    for x, y in zip(a.tolist(), b.tolist()):
        present = [v for v in (x, y) if not np.isnan(v)]
        out.append((max(present) if merge == "max" else sum(present)) if present else np.nan)
    return np.array(out, np.float32)
