"""Pausing Python's cyclic garbage collector around bulk work on statistics.

Reading commit records, packing thousands of modules or parsing an INC file creates tens of
thousands of small objects that all stay alive until the operation ends. Each time enough of them
pile up, the collector rescans every live object in the process (torch's included) and frees
nothing. Measured on the 2-core development machine: importing the 4,502-module DeepSeek-R1 file
took 1.4 s with the collector running and 0.6 s with it paused; reading the 8 commit records of a
80-layer tp=8 run, 0.27 s and 0.05 s. Reference counting still frees memory while paused; only
reference cycles wait until the collector runs again.
"""

from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from typing import Callable, Iterator, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block; restore its previous state after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def without_gc_pauses(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`paused_gc`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused_gc():
            return fn(*args, **kwargs)

    return wrapper
