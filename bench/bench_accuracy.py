"""Issue 7.7: accuracy of FP8 against fp32 for each of the 8 user-facing scale methods.

The demo model (the tiny Llama of the tests, or SmolLM2-135M with ``--smollm2``) is calibrated on
batches of ``examples/calibration.txt`` (SmolLM2's tokenizer, or bytes for the tiny Llama) and
quantized with each method; on a held-out batch of the same text we compare its logits with
the fp32 model's: top-1 agreement (share of positions whose argmax is the same) and the relative
logits error ``||L_fp8 - L_fp32|| / ||L_fp32||``. HW-aligned methods compute their scales for
Gaudi2 (``device_for_scales``), which works on CPU too. There is no goal: the figures are reported.

Run alone: ``.venv/bin/python -m bench.bench_accuracy [--quick] [--smollm2]``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

import orchestrator
from bench.models import demo_model, smollm2_dir
from bench.timing import Row, row, single_thread
from orchestrator.driver.data import make_batches, read_texts, tokenize_texts
from shards.fp8.methods import USER_METHODS

TEXT = Path(__file__).resolve().parent.parent / "examples" / "calibration.txt"
# size name -> (demo model size, calibration batches, batch, sequence length)
SIZES = {"toy": ("toy", 1, 1, 16), "quick": ("toy", 2, 2, 32), "full": ("toy", 4, 2, 64)}


def text_batches(model: torch.nn.Module, use_smollm2: bool, batch: int, length: int) -> list[torch.Tensor]:
    """Token batches of the example text: SmolLM2's tokenizer, or UTF-8 bytes for the tiny Llama."""
    streams = tokenize_texts(read_texts(TEXT), smollm2_dir() if use_smollm2 else None, model.config.vocab_size)
    return [torch.tensor(b.tokens) for b in make_batches(streams, length, batch)]


def _config(method: str, tmp: str) -> dict[str, object]:
    cfg: dict[str, object] = {"mode": "AUTO", "scale_method": method.lower(),
                              "dump_stats_path": str(Path(tmp) / method.lower() / "measure")}
    if "HW" in method:
        cfg["device_for_scales"] = "GAUDI2"
    return cfg


def compare(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, relative logits error) of ``logits`` against ``reference``."""
    agree = float((reference.argmax(-1) == logits.argmax(-1)).float().mean())
    rel = float((logits.double() - reference.double()).norm() / reference.double().norm())
    return agree, rel


def run(size: str = "full", repeats: int = 1, use_smollm2: bool = False) -> list[Row]:
    """One row per user-facing method; ``ratio`` is the top-1 agreement."""
    single_thread()
    model_size, n_calib, batch, length = SIZES[size]
    ref_model = demo_model(use_smollm2, size=model_size)
    batches = text_batches(ref_model, use_smollm2, batch, length)
    calib, test_ids = batches[:n_calib], batches[-1]  # the test batch is never calibrated on
    with torch.no_grad():
        reference = ref_model(test_ids).logits
    name = "SmolLM2-135M" if use_smollm2 else f"{model_size} Llama"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in USER_METHODS:
            quant = orchestrator.quantize(copy.deepcopy(ref_model), _config(method, tmp), calib)
            with torch.no_grad():
                agree, rel = compare(reference, quant(test_ids).logits)
            rows.append(row(f"accuracy {method.lower()}: top-1 agreement with fp32", f"{agree * 100:.1f} %",
                            "fp32", agree, "-", None,
                            f"relative logits error {rel:.4f}; {name}, {n_calib} calibration batches, "
                            f"{batch}x{length} test tokens"))
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full", use_smollm2="--smollm2" in sys.argv))
