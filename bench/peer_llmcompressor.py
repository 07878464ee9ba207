"""Quantize a HF checkpoint with the peer tool llm-compressor, for comparison in our bench.

Stand-alone on purpose: it imports nothing from this repository, because it runs in a separate
virtualenv holding llm-compressor (`make bench-peers` builds one in .venv-peers), not the
project's .venv. The recipe is llm-compressor's own documented FP8 example:
`QuantizationModifier(targets="Linear", scheme="FP8" | "FP8_DYNAMIC", ignore=["lm_head"])`
applied with `oneshot`, saved compressed (compressed-tensors format).

    .venv-peers/bin/python bench/peer_llmcompressor.py --model DIR \
        --calibration TEXTFILE --seq-len 128 --rows 16 --scheme FP8 --out OUTDIR [--ignore lm_head]

DIR is a plain HF causal-LM safetensors folder with its tokenizer; nothing is downloaded.
Calibration (FP8 only, FP8_DYNAMIC is data-free): the whole text file is tokenized once and
cut into ROWS consecutive rows of SEQ_LEN tokens, in file order. Prints one JSON line at the end:
{"scheme": ..., "out": ..., "seconds": ...}.

Side by side (`--tokens FILE`, run by `python -m bench.bench_peers`): the model is loaded in bf16 and
measured like bench/peer_inc.py measures INC (same pairing, same held-out summary, same JSON keys),
with llm-compressor's public API:

- observe: its calibration forwards, as its `BasicPipeline` runs them (`llmcompressor.core`:
  `active_session().initialize(model, recipe)`, `LifecycleCallbacks.calibration_start()`, forwards
  inside `calibration_forward_context` + `DisableQuantization`), alternating with the plain model's
  forwards inside the same `calibration_forward_context` (which skips lm_head in both); then
  `sequential_epoch_end`/`calibration_end` (weight observers, qparams) and `session.finalize()`.
- oneshot: `oneshot(...)` on a fresh copy, its default pipeline, timed whole (calibration with its
  observers and the qparams; the weights stay bf16, fake-quantized), against one pass of plain
  forwards over the same rows.
- convert: compressed-tensors' `ModelCompressor.from_pretrained_model(m).compress_model(m)` (the bf16
  weights to FP8 codes in memory, what `save_pretrained(save_compressed=True)` does), cold then on
  `--convert-repeats` copies of the oneshot model, each followed by a clone of the same weights.
- qdq: the oneshot model's forward (compressed-tensors' fake quantization) against the plain one.
- held-out summary of the plain and the oneshot model in memory; the export is saved to OUT/export
  (the driver loads it with transformers + compressed-tensors, as bench_recipes does).
"""

import argparse
import copy
import gc
import json
import os
import sys
import time

