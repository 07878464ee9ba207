"""Fast exact OPT scoring for power-of-two candidates (used by :mod:`shards.fp8.opt_search`).

Dividing by 2**k only shifts the exponent, so the error of an element under candidate k depends
only on d = e - k (e: the element's binary exponent) and on its 24-bit mantissa integer M
(|x| = M * 2**(e-23)):
  d >  eF           the whole binade saturates: (|x| - F*2**k)**2, summed from n, sum|x|, sum x**2;
  d == eF           elements with M > M_F saturate at F*2**k = M_F*2**(e-23), the rest round normally;
  emin <= d < eF    normal rounding to p mantissa bits: the same error for every such k;
  d <  emin         subnormal rounding to j = d - emin + p bits (j <= -2: the element becomes 0).
So one pass per j in -2..p builds per-(channel, exponent) tables and every candidate is scored
from the tables. Each table entry is a sum of exactly the per-element squared errors the brute
force computes, added in element order; low (M <= M_F) and high (M > M_F) elements are kept in
separate entries so that a boundary binade and a normal binade with the same per-element errors
give bit-identical sums. Every candidate's total adds its per-binade entries in the same order,
so candidates with identical per-element errors tie exactly, as they do in the brute force.

Two layouts build the tables: per-element passes over ``|x|`` (any fast-path dtype, and one
channel of a 16-bit tensor through its distinct magnitudes), and for bf16 channels one histogram
of (channel, binade, mantissa) scored against exact lookup columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from shards.fp8.numerics import Fp8Format
from shards.fp8.scale_math import ScaleContext, magnitude_codes

# Elements of one block of the per-element table passes.
CHUNK_ELEMENTS = 1 << 22
# Bins of one bf16 mantissa histogram chunk: small enough for the counts to stay in cache.
HISTOGRAM_BINS = 1 << 18


_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Smallest positive value a dtype holds (subnormals included): q * s below it would round.
_SMALLEST = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


@dataclass(frozen=True)
class _Grid:
    """The FP8 grid in the integer terms of the fast path."""

    p: int  # mantissa bits
    emin: int  # exponent of the smallest normal
    fullscale: float
    e_f: int  # binary exponent of the full scale
    m_f: int  # full scale's 24-bit mantissa integer

    @classmethod
    def of(cls, fmt: Fp8Format) -> "_Grid":
        mant, ex = math.frexp(fmt.fullscale)
        return cls(7 - fmt.exp_bits, 2 - 2 ** (fmt.exp_bits - 1), fmt.fullscale, ex - 1, int(mant * 2**24))


def _pow2_exponents(scales: torch.Tensor) -> np.ndarray | None:
    """``log2`` of every scale if all are positive finite powers of two, else None."""
    s = scales.detach().to(torch.float64).numpy()
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        return None
    mant, ex = np.frexp(s)
    return (ex - 1).astype(np.int64) if np.all(mant == 0.5) else None


def _fast_path_ok(
    x: torch.Tensor, finite: bool, amax: float, kexp: np.ndarray, grid: _Grid, div_dtype: torch.dtype,
    mul_dtype: torch.dtype,
) -> bool:
    """Whether every op of the brute force is exact (or rounds the way the tables assume) here.

    ``finite``: every element of ``x`` is finite; ``amax``: its largest magnitude.
    """
    if x.dtype not in _FAST_DTYPES or mul_dtype not in _FAST_DTYPES:
        return False
    if div_dtype is torch.float16 and grid.p == 2:
        return False  # E5M2 subnormals lie in fp16's subnormal range: the division would round twice
    if x.numel() == 0 or not finite:
        return False
    smallest_step = 2.0 ** (grid.emin - grid.p + int(kexp.min()))  # smallest nonzero q * s
    if smallest_step < _SMALLEST[mul_dtype] or smallest_step < _SMALLEST[torch.float32]:
        return False
    biggest = min(grid.fullscale * 2.0 ** int(kexp.max()), 2 * amax)  # no dequantized value exceeds 2 max|x|
    return biggest <= torch.finfo(mul_dtype).max


def _magnitudes(x: torch.Tensor) -> np.ndarray:
    """``|x|`` as float64 ``[groups, K]`` (exact for every fast-path dtype)."""
    return np.abs(x.detach().to(torch.float32).numpy(), dtype=np.float64)


def _bf16_value(code: int) -> float:
    return float(torch.tensor(code, dtype=torch.int16).view(torch.bfloat16))


def fast_errors_or_none(
    x: torch.Tensor, scales: torch.Tensor, ctx: ScaleContext, div_dtype: torch.dtype, mul_dtype: torch.dtype
) -> torch.Tensor | None:
    """Fast-path errors of ``x`` ``[groups, K]`` for ``scales`` ``[n_cand, groups]`` (float64
    ``[n_cand, groups]``), or None where the fast path does not apply (then the caller runs the
    brute force)."""
    kexp = _pow2_exponents(scales)
    if kexp is None or x.dtype not in _FAST_DTYPES or x.numel() == 0:
        return None
    grid = _Grid.of(ctx.fmt)
    # A single 16-bit channel is reduced to its distinct magnitudes with multiplicities first;
    # several bf16 channels go through mantissa histograms; anything else element by element.
    distinct = _distinct_magnitudes(x) if x.shape[0] == 1 else None
    codes = magnitude_codes(x) if distinct is None and x.dtype is torch.bfloat16 else None
    a, code_range = None, None
    if distinct is not None:
        finite, amax = bool(np.isfinite(distinct[0]).all()), float(distinct[0].max(initial=0.0))
    elif codes is not None:
        code_range = (codes.amin(dim=1), codes.amax(dim=1))  # both ~20x faster than one aminmax
        top = int(code_range[1].max())
        finite, amax = top < 0x7F80, _bf16_value(min(top, 0x7F7F))
    else:
        a = _magnitudes(x)
        finite, amax = bool(np.isfinite(a).all()), float(a.max())
    if not _fast_path_ok(x, finite, amax, kexp, grid, div_dtype, mul_dtype):
        return None
    if distinct is not None:
        return torch.from_numpy(_scores(_distinct_tables(*distinct, grid), kexp))
    if codes is not None:
        errors = _bf16_channel_errors(codes, code_range, kexp, grid)
        if errors is not None:
            return torch.from_numpy(errors)
    tables = _fill_tables(_magnitudes(x) if a is None else a, kexp, grid)
    return torch.from_numpy(_scores(tables, kexp))


class _Tables:
    """Per-(channel, exponent) sums the candidate scores are assembled from (see section comment).

    Element ``a = m * 2**ex`` (``m`` in [0.5, 1)) lands in bin ``channel * n_e + ex - ex_lo``.
    Sums are taken over ``m``-scaled values and multiplied by the bin's power of two afterwards:
    scaling by a power of two commutes exactly with every float addition, so the results are the
    sums of the per-element squared errors themselves.
    """

    def __init__(self, grid: _Grid, n_groups: int, ex_lo: int | np.ndarray, n_e: int) -> None:
        n_bins = n_groups * n_e
        self.grid, self.ex_lo, self.n_e = grid, ex_lo, n_e
        self.low = np.zeros((grid.p + 3, n_bins))  # j = -2 .. p: elements with M <= M_F
        self.high = np.zeros((grid.p + 3, n_bins))  # the same for M > M_F
        self.sat_boundary = np.zeros(n_bins)
        self.count = np.zeros(n_bins)
        self.sum_abs = np.zeros(n_bins)
        self.sum_sq = np.zeros(n_bins)

    def add(self, m: np.ndarray, bins: np.ndarray, weight: np.ndarray | None, sub: np.ndarray | None) -> None:
        """Accumulate mantissas ``m`` (``weight``: multiplicity, or None for 1) into ``bins``.

        ``sub`` marks the elements whose binade goes subnormal under some candidate (None: all);
        the subnormal tables of the others are never read.
        """
        n, grid = self.count.size, self.grid
        m_f = grid.m_f * 2.0**-24
        high = m > m_f
        both = bins + n * high  # one bincount fills the low and the high tables
        self._rounding(m, both, weight, range(grid.p, grid.p + 1))
        if sub is None:
            self._rounding(m, both, weight, range(-2, grid.p))
        elif sub.any():
            self._rounding(m[sub], both[sub], None if weight is None else weight[sub], range(-2, grid.p))
        t = np.where(high, m - m_f, 0.0)
        self.sat_boundary += self._acc(t * t, both, weight)[n:]
        self.count += np.bincount(both, weight, minlength=2 * n).reshape(2, n).sum(axis=0)
        self.sum_abs += self._acc(m.copy(), both, weight).reshape(2, n).sum(axis=0)
        self.sum_sq += self._acc(m * m, both, weight).reshape(2, n).sum(axis=0)

    def _acc(self, values: np.ndarray, both: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        if weight is not None:
            values *= weight
        return np.bincount(both, values, minlength=2 * self.count.size)

    def _rounding(self, m: np.ndarray, both: np.ndarray, weight: np.ndarray | None, js: range) -> None:
        """Squared errors of rounding to ``j`` mantissa bits (in units of the binade) for ``j`` in ``js``."""
        n = self.count.size
        t, r = np.empty_like(m), np.empty_like(m)
        for j in js:
            np.multiply(m, 2.0 ** (j + 1), out=t)  # m / granularity; rint rounds half to even
            np.rint(t, out=r)
            t -= r
            t *= t
            sums = self._acc(t, both, weight) * 4.0 ** -(j + 1)
            self.low[j + 2] += sums[:n]
            self.high[j + 2] += sums[n:]

    def extend(self, extra: int) -> None:
        """Add (``extra`` > 0) or drop (< 0) bins at the end: a scratch bin for zeros."""
        for name in ("low", "high", "sat_boundary", "count", "sum_abs", "sum_sq"):
            t = getattr(self, name)
            pad = [(0, 0)] * (t.ndim - 1) + [(0, extra)]
            setattr(self, name, np.pad(t, pad) if extra > 0 else t[..., :extra])

    def bin_exponents(self) -> np.ndarray:
        """``[n_groups, n_e]`` frexp exponent of every bin (``ex_lo`` is one int or one per channel)."""
        n_groups = self.count.size // self.n_e
        lo = np.broadcast_to(np.asarray(self.ex_lo, dtype=np.int64).reshape(-1), (n_groups,))
        return lo[:, None] + np.arange(self.n_e)[None, :]

    def finish(self) -> None:
        """Multiply every bin by its power of two (``2**ex`` for sums of ``a``, ``4**ex`` for squares)."""
        ex = self.bin_exponents().reshape(-1)
        for table in (self.low, self.high, self.sat_boundary, self.sum_sq):
            table *= np.ldexp(1.0, 2 * ex)
        self.sum_abs *= np.ldexp(1.0, ex)


def _exponent_range(a: np.ndarray) -> tuple[int, int]:
    """(lowest, number of) frexp exponents of the nonzero values of ``a``."""
    nz = a[a > 0]
    if nz.size == 0:
        return 0, 1
    lo, hi = np.frexp(nz.min())[1], np.frexp(nz.max())[1]
    return int(lo), int(hi - lo + 1)


def _distinct_magnitudes(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """For a 16-bit tensor: its distinct nonzero magnitudes (float64) and how often each occurs."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return None
    # Sign dropped in int16, widened to int32 only for bincount (torch's is ~3x numpy's here).
    bits = magnitude_codes(x).reshape(-1).to(torch.int32)
    counts = torch.bincount(bits, minlength=1 << 15).numpy()
    codes = np.flatnonzero(counts[1:]) + 1  # code 0 is +0.0
    values = torch.from_numpy(codes.astype(np.int16)).view(x.dtype).to(torch.float64).numpy()
    return values, counts[codes].astype(np.float64)


