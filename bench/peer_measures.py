"""The measurements every side-by-side process takes, defined once: INC (``peer_inc.py``),
llm-compressor (``peer_llmcompressor.py``) and us (``side_ours.py``).

The peers' scripts run in their own virtualenvs and import nothing of the project's packages; they
import this file as a sibling (``python bench/peer_inc.py`` puts ``bench/`` on ``sys.path``), so it
imports only the standard library and torch (every venv has both).
"""

import resource
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


COPY_BYTES = 300_000_000  # each buffer of the DRAM copy: far above any last-level cache


def dram_copy_s(repeats=3):
    """Seconds of ``dst.copy_(src)`` on two COPY_BYTES buffers, dst written beforehand (no page
    faults timed): each process's memory bandwidth, the convert row's baseline (the same measure as
    bench_weight_quant's DRAM copy)."""
    import torch

    src = torch.ones(COPY_BYTES, dtype=torch.uint8)
    dst = torch.zeros(COPY_BYTES, dtype=torch.uint8)
    times = [timed(lambda: dst.copy_(src))[0] for _ in range(repeats)]
    del src, dst
    return times


def heldout_summary(model, rows, batch):
    """Per position: log-probability of the next token (rows x seq-1) and argmax (rows x seq)."""
    import torch

    logp, top = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids = rows[i:i + batch]
            logits = model(input_ids=ids, use_cache=False).logits.float()
            logp.append(torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0])
            top.append(logits.argmax(-1))
    return torch.cat(logp).contiguous(), torch.cat(top).contiguous()


def quantized_linears(model):
    """The modules the side-by-side recipe selects: every Linear but lm_head (INC's allowlist types)."""
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def side_args(argv, prog, out_help):
    """The command line every side-by-side script takes, checked: a missing checkpoint or token file
    exits with one line naming it (bench.bench_peers writes both)."""
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(prog=prog, description="one tool on the bench_peers workload (prints one JSON line)")
    p.add_argument("--model", required=True, help="HF checkpoint folder (loaded in bf16)")
    p.add_argument("--tokens", required=True, help="safetensors file with int64 rows `calib` and `heldout`")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--batch", type=int, default=4, help="rows per forward")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=1, help="timed passes over the calibration rows")
    p.add_argument("--convert-repeats", type=int, default=3, help="warm converts after the cold one")
    p.add_argument("--qdq-repeats", type=int, default=3)
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        sys.exit(f"{prog}: no HF checkpoint at {a.model} (config.json missing); bench.bench_peers writes it")
    if not os.path.isfile(a.tokens):
        sys.exit(f"{prog}: token file {a.tokens} not found; bench.bench_peers writes it")
    return a


def load_rows(tokens_path, batch):
    """The calibration rows, the held-out rows and the calibration batches of ``batch`` rows."""
    from safetensors.torch import load_file

    tokens = load_file(tokens_path)
    calib, heldout = tokens["calib"].long(), tokens["heldout"].long()
    return calib, heldout, list(calib.split(batch))


def inc_style_config(dump_stats_path):
    """The INC config keys INC's FP8Config and our prepare/convert both take in this workload."""
    return dict(dump_stats_path=dump_stats_path, use_qdq=True, hp_dtype="bf16",
                allowlist={"types": ["Linear"], "names": []}, blocklist={"types": [], "names": ["lm_head"]})


def plain_reference(model_dir, heldout, batch):
    """The bf16 model, its selected Linears' weights and its held-out log-probabilities and argmax."""
    import torch
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, local_files_only=True).eval()
    weights = [m.weight for m in quantized_linears(plain).values()]
    logp, top = heldout_summary(plain, heldout, batch)
    return plain, weights, logp, top
