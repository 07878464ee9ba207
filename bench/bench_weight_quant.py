"""Issue 7.4: weight quantization throughput / ``torch.clone`` bandwidth of the same tensors (goal >= 0.5);
issue 18.2: a whole ``orchestrator.convert`` at memory speed (goal >= 25 % of the copy bandwidth).

The tensors are the bf16 linears of ~1B-Llama-shaped layers (:func:`bench.models.layer_stack`),
quantized to E4M3 with their scales computed beforehand, per tensor and per channel, with the cast
every backend shares (``shards.fp8.numerics.quantize``). Both sides allocate fresh outputs.

The convert row times ``orchestrator.convert`` (scales from the store, FP8 weights, module swap;
``maxabs_pow2``, INC's selection: every Linear but the tied head) on SmolLM2-135M in bf16
(``--smollm2``; else the bench Llama), a fresh copy of the model per run, against cloning the same
weights. Bandwidths count bytes read plus bytes written: convert reads each bf16 weight and writes
its FP8 codes (3 bytes per element), a clone reads and writes 2 bytes each (4 per element).

Run alone: ``.venv/bin/python -m bench.bench_weight_quant [--quick] [--smollm2]``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.models import bench_llama, layer_stack, smollm2, smollm2_available, tokens
from bench.timing import Row, Timing, row, single_thread, time_it, time_pair
from shards.fp8.numerics import quantize
from shards.quantized.swap import quantized_modules
from shards.fp8.methods import PREDEFINED
from shards.fp8.scale_math import ScaleContext
from shards.fp8.weight_scales import weight_scale

SIZES = {"toy": (1, 32), "quick": (1, 8), "full": (1, 1)}  # (layers, shrink)
METHODS = {"per tensor": "MAXABS_POW2", "per channel": "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"}


def convert_row(model: torch.nn.Module, what: str, repeats: int = 3) -> Row:
    """``orchestrator.convert`` of ``model`` (bytes read + written per second) / clone bandwidth."""
    import orchestrator

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(Path(tmp) / "m")}
        observed = copy.deepcopy(model)
        orchestrator.prepare(observed, {**cfg, "mode": "MEASURE"})
        with torch.no_grad():
            observed(input_ids=tokens(model, 0, 1, 64), use_cache=False)
        orchestrator.finalize_calibration(observed)
        del observed
        times, hp_bytes, fp8_bytes = [], 0, 0
        for i in range(repeats + 1):  # the first run is the cold one (imports, caches)
            fresh = copy.deepcopy(model)
            t0 = time.perf_counter()
            orchestrator.convert(fresh, {**cfg, "mode": "QUANTIZE"})
            times.append(time.perf_counter() - t0)
            if i == 0:
                weights = [m.weight for m in quantized_modules(fresh).values()]
                fp8_bytes = sum(w.numel() for w in weights)
                hp_bytes = fp8_bytes * next(model.parameters()).element_size()
            del fresh
    t_conv = Timing(min(times[1:]), statistics.median(times[1:]))
    sources = [p.detach() for p in model.parameters() if p.ndim == 2]
    t_clone = time_it(lambda: [w.clone() for w in sources], repeats)
    clone_bytes = 2 * sum(w.numel() * w.element_size() for w in sources)
    conv_bw, copy_bw = (hp_bytes + fp8_bytes) / t_conv.min, clone_bytes / t_clone.min
    ratio = conv_bw / copy_bw
    return row(f"convert (scales + FP8 weights + module swap) {what}: bytes/s / clone bandwidth",
               f"{conv_bw / 1e9:.2f} GB/s ({t_conv}; cold {times[0]:.2f} s)", f"{copy_bw / 1e9:.2f} GB/s ({t_clone})",
               ratio, ">= 0.25", ratio >= 0.25,
               f"{fp8_bytes / 1e6:.0f} M weight elements quantized: {hp_bytes / 1e6:.0f} MB read, "
               f"{fp8_bytes / 1e6:.0f} MB written; maxabs_pow2, {repeats} warm runs")


def run(size: str = "full", repeats: int = 3, use_smollm2: bool = False) -> list[Row]:
    """One row per granularity: clone time / quantize time (a throughput ratio); one convert row."""
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
    if use_smollm2 and size == "full" and smollm2_available():
        rows.append(convert_row(smollm2(torch.bfloat16).eval(), "SmolLM2-135M bf16", repeats))
    else:
        rows.append(convert_row(bench_llama("small" if size == "full" else "toy", dtype=torch.bfloat16),
                                "bench Llama bf16", repeats))
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full", use_smollm2="--smollm2" in sys.argv))
