"""OPT (MSE) weight-scale search with INC's tie rules, exact and fast for power-of-two candidates (§2.6).

The search is split into two steps so that it can run over tensor-parallel shards:

1. ``*_errors`` return, for each candidate, the sum of squared quantization errors of the part
   of the weight a shard holds, in float64. Sums over shards add up (row-parallel shards: add
   the per-channel errors; column-parallel shards: concatenate them, bit for bit).
2. ``pick_*`` choose the candidate with INC's tie rule.

INC compares L2 norms (PTS) or per-channel sums of squares (PCS) in low precision; we compare
float64 sums of squares. The square root is monotone, so the argmin is the same.

Two implementations compute the errors:

- ``*_errors_bruteforce`` quantize the whole tensor once per candidate (vectorised, chunked): any
  candidates, any dtype. It is the reference the fast path is tested against.
- The fast path (``pts_errors``/``pcs_errors`` when every candidate scale is a power of two, as all
  of INC's lists are) scores all candidates from per-(channel, binary exponent) tables built in one
  pass over the data; see :mod:`shards.fp8.opt_tables`. Per-element errors are the brute force's
  exactly, so picks agree; where candidates' exact sums differ by less than float64 summation
  noise, each implementation's order of additions decides (neither is more right).

Ties are common and must stay exact: for power-of-two candidates, an element that neither
saturates nor goes subnormal has the *same* error under every candidate. The brute force computes
each candidate's partial sums by the same code path over the same element blocks, in the same order.
Torch splits a reduction over threads (changing its rounding) only when it produces a single
output, so every reduction there has at least two outputs (a lone candidate row is duplicated).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from shards.fp8.numerics import cast_to_fp8
from shards.fp8.opt_tables import fast_errors_or_none
from shards.fp8.methods import Rounding
from shards.fp8.scale_math import ScaleContext, pcs_scale_from_amax, round_scale

# Elements of the [candidates, elements] work tensor processed at once (several temporaries of
# up to 8 bytes each exist per element: about 100 MB per 2**22 elements).
CHUNK_ELEMENTS = 1 << 22


def _qdq_sq_error(
    x: torch.Tensor, scales: torch.Tensor, ctx: ScaleContext, div_dtype: torch.dtype, mul_dtype: torch.dtype
) -> torch.Tensor:
    """Squared error (float64) of quant-dequant of ``x`` with ``scales`` (broadcast), as INC does it.

    INC divides in the weight's dtype (``div_dtype``), casts to FP8, casts back to ``hp_dtype`` and
    multiplies by the scale (``mul_dtype``). We compute each op in fp32 and round to the dtype INC
    would hold the result in, which is what torch's reduced-precision ops do.
    """
    x32 = x.to(torch.float32)
    scaled = (x32 / scales).to(div_dtype)
    q = cast_to_fp8(scaled, ctx.fmt)
    y = (q.to(ctx.hp_dtype).to(torch.float32) * scales).to(mul_dtype)
    err = x.to(torch.float64) - y.to(torch.float64)
    return err * err


def _row_sums(sq: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis with a reduction that is the same for every row (see module doc)."""
    if sq[..., 0].numel() == 1:
        return torch.cat([sq, sq], dim=0).sum(dim=-1)[:1]
    return sq.sum(dim=-1)


