"""Scales computed in batches equal the scales computed one tensor at a time, bit for bit.

The batch evaluates each formula once over a vector; the per-tensor functions evaluate it on one
value. The formulas' torch ops have scalar and vectorized kernels that could round differently,
so the exhaustive tests compare against 0-d evaluations of the same formula for every positive
finite bf16 and fp16 value, and the module tests compare whole models' scales, batched and one
module at a time, under every scale method of the registry.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shards.errors import DeviceForScalesError, NonFiniteStatsError
from shards.fp8.methods import METHODS, Rounding, ValueType
from shards.fp8.module_scales import ScaleRequest, module_scales, modules_scales
from shards.fp8.numerics import HpDtype, ScaleDevice
from shards.fp8.scale_batch import ScaleBatch
from shards.fp8.scale_math import ScaleContext, pts_scales, raw_scale, round_scale
from shards.model.op_types import get_op_type
from stats_store.records import ModuleStats

G2, G3 = ScaleDevice.GAUDI2, ScaleDevice.GAUDI3
HP = {torch.bfloat16: HpDtype.BF16, torch.float16: HpDtype.FP16, torch.float32: HpDtype.FP32}


def _positive_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every positive finite value of a 16-bit float dtype, ascending (subnormals included)."""
    top = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[dtype]
    return torch.arange(1, top, dtype=torch.int32).to(torch.int16).view(dtype)


def _one_at_a_time(values: torch.Tensor, fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.stack([fn(v) for v in values.unbind()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


# IDENTITY rounds nothing; fp16 hp is rare, so its HW rounding is checked on Gaudi3's finer set only.
@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "rounding", "device"), [
    (torch.bfloat16, Rounding.POW2, None), (torch.bfloat16, Rounding.HW_ALIGNED, G2),
    (torch.bfloat16, Rounding.HW_ALIGNED, G3), (torch.float16, Rounding.POW2, None),
    (torch.float16, Rounding.HW_ALIGNED, G3)], ids=str)
def test_rounding_of_every_16_bit_value_equals_its_0d_rounding(dtype: torch.dtype, rounding: Rounding,
                                                                 device: ScaleDevice | None) -> None:
    ctx = ScaleContext(hp=HP[dtype], device=device)
    s_raw = _positive_finite(dtype)
    batched = round_scale(s_raw, rounding, ctx)
    assert _same_bits(batched, _one_at_a_time(s_raw, lambda v: round_scale(v, rounding, ctx)))


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "backoff"), [(torch.bfloat16, 0.25), (torch.bfloat16, 0.3), (torch.float16, 0.5)],
                         ids=str)
def test_raw_scale_of_every_16_bit_value_equals_its_0d_division(dtype: torch.dtype, backoff: float) -> None:
    ctx = ScaleContext(hp=HP[dtype])
    m = _positive_finite(dtype)
    assert _same_bits(raw_scale(m, backoff, ctx), _one_at_a_time(m, lambda v: raw_scale(v, backoff, ctx)))


def _fp32_near_powers_of_two() -> torch.Tensor:
    """fp32 values a few ulps either side of every normal power of two, and random ones."""
    powers = torch.tensor([2.0**e for e in range(-120, 120)], dtype=torch.float32).view(torch.int32)
    near = (powers[:, None] + torch.arange(-3, 4, dtype=torch.int32)[None, :]).reshape(-1)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0x00800000, 0x7E000000, (4000,), generator=g, dtype=torch.int32)
    return torch.cat([near, rand]).view(torch.float32)


@pytest.mark.parametrize(("rounding", "device"), [(Rounding.IDENTITY, None), (Rounding.POW2, None),
                                                  (Rounding.HW_ALIGNED, G2), (Rounding.HW_ALIGNED, G3)])
def test_fp32_scales_next_to_powers_of_two_equal_their_0d_scales(rounding: Rounding, device: ScaleDevice | None) -> None:
    ctx = ScaleContext(hp=HpDtype.FP32, device=device)
    m = _fp32_near_powers_of_two()
    batched = pts_scales(m.tolist(), torch.float32, 0.5, rounding, ctx, ["t"] * m.numel())
    one = _one_at_a_time(m, lambda v: round_scale(raw_scale(v, 0.5, ctx), rounding, ctx))
    assert _same_bits(batched, one)


# --- whole modules: batched == one at a time, every method of the registry ----------------------------------


def _maxabs_values(n: int, ctx: ScaleContext) -> list[float]:
    """Max-abs values whose raw scales sit on, just above and just below powers of two (where bf16's
    log2 rounds down, reference §2.3), and ordinary ones."""
    out = []
    for i in range(n):
        base = ctx.fullscale * 0.25 * 2.0 ** (i % 13 - 8)
        out.append(base * (1.0, 1.0 + 2.0**-7, 1.0 - 2.0**-9, 1.37)[i % 4])
    return out