# The measurements every side-by-side process takes (bench/peer_measures.py, beside this script;
# it imports only the standard library and torch).
from peer_measures import (dram_copy_s, heldout_summary, model_bytes, pairs, peak_rss_bytes,  # noqa: E402
                           quantized_linears, rss_bytes, timed)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def calibration_rows(tok, path: str, seq_len: int, rows: int):
    """`rows` consecutive `seq_len`-token rows from the start of the tokenized text file."""
    from datasets import Dataset

    with open(path, encoding="utf-8") as f:
        ids = tok(f.read().strip())["input_ids"]
    need = seq_len * rows
    if len(ids) < need:
        sys.exit(f"{path}: {len(ids)} tokens, need seq_len*rows = {seq_len}*{rows} = {need}")
    chunks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(rows)]
    return Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * seq_len for _ in chunks]})


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="HF checkpoint folder (with tokenizer)")
    p.add_argument("--calibration", help="plain text file (used by FP8 only; not with --tokens)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--scheme", default="FP8", choices=["FP8", "FP8_DYNAMIC"])
    p.add_argument("--out", required=True, help="output folder (compressed-tensors checkpoint; with --tokens: "
                                                "the measurement files, the export in OUT/export)")
    p.add_argument("--ignore", nargs="*", default=["lm_head"],
                   help="module names/regexes left unquantized (default: lm_head; a bare --ignore "
                        "quantizes lm_head too, untying it from the embeddings)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --tokens)")
    side = p.add_argument_group("side by side (bench.bench_peers)")
    side.add_argument("--tokens", help="safetensors file with int64 rows `calib` and `heldout`: measure, "
                                       "in bf16, as bench/peer_inc.py does")
    side.add_argument("--batch", type=int, default=4, help="rows per forward")
    side.add_argument("--passes", type=int, default=1, help="timed passes over the calibration rows")
    side.add_argument("--convert-repeats", type=int, default=3, help="warm compressions after the cold one")
    side.add_argument("--qdq-repeats", type=int, default=3)
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        sys.exit(f"peer_llmcompressor: no HF checkpoint at {a.model} (config.json missing)")
    if a.tokens is not None:
        if not os.path.isfile(a.tokens):
            sys.exit(f"peer_llmcompressor: token file {a.tokens} not found; bench.bench_peers writes it")
        if a.scheme != "FP8":
            p.error("--tokens measures the static FP8 scheme only")
    elif a.calibration is None or (a.scheme == "FP8" and not os.path.isfile(a.calibration)):
        p.error(f"--calibration: a text file is needed without --tokens (got {a.calibration})")
    return a


