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
