"""SentCounts: flushes send count increments, values as running maxima."""

from __future__ import annotations

import numpy as np

from stats_store.records import Measurement, ModuleStats, SentCounts


def _m(calls: int, nan: int, value: float, samples: int | None = None) -> Measurement:
    stats = ModuleStats("fc", "linear", [np.array([value], np.float32)], num_samples=calls,
                        nonfinite={"inputs.0": nan} if nan else {})
    return Measurement(modules={"fc": stats}, num_samples=samples)


def test_increments_add_up_to_the_totals_and_values_stay_maxima() -> None:
    sent = SentCounts()
    first = sent.increment(_m(3, 1, 2.0, samples=3))
    second = sent.increment(_m(5, 4, 7.0, samples=5))
    assert (first.modules["fc"].num_samples, second.modules["fc"].num_samples) == (3, 2)
    assert first.modules["fc"].nonfinite == {"inputs.0": 1} and second.modules["fc"].nonfinite == {"inputs.0": 3}
    assert (first.num_samples, second.num_samples) == (3, 2)
    assert second.modules["fc"].inputs[0][0] == 7.0
    assert sent.increment(_m(5, 4, 7.0, samples=5)).modules["fc"].num_samples == 0


def test_a_rerun_batch_marked_sent_is_never_counted() -> None:
    sent = SentCounts()
    sent.increment(_m(2, 0, 1.0))
    sent.mark_sent(_m(2, 0, 1.0), _m(3, 2, 1.5))  # one re-run call (with 2 NaNs) already in the store
    nxt = sent.increment(_m(4, 2, 1.5))
    assert nxt.modules["fc"].num_samples == 1 and nxt.modules["fc"].nonfinite == {}


def test_token_counts_are_sent_as_increments_and_a_rerun_batch_never_counts() -> None:
    def m(calls: int, tokens: int) -> Measurement:
        stats = ModuleStats("fc", "linear", [np.array([1.0], np.float32)], num_samples=calls, num_tokens=tokens)
        return Measurement(modules={"fc": stats})

    sent = SentCounts()
    assert sent.increment(m(2, 40)).modules["fc"].num_tokens == 40
    assert sent.increment(m(3, 57)).modules["fc"].num_tokens == 17
    sent.mark_sent(m(3, 57), m(4, 70))  # a re-run call of 13 rows the store already holds
    assert sent.increment(m(5, 71)).modules["fc"].num_tokens == 1