def _blocked_errors(
    x: torch.Tensor, scales: torch.Tensor, ctx: ScaleContext, div_dtype: torch.dtype, mul_dtype: torch.dtype
) -> torch.Tensor:
    """Sums of squared error over the last axis of ``x`` (shape [..., K]) for every row of ``scales``.

    ``scales`` has shape [C, ...] broadcastable against ``x[None]`` with a trailing axis of 1; the
    result has shape [C, *x.shape[:-1]]. The candidate axis and the element axis are chunked so the
    work tensor stays below :data:`CHUNK_ELEMENTS`; the element blocks are the same for every
    candidate, so equal per-element errors give equal sums.
    """
    n_cand, k = scales.shape[0], x.shape[-1]
    per_row = max(1, x.numel())
    rows = max(1, min(n_cand, CHUNK_ELEMENTS // per_row))
    block = max(1, min(k, CHUNK_ELEMENTS // (rows * max(1, x.numel() // max(1, k)))))
    out = torch.zeros((n_cand, *x.shape[:-1]), dtype=torch.float64)
    for c0 in range(0, n_cand, rows):
        s = scales[c0 : c0 + rows]
        for k0 in range(0, k, block):
            xb = x[..., k0 : k0 + block].unsqueeze(0)
            out[c0 : c0 + rows] += _row_sums(_qdq_sq_error(xb, s, ctx, div_dtype, mul_dtype))
    return out


def pts_errors_bruteforce(weight_part: torch.Tensor, candidates: Sequence[float], ctx: ScaleContext) -> torch.Tensor:
    """:func:`pts_errors` by quantizing the whole tensor once per candidate (the reference)."""
    x = weight_part.detach().reshape(1, -1)
    scales = torch.tensor([float(c) for c in candidates], dtype=torch.float32).reshape(-1, 1, 1)
    return _blocked_errors(x, scales, ctx, weight_part.dtype, ctx.hp_dtype)[:, 0]


def pts_errors(weight_part: torch.Tensor, candidates: Sequence[float], ctx: ScaleContext) -> torch.Tensor:
    """Sum of squared quant-dequant error of ``weight_part`` for each absolute candidate scale.

    Returns a float64 tensor ``[len(candidates)]``; sums over shards of one weight add up.
    Power-of-two candidates take the fast exact path; anything else the brute force.
    """
    scales = torch.tensor([float(c) for c in candidates], dtype=torch.float32).reshape(-1, 1)
    fast = fast_errors_or_none(weight_part.reshape(1, -1), scales, ctx, weight_part.dtype, ctx.hp_dtype)
    return pts_errors_bruteforce(weight_part, candidates, ctx) if fast is None else fast[:, 0]


def pick_pts(errors: torch.Tensor, candidates: Sequence[float]) -> float:
    """INC's per-tensor choice: the minimum kept with ``<=``, so the *later* candidate wins a tie."""
    best_i, best_err = -1, float("inf")
    for i, e in enumerate(errors.tolist()):
        if e <= best_err:
            best_i, best_err = i, e
    if best_i < 0:
        raise ValueError(f"OPT search: no candidate has a finite error (errors {errors.tolist()})")
    return float(candidates[best_i])


def pcs_reference(
    weight_maxabs_per_channel: torch.Tensor,
    ctx: ScaleContext,
    weight_dtype: torch.dtype,
    backoff: float = 0.5,
) -> torch.Tensor:
    """The per-channel POW2 max-abs scale the PCS multipliers are relative to, in the weight dtype."""
    amax = weight_maxabs_per_channel.detach().reshape(-1).to(weight_dtype)
    return pcs_scale_from_amax(amax, backoff, Rounding.POW2, ctx)


def _pcs_scale_dtype(reference: torch.Tensor, ctx: ScaleContext) -> torch.dtype:
    # INC multiplies an hp_dtype multiplier vector by the reference: torch promotion decides.
    return torch.promote_types(reference.dtype, ctx.hp_dtype)


def _pcs_candidates(reference: torch.Tensor, multipliers: Sequence[float], ctx: ScaleContext) -> torch.Tensor:
    """``[n_mult, out]`` candidate scales ``reference * m`` held in INC's dtype, as fp32 values."""
    dtype = _pcs_scale_dtype(reference, ctx)
    mult = torch.tensor([float(m) for m in multipliers], dtype=ctx.hp_dtype).to(dtype)
    return (mult.reshape(-1, 1) * reference.to(dtype).reshape(1, -1)).to(torch.float32)


def _pcs_dtypes(weight_part: torch.Tensor, reference: torch.Tensor, ctx: ScaleContext) -> tuple[torch.dtype, torch.dtype]:
    """(division dtype, dequant-multiply dtype) of INC's per-channel quant-dequant."""
    dtype = _pcs_scale_dtype(reference, ctx)
    return torch.promote_types(weight_part.dtype, dtype), torch.promote_types(ctx.hp_dtype, dtype)


def pcs_errors_bruteforce(
    weight_part: torch.Tensor, reference: torch.Tensor, multipliers: Sequence[float], ctx: ScaleContext
) -> torch.Tensor:
    """:func:`pcs_errors` by quantizing the whole tensor once per multiplier (the reference)."""
    x = weight_part.detach().reshape(weight_part.shape[0], -1)
    scales = _pcs_candidates(reference, multipliers, ctx).unsqueeze(-1)
    return _blocked_errors(x, scales, ctx, *_pcs_dtypes(weight_part, reference, ctx))


def pcs_errors(
    weight_part: torch.Tensor, reference: torch.Tensor, multipliers: Sequence[float], ctx: ScaleContext
) -> torch.Tensor:
    """Per-channel sums of squared error for each multiplier: float64 ``[n_mult, out]``.

    ``weight_part`` is ``[out, ...]`` (every axis after the first is summed over) and ``reference``
    holds its channels' reference scales (for a column shard: the matching slice). Power-of-two
    candidate scales take the fast exact path; anything else the brute force.
    """
    x = weight_part.detach().reshape(weight_part.shape[0], -1)
    scales = _pcs_candidates(reference, multipliers, ctx)
    fast = fast_errors_or_none(x, scales, ctx, *_pcs_dtypes(weight_part, reference, ctx))
    return pcs_errors_bruteforce(weight_part, reference, multipliers, ctx) if fast is None else fast


def pick_pcs(
    errors: torch.Tensor,
    reference: torch.Tensor,
    multipliers: Sequence[float],
    ctx: ScaleContext,
    rounding: Rounding = Rounding.POW2,
) -> torch.Tensor:
    """INC's per-channel choice: strict ``<``, so the *first* multiplier wins a tie; then rounding.

    Returns ``round(reference * m_best)`` per channel, in the promoted dtype INC computes it in.
    """
    dtype = _pcs_scale_dtype(reference, ctx)
    # NaN never wins a strict < and inf never beats the starting inf: both count as inf here;
    # argmin takes the first of equal minima, i.e. the first multiplier wins a tie.
    e = np.nan_to_num(errors.to(torch.float64).numpy(), nan=np.inf, posinf=np.inf)
    if e.size and not np.isfinite(e.min(axis=0)).all():
        raise ValueError("OPT search: a channel has no candidate with a finite error")
    mult = torch.tensor([float(m) for m in multipliers], dtype=ctx.hp_dtype).to(dtype)
    best_m = mult[torch.from_numpy(np.argmin(e, axis=0))]
    return round_scale(best_m * reference.to(dtype), rounding, ctx)