def _distinct_tables(values: np.ndarray, counts: np.ndarray, grid: _Grid) -> _Tables:
    """Tables of one channel given as distinct magnitudes and their multiplicities."""
    tables = _Tables(grid, 1, *_exponent_range(values))
    m, ex = np.frexp(values)
    tables.add(m, ex - tables.ex_lo, counts, None)
    tables.finish()
    return tables


def _fill_tables(a: np.ndarray, kexp: np.ndarray, grid: _Grid) -> _Tables:
    """Tables over the rows (channels) of ``a`` = ``|x|`` ``[groups, K]``.

    Chunks are whole rows (or fixed column blocks of one row), so a channel's entries do not
    depend on which other channels share the tensor: column shards concatenate bit for bit.
    """
    tables = _Tables(grid, a.shape[0], *_exponent_range(a.reshape(-1)))
    dummy = tables.count.size  # zeros go to a bin past the end (error 0 under every candidate)
    tables.extend(1)
    # An element needs the subnormal tables if its binade is below emin + the channel's largest k.
    sub_below = np.ldexp(1.0, kexp.max(axis=0) + grid.emin)
    k = a.shape[1]
    cols = max(1, min(k, CHUNK_ELEMENTS))
    rows = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, a.shape[0], rows):
        for c0 in range(0, k, cols):
            block = a[r0 : r0 + rows, c0 : c0 + cols]
            m, ex = np.frexp(block)
            first_bin = np.arange(r0, r0 + block.shape[0]) * tables.n_e - tables.ex_lo
            bins = ex + first_bin[:, None]
            bins[block == 0] = dummy
            sub = block < sub_below[r0 : r0 + block.shape[0], None]
            tables.add(m.reshape(-1), bins.reshape(-1), None, sub.reshape(-1))
    tables.extend(-1)
    tables.finish()
    return tables


