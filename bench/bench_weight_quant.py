"""Issue 7.4: weight quantization throughput / ``torch.clone`` bandwidth of the same tensors (goal >= 0.5);
issue 18.2: a whole ``orchestrator.convert`` at memory speed (goal >= 25 % of the copy bandwidth).

The tensors are the bf16 linears of ~1B-Llama-shaped layers (:func:`bench.models.layer_stack`),
quantized to E4M3 with their scales computed beforehand, per tensor and per channel, with the cast
every backend shares (``shards.fp8.numerics.quantize``). Both sides allocate fresh outputs.

The convert rows time ``orchestrator.convert`` (scales from the store, FP8 weights, module swap;
``maxabs_pow2``, INC's selection: every Linear but the tied head) on SmolLM2-135M in bf16
(``--smollm2``; else the bench Llama), a fresh copy of the model per run, and the shards' in-place
quantize of the distributed path (``convert_model`` with the coordinator's weight scales and the
shard's statistics, what ``ShardRunner.quantize`` runs). Bandwidths count bytes read plus bytes
written: convert reads each bf16 weight and writes its FP8 codes (3 bytes per element).

The copy bandwidth is measured in the same process two ways: ``dst.copy_(src)`` of
:data:`DRAM_COPY_BYTES` (far larger than the last-level cache, ``dst`` written once beforehand so
that no page is faulted in the timed copies): the machine's memory bandwidth; and, as the rows did
before 2026-12-07, ``clone()`` of the same weights (memory the allocator already holds: it often
runs at the copy's speed, but it is not a fixed measure of the machine). Both count 2 bytes per
byte copied.

Run alone: ``.venv/bin/python -m bench.bench_weight_quant [--quick] [--smollm2]``.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from bench.peer_measures import COPY_BYTES
from bench.models import bench_llama, layer_stack, smollm2, smollm2_available, tokens
from bench.timing import Row, Timing, row, single_thread, time_it, time_pair
from shards.fp8.numerics import quantize
from shards.quantized.swap import quantized_modules
from shards.fp8.methods import PREDEFINED
from shards.fp8.scale_math import ScaleContext
from shards.fp8.weight_scales import weight_scale

SIZES = {"toy": (1, 32), "quick": (1, 8), "full": (1, 1)}  # (layers, shrink)
METHODS = {"per tensor": "MAXABS_POW2", "per channel": "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"}


# Bytes of each buffer of the DRAM copy: far above any last-level cache (this machine's: 32 MiB);
# the side-by-side bench's convert row uses the same copy (bench.peer_measures.dram_copy_s).
DRAM_COPY_BYTES = COPY_BYTES


def dram_copy(nbytes: int = DRAM_COPY_BYTES, repeats: int = 3) -> tuple[float, Timing]:
    """Bytes read + written per second of ``dst.copy_(src)`` on ``nbytes`` buffers, ``dst``
    written beforehand (no page faults in the timed copies), and the timing."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    t = time_it(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / t.min, t


def _timed_converts(model: torch.nn.Module, convert: Callable[[torch.nn.Module], object],
                    repeats: int) -> tuple[Timing, Timing, float, int]:
    """Warm timings of ``convert`` on fresh copies of ``model``, wall clock and CPU time of the
    process (the first, cold run apart), the cold run's seconds, and the weight elements it quantized.

    The CPU time counts every thread of the process (the store's reads run on zarr's I/O thread)
    but not time spent waiting for a core, so on a busy machine it moves far less than the wall clock.
    """
    wall, cpu, numel = [], [], 0
    for i in range(repeats + 1):  # the first run is the cold one (imports, caches)
        fresh = copy.deepcopy(model)
        t0, c0 = time.perf_counter(), time.process_time()
        convert(fresh)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            numel = sum(m.weight.numel() for m in quantized_modules(fresh).values())
        del fresh
    return (Timing(min(wall[1:]), statistics.median(wall[1:])), Timing(min(cpu[1:]), statistics.median(cpu[1:])),
            wall[0], numel)


