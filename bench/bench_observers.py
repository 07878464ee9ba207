"""Issue 18.1: observer overhead, MEASURE-mode forward / plain forward (goals: <= 1.02 per tensor,
<= 1.05 per channel).

Both models are the same checkpoint; one has the observers of ``orchestrator.prepare`` attached
(``maxabs`` or ``maxabs_per_channel``, INC's default selection: every Linear). Forwards alternate
between the two, timed in CPU time of the calling thread (one torch thread: every op runs there).
The ratio is (plain forward + the CPU time spent inside the observers' hooks) / plain forward, the
hook time summed per call during the observed forwards: on a shared 2-core box the two forwards'
own times differ by several per cent run to run, which would drown a 1 % cost. The note also gives
the plain ratio of the two forwards' minima. Not counted: torch's dispatch of each hook (~2 us).

With ``--smollm2`` the model is SmolLM2-135M, 1 x 128 tokens, in two dtypes: **bf16**, whose matmuls
this AVX2 CPU emulates (~7x slower than fp32, the case of a CPU without bf16 units), and **fp32**,
whose matmuls run at the vector units' speed (the matmul-to-elementwise cost ratio of a CPU with
bf16 units: the observers' share is the larger one there). Without it, the bench Llama in bf16.

Run alone: ``.venv/bin/python -m bench.bench_observers [--quick] [--smollm2]``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

import orchestrator
from bench.models import bench_llama, smollm2, smollm2_available, tokens
from bench.timing import Row, Timing, at_most, single_thread, time_pair
from shards.measuring.session import ModuleObservers

# size name -> (model size, batch, sequence length)
SIZES = {"toy": ("toy", 1, 16), "quick": ("small", 2, 64), "full": ("bench", 4, 128)}
GOALS = {"maxabs": 1.02, "maxabs_per_channel": 1.05}


def _row(plain: torch.nn.Module, ids: torch.Tensor, observer: str, repeats: int, what: str) -> Row:
    observed = copy.deepcopy(plain)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"mode": "MEASURE", "observer": observer, "scale_method": "maxabs_pow2",
               "dump_stats_path": str(Path(tmp) / "measure")}
        orchestrator.prepare(observed, cfg)

        def forward(model: torch.nn.Module) -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        hook_s: list[float] = []
        with _timed_hooks(hook_s):
            t_obs, t_plain = time_pair(lambda: forward(observed), lambda: forward(plain), repeats,
                                       clock=time.thread_time)
        stats = orchestrator.finalize_calibration(observed)
    per_forward = sum(hook_s) / (repeats + 1)  # + the warm-up forward
    with_hooks = Timing(t_plain.min + per_forward, t_plain.median + per_forward)
    note = (f"{len(stats.modules)} modules observed; {what}, {ids.shape[0]}x{ids.shape[1]} tokens; "
            f"{per_forward * 1e3:.1f} ms CPU time in the hooks per forward; the two forwards' minima alone: "
            f"{t_obs.min / t_plain.min:.3f}; CPU time of the calling thread, min of {repeats}")
    return at_most(f"observers {observer}: MEASURE-mode forward / plain forward ({what})", with_hooks, t_plain,
                   GOALS[observer], note)


@contextmanager
def _timed_hooks(acc: list[float]) -> Iterator[None]:
    """Add the CPU time of every observer hook call (inputs and outputs) to ``acc``."""
    originals = {name: getattr(ModuleObservers, name) for name in ("observe_inputs", "observe_outputs")}

    def timed(fn: Callable[..., None]) -> Callable[..., None]:
        def wrapper(*args: object) -> None:
            t0 = time.thread_time()
            fn(*args)
            acc.append(time.thread_time() - t0)
        return wrapper

    for name, fn in originals.items():
        setattr(ModuleObservers, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ModuleObservers, name, fn)


def run(size: str = "full", repeats: int = 5, use_smollm2: bool = False) -> list[Row]:
    """One row per (model dtype, observer): min forward time with observers over min without."""
    single_thread()
    if use_smollm2 and size == "full" and smollm2_available():
        ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
        rows = []
        for dtype in (torch.bfloat16, torch.float32):
            plain = smollm2(dtype).eval()
            what = f"SmolLM2-135M {str(dtype).removeprefix('torch.')}"
            rows += [_row(plain, ids, observer, repeats, what) for observer in GOALS]
        return rows
    model_size, batch, length = SIZES[size]
    plain = bench_llama(model_size, dtype=torch.bfloat16)
    ids = tokens(plain, 0, batch, length)
    return [_row(plain, ids, observer, repeats, f"bf16 {model_size} Llama") for observer in GOALS]


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full", use_smollm2="--smollm2" in sys.argv))