def _scores(tables: _Tables, kexp: np.ndarray) -> np.ndarray:
    """``[n_cand, n_groups]`` sums of squared error; ``kexp`` is ``[n_cand, n_groups]``."""
    grid, n_e = tables.grid, tables.n_e
    n_groups = kexp.shape[1]
    shape = (n_groups, n_e)
    low, high = tables.low.reshape(-1, *shape), tables.high.reshape(-1, *shape)
    exs = tables.bin_exponents()
    d = (exs - 1)[None] - kexp[:, :, None]  # binade minus k
    j_idx = np.clip(d - grid.emin + grid.p, -2, grid.p) + 2
    g_idx = np.arange(n_groups)[None, :, None]
    e_idx = np.arange(n_e)[None, None, :]
    rounded = low[j_idx, g_idx, e_idx] + high[j_idx, g_idx, e_idx]
    boundary = low[grid.p + 2][None] + tables.sat_boundary.reshape(shape)[None]
    c = np.ldexp(grid.fullscale, kexp)[:, :, None]
    cnt, s1, s2 = (t.reshape(shape)[None] for t in (tables.count, tables.sum_abs, tables.sum_sq))
    saturated = s2 - 2.0 * c * s1 + cnt * c * c
    # Where c is below a quarter ulp of the binade's smallest value, |x| - c rounds to |x| in float64
    # and every such candidate gets exactly sum(x^2), as in the brute force.
    binade = np.ldexp(1.0, exs - 1)[None]
    saturated = np.where(c < binade * 2.0**-54, s2, saturated)
    contrib = np.where(d > grid.e_f, saturated, np.where(d == grid.e_f, boundary, rounded))
    # Left-to-right over exponents: empty binades add +0.0, so the result does not depend on the
    # exponent range of the tensor (column shards) and identical rows give identical sums.
    total = np.zeros(contrib.shape[:2])
    for i in range(n_e):
        total += contrib[:, :, i]
    return total





