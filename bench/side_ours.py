"""Measure fp8-orchestrator on the side-by-side workload, exactly as bench/peer_inc.py measures INC.

Run by ``python -m bench.bench_peers`` in a subprocess of the project venv (so peak RSS compares
with the peers' processes); the same INC-style config dicts as peer_inc.py go through
``orchestrator.prepare`` / ``finalize_calibration`` / ``convert`` (the CPU emulating backend, bf16).

    .venv/bin/python -m bench.side_ours --model DIR --tokens FILE --out OUTDIR [same options as peer_inc.py]

The measurements are bench/peer_measures.py's, which the peer scripts import too: every figure is
defined the same way in the three processes.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
from typing import Callable, Sequence

import torch

from bench.peer_measures import (dram_copy_s, heldout_summary, inc_style_config, load_rows, model_bytes, pairs, peak_rss_bytes,
                                 plain_reference, rss_bytes, side_args, timed)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    return side_args(argv, "python -m bench.side_ours", "folder for the stats store and heldout.safetensors")


def main(argv: Sequence[str] | None = None) -> None:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from safetensors.torch import save_file

    import orchestrator
    from importlib.metadata import version

    torch.set_num_threads(a.threads)
    rss_imports = rss_bytes()
    calib, heldout, batches = load_rows(a.tokens, a.batch)
    os.makedirs(a.out, exist_ok=True)
    # The same INC config dicts as peer_inc.py's FP8Config.
    common = inc_style_config(os.path.join(a.out, "stats", "measure"))

    plain, weights, plain_logp, plain_top = plain_reference(a.model, heldout, a.batch)

    def forward(model: torch.nn.Module) -> Callable[[torch.Tensor], None]:
        def run(x: torch.Tensor) -> None:
            with torch.no_grad():
                model(input_ids=x, use_cache=False)
        return run

    measured = orchestrator.prepare(copy.deepcopy(plain), dict(mode="MEASURE", observer="maxabs", **common))
    t_meas, t_plain = pairs(forward(measured), forward(plain), batches * a.passes, batches[0])
    t_finalize, _ = timed(lambda: orchestrator.finalize_calibration(measured))
    measured = None
    gc.collect()

    qcfg = dict(mode="QUANTIZE", scale_method="maxabs_pow2", **common)
    t_convert: list[float] = []
    t_clone: list[float] = []
    quant = fresh = None
    for i in range(1 + a.convert_repeats):
        fresh = quant = None
        gc.collect()
        fresh = copy.deepcopy(plain)
        t, quant = timed(lambda: orchestrator.convert(fresh, qcfg))
        t_convert.append(t)
        if i:
            t_clone.append(timed(lambda: [w.clone() for w in weights])[0])
    assert quant is not None
    n_quant = len(orchestrator.scales_of(quant))

    t_qdq, t_qdq_plain = pairs(forward(quant), forward(plain), [batches[0]] * a.qdq_repeats, batches[0])
    quant_logp, quant_top = heldout_summary(quant, heldout, a.batch)
    scales = os.path.join(a.out, "scales.json")  # INC's scale-file layout, compared with INC's by the driver
    with open(scales, "w") as f:
        json.dump({"Nodes": orchestrator.scales_of(quant)}, f, default=float)
    summary = os.path.join(a.out, "heldout.safetensors")
    save_file({"plain_logprob": plain_logp, "plain_argmax": plain_top, "quant_logprob": quant_logp,
               "quant_argmax": quant_top}, summary)

    peak_rss = peak_rss_bytes()  # before the DRAM copy's 600 MB of buffers
    copy_s = dram_copy_s()
    print(json.dumps({
        "tool": "ours", "tool_version": f"fp8-orchestrator {version('fp8-orchestrator')}", "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(), "batch": a.batch,
        "calib_shape": list(calib.shape), "heldout_shape": list(heldout.shape), "n_batches": len(batches),
        "model_bytes": model_bytes(plain), "quant_weight_bytes": sum(w.numel() * w.element_size() for w in weights),
        "quant_weight_numel": sum(w.numel() for w in weights), "n_selected": len(weights), "n_quantized": n_quant,
        "observe_s": t_meas, "observe_plain_s": t_plain, "finalize_s": t_finalize,
        "convert_s": t_convert, "clone_s": t_clone, "copy_s": copy_s, "qdq_s": t_qdq, "qdq_plain_s": t_qdq_plain,
        "rss_imports_bytes": rss_imports, "peak_rss_bytes": peak_rss, "heldout": summary,
        "scales": scales,
        "notes": ["the same INC config dicts (use_qdq=True, hp_dtype bf16) through orchestrator.prepare/convert; "
                  "CPU emulating backend: FP8 values multiplied and accumulated in fp32, rounded once to bf16; each FP8 Linear keeps the fp32 values of its weight codes between forwards"],
    }))


if __name__ == "__main__":
    main()
