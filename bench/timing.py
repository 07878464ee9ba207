"""Timing and result rows shared by the bench modules.

Every figure in the table is a ratio of two timings taken side by side in one process (never a bare
absolute time): the machine is shared, so absolute times drift by large factors between runs while
ratios measured together stay put. Each timing is the min and the median of ``repeats`` runs after
a warm-up; ratios use the minimum (the run least disturbed by other load).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

Row = dict[str, Any]


@dataclass(frozen=True)
class Timing:
    """Seconds of the fastest and the median of several repetitions."""

    min: float
    median: float

    def __str__(self) -> str:
        return f"{_fmt_s(self.min)} (med {_fmt_s(self.median)})"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def single_thread() -> None:
    """One torch thread per process: the shared 2-core box stalls in OpenMP barriers otherwise."""
    torch.set_num_threads(1)


def time_it(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(min(times), statistics.median(times))


def row(name: str, measured: Any, baseline: Any, ratio: float, goal: str, met: bool | None, note: str = "") -> Row:
    """One line of the results table (``met`` None: no goal, or not measured)."""
    return {"name": name, "measured": str(measured), "baseline": str(baseline), "ratio": ratio, "goal": goal,
            "met": met, "note": note}


def at_most(name: str, measured: Timing, baseline: Timing, limit: float, note: str = "") -> Row:
    """A row for ``measured / baseline`` that should stay at or below ``limit``."""
    r = measured.min / baseline.min
    return row(name, measured, baseline, r, f"<= {limit:g}", r <= limit, note)


def at_least(name: str, measured: Timing, baseline: Timing, limit: float, note: str = "") -> Row:
    """A row for the speed-up ``baseline / measured`` that should reach ``limit``."""
    r = baseline.min / measured.min
    return row(name, measured, baseline, r, f">= {limit:g}", r >= limit, note)


def skipped(name: str, goal: str, reason: str) -> Row:
    """A row for a figure that could not be measured here, with the reason."""
    return row(name, "-", "-", float("nan"), goal, None, f"skipped: {reason}")


def time_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any], repeats: int = 3,
              warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> tuple[Timing, Timing]:
    """Time two functions alternately (a, b, a, b, ...) so slow drift of the machine hits both alike.

    ``clock=time.thread_time`` counts the CPU time of this thread only: with one torch thread every
    op runs here, and time the scheduler gives other processes is not counted (a busy shared box
    moves wall-clock ratios by several per cent, CPU-time ratios much less).
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = clock()
            fn()
            acc.append(clock() - t0)
    return Timing(min(ta), statistics.median(ta)), Timing(min(tb), statistics.median(tb))
