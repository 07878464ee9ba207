"""What the user watches: a progress bar over batches with per-group throughput, phase timings
and the final summary table."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from tqdm import tqdm


@dataclass
class PhaseTimer:
    """Wall time per named phase, in the order the phases ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class BatchProgress:
    """A tqdm bar over calibration batches; the postfix shows tokens/s of each data-parallel group."""

    def __init__(self, total: int, groups: int, enabled: bool = True) -> None:
        self._bar = tqdm(total=total, unit="batch", desc="measure", disable=not enabled, dynamic_ncols=True)
        self._start = time.perf_counter()
        self._tokens = [0] * groups

    def update(self, group: int, tokens: int) -> None:
        self._tokens[group] += tokens
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix({f"dp{g}": f"{t / elapsed:.0f} tok/s" for g, t in enumerate(self._tokens)}, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
