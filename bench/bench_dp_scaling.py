"""Issue 7.2: data-parallel scaling, calibration throughput dp=2 / dp=1 on 2 cores (goal >= 1.8).

A bf16 Llama checkpoint (:func:`bench.models.bench_llama`) is written once; ``Calibration`` measures
the same batches with dp=1 and with dp=2 (one torch thread per Ray actor). Only the MEASURE phase
is timed (actor start-up and the store reduce are not). dp=1 and dp=2 alternate.

Run alone: ``.venv/bin/python -m bench.bench_dp_scaling [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.models import bench_llama, tokens
from bench.timing import Row, Timing, at_least, single_thread, skipped

# size name -> (model size, batches, batch, sequence length)
SIZES = {"toy": ("toy", 4, 1, 16), "quick": ("small", 8, 2, 64), "full": ("small", 24, 4, 256)}
NAME = "data-parallel calibration throughput dp=2 / dp=1"


def _batches(model: torch.nn.Module, n: int, batch: int, length: int) -> list:
    from orchestrator.driver.data import Batch

    return [Batch(i, tuple(tuple(r) for r in tokens(model, i, batch, length).tolist())) for i in range(n)]


def _measure_seconds(ckpt: Path, dump: Path, dp: int, batches: list) -> float:
    from orchestrator.driver.calibration import Calibration

    cfg = {"mode": "MEASURE", "observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(dump)}
    with Calibration(cfg, model=ckpt, tp=1, dp=dp, num_cpus=2, progress=False, overwrite=True) as cal:
        cal.measure(batches)
        return cal.report.timer.seconds["measure"]


def run(size: str = "full", repeats: int = 2) -> list[Row]:
    """One row: dp=1 measure time / dp=2 measure time of the same batches."""
    try:
        import orchestrator.driver.calibration  # noqa: F401
    except ImportError as exc:
        return [skipped(NAME, ">= 1.8", f"orchestrator.driver.calibration not importable ({exc})")]
    single_thread()
    model_size, n, batch, length = SIZES[size]
    model = bench_llama(model_size, dtype=torch.bfloat16)
    batches = _batches(model, n, batch, length)
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model.save_pretrained(ckpt)
        for rep in range(repeats):
            for dp in (1, 2):
                times[dp].append(_measure_seconds(ckpt, Path(tmp) / f"dp{dp}_{rep}" / "measure", dp, batches))
    t1, t2 = (Timing(min(times[d]), statistics.median(times[d])) for d in (1, 2))
    return [at_least(NAME, t2, t1, 1.8, f"{n} batches of {batch}x{length} tokens, {model_size} Llama, "
                                         "1 torch thread per actor; measure phase only")]


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
