"""Issue 7.4: weight quantization throughput / ``torch.clone`` bandwidth of the same tensors (goal >= 0.5).

The tensors are the bf16 linears of ~1B-Llama-shaped layers (:func:`bench.models.layer_stack`),
quantized to E4M3 with their scales computed beforehand, per tensor and per channel, with the cast
every backend shares (``shards.fp8.numerics.quantize``). Both sides allocate fresh outputs.

Run alone: ``.venv/bin/python -m bench.bench_weight_quant [--quick]``.
"""

from __future__ import annotations

import sys


from bench.models import layer_stack
from bench.timing import Row, row, single_thread, time_pair
from shards.fp8.numerics import quantize
from shards.fp8.methods import PREDEFINED
from shards.fp8.scale_math import ScaleContext
from shards.fp8.weight_scales import weight_scale

SIZES = {"toy": (1, 32), "quick": (1, 8), "full": (1, 1)}  # (layers, shrink)
METHODS = {"per tensor": "MAXABS_POW2", "per channel": "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"}


def run(size: str = "full", repeats: int = 3) -> list[Row]:
    """One row per granularity: clone time / quantize time (a throughput ratio)."""
    single_thread()
    layers, shrink = SIZES[size]
    stack = layer_stack(layers, shrink=shrink)
    ctx = ScaleContext()
    gb = sum(w.numel() * w.element_size() for w in stack.values()) / 1e9
    rows = []
    for label, method in METHODS.items():
        section = PREDEFINED[method].weight
        scales = {n: weight_scale(w, section, ctx) for n, w in stack.items()}
        axis = 0 if section.granularity.value == "PCS" else None

        def quant() -> None:
            for n, w in stack.items():
                quantize(w, scales[n], ctx.fmt, axis=axis)

        t_q, t_c = time_pair(quant, lambda: [w.clone() for w in stack.values()], repeats)
        ratio = t_c.min / t_q.min
        rows.append(row(f"weight quantization {label}: throughput / clone bandwidth",
                        f"{gb / t_q.min:.2f} GB/s ({t_q})", f"{gb / t_c.min:.2f} GB/s ({t_c})", ratio, ">= 0.5",
                        ratio >= 0.5, f"{len(stack)} bf16 tensors, {gb * 1e3:.0f} MB"))
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
