"""Issue 7.1: observer overhead, MEASURE-mode forward / plain forward of a Llama (goal <= 1.05).

Both models are the same bf16 Llama built from config (:func:`bench.models.bench_llama`); one has
the maxabs observers of ``orchestrator.prepare`` attached. Forwards alternate between the two.

Run alone: ``.venv/bin/python -m bench.bench_observers [--quick]``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

import orchestrator
from bench.models import bench_llama, tokens
from bench.timing import Row, at_most, single_thread, time_pair

# size name -> (model size, batch, sequence length)
SIZES = {"toy": ("toy", 1, 16), "quick": ("small", 2, 64), "full": ("bench", 4, 128)}


def run(size: str = "full", repeats: int = 5) -> list[Row]:
    """One row: min forward time with observers over min forward time without."""
    single_thread()
    model_size, batch, length = SIZES[size]
    plain = bench_llama(model_size, dtype=torch.bfloat16)
    observed = copy.deepcopy(plain)
    ids = tokens(plain, 0, batch, length)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"mode": "MEASURE", "observer": "maxabs", "scale_method": "maxabs_pow2",
               "dump_stats_path": str(Path(tmp) / "measure")}
        orchestrator.prepare(observed, cfg)

        def forward(model: torch.nn.Module) -> None:
            with torch.no_grad():
                model(ids)

        t_obs, t_plain = time_pair(lambda: forward(observed), lambda: forward(plain), repeats)
        stats = orchestrator.finalize_calibration(observed)
    note = f"{len(stats.modules)} modules observed; bf16, {batch}x{length} tokens, {model_size} Llama"
    return [at_most("observers: MEASURE-mode forward / plain forward", t_obs, t_plain, 1.05, note)]


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
