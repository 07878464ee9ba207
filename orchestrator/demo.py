"""``make demo``: the main job end to end on an embedded default.

Builds a small Llama-family checkpoint, runs `fp8-calibrate run` semantics on an in-process Ray
cluster with tp=2 simulated cards on CPU, prints the summary table, the fp32-vs-FP8 top-1
agreement, and what the stats store holds. Everything lands in ``demo_output/``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from orchestrator.calibration import Calibration
from orchestrator.cli import calibration_batches, summary_table
from orchestrator.demo_model import build_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("demo_output")
CONFIG = ROOT / "examples" / "configs" / "demo_maxabs_pow2.json"
DATA = ROOT / "examples" / "calibration.txt"


def agreement(fp32: np.ndarray, fp8: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and relative L2 error of the logits."""
    top1 = float((fp32.argmax(-1) == fp8.argmax(-1)).mean())
    rel = float(np.linalg.norm(fp8 - fp32) / np.linalg.norm(fp32))
    return top1, rel


def main() -> int:
    console = Console()
    for stale in (OUT / "stats", OUT / "fp8-model"):
        if stale.exists():
            console.print(f"demo: removing the previous demo's {stale}")
            shutil.rmtree(stale)
    model_dir = build_demo_checkpoint(OUT / "model")
    batches = calibration_batches(DATA, model_dir, seq_len=64, batch_size=2, max_batches=None)
    eval_ids = np.asarray([row for b in batches[-2:] for row in b.tokens], dtype=np.int64)
    console.print(f"demo: {len(batches)} calibration batches of 2 x 64 tokens, tp=2 simulated cards on CPU")
    with Calibration(CONFIG, model_dir, tp=2, dp=1, flush_every=4) as cal:
        cal.measure(batches)
        cal.quantize()
        exported = cal.export(OUT / "fp8-model")
        fp8 = cal.forward(eval_ids)
        report = cal.report
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        fp32 = ref(input_ids=torch.from_numpy(eval_ids), use_cache=False).logits.numpy()
    top1, rel = agreement(fp32, fp8)
    console.print(summary_table(report, title="fp8-calibrate run (demo)"))
    console.print(f"fp32 vs FP8 (maxabs_pow2, tp=2): top-1 agreement {top1:.1%} over {fp32.shape[0] * fp32.shape[1]} "
                  f"tokens, relative logits error {rel:.3%}")
    console.print(f"FP8 checkpoint (compressed-tensors): {exported}")
    from stats_store.cli import main as stats_store_main

    console.print("stats-store ls demo_output/stats/demo.zarr:")
    stats_store_main(["ls", str(OUT / "stats" / "demo.zarr")])
    return 0 if top1 >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