def quantize_and_save(a) -> None:
    """The recipe of bench_recipes: oneshot in fp32 on text rows, saved compressed."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads or 2)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    dataset = None
    if a.scheme == "FP8":  # static per-tensor activation scales need calibration data
        dataset = calibration_rows(tok, a.calibration, a.seq_len, a.rows)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, local_files_only=True)

    recipe = QuantizationModifier(targets="Linear", scheme=a.scheme, ignore=list(a.ignore))
    # Tied embeddings (SmolLM2: tie_word_embeddings=true): with lm_head ignored it stays a plain
    # tied Linear and save_pretrained writes the shared tensor once, as the source did. If lm_head
    # is quantized, it must not share (and re-quantize) the embedding weight, so oneshot unties it
    # first (tie_word_embeddings=False clones both and sets config.tie_word_embeddings=false).
    tie = "lm_head" in a.ignore
    oneshot(
        model=model,
        processor=tok,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=a.seq_len,
        num_calibration_samples=a.rows,
        shuffle_calibration_samples=False,
        tie_word_embeddings=tie,
    )

    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"scheme": a.scheme, "out": a.out, "seconds": round(time.perf_counter() - t0, 3)}))


# ---- side by side: the measurements are bench/peer_measures.py's (the same in every process)


def side_by_side(a) -> None:
    import contextlib
    from importlib.metadata import version

    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import LifecycleCallbacks, active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads or 1)
    rss_imports = rss_bytes()
    tokens = load_file(a.tokens)
    calib, heldout = tokens["calib"].long(), tokens["heldout"].long()
    batches = list(calib.split(a.batch))
    os.makedirs(a.out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    plain = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, local_files_only=True).eval()
    linears = quantized_linears(plain)
    weights = [m.weight for m in linears.values()]
    plain_logp, plain_top = heldout_summary(plain, heldout, a.batch)

    def recipe():
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=list(a.ignore))

    def forward(model):
        def run(x):
            with torch.no_grad():
                model(input_ids=x)
        return run

    # Its calibration forwards with observers, step by step as its BasicPipeline runs them.
    work = copy.deepcopy(plain)
    session = active_session()
    session.reset()
    t_init, _ = timed(lambda: session.initialize(model=work, start=-1, recipe=recipe()))
    t_start, _ = timed(LifecycleCallbacks.calibration_start)
    with contextlib.ExitStack() as stack:
        stack.enter_context(calibration_forward_context(work))
        stack.enter_context(DisableQuantization(work))
        stack.enter_context(calibration_forward_context(plain))
        t_meas, t_plain = pairs(forward(work), forward(plain), batches * a.passes, batches[0])

    def end():
        LifecycleCallbacks.sequential_epoch_end(list(work.modules()))
        LifecycleCallbacks.calibration_end()
        session.finalize()

    t_finalize, _ = timed(end)
    step_logp, step_top = heldout_summary(work, heldout, a.batch)
    work = None
    session.reset()
    gc.collect()

    # oneshot, whole, against one pass of plain (full) forwards over the same rows.
    plain_pass = sum(timed(lambda: forward(plain)(x))[0] for x in batches)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    work = copy.deepcopy(plain)
    t_oneshot, _ = timed(lambda: oneshot(model=work, processor=tok, dataset=dataset, recipe=recipe(),
                                         max_seq_length=calib.shape[1], num_calibration_samples=len(calib),
                                         shuffle_calibration_samples=False, batch_size=a.batch,
                                         tie_word_embeddings=True))
    work.eval()
    n_quant = sum(1 for m in work.modules() if getattr(m, "quantization_scheme", None) is not None)
    t_qdq, t_qdq_plain = pairs(forward(work), forward(plain), [batches[0]] * a.qdq_repeats, batches[0])
    quant_logp, quant_top = heldout_summary(work, heldout, a.batch)

    # The FP8 codes: compressed-tensors' compression of the oneshot model (copies), clone paired.
    t_convert, t_clone = [], []
    for i in range(1 + a.convert_repeats):
        fresh = None
        gc.collect()
        fresh = copy.deepcopy(work)
        t_convert.append(timed(lambda: ModelCompressor.from_pretrained_model(fresh).compress_model(fresh))[0])
        if i:
            t_clone.append(timed(lambda: [w.clone() for w in weights])[0])
    fresh = None
    gc.collect()
    export = os.path.join(a.out, "export")
    t_export, _ = timed(lambda: (work.save_pretrained(export, save_compressed=True), tok.save_pretrained(export)))

    summary = os.path.join(a.out, "heldout.safetensors")
    save_file({"plain_logprob": plain_logp, "plain_argmax": plain_top, "quant_logprob": quant_logp,
               "quant_argmax": quant_top}, summary)
    step_gap = float((step_logp - quant_logp).abs().max())
    step_top1 = float((step_top == quant_top).float().mean())
    peak_rss = peak_rss_bytes()  # before the DRAM copy's 600 MB of buffers
    copy_s = dram_copy_s()
    print(json.dumps({
        "tool": "llmcompressor", "tool_version": f"llmcompressor {version('llmcompressor')}, compressed-tensors "
                                                 f"{version('compressed-tensors')}",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "batch": a.batch, "calib_shape": list(calib.shape), "heldout_shape": list(heldout.shape),
        "n_batches": len(batches), "model_bytes": model_bytes(plain),
        "quant_weight_bytes": sum(w.numel() * w.element_size() for w in weights),
        "quant_weight_numel": sum(w.numel() for w in weights), "n_selected": len(linears), "n_quantized": n_quant,
        "observe_s": t_meas, "observe_plain_s": t_plain, "observe_lm_head": False, "finalize_s": t_finalize,
        "initialize_s": t_init + t_start, "oneshot_s": t_oneshot, "calib_plain_pass_s": plain_pass,
        "convert_s": t_convert, "clone_s": t_clone, "copy_s": copy_s, "qdq_s": t_qdq, "qdq_plain_s": t_qdq_plain,
        "export_s": t_export, "export": export,
        "rss_imports_bytes": rss_imports, "peak_rss_bytes": peak_rss, "heldout": summary,
        "notes": [f"QuantizationModifier(targets='Linear', scheme='FP8', ignore={list(a.ignore)}); oneshot's "
                  "default pipeline", f"step-by-step calibration vs oneshot on the held-out rows: max |Δ log p| "
                  f"{step_gap:.2e}, argmax agreement {step_top1:.1%}"],
    }))


def main(argv=None) -> None:
    a = parse(argv)
    if a.tokens is not None:
        side_by_side(a)
    else:
        quantize_and_save(a)


if __name__ == "__main__":
    main()
