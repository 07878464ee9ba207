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

import argparse
import copy
import gc
import json
import os
import resource
import sys
import time


def rss_bytes() -> int:
    """Current resident set size (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def pairs(fn_a, fn_b, inputs, warmup_input):
    """Seconds of fn_a(x) and fn_b(x) for each x, alternating a, b; one untimed pair first."""
    fn_a(warmup_input)
    fn_b(warmup_input)
    ta, tb = [], []
    for x in inputs:
        ta.append(timed(lambda: fn_a(x))[0])
        tb.append(timed(lambda: fn_b(x))[0])
    return ta, tb


def heldout_summary(torch, model, rows, batch):
    """Per position: log-probability of the next token (rows x seq-1) and argmax (rows x seq)."""
    logp, top = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids = rows[i:i + batch]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            logp.append(torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0])
            top.append(logits.argmax(-1))
    return torch.cat(logp).contiguous(), torch.cat(top).contiguous()


def quantized_linears(torch, model):
    """The modules INC's config selects: every Linear but lm_head."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="HF checkpoint folder (loaded in bf16)")
    p.add_argument("--tokens", required=True, help="safetensors file with int64 rows `calib` and `heldout`")
    p.add_argument("--out", required=True, help="folder for the measurement files and heldout.safetensors")
    p.add_argument("--batch", type=int, default=4, help="rows per forward")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=1, help="timed passes over the calibration rows")
    p.add_argument("--convert-repeats", type=int, default=3, help="warm converts after the cold one")
    p.add_argument("--qdq-repeats", type=int, default=3)
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        sys.exit(f"peer_inc: no HF checkpoint at {a.model} (config.json missing); bench.bench_peers writes it")
    if not os.path.isfile(a.tokens):
        sys.exit(f"peer_inc: token file {a.tokens} not found; bench.bench_peers writes it")
    return a


def main(argv=None) -> None:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from neural_compressor.torch.quantization import FP8Config, convert, finalize_calibration, prepare
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    rss_imports = rss_bytes()
    tokens = load_file(a.tokens)
    calib, heldout = tokens["calib"].long(), tokens["heldout"].long()
    batches = list(calib.split(a.batch))
    os.makedirs(a.out, exist_ok=True)
    common = dict(dump_stats_path=os.path.join(a.out, "inc_stats", "measure"), use_qdq=True, hp_dtype="bf16",
                  allowlist={"types": ["Linear"], "names": []}, blocklist={"types": [], "names": ["lm_head"]})

    plain = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, local_files_only=True).eval()
    linears = quantized_linears(torch, plain)
    weights = [m.weight for m in linears.values()]
    plain_logp, plain_top = heldout_summary(torch, plain, heldout, a.batch)

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
    quant_logp, quant_top = heldout_summary(torch, quant, heldout, a.batch)
    summary = os.path.join(a.out, "heldout.safetensors")
    save_file({"plain_logprob": plain_logp, "plain_argmax": plain_top, "quant_logprob": quant_logp,
               "quant_argmax": quant_top}, summary)

    from importlib.metadata import version
    stats_dir = os.path.dirname(common["dump_stats_path"])
    scale_files = sorted(f for f in os.listdir(stats_dir) if f.endswith("_MAXABS_POW2.json"))
    print(json.dumps({
        "tool": "inc", "tool_version": f"neural-compressor-pt {version('neural_compressor_pt')}",
        "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(), "batch": a.batch,
        "calib_shape": list(calib.shape), "heldout_shape": list(heldout.shape), "n_batches": len(batches),
        "model_bytes": model_bytes(plain), "quant_weight_bytes": sum(w.numel() * w.element_size() for w in weights),
        "quant_weight_numel": sum(w.numel() for w in weights), "n_selected": len(linears), "n_quantized": n_quant,
        "observe_s": t_meas, "observe_plain_s": t_plain, "finalize_s": t_finalize,
        "convert_s": t_convert, "clone_s": t_clone, "qdq_s": t_qdq, "qdq_plain_s": t_qdq_plain,
        "rss_imports_bytes": rss_imports, "peak_rss_bytes": peak_rss_bytes(), "heldout": summary,
        "scales": os.path.join(stats_dir, scale_files[-1]) if scale_files else None,
        "notes": ["FP8Config use_qdq=True, hp_dtype bf16; MEASURE observer maxabs, QUANTIZE maxabs_pow2"],
    }))


if __name__ == "__main__":
    main()