def _requests(method: str, ctx: ScaleContext, wdtype: torch.dtype) -> list[ScaleRequest]:
    g = torch.Generator().manual_seed(0)
    values = _maxabs_values(64, ctx)
    v = lambda x: np.array([x], np.float32)  # noqa: E731
    reqs = []
    for i in range(12):
        w = (torch.randn(6, 8, generator=g) * values[i] / 50).to(wdtype)
        stats = ModuleStats(f"lin{i}", "linear", [v(values[i + 12])], params={"weight": w.float().abs().max().reshape(1).numpy()})
        reqs.append(ScaleRequest(get_op_type("linear"), METHODS[method], stats, f"lin{i}", weight=w))
    for i in range(4):
        mm = ModuleStats(f"mm{i}", "matmul", [v(values[i + 30]), np.array([values[i + 40], 0.5], np.float32)])
        reqs.append(ScaleRequest(get_op_type("matmul"), METHODS[method], mm, f"mm{i}"))
        sm = ModuleStats(f"sm{i}", "softmax", [v(1.0)], outputs=[v(values[i + 50])])
        reqs.append(ScaleRequest(get_op_type("softmax"), METHODS[method], sm, f"sm{i}", output_backoff=1.0))
    # A linear whose weight scale comes from the stored max-abs, and one with a given weight scale.
    reqs.append(ScaleRequest(get_op_type("linear"), METHODS[method], reqs[0].stats, "lin_stats", in_features=8))
    reqs.append(ScaleRequest(get_op_type("linear"), METHODS[method], reqs[1].stats, "lin_given",
                             weight_scale=torch.tensor(0.25, dtype=ctx.hp_dtype)))
    return reqs


def _alone(r: ScaleRequest, ctx: ScaleContext):  # type: ignore[no-untyped-def]
    return module_scales(r.op, r.method, ctx, r.stats, r.weight, r.weight_scale, r.output_backoff, module=r.module,
                         in_features=r.in_features)


def _tensors(ms) -> list[torch.Tensor | None]:  # type: ignore[no-untyped-def]
    return [*ms.inputs, *ms.outputs, ms.weight, ms.weight_in_channel]


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hp", [HpDtype.BF16, HpDtype.FP32])
@pytest.mark.parametrize("device", [None, G2, G3], ids=lambda d: d.value if d else "cpu")
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_module_scales_equal_one_module_at_a_time(method: str, device: ScaleDevice | None, hp: HpDtype,
                                                          wdtype: torch.dtype) -> None:
    ctx = ScaleContext(hp=hp, device=device)
    reqs = _requests(method, ctx, wdtype)
    if METHODS[method].weight.value_type is ValueType.OPT:  # OPT needs the weight itself, not its max-abs
        reqs = [r for r in reqs if r.module != "lin_stats"]
    if METHODS[method].needs_hw_device and device is None:
        with pytest.raises(DeviceForScalesError):
            modules_scales(reqs, ctx)
        return
    batched = modules_scales(reqs, ctx)
    for r, got in zip(reqs, batched):
        want = _alone(r, ctx)
        assert got.to_inc_node() == want.to_inc_node(), r.module
        assert got.dynamic == want.dynamic
        for a, b in zip(_tensors(got), _tensors(want)):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), r.module


def test_each_module_gets_scales_of_its_own() -> None:
    ctx = ScaleContext()
    reqs = _requests("MAXABS_POW2", ctx, torch.bfloat16)[:3]
    scales = modules_scales(reqs, ctx)
    a, b = scales[0].inputs[0], scales[1].inputs[0]
    assert a.ndim == 0 and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


# --- errors: named as the one-at-a-time functions name them, in queue order ----------------------------------


def test_non_finite_statistics_are_refused_when_queued_naming_the_first_bad_tensor() -> None:
    ctx = ScaleContext()
    batch = ScaleBatch(ctx)
    batch.activation(np.array([2.0], np.float32), METHODS["MAXABS_POW2"].activation, where="m0 inputs.0")
    with pytest.raises(NonFiniteStatsError, match="m1 inputs.0"):
        batch.activation(np.array([1.0, -math.inf], np.float32), METHODS["MAXABS_POW2"].activation, where="m1 inputs.0")


def test_hp_overflow_is_found_when_computed_naming_the_first_overflowing_tensor() -> None:
    ctx = ScaleContext(hp=HpDtype.FP16)
    batch = ScaleBatch(ctx)
    section = METHODS["MAXABS_POW2"].activation
    for i, value in enumerate([3.0, 7e4, 1e5]):
        batch.activation(value, section, where=f"m{i} inputs.0")
    with pytest.raises(NonFiniteStatsError, match=r"m1 inputs\.0 \(in torch\.float16\)"):
        batch.compute()


def test_scales_are_read_after_compute() -> None:
    batch = ScaleBatch(ScaleContext())
    s = batch.activation(3.0, METHODS["MAXABS_POW2"].activation, where="x")
    with pytest.raises(RuntimeError, match="compute"):
        s.get()
    batch.compute()
    assert float(s.get()) == 2.0 ** math.ceil(math.log2(3.0 / 112))


# The weight's max-abs: the C kernel's float (per tensor) or its per-row pass, else torch's route.
@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["MAXABS_POW2", "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"])
def test_weight_scales_equal_the_formula_on_the_weight_and_a_non_finite_weight_is_named(
        native: str, dtype: torch.dtype, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FP8_ORCH_NATIVE_CAST", native)
    section, ctx = METHODS[method].weight, ScaleContext()
    w = (torch.randn(8, 24, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    w[5, 7] = -0.75  # the largest magnitude, negative
    batch = ScaleBatch(ctx)
    got = batch.weight(w, section, where="m.weight")
    batch.compute()
    per_row = section.granularity.name == "PCS"
    amax = w.double().abs().amax(dim=1) if per_row else w.double().abs().max()
    # Independent of the code under test: the spec's formula evaluated on the exact max-abs.
    want = raw_scale(amax.to(dtype if per_row else ctx.hp_dtype), section.backoff, ctx)
    assert torch.equal(got.get(), round_scale(want, section.rounding, ctx))
    for bad in (math.nan, math.inf, -math.inf):
        w_bad = w.clone()
        w_bad[2, 3] = bad
        with pytest.raises(NonFiniteStatsError, match=r"m\.weight"):
            ScaleBatch(ctx).weight(w_bad, section, where="m.weight")
