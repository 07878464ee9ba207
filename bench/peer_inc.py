"""Measure Intel Neural Compressor's fp8_quant (the peer tool) on our side-by-side workload.

Stand-alone on purpose: it imports nothing from this repository, because it runs in a separate
virtualenv holding `neural-compressor-pt` (`make bench-peers` builds one in .venv-inc), not the
project's .venv. `python -m bench.bench_peers` runs it; bench/side_ours.py measures us the same way.

    .venv-inc/bin/python bench/peer_inc.py --model DIR --tokens FILE --out OUTDIR \
        [--batch 4] [--threads 1] [--passes 1] [--convert-repeats 3] [--qdq-repeats 3]

DIR: a HF causal-LM folder (loaded in bf16). FILE: safetensors with int64 token rows `calib`
(calibration) and `heldout` (evaluation), written by the driver. INC's own API on CPU:
`FP8Config(mode="MEASURE", observer="maxabs")` + `prepare` / `finalize_calibration`, then
`convert` with `FP8Config(mode="QUANTIZE", scale_method="maxabs_pow2", use_qdq=True)`; Linear
layers only, lm_head blocked. Every time is paired with its baseline in this process:

- observe: each calibration batch through the MEASURE model and through the plain model, alternating
  (one warm-up pair first; `--passes` passes over the rows).
- convert: the first convert of the process (cold), then `--convert-repeats` converts of fresh
  copies of the plain model, each followed by a `torch.clone` of the weights it quantizes.
- qdq: the first calibration batch through the converted and the plain model, alternating.
- held-out rows: per position the log-probability of the next token and the argmax, of the plain
  and the converted model (OUTDIR/heldout.safetensors; the driver computes ppl and top-1).
- peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end (and the RSS after imports).
- scales: the scale file INC's convert writes (`*_MAXABS_POW2.json`); the driver compares it with ours.

Prints one JSON line (the keys bench/bench_peers.py reads).
"""

import copy
import gc
import json
import os

# The measurements every side-by-side process takes (bench/peer_measures.py, beside this script;
# it imports only the standard library and torch).
from peer_measures import (dram_copy_s, heldout_summary, inc_style_config, load_rows, model_bytes, pairs, peak_rss_bytes,  # noqa: E402
                           plain_reference, rss_bytes, side_args, timed)


def parse(argv):
    return side_args(argv, "peer_inc", "folder for the measurement files and heldout.safetensors")


def main(argv=None) -> None:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from neural_compressor.torch.quantization import FP8Config, convert, finalize_calibration, prepare
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    rss_imports = rss_bytes()
    calib, heldout, batches = load_rows(a.tokens, a.batch)
    os.makedirs(a.out, exist_ok=True)
    common = inc_style_config(os.path.join(a.out, "inc_stats", "measure"))

    plain, weights, plain_logp, plain_top = plain_reference(a.model, heldout, a.batch)

    def forward(model):
        def run(x):
            with torch.no_grad():
                model(input_ids=x, use_cache=False)
        return run

    # MEASURE: observers on a copy, its forwards alternating with the plain model's.
    measured = prepare(copy.deepcopy(plain), FP8Config(mode="MEASURE", observer="maxabs", **common))
    t_meas, t_plain = pairs(forward(measured), forward(plain), batches * a.passes, batches[0])
    t_finalize, _ = timed(lambda: finalize_calibration(measured))
    measured = None
    gc.collect()

    # QUANTIZE: cold convert, then warm converts each paired with a clone of the same weights.
    qcfg = FP8Config(mode="QUANTIZE", scale_method="maxabs_pow2", **common)
    t_convert, t_clone, quant = [], [], None
    for i in range(1 + a.convert_repeats):
        fresh = quant = None
        gc.collect()
        fresh = copy.deepcopy(plain)
        t, quant = timed(lambda: convert(fresh, qcfg))
        t_convert.append(t)
        if i:
            t_clone.append(timed(lambda: [w.clone() for w in weights])[0])
    n_quant = sum(1 for m in quant.modules() if hasattr(m, "quant_input"))

    t_qdq, t_qdq_plain = pairs(forward(quant), forward(plain), [batches[0]] * a.qdq_repeats, batches[0])
    quant_logp, quant_top = heldout_summary(quant, heldout, a.batch)
    summary = os.path.join(a.out, "heldout.safetensors")
    save_file({"plain_logprob": plain_logp, "plain_argmax": plain_top, "quant_logprob": quant_logp,
               "quant_argmax": quant_top}, summary)

    from importlib.metadata import version
    stats_dir = os.path.dirname(common["dump_stats_path"])
    scale_files = sorted(f for f in os.listdir(stats_dir) if f.endswith("_MAXABS_POW2.json"))
    peak_rss = peak_rss_bytes()  # before the DRAM copy's 600 MB of buffers
    copy_s = dram_copy_s()
    print(json.dumps({
        "tool": "inc", "tool_version": f"neural-compressor-pt {version('neural_compressor_pt')}",
        "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(), "batch": a.batch,
        "calib_shape": list(calib.shape), "heldout_shape": list(heldout.shape), "n_batches": len(batches),
        "model_bytes": model_bytes(plain), "quant_weight_bytes": sum(w.numel() * w.element_size() for w in weights),
        "quant_weight_numel": sum(w.numel() for w in weights), "n_selected": len(weights), "n_quantized": n_quant,
        "observe_s": t_meas, "observe_plain_s": t_plain, "finalize_s": t_finalize,
        "convert_s": t_convert, "clone_s": t_clone, "copy_s": copy_s, "qdq_s": t_qdq, "qdq_plain_s": t_qdq_plain,
        "rss_imports_bytes": rss_imports, "peak_rss_bytes": peak_rss, "heldout": summary,
        "scales": os.path.join(stats_dir, scale_files[-1]) if scale_files else None,
        "notes": ["FP8Config use_qdq=True, hp_dtype bf16; MEASURE observer maxabs, QUANTIZE maxabs_pow2"],
    }))


if __name__ == "__main__":
    main()
