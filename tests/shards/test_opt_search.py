"""OPT (MSE) search: the vectorised, chunked search against a plain per-candidate loop.

The loop here quantizes with the pure-Python FP8 reference of ``test_numerics`` (nearest grid
value, ties to even, saturating), sums squared errors exactly with ``math.fsum`` and applies INC's
tie rules, so it shares no code with ``shards.opt_search``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest
import torch

from shards import opt_search
from shards.errors import DeviceForScalesError
from shards.numerics import HW_TRAITS, ScaleDevice
from shards.scale_spec import PCS_OPT_MULTIPLIERS, POW2_OPT_CANDIDATES, PREDEFINED
from shards.scales import ScaleContext, weight_scale
from tests.shards.test_numerics import decode, nearest_code

G2, G3 = ScaleDevice.GAUDI2, ScaleDevice.GAUDI3


def qdq(x: float, s: float, ctx: ScaleContext) -> float:
    return decode(nearest_code(x / s, ctx.fmt), ctx.fmt.exp_bits) * s


def loop_errors(values: Sequence[float], scales: Sequence[float], ctx: ScaleContext) -> list[float]:
    return [math.fsum((x - qdq(x, s, ctx)) ** 2 for x in values) for s in scales]


def loop_pick_pts(values: Sequence[float], cands: Sequence[float], ctx: ScaleContext) -> float:
    best, best_err = None, math.inf
    for s, e in zip(cands, loop_errors(values, cands, ctx)):
        if e <= best_err:  # INC: later candidate wins a tie
            best, best_err = s, e
    assert best is not None
    return best


def loop_pick_pcs(w: np.ndarray, mults: Sequence[float], ctx: ScaleContext) -> list[float]:
    out = []
    for row in w:
        ref = 2.0 ** math.ceil(math.log2(max(float(np.abs(row).max()), 2.0**-126) / (ctx.fullscale * 0.5)))
        best, best_err = math.nan, math.inf
        for m, e in zip(mults, loop_errors(row.tolist(), [ref * m for m in mults], ctx)):
            if e < best_err:  # INC: first multiplier wins a tie
                best, best_err = m, e
        out.append(ref * best)
    return out


def _weight(seed: int, shape: tuple[int, int] = (6, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).reshape(-1, 1)
    w[0, :3] = torch.tensor([0.0, 1e-6, 3e-3])  # zeros and values that go subnormal
    return w


@pytest.mark.parametrize("device", [None, G2, G3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pts_search_matches_per_candidate_loop(device: ScaleDevice | None, seed: int) -> None:
    ctx = ScaleContext(device=device)
    w = _weight(seed)
    cands = POW2_OPT_CANDIDATES if device is None else HW_TRAITS[device].scales
    errors = opt_search.pts_errors(w, cands, ctx)
    want = loop_errors(w.reshape(-1).tolist(), cands, ctx)
    np.testing.assert_allclose(errors.numpy(), want, rtol=1e-12, atol=0)
    assert opt_search.pick_pts(errors, cands) == loop_pick_pts(w.reshape(-1).tolist(), cands, ctx)


@pytest.mark.parametrize("device", [None, G2])
@pytest.mark.parametrize("seed", [0, 3])
def test_pcs_search_matches_per_channel_loop(device: ScaleDevice | None, seed: int) -> None:
    ctx = ScaleContext(device=device)
    w = _weight(seed)
    got = weight_scale(w, PREDEFINED["ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2"].weight, ctx)
    assert got.tolist() == loop_pick_pcs(w.numpy(), PCS_OPT_MULTIPLIERS, ctx)


def test_equal_errors_tie_exactly_and_pts_takes_the_later_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values in [1, 2) with 3 mantissa bits are exact for every scale 2^-4..2^-1: four equal errors
    (all zero here, plus identical non-zero ones below) and the last candidate wins."""
    monkeypatch.setattr(opt_search, "CHUNK_ELEMENTS", 7)  # forces 1-row chunks and element blocks
    ctx = ScaleContext()
    grid = torch.tensor([1.0, 1.125, 1.25, 1.5, 1.875, -1.75] * 50)
    cands = (2.0**-4, 2.0**-3, 2.0**-2, 2.0**-1)
    zero = opt_search.pts_errors(grid, cands, ctx)
    assert zero.tolist() == [0.0] * 4 and opt_search.pick_pts(zero, cands) == 0.5
    off_grid = torch.linspace(1.0, 1.99, 301)  # rounding errors, identical for every candidate
    e = opt_search.pts_errors(off_grid, cands, ctx)
    assert e[0] > 0 and len(set(e.tolist())) == 1
    assert opt_search.pick_pts(e, cands) == 0.5


def test_pcs_ties_take_the_first_multiplier() -> None:
    ctx = ScaleContext()
    w = torch.linspace(1.0, 1.99, 64).reshape(32, 2).T.contiguous()  # both rows reach 1.99
    ref = opt_search.pcs_reference(w.abs().amax(dim=1), ctx, w.dtype)
    assert ref.tolist() == [2.0**-6, 2.0**-6]  # 1.99 / 224 -> 2^-6
    mults = (0.5, 1.0, 2.0, 4.0)  # scales 2^-7..2^-4: no saturation (1.99 * 2^7 < 448), all normal
    errors = opt_search.pcs_errors(w, ref, mults, ctx)
    assert all(errors[0, c] > 0 and len(set(errors[:, c].tolist())) == 1 for c in range(2))
    assert opt_search.pick_pcs(errors, ref, mults, ctx).tolist() == [2.0**-7, 2.0**-7]


