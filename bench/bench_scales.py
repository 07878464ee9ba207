"""Issue 7.3: weight-scale computation for every user-facing scale method, in ms per GB of weights.

The weights are the seven linears of ~1B-Llama-shaped layers (bf16, :func:`bench.models.layer_stack`).
For the three OPT methods the fast search (``shards.fp8.opt_search``) over all weights of the stack is
timed against a straightforward per-candidate loop over the same weights (quantize-dequantize each
tensor once per candidate with ``shards.fp8.numerics.quant_dequant``, sum the squared error, keep INC's
tie rule), in the same run; goal >= 10x. The loop takes tens of seconds, so it runs once (the fast
search: min of the repetitions). Both must pick the same scales for every tensor (checked). The note
gives the ratio of the tensor where the search gains least (the smallest: it stays in cache for the
loop). Other methods are shown next to one ``abs().amax()`` pass over the same weights, the floor any
scale computation pays.

Two more rows time the error scoring alone on the stack's smallest tensor: ``opt_search.pts_errors`` /
``pcs_errors`` (the per-exponent tables of ``shards.fp8.opt_tables``) against ``pts_errors_bruteforce``
/ ``pcs_errors_bruteforce`` (one quantize of the whole tensor per candidate), run alternately in the
same process; goal >= 4 (the bound tests/shards/test_opt_tables.py asserted before its timing moved
here). Both must give the same errors (checked, rtol 1e-12: float64 summation order).

Run alone: ``.venv/bin/python -m bench.bench_scales [--quick]``.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch

from bench.models import layer_stack
from bench.timing import Row, Timing, row, single_thread, time_it, time_pair
from shards.fp8 import opt_search
from shards.fp8.numerics import ScaleDevice, quant_dequant
from shards.fp8.methods import (PCS_OPT_MULTIPLIERS, POW2_OPT_CANDIDATES, PREDEFINED, USER_METHODS, Granularity,
                                 SectionSpec, ValueType)
from shards.fp8.scale_math import ScaleContext, opt_candidates, per_channel_maxabs, round_scale
from shards.fp8.weight_scales import weight_scale

# (layers, shrink of every dimension)
SIZES = {"toy": (1, 32), "quick": (1, 8), "full": (1, 1)}


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


def _per_tensor(fn: Callable[[torch.Tensor], torch.Tensor], stack: dict[str, torch.Tensor],
                repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Fastest of ``repeats`` timings of ``fn`` on each tensor, and its results."""
    results: dict[str, torch.Tensor] = {}
    times = {name: time_it(lambda: results.__setitem__(name, fn(w)), repeats, warmup=0).min
             for name, w in stack.items()}
    return times, results


def _opt_row(method: str, stack: dict[str, torch.Tensor], section: SectionSpec, ctx: ScaleContext,
             stack_t: Timing, nbytes: int, repeats: int) -> Row:
    fast_t, fast = _per_tensor(lambda w: weight_scale(w, section, ctx), stack, repeats)
    loop_t, loop = _per_tensor(lambda w: _loop_scale(w, section, ctx), stack, 1)
    same = all(torch.equal(fast[n].float(), loop[n].float()) for n in stack)
    worst = min(stack, key=lambda n: loop_t[n] / fast_t[n])
    fast_total, loop_total = sum(fast_t.values()), sum(loop_t.values())
    ratio = loop_total / fast_total
    return row(f"scales {method.lower()}: OPT search vs per-candidate loop, whole stack",
               f"{fast_total * 1e3:.1f} ms (sum of per-tensor minima)", f"{loop_total:.1f} s (one run)", ratio,
               ">= 10", same and ratio >= 10.0,
               f"stack {_per_gb(stack_t, nbytes)}; same picks: {same}; least gain "
               f"{loop_t[worst] / fast_t[worst]:.1f}x on {worst.rsplit('.', 1)[-1]} {tuple(stack[worst].shape)}")


def _tables_rows(name: str, w: torch.Tensor, repeats: int) -> list[Row]:
    """The fast error scoring against opt_search's brute force on one tensor (PTS and PCS), timed
    alternately so that the machine's drift hits both alike."""
    ctx = ScaleContext()
    ref = opt_search.pcs_reference(per_channel_maxabs(w), ctx, w.dtype)
    pairs = {
        "PTS": (lambda: opt_search.pts_errors(w, POW2_OPT_CANDIDATES, ctx),
                lambda: opt_search.pts_errors_bruteforce(w, POW2_OPT_CANDIDATES, ctx), len(POW2_OPT_CANDIDATES)),
        "PCS": (lambda: opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx),
                lambda: opt_search.pcs_errors_bruteforce(w, ref, PCS_OPT_MULTIPLIERS, ctx), len(PCS_OPT_MULTIPLIERS)),
    }
    rows = []
    for gran, (fast, brute, n) in pairs.items():
        fast_t, brute_t = time_pair(fast, brute, repeats)
        same = torch.allclose(fast(), brute(), rtol=1e-12, atol=0)
        ratio = brute_t.min / fast_t.min
        rows.append(row(f"OPT tables {gran}: fast error scoring vs brute force, {name.rsplit('.', 1)[-1]} "
                        f"{tuple(w.shape)}", fast_t, brute_t, ratio, ">= 4", same and ratio >= 4.0,
                        f"{n} candidates, {w.dtype}; same errors: {same}"))
    return rows


def run(size: str = "full", repeats: int = 3) -> list[Row]:
    """One row per user-facing method (ms/GB over the stack); OPT rows carry the loop speed-up."""
    single_thread()
    layers, shrink = SIZES[size]
    stack = layer_stack(layers, shrink=shrink)
    nbytes = sum(w.numel() * w.element_size() for w in stack.values())
    floor = time_it(lambda: [w.abs().amax() for w in stack.values()], repeats)
    rows = []
    for method in USER_METHODS:
        section, ctx = PREDEFINED[method].weight, context_for(method)
        t = time_it(lambda: [weight_scale(w, section, ctx) for w in stack.values()], repeats)
        if section.value_type is ValueType.OPT:
            rows.append(_opt_row(method, stack, section, ctx, t, nbytes, repeats))
        else:
            rows.append(row(f"scales {method.lower()} (ms/GB; baseline: one amax pass)", _per_gb(t, nbytes),
                            _per_gb(floor, nbytes), t.min / floor.min, "-", None))
    # The smallest tensor keeps the brute force's 1 + repeats runs short; the OPT rows above gain least
    # on small tensors too (they stay in cache for the per-candidate passes).
    rows += _tables_rows(*min(stack.items(), key=lambda kv: kv[1].numel()), repeats)
    return rows


if __name__ == "__main__":
    from bench.run_all import print_rows

    print_rows(run("quick" if "--quick" in sys.argv else "full"))