# ---- bf16 channels: mantissa histograms ---------------------------------------------------------
# A bf16 magnitude code is (exponent field << 7 | mantissa u): |x| = m * 2**ex with m = (128 + u) / 256.
# With power-of-two candidates at the same offsets in every channel (PCS: reference * multiplier),
# d = binade - k depends only on the binade's position relative to the channel's first candidate,
# so one lookup column per distinct d gives every element's squared error in units of 4**ex, and a
# histogram of (channel, relative binade, u) dotted with those columns scores every candidate.
# Lookup values are integers times 2**-S and the histogram holds counts, so each (channel, binade)
# dot product is exact whatever order BLAS adds in (checked: every partial sum stays below 2**53).
# Totals then add the binades upward in a fixed order, as :func:`_scores` does.


def _binade_error_column(d: int, grid: _Grid) -> np.ndarray:
    """``[128]`` squared quant-dequant error, in units of ``4**ex``, of the bf16 mantissas of a binade
    that lies ``d`` binades above the candidate scale's exponent (see the section comment above)."""
    m = (128 + np.arange(128)) / 256.0
    m_f = grid.m_f * 2.0**-24
    if d > grid.e_f:  # the whole binade saturates at F * 2**k = m_f * 2**(e_f - d) binade units
        return (m - m_f * 2.0 ** (grid.e_f - d)) ** 2
    j = min(grid.p, max(-2, d - grid.emin + grid.p))  # mantissa bits left after rounding
    t = m * 2.0 ** (j + 1)
    rounded = (t - np.rint(t)) ** 2 * 4.0 ** -(j + 1)
    return np.where(m > m_f, (m - m_f) ** 2, rounded) if d == grid.e_f else rounded


def _canonical_d(d: np.ndarray, grid: _Grid) -> np.ndarray:
    """Map binade offsets with the same error column onto one representative (fewer columns)."""
    d = np.where((d >= grid.emin) & (d < grid.e_f), grid.emin, d)
    return np.maximum(d, grid.emin - grid.p - 2)  # below this every element rounds to 0: error x**2


def _exact_lookup(columns: list[np.ndarray], max_count: int) -> bool:
    """Whether count-weighted sums of these columns are exact in float64 in any order."""
    lut = np.stack(columns)
    for shift in range(0, 54):
        scaled = np.ldexp(lut, shift)
        if np.array_equal(scaled, np.floor(scaled)):
            return float(scaled.max(initial=0.0)) * max_count < 2.0**53
    return False


