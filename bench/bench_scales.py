"""Issue 7.3: weight-scale computation for every user-facing scale method, in ms per GB of weights.

The weights are the seven linears of ~1B-Llama-shaped layers (bf16, :func:`bench.models.layer_stack`).
For the three OPT methods the fast search (``shards.opt_search``) is also timed against a
straightforward per-candidate loop (quantize-dequantize the whole tensor once per candidate, sum the
squared error, keep INC's tie rule) on one tensor of the stack, in the same run; goal >= 10x. Both
must pick the same scales (checked). Other methods are shown next to one ``abs().amax()`` pass over
the same weights, the floor any scale computation pays.

Run alone: ``.venv/bin/python -m bench.bench_scales [--quick]``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from bench.models import layer_stack
from bench.timing import Row, Timing, at_least, row, single_thread, time_it
from shards import opt_search
from shards.numerics import ScaleDevice, quant_dequant
from shards.scale_spec import PCS_OPT_MULTIPLIERS, PREDEFINED, USER_METHODS, Granularity, SectionSpec, ValueType
from shards.scales import ScaleContext, opt_candidates, per_channel_maxabs, round_scale, weight_scale

# (layers, shrink of every dimension, name of the tensor the loop baseline runs on)
SIZES = {"toy": (1, 32, "model.layers.0.k_proj"), "quick": (1, 8, "model.layers.0.gate_proj"),
         "full": (1, 1, "model.layers.0.k_proj")}


def context_for(method: str) -> ScaleContext:
    """HW methods need Gaudi traits; the others compute for CPU/CUDA (full scale 448)."""
    return ScaleContext(device=ScaleDevice.GAUDI2) if "HW" in method else ScaleContext()


def loop_pts(w: torch.Tensor, cands: Sequence[float], ctx: ScaleContext) -> float:
    """Per-candidate loop: one full quant-dequant per candidate; ``<=`` keeps the later candidate."""
    x = w.float()
    best, best_err = cands[0], float("inf")
    for s in cands:
        y = quant_dequant(x, s, ctx.fmt, out_dtype=ctx.hp_dtype)
        err = float(((x.double() - y.double()) ** 2).sum())
        if err <= best_err:
            best, best_err = s, err
    return best


def loop_pcs(w: torch.Tensor, mults: Sequence[float], ctx: ScaleContext) -> torch.Tensor:
    """Per-multiplier loop over per-channel scales ``ref * m``; strict ``<`` keeps the first."""
    ref = opt_search.pcs_reference(per_channel_maxabs(w), ctx, w.dtype).float()
    x = w.float()
    best_err = torch.full((w.shape[0],), float("inf"), dtype=torch.float64)
    best = torch.zeros(w.shape[0])
    for m in mults:
        s = ref * m
        y = quant_dequant(x, s, ctx.fmt, out_dtype=ctx.hp_dtype, axis=0)
        err = ((x.double() - y.double()) ** 2).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def _loop_scale(w: torch.Tensor, section: SectionSpec, ctx: ScaleContext) -> torch.Tensor:
    if section.granularity is Granularity.PTS:
        best = loop_pts(w, opt_candidates(section, ctx), ctx)
        return round_scale(torch.tensor(best, dtype=ctx.hp_dtype), section.rounding, ctx)
    return loop_pcs(w, section.candidates or PCS_OPT_MULTIPLIERS, ctx)


def _per_gb(t: Timing, nbytes: int) -> str:
    return f"{t.min * 1e3 / (nbytes / 1e9):.0f} ms/GB (med {t.median * 1e3 / (nbytes / 1e9):.0f})"


def _opt_row(method: str, sample: torch.Tensor, section: SectionSpec, ctx: ScaleContext, stack_t: Timing,
             nbytes: int, repeats: int) -> Row:
    fast = time_it(lambda: weight_scale(sample, section, ctx), repeats)
    loop = time_it(lambda: _loop_scale(sample, section, ctx), repeats, warmup=0)
    same = torch.equal(weight_scale(sample, section, ctx).float(), _loop_scale(sample, section, ctx).float())
    r = at_least(f"scales {method.lower()}: OPT search vs per-candidate loop", fast, loop, 10.0,
                 note=f"stack {_per_gb(stack_t, nbytes)}; loop on {tuple(sample.shape)}; same picks: {same}")
    if not same:
        r["met"] = False
    return r


def run(size: str = "full", repeats: int = 3) -> list[Row]:
    """One row per user-facing method (ms/GB over the stack); OPT rows carry the loop speed-up."""
    single_thread()
    layers, shrink, sample_name = SIZES[size]
    stack = layer_stack(layers, shrink=shrink)
    nbytes = sum(w.numel() * w.element_size() for w in stack.values())
    floor = time_it(lambda: [w.abs().amax() for w in stack.values()], repeats)
    rows = []
    for method in USER_METHODS:
        section, ctx = PREDEFINED[method].weight, context_for(method)
        t = time_it(lambda: [weight_scale(w, section, ctx) for w in stack.values()], repeats)
        if section.value_type is ValueType.OPT:
            rows.append(_opt_row(method, stack[sample_name], section, ctx, t, nbytes, repeats))
        else:
            rows.append(row(f"scales {method.lower()} (ms/GB; baseline: one amax pass)", _per_gb(t, nbytes),
                            _per_gb(floor, nbytes), t.min / floor.min, "-", None))
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
