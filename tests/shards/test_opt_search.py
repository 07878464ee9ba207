"""OPT (MSE) search: the vectorised, chunked search against a plain per-candidate loop.

The loop here quantizes with the pure-Python FP8 reference of ``test_numerics`` (nearest grid
value, ties to even, saturating), sums squared errors exactly with ``math.fsum`` and applies INC's
tie rules, so it shares no code with ``shards.fp8.opt_search``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest
import torch

from shards.fp8 import opt_search

from shards.fp8 import opt_tables
from shards.errors import DeviceForScalesError
from shards.fp8.numerics import HW_TRAITS, ScaleDevice
from shards.fp8.methods import PCS_OPT_MULTIPLIERS, POW2_OPT_CANDIDATES, PREDEFINED
from shards.fp8.scale_math import ScaleContext
from shards.fp8.weight_scales import weight_scale
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
    monkeypatch.setattr(opt_search, "CHUNK_ELEMENTS", chunk)  # the brute force's blocks
    monkeypatch.setattr(opt_tables, "CHUNK_ELEMENTS", chunk)  # the per-element table passes
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
