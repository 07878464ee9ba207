"""MoE measurement cost: measuring a tiny Mixtral (every expert) / its plain forward on the same batches.

A small ``MixtralForCausalLM`` is built from ``MixtralConfig`` with a fixed seed (full size: hidden
256, 8 experts, top-2, 2 layers; fp32). Its routers get random weights normal(0, 0.5), so tokens
spread over all experts (HF initialises some routers to zero, which routes every token alike).

*measured*: the single-card API as a user runs it, on a fresh copy of the model each repetition
(the copy is not timed): ``orchestrator.prepare(model, config)`` (replaces the fused experts by
per-expert Linears and attaches the max-abs observers; default allowlist, so attention matmuls are
observed too), the forwards of the batches, ``orchestrator.finalize_calibration(model)`` (store
write and reduce). *baseline*: the plain forward of an identical, untouched model (HF's fused
experts) on the same batches. The two alternate; one torch thread. The row checks in the returned
Measurement that every expert of every layer was measured (modules matching ``.experts.<E>.``).

Run alone: ``.venv/bin/python -m bench.bench_moe [--quick]``.
"""

from __future__ import annotations

import copy
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.timing import Row, Timing, row, single_thread


@dataclass(frozen=True)
class MoeSize:
    """The tiny Mixtral and the batches it sees."""

    hidden: int
    intermediate: int
    experts: int
    layers: int
    batches: int
    batch: int
    length: int


SIZES: dict[str, MoeSize] = {
    "toy": MoeSize(64, 128, 8, 2, 2, 1, 32),
    "quick": MoeSize(128, 256, 8, 2, 2, 2, 64),
    "full": MoeSize(256, 512, 8, 2, 8, 4, 128),
}
VOCAB = 1024
TOP_K = 2
EXPERT_RE = re.compile(r"^(.*)\.experts\.(\d+)\.")


def tiny_mixtral(size: MoeSize, seed: int = 0) -> nn.Module:
    """A random fp32 ``MixtralForCausalLM`` with router weights normal(0, 0.5), in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=size.hidden, intermediate_size=size.intermediate,
                           num_hidden_layers=size.layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=size.experts, num_experts_per_tok=TOP_K,
                           max_position_embeddings=max(256, size.length), initializer_range=0.05)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.ndim == 2 and p.shape[0] == size.experts:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def expert_coverage(names: Any) -> dict[str, set[int]]:
    """MoE layer prefix → indices of the experts that have a measured module."""
    out: dict[str, set[int]] = {}
    for name in names:
        m = EXPERT_RE.match(name)
        if m:
            out.setdefault(m.group(1), set()).add(int(m.group(2)))
    return out


def _config(dump: Path) -> dict[str, Any]:
    return {"mode": "MEASURE", "observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(dump)}


def _forward_all(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)


def _measure_once(model: nn.Module, batches: list[torch.Tensor], dump: Path) -> tuple[float, float, Any]:
    """(seconds of the whole measurement, seconds of its observed forwards, the Measurement)."""
    import orchestrator

    t0 = time.perf_counter()
    orchestrator.prepare(model, _config(dump))
    t1 = time.perf_counter()
    _forward_all(model, batches)
    t2 = time.perf_counter()
    measurement = orchestrator.finalize_calibration(model)
    return time.perf_counter() - t0, t2 - t1, measurement


def run(size: str = "full", repeats: int = 3) -> list[Row]:
    """One row: (prepare + observed forwards + finalize_calibration) / plain forward, same batches."""
    single_thread()
    s = SIZES[size]
    repeats = max(1, repeats)
    plain = tiny_mixtral(s)
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, VOCAB, (s.batch, s.length), generator=g) for _ in range(s.batches)]
    whole: list[float] = []
    forwards: list[float] = []
    base: list[float] = []
    measurement = None
    with tempfile.TemporaryDirectory() as tmp:
        _forward_all(plain, batches)  # warm-up of the plain path (the measured path warms up in rep 0)
        for rep in range(repeats + 1):
            model = copy.deepcopy(plain)  # identical weights, never prepared (not timed)
            w, f, measurement = _measure_once(model, batches, Path(tmp) / f"rep{rep}" / "moe")
            t0 = time.perf_counter()
            _forward_all(plain, batches)
            b = time.perf_counter() - t0
            if rep:  # rep 0 is the warm-up
                whole.append(w)
                forwards.append(f)
                base.append(b)
    measured = Timing(min(whole), statistics.median(whole))
    baseline = Timing(min(base), statistics.median(base))
    ratio = measured.min / baseline.min
    assert measurement is not None
    coverage = expert_coverage(measurement.modules)
    complete = len(coverage) == s.layers and all(len(e) == s.experts for e in coverage.values())
    counted = sum(len(e) for e in coverage.values())
    expert_modules = sum(1 for n in measurement.modules if EXPERT_RE.match(n))
    routed = [m.num_tokens for n, m in measurement.modules.items() if EXPERT_RE.match(n)]
    note = (f"tiny Mixtral fp32, hidden {s.hidden}, {s.experts} experts top-{TOP_K}, {s.layers} layers, routers "
            f"normal(0, 0.5); {s.batches} batches of {s.batch}x{s.length} tokens; experts measured "
            f"{counted}/{s.layers * s.experts} ({expert_modules} expert Linears, "
            f"{len(measurement.modules)} modules in all; tokens per expert {min(routed, default=0)}.."
            f"{max(routed, default=0)} of {s.batches * s.batch * s.length * TOP_K} routings per layer); "
            f"observed forwards alone "
            f"{min(forwards) / baseline.min:.3g}x the plain forward (prepare and finalize_calibration are the rest); "
            f"baseline: HF's fused experts; {repeats} repetition(s)")
    if not complete:
        missing = {layer: sorted(set(range(s.experts)) - e) for layer, e in coverage.items()}
        note += f"; MISSING experts: {missing or 'no expert module measured'}"
    return [row("MoE measure (tiny Mixtral, all experts) / plain forward", measured, f"plain forward {baseline}",
                ratio, "every expert measured", complete, note)]


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