def test_hw_opt_weight_later_candidate_wins_ties() -> None:
    """Values on the grid at scales 16, 1 and 1/16 (zero error); 1/256 saturates 1.75*256 > 240.
    Later wins: 1/16 on Gaudi2. On Gaudi3 (full scale 448) every scale down to 2^-8 is exact."""
    w = torch.tensor([[1.75, -1.5, 1.0], [0.5, -0.375, 0.75]])
    method = PREDEFINED["MAXABS_HW_OPT_WEIGHT"].weight
    assert float(weight_scale(w, method, ScaleContext(device=G2))) == 1 / 16
    assert float(weight_scale(w, method, ScaleContext(device=G3))) == 2.0**-8
    assert float(weight_scale(w, PREDEFINED["MAXABS_POW2_OPT_WEIGHT"].weight, ScaleContext())) == 64.0
    with pytest.raises(DeviceForScalesError, match="device_for_scales"):
        weight_scale(w, method, ScaleContext())


@pytest.mark.parametrize("chunk", [5, 64, 1 << 22])
def test_chunking_does_not_change_errors(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    ctx = ScaleContext()
    w = _weight(4)
    full = opt_search.pts_errors(w, POW2_OPT_CANDIDATES, ctx)
    ref = opt_search.pcs_reference(w.abs().amax(dim=1), ctx, w.dtype)
    pcs_full = opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx)
    monkeypatch.setattr(opt_search, "CHUNK_ELEMENTS", chunk)
    np.testing.assert_allclose(opt_search.pts_errors(w, POW2_OPT_CANDIDATES, ctx), full, rtol=1e-13)
    np.testing.assert_allclose(opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx), pcs_full, rtol=1e-13)


def test_errors_add_up_over_tensor_parallel_shards() -> None:
    ctx = ScaleContext()
    w = _weight(5, (8, 40))
    cands = POW2_OPT_CANDIDATES
    # Row-parallel shards split the input axis: PTS and PCS errors add up.
    halves = (w[:, :17], w[:, 17:])
    total = sum(opt_search.pts_errors(h, cands, ctx) for h in halves)
    np.testing.assert_allclose(total, opt_search.pts_errors(w, cands, ctx), rtol=1e-12)
    ref = opt_search.pcs_reference(w.abs().amax(dim=1), ctx, w.dtype)
    pcs_total = sum(opt_search.pcs_errors(h, ref, PCS_OPT_MULTIPLIERS, ctx) for h in halves)
    np.testing.assert_allclose(pcs_total, opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx), rtol=1e-12)
    # Column-parallel shards split the output axis: PCS errors concatenate.
    cols = [opt_search.pcs_errors(w[a:b], ref[a:b], PCS_OPT_MULTIPLIERS, ctx) for a, b in ((0, 3), (3, 8))]
    assert torch.equal(torch.cat(cols, dim=1), opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_search_like_fp32_copies(wdtype: torch.dtype) -> None:
    """Power-of-two candidates: dividing in the weight's dtype is exact, so the result is the loop's."""
    ctx = ScaleContext()
    w = _weight(6).to(wdtype)
    cands = POW2_OPT_CANDIDATES
    vals = w.float().reshape(-1).tolist()
    assert opt_search.pick_pts(opt_search.pts_errors(w, cands, ctx), cands) == loop_pick_pts(vals, cands, ctx)


# --- The fast power-of-two path against the brute force ------------------------------------------
# ``pts_errors_bruteforce`` / ``pcs_errors_bruteforce`` quantize the whole tensor once per candidate;
# the fast path builds per-exponent tables. Picks must be identical (ties included) and errors equal
# up to float64 summation order.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shards.numerics import HpDtype, LpDtype  # noqa: E402

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
    got = opt_search._fast_errors_or_none(w.reshape(1, -1), scales, ctx, w.dtype, ctx.hp_dtype)
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


def test_fast_path_is_much_faster_than_the_brute_force() -> None:
    """A sanity bound, loose for a loaded machine; the benchmark measures the real ratio."""
    import time

    ctx = ScaleContext()
    w = (torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    fast = best(lambda: opt_search.pts_errors(w, POW2_OPT_CANDIDATES, ctx))
    brute = best(lambda: opt_search.pts_errors_bruteforce(w, POW2_OPT_CANDIDATES, ctx))
    assert fast * 4 < brute


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
    real = opt_search._bf16_channel_errors

    def spy(*args: object) -> object:
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(opt_search, "_bf16_channel_errors", spy)
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
    monkeypatch.setattr(opt_search, "HISTOGRAM_BINS", 1)  # one channel per chunk
    assert torch.equal(opt_search.pcs_errors(w, ref, PCS_OPT_MULTIPLIERS, ctx), whole)


def test_bf16_subnormal_weights_leave_the_histogram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _bf16_channels("zeros")
    w[4, 0] = 2.0**-130  # a bf16 subnormal: its code does not encode mantissa and exponent that way
    calls = _histogram_calls(monkeypatch)
    _check_pcs(w, ScaleContext())
    assert calls == [False]
