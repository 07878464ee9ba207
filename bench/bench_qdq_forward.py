"""Issue 7.6: QDQ forward / bf16 forward on CPU (goal <= 1.3); CUDA FP8 forward / bf16 where a GPU is.

The quantized model is the bf16 Llama of :func:`bench.models.bench_llama` after
``orchestrator.quantize`` with ``maxabs_pow2`` (FP8 weights; on CPU the emulating backend
multiplies the FP8 values in fp32 and rounds once to bf16, as the hardware does; INC's QDQ path,
a bf16 matmul of dequantized operands, is ``EmulatedBackend(inc_layout=True)``). Forwards alternate
between the two.

Run alone: ``.venv/bin/python -m bench.bench_qdq_forward [--quick]``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

import orchestrator
from bench.models import bench_llama, tokens
from bench.timing import Row, at_most, single_thread, skipped, time_pair

SIZES = {"toy": ("toy", 1, 16), "quick": ("small", 2, 64), "full": ("bench", 4, 128)}


def _quantized(model: torch.nn.Module, calib: list[torch.Tensor], tmp: str) -> torch.nn.Module:
    cfg = {"mode": "AUTO", "scale_method": "maxabs_pow2", "dump_stats_path": str(Path(tmp) / "measure")}
    return orchestrator.quantize(copy.deepcopy(model), cfg, calib)


def _forward_row(name: str, device: str, size: str, repeats: int, limit: float) -> Row:
    model_size, batch, length = SIZES[size]
    plain = bench_llama(model_size, dtype=torch.bfloat16).to(device)
    calib = [tokens(plain, s, batch, length).to(device) for s in range(2)]
    ids = tokens(plain, 99, batch, length).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        quant = _quantized(plain, calib, tmp)

    def forward(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(ids)
        if device == "cuda":
            torch.cuda.synchronize()

    t_q, t_p = time_pair(lambda: forward(quant), lambda: forward(plain), repeats)
    return at_most(name, t_q, t_p, limit, f"maxabs_pow2, {batch}x{length} tokens, {model_size} Llama")


def run(size: str = "full", repeats: int = 3) -> list[Row]:
    """The CPU row, and the CUDA row (or a skipped row without a GPU)."""
    single_thread()
    rows = [_forward_row("QDQ forward / bf16 forward (CPU)", "cpu", size, repeats, 1.3)]
    if torch.cuda.is_available():
        cuda = _forward_row("FP8 forward / bf16 forward (CUDA)", "cuda", size, repeats, 1.0)
        rows.append({**cuda, "goal": "-", "met": None})  # the issue sets no goal: reported only
    else:
        print("no GPU: skipped")
        rows.append(skipped("FP8 forward / bf16 forward (CUDA)", "-", "no GPU"))
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
