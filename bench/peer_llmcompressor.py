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
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def calibration_rows(tok, path: str, seq_len: int, rows: int) -> Dataset:
    """`rows` consecutive `seq_len`-token rows from the start of the tokenized text file."""
    with open(path, encoding="utf-8") as f:
        ids = tok(f.read().strip())["input_ids"]
    need = seq_len * rows
    if len(ids) < need:
        sys.exit(f"{path}: {len(ids)} tokens, need seq_len*rows = {seq_len}*{rows} = {need}")
    chunks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(rows)]
    return Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * seq_len for _ in chunks]})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="HF checkpoint folder (with tokenizer)")
    p.add_argument("--calibration", required=True, help="plain text file (used by FP8 only)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--scheme", required=True, choices=["FP8", "FP8_DYNAMIC"])
    p.add_argument("--out", required=True, help="output folder (compressed-tensors checkpoint)")
    p.add_argument("--ignore", nargs="*", default=["lm_head"],
                   help="module names/regexes left unquantized (default: lm_head; a bare --ignore "
                        "quantizes lm_head too, untying it from the embeddings)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)

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


if __name__ == "__main__":
    main()
