"""A calibration driver whose shards take their time per batch, so a test can SIGKILL it mid-run.

Run as ``python -m tests.orchestrator.slow_driver CONFIG MODEL DATA``: the same batches as
``fp8-calibrate measure --tp 2 --seq-len 32 --batch-size 2 --flush-every 2``.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from orchestrator.driver.calibration import Calibration
from orchestrator.entry.fp8_calibrate import calibration_batches
from shards.card.actor import CalibrationRunner


class SlowRunner(CalibrationRunner):
    def measure_batch(self, batch_id: int, tokens: np.ndarray) -> int:
        time.sleep(0.4)
        return super().measure_batch(batch_id, tokens)


def main(config: str, model: str, data: str) -> None:
    batches = calibration_batches(data, model, seq_len=32, batch_size=2, max_batches=None)
    with Calibration(config, model, tp=2, flush_every=2, progress=False, runner_cls=SlowRunner) as cal:
        cal.measure(batches)


if __name__ == "__main__":
    main(*sys.argv[1:4])
