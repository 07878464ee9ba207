"""Scale arithmetic against the reference's numeric examples and explicit formulas.

Expected values are written out here with Python floats; ``bf16``/``f32`` round a float the way
the hardware formats do (round to nearest even on the bit pattern), independently of torch.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.errors import DeviceForScalesError, NonFiniteStatsError, ShardError
from shards.fp8.numerics import HW_TRAITS, HpDtype, LpDtype, ScaleDevice
from shards.fp8.methods import PREDEFINED, Granularity, Rounding, SectionSpec, ValueType
from shards.fp8.scale_math import (
    ScaleContext,
    activation_scale,
    dynamic_activation_scale,
    magnitude_max,
    round_scale,
    weight_scale_from_maxabs,
)
from shards.fp8.weight_scales import weight_scale

G2, G3 = ScaleDevice.GAUDI2, ScaleDevice.GAUDI3


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16(x: float) -> float:
    """Round to bfloat16 (nearest even), via the fp32 bit pattern."""
    bits = struct.unpack("<I", struct.pack("<f", f32(x)))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def pow2(x: float) -> float:
    return 2.0 ** math.ceil(math.log2(x))


def act(rounding: Rounding, backoff: float = 0.25) -> SectionSpec:
    return SectionSpec(Granularity.PTS, ValueType.MAXABS, rounding, backoff)


def val(t: torch.Tensor) -> float:
    assert t.numel() == 1
    return float(t.reshape(-1)[0])


# --- reference §2.10: Gaudi2 maxabs_hw, checked against real vLLM scale files -----------------


@pytest.mark.parametrize(
    ("maxabs", "kind", "expected"),
    [(0.1162, "activation", 2.0**-8), (4.406, "activation", 1.0), (91.5, "weight", 1.0), (0.625, "weight", 0.0625)],
)
def test_reference_worked_examples_gaudi2_maxabs_hw(maxabs: float, kind: str, expected: float) -> None:
    ctx = ScaleContext(device=G2)
    method = PREDEFINED["MAXABS_HW"]
    if kind == "activation":
        got = activation_scale(np.array([maxabs], np.float32), method.activation, ctx)
    else:
        w = torch.tensor([[maxabs, -0.01], [0.3, 0.2]], dtype=torch.bfloat16)
        got = weight_scale(w, method.weight, ctx)
        assert val(weight_scale_from_maxabs(np.array([maxabs], np.float32), method.weight, ctx, torch.bfloat16)) == expected
    assert got.dtype == torch.bfloat16 and got.ndim == 0
    assert val(got) == expected


# --- reference §2.2 / §2.9.1: arithmetic in hp_dtype ---------------------------------------------


def test_maxabs_is_rounded_to_bf16_then_divided_in_bf16() -> None:
    """§2.9.1: 5.378173828 -> bf16 5.375; §2.2: 5.375 / 112 -> 0.048095703125."""
    assert bf16(5.378173828) == 5.375 and bf16(0.35267937) == 0.353515625
    ctx = ScaleContext()
    got = activation_scale(5.378173828, act(Rounding.IDENTITY), ctx)
    assert val(got) == 0.048095703125 == bf16(5.375 / 112)
    got2 = activation_scale(0.35267937, act(Rounding.IDENTITY), ctx)
    assert val(got2) == bf16(f32(0.353515625 / 112))


def test_divisor_is_rounded_to_fp32_first() -> None:
    """§2.2: fp32, backoff 0.3: 3826.105 / fp32(134.4) = 28.46804428, not the single rounding."""
    ctx = ScaleContext(hp=HpDtype.FP32)
    got = val(activation_scale(3826.105, act(Rounding.IDENTITY, 0.3), ctx))
    assert got == f32(f32(3826.105) / f32(448 * 0.3))
    assert abs(got - 28.46804428) < 1e-8
    assert got != f32(f32(3826.105) / (448 * 0.3))


def test_per_channel_weight_scales_stay_in_weight_dtype() -> None:
    """§2.2: fp32 weight, hp bf16: channel max 14.0137 -> PCS 0.125, while PTS rounds to bf16 14.0 -> 0.0625."""
    w = torch.tensor([[14.0137, -1.0], [0.5, -0.25]], dtype=torch.float32)
    ctx = ScaleContext()
    pcs = weight_scale(w, PREDEFINED["ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"].weight, ctx)
    pts = weight_scale(w, PREDEFINED["MAXABS_POW2"].weight, ctx)
    assert pcs.dtype == torch.float32 and pcs.tolist() == [0.125, pow2(0.5 / 224)]
    assert pts.dtype == torch.bfloat16 and val(pts) == 0.0625


def test_dict_form_backoff_one_changes_the_input_scale() -> None:
    """§1.4: a dict that says only "pow2" runs with backoff 1.0: 0.015625 instead of 0.0625."""
    ctx = ScaleContext()
    assert val(activation_scale(5.375, act(Rounding.POW2, 1.0), ctx)) == 0.015625
    assert val(activation_scale(5.375, act(Rounding.POW2, 0.25), ctx)) == 0.0625


# --- reference §2.3: rounding ----------------------------------------------------------------


def test_pow2_bf16_log2_quirk_rounds_down_next_to_a_power_of_two() -> None:
    """§2.3: bf16 s_raw 2^-5 (1 + 2^-7) gives 2^-5, and 3.0468e-11 gives 2^-35 (4.7 % below)."""
    ctx = ScaleContext()
    s = torch.tensor(0.031494140625, dtype=torch.bfloat16)
    assert val(round_scale(s, Rounding.POW2, ctx)) == 0.03125
    assert val(round_scale(s.float(), Rounding.POW2, ctx)) == 0.0625  # fp32 rounds up as expected
    tiny = torch.tensor(3.0468e-11, dtype=torch.bfloat16)
    got = val(round_scale(tiny, Rounding.POW2, ctx))
    assert got == 2.0**-35 and got < float(tiny) and abs(float(tiny) / got - 1.047) < 0.001  # "4.7 %"


@pytest.mark.parametrize(
    ("device", "maxabs", "expected"),
    [
        (G2, 2000.0, 16.0),  # clipped: needs more than 16
        (G2, 960.0, 16.0),
        (G2, 1e-6, 2.0**-8),  # floored
        (G2, 0.5, 2.0**-4),  # 0.5/60 -> 2^-6 -> next power of 16
        (G3, 1e6, 128.0),
        (G3, 1e-30, 2.0**-55),
        (G3, 0.5, pow2(0.5 / 112)),
    ],
)
def test_hw_aligned_snaps_and_clamps(device: ScaleDevice, maxabs: float, expected: float) -> None:
    fs = 240.0 if device is G2 else 448.0
    assert expected == min(max(2.0 ** (math.ceil(math.ceil(math.log2(bf16(maxabs) / (fs * 0.25))) / HW_TRAITS[device].step_exp) * HW_TRAITS[device].step_exp), HW_TRAITS[device].min_scale), HW_TRAITS[device].max_scale)  # noqa: E501
    assert val(activation_scale(maxabs, act(Rounding.HW_ALIGNED), ScaleContext(device=device))) == expected


@pytest.mark.parametrize(("device", "expected"), [(G2, 16.0), (G3, 128.0)])
def test_hw_aligned_fixed_and_unit(device: ScaleDevice, expected: float) -> None:
    ctx = ScaleContext(device=device)
    fixed = SectionSpec(Granularity.PTS, ValueType.FIXED_VALUE, Rounding.HW_ALIGNED_FIXED)
    unit = SectionSpec(Granularity.PTS, ValueType.FIXED_VALUE, Rounding.SCALE_UNIT)
    assert val(activation_scale(3.0, fixed, ctx)) == expected
    assert val(weight_scale(torch.ones(2, 2), fixed, ctx)) == expected
    assert val(activation_scale(3.0, unit, ctx)) == 1.0
    assert activation_scale(3.0, unit, ScaleContext()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("lp", "device", "fullscale"),
    [
        (LpDtype.E4M3, None, 448.0),
        (LpDtype.E4M3, G2, 240.0),
        (LpDtype.E4M3, G3, 448.0),
        (LpDtype.E5M2, None, 57344.0),
        (LpDtype.E5M2, G2, 57344.0),
    ],
)
def test_full_scale_per_format_and_device(lp: LpDtype, device: ScaleDevice | None, fullscale: float) -> None:
    ctx = ScaleContext(lp=lp, hp=HpDtype.FP32, device=device)
    assert ctx.fullscale == fullscale
    assert val(activation_scale(fullscale, act(Rounding.IDENTITY, 1.0), ctx)) == 1.0
    assert val(activation_scale(fullscale * 3, act(Rounding.IDENTITY, 0.5), ctx)) == 6.0


@pytest.mark.parametrize("rounding", [Rounding.HW_ALIGNED, Rounding.HW_ALIGNED_FIXED])
def test_hw_rounding_off_gaudi_names_device_for_scales(rounding: Rounding) -> None:
    section = SectionSpec(Granularity.PTS, ValueType.MAXABS if rounding is Rounding.HW_ALIGNED else ValueType.FIXED_VALUE, rounding, 0.25)
    with pytest.raises(DeviceForScalesError, match="device_for_scales") as info:
        activation_scale(1.0, section, ScaleContext())
    assert isinstance(info.value, ValueError) and isinstance(info.value, ShardError)


def test_hw_opt_candidates_off_gaudi_name_device_for_scales() -> None:
    with pytest.raises(DeviceForScalesError, match="device_for_scales.*GAUDI2"):
        weight_scale(torch.ones(2, 2), PREDEFINED["MAXABS_HW_OPT_WEIGHT"].weight, ScaleContext())


# --- zero and non-finite statistics ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("hp", "floor"), [(HpDtype.BF16, 2.0**-126), (HpDtype.FP32, 2.0**-126), (HpDtype.FP16, 2.0**-14)]
)
@pytest.mark.parametrize("rounding", [Rounding.IDENTITY, Rounding.POW2])
def test_zero_maxabs_gives_the_smallest_normal_not_zero(hp: HpDtype, floor: float, rounding: Rounding) -> None:
    s = activation_scale(0.0, act(rounding), ScaleContext(hp=hp))
    assert val(s) == floor


def test_all_zero_weight_channel_gets_a_positive_scale() -> None:
    w = torch.zeros(3, 4)
    w[1] = 2.0
    s = weight_scale(w, PREDEFINED["ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"].weight, ScaleContext())
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    assert s[1] == pow2(2.0 / 224)
    assert float(s[0]) == pow2(2.0**-126 / 224)  # the bf16-tiny floor on the max-abs, then /224


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_maxabs_raises_naming_the_tensor(bad: float) -> None:
    with pytest.raises(NonFiniteStatsError, match="layer.0 inputs.0"):
        activation_scale(np.array([1.0, bad], np.float32), act(Rounding.POW2), ScaleContext(), where="layer.0 inputs.0")


def test_maxabs_overflowing_fp16_raises() -> None:
    with pytest.raises(NonFiniteStatsError, match="float16"):
        activation_scale(1e5, act(Rounding.POW2), ScaleContext(hp=HpDtype.FP16))


def test_non_finite_weight_raises() -> None:
    w = torch.tensor([[1.0, math.nan]])
    with pytest.raises(NonFiniteStatsError, match="my.weight"):
        weight_scale(w, PREDEFINED["MAXABS_POW2"].weight, ScaleContext(), where="my.weight")


# --- per-channel activations are reduced first; dynamic scales --------------------------------


def test_per_channel_activation_measurement_is_reduced_with_max() -> None:
    ctx = ScaleContext()
    assert val(activation_scale(np.array([0.5, 7.0, 2.0], np.float32), act(Rounding.POW2), ctx)) == pow2(7.0 / 112)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_per_token_per_column_and_per_tensor(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0, -3.0, 0.5], [100.0, 2.0, -0.25], [0.0, 0.0, 0.0]], dtype=dtype)
    ctx = ScaleContext()
    rows = dynamic_activation_scale(x, ctx)
    assert rows.shape == (3, 1) and rows.dtype == dtype
    assert rows.reshape(-1).tolist() == [pow2(3.0 / 224), pow2(100.0 / 224), 2.0**-126]
    cols = dynamic_activation_scale(x, ctx, dim=-2)
    assert cols.shape == (1, 3) and cols.reshape(-1).tolist() == [pow2(100 / 224), pow2(3 / 224), pow2(0.5 / 224)]
    whole = dynamic_activation_scale(x, ctx, per_tensor=True)
    assert whole.ndim == 0 and val(whole) == pow2(100 / 224)


# --- weights from stored max-abs equal weights from the tensor ----------------------------------


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["MAXABS_POW2", "MAXABS_ARBITRARY", "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"])
def test_weight_scale_from_maxabs_matches_formula(wdtype: torch.dtype, name: str) -> None:
    w = (torch.randn(5, 7, generator=torch.Generator().manual_seed(3)) * 3).to(wdtype)
    section = PREDEFINED[name].weight
    ctx = ScaleContext()
    per_channel = section.granularity is Granularity.PCS
    amax = w.float().abs().amax(dim=1) if per_channel else w.float().abs().max().reshape(1)
    got = weight_scale_from_maxabs(amax.numpy(), section, ctx, wdtype)
    assert torch.equal(got, weight_scale(w, section, ctx))
    # Explicit formula: PCS in the weight dtype, PTS in bf16.
    if per_channel:
        rnd = bf16 if wdtype is torch.bfloat16 else f32
        want = [pow2(rnd(m / 224)) for m in amax.tolist()]
        assert got.tolist() == want
    elif section.rounding is Rounding.POW2:
        assert val(got) == pow2(bf16(bf16(float(amax[0])) / 224))
    else:
        assert val(got) == bf16(bf16(float(amax[0])) / 224)


# --- properties -----------------------------------------------------------------------------------

_POS_F32 = st.floats(2.0**-100, 2.0**100, allow_nan=False, width=32)


@settings(max_examples=400, deadline=None)
@given(raw=_POS_F32)
def test_pow2_in_fp32_is_a_power_of_two_at_least_raw(raw: float) -> None:
    """In fp32, POW2 lands in [raw, 2 raw); the log2 rounding can only pull it below raw within
    ~|log2 raw| * 2^-24 of a power of two (reference §2.3), bounded here by 2^-16."""
    s = val(round_scale(torch.tensor(raw, dtype=torch.float32), Rounding.POW2, ScaleContext()))
    mant, _ = math.frexp(s)
    assert mant == 0.5  # a power of two
    assert s < 2 * raw
    assert s >= raw or (raw / s - 1) < 2.0**-16


@pytest.mark.parametrize("device", [G2, G3])
@settings(max_examples=200, deadline=None)
@given(raw=_POS_F32)
def test_hw_aligned_scale_is_in_the_device_set(device: ScaleDevice, raw: float) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        s = val(round_scale(torch.tensor(raw, dtype=dtype), Rounding.HW_ALIGNED, ScaleContext(device=device)))
        assert s in HW_TRAITS[device].scales


@pytest.mark.parametrize(
    ("rounding", "device"), [(Rounding.POW2, None), (Rounding.HW_ALIGNED, G2), (Rounding.HW_ALIGNED, G3)]
)
@pytest.mark.parametrize("backoff", [0.25, 0.5, 1.0])
@settings(max_examples=150, deadline=None)
@given(pos=st.floats(0, 1), frac=st.floats(0, 1))
def test_rounding_up_keeps_every_value_within_backoff(
    rounding: Rounding, device: ScaleDevice | None, backoff: float, pos: float, frac: float
) -> None:
    """|x / s| <= fullscale * backoff for all |x| <= maxabs (HW: while the raw scale is below the clip)."""
    ctx = ScaleContext(hp=HpDtype.FP32, device=device)
    lo, hi = (-40.0, 40.0) if device is None else (math.log2(HW_TRAITS[device].min_scale) - 3, math.log2(HW_TRAITS[device].max_scale) - 0.01)
    maxabs = f32(2.0 ** (lo + pos * (hi - lo)) * ctx.fullscale * backoff)
    s = val(activation_scale(maxabs, act(rounding, backoff), ctx))
    raw = f32(maxabs / f32(ctx.fullscale * backoff))
    if s < raw:  # the fp32 log2 quirk (see the POW2 property above): only a hair below raw
        assert raw / s - 1 < 2.0**-16
        return
    for x in (maxabs, f32(maxabs * frac)):
        assert x / s <= ctx.fullscale * backoff


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("special", [None, "-inf", "nan", "-0"])
def test_magnitude_max_equals_abs_amax(dtype: torch.dtype, special: str | None) -> None:
    """The 16-bit bit-pattern route must agree with ``abs().amax()``: values, infinities and NaN."""
    w = (torch.randn(6, 33, generator=torch.Generator().manual_seed(3)) * 50).to(dtype)
    w[2] = -w[2].abs()  # a channel of negative values only
    if special is not None:
        w[4, 7] = float(special)
    cols = w[:, ::2]  # non-contiguous
    for x in (w, cols):
        for dim in (None, 1):
            got = magnitude_max(x, dim)
            want = x.abs().amax() if dim is None else x.abs().amax(dim=dim)
            assert got.dtype == x.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
