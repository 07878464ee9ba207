"""The merge declarations and the reduction over shards, against explicit loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stats_store.reduce import MERGES, get_merge, reduce_count, reduce_over_shards
from stats_store.store_errors import UnknownMergeError

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