def convert_rows(model: torch.nn.Module, what: str, repeats: int = 5) -> list[Row]:
    """``orchestrator.convert`` and the shards' quantize of ``model``, in bytes read + written per
    second, against the DRAM copy and against the clone of the same weights."""
    import orchestrator
    from orchestrator.configuration.fp8_config import Fp8Config
    from shards.plan import Mode
    from shards.quantized.backends import EmulatedBackend
    from shards.quantized.swap import convert_model
    from stats_store.zarr_store import ZarrStatsStore, store_path

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(Path(tmp) / "m")}
        observed = copy.deepcopy(model)
        orchestrator.prepare(observed, {**cfg, "mode": "MEASURE"})
        with torch.no_grad():
            observed(input_ids=tokens(model, 0, 1, 64), use_cache=False)
        orchestrator.finalize_calibration(observed)
        del observed
        t_conv, cpu_conv, cold, numel = _timed_converts(
            model, lambda m: orchestrator.convert(m, {**cfg, "mode": "QUANTIZE"}), repeats)
        # The distributed path: each shard converts in place with the coordinator's weight scales
        # (computed beforehand, as the coordinator does) and the statistics of the store.
        plan = Fp8Config.load({**cfg, "mode": "QUANTIZE"}).to_plan(Mode.QUANTIZE)
        stats = ZarrStatsStore.open(store_path(plan.dump_stats_path)).read_reduced()
        section, ctx = plan.scale_plan.default.weight, ScaleContext(lp=plan.lp, hp=plan.hp)
        given = {n.removesuffix(".weight"): weight_scale(p.detach(), section, ctx)
                 for n, p in model.named_parameters() if p.ndim == 2}
        t_shard, cpu_shard, _, _ = _timed_converts(
            model, lambda m: convert_model(m, plan, stats, EmulatedBackend(), weight_scales=given), repeats)
    hp_bytes = numel * next(model.parameters()).element_size()
    moved = hp_bytes + numel  # bf16 read, FP8 written
    dram_bw, t_dram = dram_copy(repeats=repeats)
    sources = [p.detach() for p in model.parameters() if p.ndim == 2]
    t_clone = time_it(lambda: [w.clone() for w in sources], repeats)
    clone_bw = 2 * sum(w.numel() * w.element_size() for w in sources) / t_clone.min
    note = (f"{numel / 1e6:.0f} M weight elements quantized: {hp_bytes / 1e6:.0f} MB read, {numel / 1e6:.0f} MB "
            f"written; maxabs_pow2, {repeats} warm runs")
    dram = f"DRAM copy {dram_bw / 1e9:.2f} GB/s ({t_dram}, 2 x {DRAM_COPY_BYTES / 1e6:.0f} MB)"
    rows = []
    for label, t, cpu, extra in (
            ("convert (scales + FP8 weights + module swap)", t_conv, cpu_conv, f"; cold {cold:.2f} s"),
            ("shard in-place quantize (convert_model with the coordinator's weight scales)", t_shard, cpu_shard, "")):
        bw = moved / t.min
        rows.append(row(f"{label} {what}: bytes/s / DRAM copy bandwidth", f"{bw / 1e9:.2f} GB/s ({t}{extra})",
                        dram, bw / dram_bw, ">= 0.25", bw / dram_bw >= 0.25,
                        f"{note}; CPU time of the process {cpu} ({moved / cpu.min / dram_bw:.3f} of the copy)"))
    bw = moved / t_conv.min
    rows.append(row(f"convert {what}: bytes/s / clone bandwidth of the same weights (baseline before 2026-12-07)",
                    f"{bw / 1e9:.2f} GB/s ({t_conv})", f"clone {clone_bw / 1e9:.2f} GB/s ({t_clone})",
                    bw / clone_bw, ">= 0.25", bw / clone_bw >= 0.25,
                    "the clone reuses memory the allocator holds; the DRAM copy above is the machine's measure"))
    return rows


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
        rows.extend(convert_rows(smollm2(torch.bfloat16).eval(), "SmolLM2-135M bf16", max(repeats, 5)))
    else:
        rows.extend(convert_rows(bench_llama("small" if size == "full" else "toy", dtype=torch.bfloat16),
                                 "bench Llama bf16", repeats))
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full", use_smollm2="--smollm2" in sys.argv))
