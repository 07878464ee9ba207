"""The fast power-of-two scoring (``shards.fp8.opt_tables``) against the brute force of ``shards.fp8.opt_search``.

``pts_errors_bruteforce`` / ``pcs_errors_bruteforce`` quantize the whole tensor once per candidate;
the fast path builds per-exponent tables. Picks must be identical (ties included) and errors equal
up to float64 summation order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.fp8 import opt_search

from shards.fp8 import opt_tables
from shards.fp8.numerics import HW_TRAITS, HpDtype, LpDtype, ScaleDevice
from shards.fp8.methods import PCS_OPT_MULTIPLIERS, POW2_OPT_CANDIDATES
from shards.fp8.scale_math import ScaleContext
from tests.shards.test_opt_search import _weight

G2, G3 = ScaleDevice.GAUDI2, ScaleDevice.GAUDI3


CTXS = [
    ScaleContext(),
    ScaleContext(device=G2),
    ScaleContext(device=G3),
    ScaleContext(hp=HpDtype.FP32),
    ScaleContext(hp=HpDtype.FP16),
    ScaleContext(lp=LpDtype.E5M2),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pts_cands(ctx: ScaleContext) -> tuple[float, ...]:
    return POW2_OPT_CANDIDATES if ctx.device is None else HW_TRAITS[ctx.device].scales


def _ties_kept(fast: torch.Tensor, brute: torch.Tensor) -> None:
    """The candidates that reach the minimum are the same, bit for bit (per column for PCS): INC's
    tie rules only look at those, so equal minimum sets mean equal picks under either rule.

    Exception: candidates whose exact error sums differ by less than float64 summation noise. There
    the brute force's own order of additions decides (e.g. 2304 + 2^-42 + 2^-48 rounds to 2304 or up
    depending on which tiny term comes first) and neither order is more right, so columns whose
    minimum set differs are accepted only when all the differing candidates are within 1e-12 of the min.
    """
    f, b = fast.reshape(fast.shape[0], -1), brute.reshape(brute.shape[0], -1)
    fmin, bmin = f == f.min(dim=0).values, b == b.min(dim=0).values
    for col in torch.nonzero((fmin != bmin).any(dim=0)).flatten().tolist():
        differing = (fmin[:, col] != bmin[:, col]).nonzero().flatten()
        lo = b[:, col].min()
        assert torch.all((b[differing, col] - lo).abs() <= 1e-12 * lo), (col, f[:, col], b[:, col])


def _check_pts(w: torch.Tensor, ctx: ScaleContext, cands: Sequence[float]) -> None:
    fast = opt_search.pts_errors(w, cands, ctx)
    brute = opt_search.pts_errors_bruteforce(w, cands, ctx)
    np.testing.assert_allclose(fast.numpy(), brute.numpy(), rtol=1e-12, atol=0)
    _ties_kept(fast, brute)
    got, want = opt_search.pick_pts(fast, cands), opt_search.pick_pts(brute, cands)
    if got != want:  # only inside summation noise (see _ties_kept)
        e = dict(zip(cands, brute.tolist()))
        assert abs(e[got] - e[want]) <= 1e-12 * min(e[got], e[want])


def _check_pcs(w: torch.Tensor, ctx: ScaleContext, mults: Sequence[float] = PCS_OPT_MULTIPLIERS) -> None:
    ref = opt_search.pcs_reference(w.abs().reshape(w.shape[0], -1).amax(dim=1), ctx, w.dtype)
    fast = opt_search.pcs_errors(w, ref, mults, ctx)
    brute = opt_search.pcs_errors_bruteforce(w, ref, mults, ctx)
    np.testing.assert_allclose(fast.numpy(), brute.numpy(), rtol=1e-12, atol=0)
    _ties_kept(fast, brute)
    got, want = opt_search.pick_pcs(fast, ref, mults, ctx), opt_search.pick_pcs(brute, ref, mults, ctx)
    for col in torch.nonzero(got != want).flatten().tolist():  # only inside summation noise
        lo = brute[:, col].min()
        assert (brute[:, col] - lo).abs().le(1e-12 * lo).sum() > 1, col


def _takes_fast_path(w: torch.Tensor, cands: Sequence[float], ctx: ScaleContext) -> bool:
    scales = torch.tensor(cands, dtype=torch.float32).reshape(-1, 1)
    got = opt_tables.fast_errors_or_none(w.reshape(1, -1), scales, ctx, w.dtype, ctx.hp_dtype)
    return got is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ctx", CTXS, ids=lambda c: f"{c.lp.value}-{c.hp.value}-{c.device}")
def test_fast_path_matches_brute_force_on_random_weights(ctx: ScaleContext, dtype: torch.dtype) -> None:
    w = _weight(7, (8, 48)).to(dtype)
    fast_expected = not (dtype is torch.float16 and ctx.lp is LpDtype.E5M2)
    if ctx.hp is HpDtype.FP16 and ctx.device is G3:
        fast_expected = False  # 2^-55 * smallest FP8 step is below fp16's smallest subnormal
    assert _takes_fast_path(w, _pts_cands(ctx), ctx) == fast_expected
    _check_pts(w, ctx, _pts_cands(ctx))
    _check_pcs(w, ctx)


def _adversarial(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    if name == "zeros":
        return torch.zeros(4, 16)
    if name == "zero_row":  # one channel entirely zero beside normal ones
        w = torch.randn(3, 16, generator=g)
        w[1] = 0.0
        return w
    if name == "one_value":
        return torch.full((3, 5), 0.3)
    if name == "grid":  # exact FP8 values at several binades: zero error for many candidates
        return torch.tensor([1.0, 1.125, -1.25, 1.5, 1.875, -1.75, 0.0, 3.5] * 4).reshape(4, 8) * 2.0**-3
    if name == "thresholds":  # exactly at, just above and just below F * 2^k, and halfway points
        base = torch.tensor([448.0, 448.0 * (1 + 2**-23), 448.0 * (1 - 2**-24), 240.0, 241.0, 464.0, 480.0])
        return torch.cat([base * 2.0**k for k in (-10, -4, 0, 3)]).reshape(4, -1)
    if name == "subnormal_ties":  # odd multiples of half the smallest FP8 step at several scales
        base = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 2.0, 6.0, 0.5]) * 2.0**-10
        return torch.cat([base * 2.0**k for k in range(-10, 10, 3)]).reshape(7, 8)
    if name == "huge_tiny":
        w = torch.randn(4, 32, generator=g) * torch.logspace(-30, 30, 32).reshape(1, -1)
        w[0, 0] = 1e-40  # fp32 subnormal
        return w
    if name == "wide":  # values spread over 2^-40 .. 2^40 per channel
        return torch.randn(6, 40, generator=g) * torch.exp2(torch.randint(-40, 40, (6, 40), generator=g).float())
    raise KeyError(name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["zeros", "zero_row", "one_value", "grid", "thresholds", "subnormal_ties", "huge_tiny", "wide"])
@pytest.mark.parametrize("ctx", CTXS[:4], ids=lambda c: f"{c.device}-{c.hp.value}")
def test_fast_path_matches_brute_force_on_adversarial_weights(name: str, dtype: torch.dtype, ctx: ScaleContext) -> None:
    w = _adversarial(name).to(dtype)
    if not bool(torch.isfinite(w).all()):
        pytest.skip("this dtype overflows: covered by the non-finite test")
    _check_pts(w, ctx, _pts_cands(ctx))
    _check_pcs(w, ctx)


def test_exact_ties_between_candidates_survive_the_fast_path() -> None:
    """Normal-range values give every unsaturated, non-subnormal candidate the same error; the
    biggest value is just above 448 * 2^-4, so at 2^-3 it rounds to the value it saturates to at 2^-4."""
    w = torch.tensor([[448.0 * 2**-4 * (1 + 2**-6), 1.3, -1.7, 1.1, 1.05, 1.9]])
    ctx = ScaleContext()
    cands = tuple(2.0**k for k in range(-5, 2))
    assert _takes_fast_path(w, cands, ctx)
    brute = opt_search.pts_errors_bruteforce(w, cands, ctx)
    assert brute[1] == brute[2]  # 2^-4 saturates the top value, 2^-3 rounds it to the same value
    _check_pts(w, ctx, cands)


def test_non_power_of_two_candidates_and_non_finite_weights_use_the_brute_force() -> None:
    ctx = ScaleContext()
    w = _weight(8)
    cands = (0.3, 0.03, 2.0**-4)
    assert not _takes_fast_path(w, cands, ctx)
    assert torch.equal(opt_search.pts_errors(w, cands, ctx), opt_search.pts_errors_bruteforce(w, cands, ctx))
    w[1, 1] = float("inf")
    assert not _takes_fast_path(w, POW2_OPT_CANDIDATES, ctx)
    got = opt_search.pts_errors(w, POW2_OPT_CANDIDATES, ctx)
    want = opt_search.pts_errors_bruteforce(w, POW2_OPT_CANDIDATES, ctx)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


_exponents = st.integers(min_value=-45, max_value=30)
_mantissas = st.integers(min_value=0, max_value=(1 << 24) - 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mant=st.lists(st.tuples(_mantissas, _exponents, st.booleans()), min_size=1, max_size=24),
    rows=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from(DTYPES),
    ctx=st.sampled_from(CTXS),
)
def test_fast_path_matches_brute_force_on_generated_weights(
    mant: list[tuple[int, int, bool]], rows: int, dtype: torch.dtype, ctx: ScaleContext
) -> None:
    vals = [(-1.0 if neg else 1.0) * m * 2.0 ** (e - 24) for m, e, neg in mant]
    vals = (vals * rows)[: max(rows, len(vals) // rows * rows)]
    w = torch.tensor(vals, dtype=torch.float32).reshape(rows, -1).to(dtype)
    if not bool(torch.isfinite(w).all()):
        return
    _check_pts(w, ctx, _pts_cands(ctx))
    _check_pcs(w, ctx)


def test_fast_path_takes_a_layer_sized_bf16_weight() -> None:
    """A trained-looking bf16 weight of a real layer's size is scored by the tables, not the brute
    force, and both agree (the brute force's candidates then span more than one of its work chunks).
    How much faster the tables are is measured in bench/bench_scales.py ("OPT tables" rows): a
    wall-clock bound here would flake under load."""
    ctx = ScaleContext()
    w = (torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    assert _takes_fast_path(w, POW2_OPT_CANDIDATES, ctx)
    _check_pts(w, ctx, POW2_OPT_CANDIDATES)
    _check_pcs(w, ctx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fast_path_column_shards_concatenate_and_row_shards_add(dtype: torch.dtype) -> None:
    ctx = ScaleContext()
    w = _weight(9, (8, 40)).to(dtype)
    ref = opt_search.pcs_reference(w.abs().amax(dim=1), ctx, w.dtype)
    whole = opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx)
    cols = [opt_search.pcs_errors(w[a:b], ref[a:b], PCS_OPT_MULTIPLIERS, ctx) for a, b in ((0, 3), (3, 8))]
    assert torch.equal(torch.cat(cols, dim=1), whole)
    rows = sum(opt_search.pcs_errors(h, ref, PCS_OPT_MULTIPLIERS, ctx) for h in (w[:, :13], w[:, 13:]))
    np.testing.assert_allclose(rows, opt_search.pcs_errors_bruteforce(w, ref, PCS_OPT_MULTIPLIERS, ctx), rtol=1e-12)


def _histogram_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per call of the bf16 histogram path, whether it produced the errors."""
    calls: list[bool] = []
    real = opt_tables._bf16_channel_errors

    def spy(*args: object) -> object:
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(opt_tables, "_bf16_channel_errors", spy)
    return calls


def _bf16_channels(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if name == "spread":  # channels 2^-20 .. 2^12 apart, long rows (several binades each)
        w = torch.randn(9, 3000, generator=g) * torch.logspace(-6, 4, 9).reshape(-1, 1)
    elif name == "zeros":  # exact zeros and a channel of one repeated value
        w = torch.randn(5, 64, generator=g)
        w[1, 1:] = 0.0
        w[2, ::3] = 0.0
        w[3] = 0.75
    else:  # "grid": FP8 grid values at one scale: several candidates have exactly equal errors
        w = torch.tensor([1.0, 1.125, -1.25, 1.5, 1.875, -1.75, 0.0, 3.5] * 8).reshape(4, 16) * 2.0**-3
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("ctx", [CTXS[0], CTXS[1], CTXS[2], CTXS[5]], ids=lambda c: f"{c.lp.value}-{c.device}")
@pytest.mark.parametrize("name", ["spread", "zeros", "grid"])
def test_bf16_channels_are_scored_from_one_histogram(name: str, ctx: ScaleContext, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _bf16_channels(name)
    calls = _histogram_calls(monkeypatch)
    _check_pcs(w, ctx)
    _check_pcs(w, ctx, mults=(2.0**-6, 1.0, 2.0**5))  # wider, uneven multiplier offsets
    assert calls == [True, True]


def test_bf16_histogram_chunks_do_not_change_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    w, ctx = _bf16_channels("spread"), ScaleContext()
    ref = opt_search.pcs_reference(w.abs().amax(dim=1), ctx, w.dtype)
    whole = opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx)
    monkeypatch.setattr(opt_tables, "HISTOGRAM_BINS", 1)  # one channel per chunk
    assert torch.equal(opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx), whole)


def test_bf16_subnormal_weights_leave_the_histogram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _bf16_channels("zeros")
    w[4, 0] = 2.0**-130  # a bf16 subnormal: its code does not encode mantissa and exponent that way
    calls = _histogram_calls(monkeypatch)
    _check_pcs(w, ScaleContext())
    assert calls == [False]