def _bf16_channel_errors(
    codes: torch.Tensor, code_range: tuple[torch.Tensor, torch.Tensor], kexp: np.ndarray, grid: _Grid
) -> np.ndarray | None:
    """``[n_cand, groups]`` error sums of a bf16 ``[groups, K]`` tensor (``codes``: :func:`shards.fp8.scale_math.magnitude_codes`,
    ``code_range``: their per-row min and max) from one histogram; None where this path does not
    apply (bf16 subnormals, candidates at different offsets per channel, inexact lookup sums)."""
    offsets = kexp - kexp[:1]
    if not np.all(offsets == offsets[:, :1]):
        return None
    offsets, base = offsets[:, 0], kexp[0]
    lo, hi = (t.to(torch.int32) for t in code_range)
    if bool((lo == 0).any()):  # zeros: the smallest *nonzero* code; all-zero rows keep their max
        nz = ((codes - 1) & 0x7FFF).amin(dim=1).to(torch.int32) + 1
        lo = torch.where(nz > 0x7FFF, hi, nz)
    lo_b, hi_b = (lo >> 7).numpy() - 127, (hi >> 7).numpy() - 127  # binade (exponent) of each code
    nonzero = hi.numpy() > 0
    if not nonzero.any():
        return np.zeros((kexp.shape[0], kexp.shape[1]))
    if int(lo[torch.from_numpy(nonzero)].min()) < 128:
        return None  # bf16 subnormals: their codes do not encode m and ex this way
    rlo, rhi = int((lo_b - base)[nonzero].min()), int((hi_b - base)[nonzero].max())
    n_r = rhi - rlo + 1
    first_binade = np.where(nonzero, base + rlo, -126)  # all-zero rows: any window holds them
    if int(first_binade.min()) < -126:
        return None  # the zeros' slot below the window would overlap real codes
    d = _canonical_d(rlo + np.arange(n_r)[:, None] - offsets[None, :], grid)  # [n_r, n_cand]
    ds, col = np.unique(d, return_inverse=True)
    columns = [_binade_error_column(int(v), grid) for v in ds]
    if not _exact_lookup(columns, codes.shape[1]):
        return None
    sums = _binade_sums(codes, first_binade, n_r, np.stack(columns, axis=1))  # [groups, n_r, columns]
    # Binade r of channel c holds units of 4**(first_binade[c] + 1 + r). Scaling by a power of two
    # commutes exactly with float addition while nothing goes subnormal or overflows (every factor
    # here stays within 2**-600 .. 2**600), so the per-binade factor is applied before the sum and
    # the per-channel one after it.
    sums *= np.ldexp(1.0, 2 * np.arange(n_r))[None, :, None]
    col = col.reshape(n_r, -1)
    total = np.zeros((codes.shape[0], kexp.shape[0]))
    for r in range(n_r):  # upward over binades, one fixed order (ties stay exact)
        total += sums[:, r, col[r]]
    total *= np.ldexp(1.0, 2 * (first_binade + 1))[:, None]
    return np.ascontiguousarray(total.T)


def _binade_sums(codes: torch.Tensor, first_binade: np.ndarray, n_r: int, lut: np.ndarray) -> np.ndarray:
    """``[groups, n_r, columns]``: per channel and binade (from ``first_binade`` up), the histogram of
    mantissas dotted with every lookup column. Slot 0 of each channel's window collects its zeros."""
    n_groups, width = codes.shape[0], (n_r + 1) * 128
    first_code = torch.from_numpy((first_binade + 127) * 128).to(torch.int32)  # code of the first binade
    out = np.empty((n_groups, n_r, lut.shape[1]))
    rows = max(1, HISTOGRAM_BINS // width)
    for r0 in range(0, n_groups, rows):
        r1 = min(n_groups, r0 + rows)
        floor = torch.arange(r1 - r0, dtype=torch.int32) * width
        key = codes[r0:r1].to(torch.int32).add_((floor + 128 - first_code[r0:r1])[:, None])
        key.clamp_(min=floor[:, None])  # zeros (code 0) fall below their window: slot 0
        hist = torch.bincount(key.reshape(-1), minlength=(r1 - r0) * width).reshape(r1 - r0, n_r + 1, 128)
        h = hist[:, 1:].to(torch.float64).numpy()
        out[r0:r1] = (h.reshape(-1, 128) @ lut).reshape(r1 - r0, n_r, -1)
    return out
