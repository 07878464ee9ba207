"""Backends: one conformance suite every backend passes, then what only one backend has.

``TestBackendConformance`` holds the contract of ``shards.quantized.backends.Backend`` once and runs
it on every backend case below, against references computed here (never by ``shards.fp8.numerics``):

- quantize: fp32 ``x / s``, clamp to the format's full scale (the literals 448, 240, 57344 below),
  round to nearest even through torch's float8 cast; codes bit-exact, NaN stays NaN, inf saturates.
- dequantize: ``codes · s`` in fp32, rounded once to the output dtype; exact.
- gemm: ``(qa · s_a) @ (qb · s_b)`` with per-tensor, per-row and per-column scales; bit-exact where the
  backend's gemm is an emulation (against its definition: the fp32 gemm of the codes, scaled and
  rounded once, or INC's QDQ for ``inc_layout``), within the error bound of a gemm in the output
  dtype otherwise, and bit-exact for every backend where all the arithmetic is exact.

The backend-specific tests after it check what only one backend has: which gemms reach
``torch._scaled_mm``, the HPU ops' arguments, the registry and device lookup, ``detect_gaudi``.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from shards.quantized import backends
from shards.quantized.backends import (
    Backend,
    BackendUnavailableError,
    CudaBackend,
    EmulatedBackend,
    HpuBackend,
    UnknownBackendError,
    backend_for_device,
    detect_gaudi,
    get_backend,
    register_backend,
)
from shards.errors import DuplicateRegistrationError
from shards.fp8.numerics import E4M3, E4M3_GAUDI2, E5M2, Fp8Format, ScaleDevice

F8 = torch.float8_e4m3fn
# The largest finite magnitude of each format, written out here rather than read from Fp8Format.
FULLSCALE = {E4M3.name: 448.0, E4M3_GAUDI2.name: 240.0, E5M2.name: 57344.0}
ALL_FORMATS = (E4M3, E4M3_GAUDI2, E5M2)


class RecordingHpuOps:
    """Stand-in for ``torch.ops.hpu``: records every call and computes what the kernel would.

    Args:
        e4m3_fullscale: where the card saturates E4M3 (240 on Gaudi2, 448 on Gaudi3); E5M2 saturates
            at 57344 on both.
    """

    def __init__(self, e4m3_fullscale: float = 240.0) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fullscale = {torch.float8_e4m3fn: e4m3_fullscale, torch.float8_e5m2: 57344.0}

    def cast_to_fp8_v2(self, x, scale_inv, stochastic, is_amax, dtype):  # type: ignore[no-untyped-def]
        self.calls.append(("cast_to_fp8_v2", (scale_inv, stochastic, is_amax, dtype)))
        fs = self.fullscale[dtype]
        return (x.float() * scale_inv).clamp(-fs, fs).to(dtype), None

    def cast_from_fp8(self, q, scale, out_dtype):  # type: ignore[no-untyped-def]
        self.calls.append(("cast_from_fp8", (scale, out_dtype)))
        return (q.float() * scale).to(out_dtype)

    def fp8_gemm_v2(self, a, trans_a, b, trans_b, d, out_dtype, a_scale, b_scale, bias, accumulate):  # type: ignore[no-untyped-def]
        self.calls.append(("fp8_gemm_v2", (trans_a, trans_b, d, out_dtype, a_scale, b_scale, bias, accumulate)))
        return torch.matmul(a.float() * a_scale, b.float() * b_scale).to(out_dtype)


# ---- the backend cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendCase:
    """One backend as the suite runs it.

    Attributes:
        formats: the formats its quantize implements (a Gaudi saturates E4M3 where its card does).
        device: where the inputs go; results come back to the CPU for the comparisons.
        divides: quantize computes ``x / s``; False: ``x · (1/s)`` in fp32, as the Gaudi kernel takes
            the inverse scale (the two differ in the last bit for scales that are not powers of two).
        gemm_reference: the emulation's definition of its gemm, which it must equal bit for bit
            (same shapes, same operand layouts); None: the gemm accumulates its own way and meets
            the error bound.
        skip: why the case cannot run here (None: it runs).
    """

    id: str
    make: Callable[[], Backend]
    formats: tuple[Fp8Format, ...]
    device: str = "cpu"
    divides: bool = True
    gemm_reference: Callable[..., torch.Tensor] | None = None
    skip: str | None = None


def _real_gaudi_formats() -> tuple[Fp8Format, ...]:
    return (E4M3 if detect_gaudi() is ScaleDevice.GAUDI3 else E4M3_GAUDI2, E5M2)


def _real_gaudi_skip() -> str | None:
    if detect_gaudi() is None:
        return "needs a Gaudi2/Gaudi3 card with habana_frameworks.torch (the real torch.ops.hpu kernels)"
    return None


# The references are defined further down, hence the lambdas.
CASES = (
    BackendCase("emulated", EmulatedBackend, ALL_FORMATS, gemm_reference=lambda *a: ref_gemm_fp32(*a)),
    BackendCase("emulated-no-reuse", lambda: EmulatedBackend(reuse_weights=False), ALL_FORMATS,
                gemm_reference=lambda *a: ref_gemm_fp32(*a)),
    BackendCase("emulated-inc-layout", lambda: EmulatedBackend(inc_layout=True), ALL_FORMATS,
                gemm_reference=lambda *a: ref_gemm_inc_qdq(*a)),
    # On CPU tensors CudaBackend runs torch._scaled_mm's CPU implementation for aligned 2-D gemms
    # (see test_cuda_backend_routes_aligned_2d_gemms_to_scaled_mm) and the emulation otherwise.
    BackendCase("cuda-on-cpu", CudaBackend, ALL_FORMATS),
    BackendCase("cuda-gpu", CudaBackend, ALL_FORMATS, device="cuda",
                skip=None if torch.cuda.is_available() else "needs a CUDA GPU (the GPU _scaled_mm kernels)"),
    BackendCase("hpu-standin-gaudi2", lambda: HpuBackend(RecordingHpuOps(240.0)), (E4M3_GAUDI2, E5M2), divides=False),
    BackendCase("hpu-standin-gaudi3", lambda: HpuBackend(RecordingHpuOps(448.0)), (E4M3, E5M2), divides=False),
    BackendCase("hpu-gaudi", HpuBackend, _real_gaudi_formats(), device="hpu", divides=False, skip=_real_gaudi_skip()),
)


def _with_formats() -> list[Any]:
    return [pytest.param(c, f, id=f"{c.id}-{f.name}", marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
            for c in CASES for f in c.formats]


def _with_storages() -> list[Any]:
    out = []
    for c in CASES:
        for storage in dict.fromkeys(f.storage for f in c.formats):
            marks = [pytest.mark.skip(reason=c.skip)] if c.skip else []
            out.append(pytest.param(c, storage, id=f"{c.id}-{str(storage).removeprefix('torch.float8_')}", marks=marks))
    return out


def _to(v: Any, device: str) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v


# ---- references -------------------------------------------------------------------------------------


def _s32(s: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(s, dtype=torch.float32)


def ref_quantize(x: torch.Tensor, s: torch.Tensor | float, fmt: Fp8Format, divides: bool = True) -> torch.Tensor:
    y = x.float() / _s32(s) if divides else x.float() * (1.0 / _s32(s))
    fs = FULLSCALE[fmt.name]
    return y.clamp(-fs, fs).to(fmt.storage)


def ref_dequantize(q: torch.Tensor, s: torch.Tensor | float, out_dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * _s32(s)).to(out_dtype)


def ref_gemm_fp32(qa: torch.Tensor, qb: torch.Tensor, sa: Any, sb: Any, out_dtype: torch.dtype) -> torch.Tensor:
    """The hardware's FP8 gemm: codes multiplied and accumulated in fp32, then one fp32 factor
    s_a·s_b (per tensor) or s_a[row]·s_b[col] applied, then one rounding to the output dtype."""
    acc, a, b = torch.matmul(qa.float(), qb.float()), _s32(sa), _s32(sb)
    return (acc * (a * b) if a.numel() == b.numel() == 1 else acc * a * b).to(out_dtype)


def ref_gemm_inc_qdq(qa: torch.Tensor, qb: torch.Tensor, sa: Any, sb: Any, out_dtype: torch.dtype) -> torch.Tensor:
    """INC's CPU QDQ: both operands dequantized to the output dtype, multiplied there."""
    return torch.matmul(ref_dequantize(qa, sa, out_dtype), ref_dequantize(qb, sb, out_dtype))


def _f64(q: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    return q.double() * torch.as_tensor(s, dtype=torch.float32).double()


OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Unit roundoff of each output dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_within_gemm_bound(got: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor, sa: Any, sb: Any) -> None:
    """|got - exact| <= (2u + (K + 3)·2^-24)·(|A| @ |B|) + u·|exact|, u the output dtype's roundoff.

    The bound of a gemm whose operands are rounded to the output dtype (2u), accumulated in fp32
    (K·2^-24) with up to three more fp32 roundings for the scales, and rounded once to the output
    dtype (u·|exact|): every backend's way of computing the product lies inside it, a wrong scale,
    operand or layout does not. The float64 product stands for the exact one.
    """
    a, b = _f64(qa, sa), _f64(qb, sb)
    exact, mag = torch.matmul(a, b), torch.matmul(a.abs(), b.abs())
    u, k = UNIT_ROUNDOFF[got.dtype], qa.shape[-1]
    bound = (2 * u + (k + 3) * 2.0**-24) * mag + u * exact.abs()
    err = (got.double() - exact).abs()
    worst = float((err / bound.clamp_min(1e-300)).max())
    assert bool((err <= bound).all()), f"{got.dtype}: max error / bound {worst:.3g}"


# ---- inputs ---------------------------------------------------------------------------------------


def _grid(fmt: Fp8Format) -> torch.Tensor:
    """Every finite value of the format up to its full scale, ascending (both zeros)."""
    v = torch.arange(256, dtype=torch.uint8).view(fmt.storage).float()
    v = v[torch.isfinite(v) & (v.abs() <= FULLSCALE[fmt.name])]
    return v.sort().values


def _scaled_domain_values(fmt: Fp8Format) -> torch.Tensor:
    """Values of ``x / s`` that exercise the cast: the grid, exact midpoints (ties to even), points
    just off the midpoints, the subnormal range and values past the full scale."""
    g = _grid(fmt)
    mid = (g[1:] + g[:-1]) / 2
    fs = FULLSCALE[fmt.name]
    past = torch.tensor([1.02, 1.05, 1.5, 4.0, 1e20]) * fs
    rnd = torch.randn(64, generator=torch.Generator().manual_seed(0)) * fs / 8
    return torch.cat([g, mid, mid * (1 + 2.0**-20), mid * (1 - 2.0**-20), g[:8] / 3, past, -past, rnd])


# The scale layouts of the contract: per tensor (float or 0-d tensor; a power of two, an arbitrary
# value, one that bf16 holds exactly), per row ([R, 1]) and per column ([1, C]); row and column
# scales mix powers of two with other values.
SCALE_KINDS = ("pow2", "arbitrary", "bf16-exact", "0-d", "per-row", "per-column")


def _scale(kind: str, rows: int, cols: int, seed: int = 1) -> torch.Tensor | float:
    g = torch.Generator().manual_seed(seed)
    if kind == "pow2":
        return 0.25
    if kind == "arbitrary":
        return 0.0481930123
    if kind == "bf16-exact":
        return 0.048095703125
    if kind == "0-d":
        return torch.tensor(3.7)
    n = rows if kind == "per-row" else cols
    s = torch.rand(n, generator=g) * 2 + 0.01
    s[::2] = torch.exp2(torch.randint(-4, 4, (len(s[::2]),), generator=g).float())
    return s.reshape(n, 1) if kind == "per-row" else s.reshape(1, n)


def _quantize_input(fmt: Fp8Format, kind: str, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor | float]:
    v = _scaled_domain_values(fmt)
    s = _scale(kind, rows, v.numel())
    return v.reshape(1, -1).expand(rows, -1) * _s32(s), s


def _codes(seed: int, shape: tuple[int, ...], storage: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 4).to(storage)


def _exact_codes(seed: int, shape: tuple[int, ...], storage: torch.dtype) -> torch.Tensor:
    """Codes of magnitude 1..16: products are multiples of 2^-6 below 2^8, so a K <= 32 dot product
    needs at most 19 bits and every fp32 step of any backend's gemm is exact."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.rand(*shape, generator=g) * 15 + 1
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).to(storage)


# (a's shape, b's shape): an aligned 2-D gemm (CudaBackend's kernel path), a 3-D activation against a
# 2-D weight (kernel path after a reshape), sizes _scaled_mm refuses, and a batched (attention) matmul.
GEMM_SHAPES = {
    "2d": ((8, 32), (32, 16)),
    "3d": ((2, 4, 32), (32, 16)),
    "unaligned": ((5, 24), (24, 7)),
    "batched": ((2, 3, 8), (2, 8, 5)),
}


def _gemm_scales(kind: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], pow2: bool,
                 seed: int = 4) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)

    def values(*shape: int) -> torch.Tensor:
        if pow2:
            return torch.exp2(torch.randint(-3, 4, shape, generator=g).float())
        return torch.rand(*shape, generator=g) * 0.5 + 0.05

    row = values(*a_shape[:-1], 1)
    col = values(1, b_shape[-1])
    per_tensor_a, per_tensor_b = (0.5, 2.0) if pow2 else (0.0481930123, 0.7310)
    return {"tensor": (per_tensor_a, per_tensor_b), "row": (row, per_tensor_b), "row-col": (row, col)}[kind]


# ---- the contract -----------------------------------------------------------------------------------


class TestBackendConformance:
    """The contract every backend meets; each test runs once per backend case (and format)."""

    @pytest.mark.parametrize("kind", SCALE_KINDS)
    @pytest.mark.parametrize("case, fmt", _with_formats())
    def test_quantize_codes_are_bit_exact(self, case: BackendCase, fmt: Fp8Format, kind: str) -> None:
        x, s = _quantize_input(fmt, kind)
        q = case.make().quantize(x.to(case.device), _to(s, case.device), fmt)
        assert q.dtype == fmt.storage and q.shape == x.shape
        want = ref_quantize(x, s, fmt, divides=case.divides)
        assert torch.equal(q.cpu().view(torch.uint8), want.view(torch.uint8))

    @pytest.mark.parametrize("case, fmt", _with_formats())
    def test_quantize_saturates_at_the_full_scale(self, case: BackendCase, fmt: Fp8Format) -> None:
        fs = FULLSCALE[fmt.name]
        # 1.05·240 = 252 would round up to 256 on the e4m3fn grid: only the clamp keeps Gaudi2 at 240.
        v = torch.tensor([1.0, 1.02, 1.05, 1.5, 4.0, 1e20, -1.0, -1.05, -1e20]) * fs
        q = case.make().quantize((v * 0.5).to(case.device), 0.5, fmt)
        assert q.cpu().float().tolist() == [fs] * 6 + [-fs] * 3

    @pytest.mark.parametrize("case, fmt", _with_formats())
    def test_quantize_keeps_nan_and_saturates_inf(self, case: BackendCase, fmt: Fp8Format) -> None:
        fs = FULLSCALE[fmt.name]
        x = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.0])
        got = case.make().quantize(x.to(case.device), 0.75, fmt).cpu().float()
        assert bool(got[0].isnan()) and got[1:].tolist() == [fs, -fs, 4.0]

    @pytest.mark.parametrize("kind", SCALE_KINDS)
    @pytest.mark.parametrize("case, storage", _with_storages())
    def test_dequantize_is_exact(self, case: BackendCase, storage: torch.dtype, kind: str) -> None:
        q = torch.arange(256, dtype=torch.uint8).view(storage).reshape(16, 16)  # every code, NaN and inf too
        s = _scale(kind, 16, 16, seed=2)
        backend = case.make()
        for out_dtype in OUT_DTYPES:
            got = backend.dequantize(q.to(case.device), _to(s, case.device), out_dtype)
            assert got.dtype == out_dtype
            torch.testing.assert_close(got.cpu(), ref_dequantize(q, s, out_dtype), rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"out_dtype {out_dtype}: {m}")

    @pytest.mark.parametrize("scales", ["tensor", "row", "row-col"])
    @pytest.mark.parametrize("shape", list(GEMM_SHAPES))
    @pytest.mark.parametrize("case, storage", _with_storages())
    def test_gemm_matches_the_reference(self, case: BackendCase, storage: torch.dtype, shape: str, scales: str) -> None:
        a_shape, b_shape = GEMM_SHAPES[shape]
        qa, qb = _codes(2, a_shape, storage), _codes(3, b_shape, storage)
        sa, sb = _gemm_scales(scales, a_shape, b_shape, pow2=False)
        d, backend = case.device, case.make()
        for out_dtype in OUT_DTYPES:
            got = backend.gemm(qa.to(d), qb.to(d), _to(sa, d), _to(sb, d), out_dtype).cpu()
            assert got.dtype == out_dtype and got.shape == torch.matmul(qa.float(), qb.float()).shape
            if case.gemm_reference is not None:
                assert torch.equal(got, case.gemm_reference(qa, qb, sa, sb, out_dtype)), f"out_dtype {out_dtype}"
            assert_within_gemm_bound(got, qa, qb, sa, sb)

    @pytest.mark.parametrize("scales", ["tensor", "row", "row-col"])
    @pytest.mark.parametrize("shape", list(GEMM_SHAPES))
    @pytest.mark.parametrize("case, storage", _with_storages())
    def test_gemm_is_bit_exact_where_the_arithmetic_is_exact(self, case: BackendCase, storage: torch.dtype, shape: str,
                                                             scales: str) -> None:
        # Power-of-two scales, small codes, fp32 output: no step of any backend's gemm rounds, so
        # every accumulation order gives the exact product.
        a_shape, b_shape = GEMM_SHAPES[shape]
        qa, qb = _exact_codes(5, a_shape, storage), _exact_codes(6, b_shape, storage)
        sa, sb = _gemm_scales(scales, a_shape, b_shape, pow2=True)
        d = case.device
        got = case.make().gemm(qa.to(d), qb.to(d), _to(sa, d), _to(sb, d), torch.float32).cpu()
        assert torch.equal(got, torch.matmul(_f64(qa, sa), _f64(qb, sb)).float())

    @pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
    @pytest.mark.parametrize("kind", SCALE_KINDS)
    @pytest.mark.parametrize("case, fmt", [p for p in _with_formats()
                                           if not p.values[0].skip and hasattr(p.values[0].make(), "fake_quant")])
    def test_fake_quant_is_quantize_then_dequantize(self, case: BackendCase, fmt: Fp8Format, kind: str,
                                                   out_dtype: torch.dtype) -> None:
        # Only backends that offer fake_quant (modules use it in place of quantize + dequantize).
        x, s = _quantize_input(fmt, kind)
        backend = case.make()
        got = backend.fake_quant(x.to(case.device), _to(s, case.device), fmt, out_dtype)  # type: ignore[attr-defined]
        want = ref_dequantize(ref_quantize(x, s, fmt, divides=case.divides), s, out_dtype)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


# ---- what only one backend has ----------------------------------------------------------------------


def test_cuda_backend_routes_aligned_2d_gemms_to_scaled_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligned 2-D weights (K, N multiples of 16) go to _scaled_mm, with the per-tensor scales or, for
    row/column scales, unit scales (applied to the fp32 result); other shapes use the emulation."""
    calls: list[tuple[float, float, torch.dtype]] = []
    real = torch._scaled_mm

    def spy(a, b, *, scale_a, scale_b, out_dtype):  # type: ignore[no-untyped-def]
        calls.append((float(scale_a), float(scale_b), out_dtype))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    cuda = CudaBackend()
    qb = _codes(1, (32, 16), F8)
    cuda.gemm(_codes(0, (8, 32), F8), qb, 0.5, 0.25, torch.bfloat16)
    assert calls == [(0.5, 0.25, torch.bfloat16)]
    cuda.gemm(_codes(0, (2, 4, 32), F8), qb, torch.rand(2, 4, 1), torch.rand(1, 16), torch.bfloat16)
    assert calls[1:] == [(1.0, 1.0, torch.float32)]
    for a_shape, b_shape in (GEMM_SHAPES["unaligned"], GEMM_SHAPES["batched"], ((4, 32), (32, 8)), ((4, 24), (24, 16))):
        cuda.gemm(_codes(0, a_shape, F8), _codes(1, b_shape, F8), 0.5, 0.25, torch.float32)
    assert len(calls) == 2


def test_hpu_backend_calls_the_gaudi_ops_with_inverse_and_descales() -> None:
    """The kernels take the inverse scale when casting to FP8 and the scales themselves as descales."""
    ops = RecordingHpuOps()
    hpu = HpuBackend(ops)
    q = hpu.quantize(torch.tensor([[1.0, -500.0, 3.0]]), 2.0, E4M3_GAUDI2)
    name, (inv, stochastic, is_amax, dtype) = ops.calls[-1]
    assert name == "cast_to_fp8_v2" and float(inv) == 0.5 and (stochastic, is_amax, dtype) == (False, False, F8)
    hpu.dequantize(q, 2.0, torch.bfloat16)
    name, (scale, out) = ops.calls[-1]
    assert name == "cast_from_fp8" and float(scale) == 2.0 and out == torch.bfloat16
    hpu.gemm(q, _codes(8, (3, 4), F8), 2.0, 0.5, torch.float32)
    name, (ta, tb, d, out, sa, sb, bias, acc) = ops.calls[-1]
    assert name == "fp8_gemm_v2" and (ta, tb, d, out, bias, acc) == (False, False, None, torch.float32, None, False)
    assert (float(sa), float(sb)) == (2.0, 0.5)


def test_hpu_backend_without_habana_is_a_clear_error() -> None:
    try:
        import habana_frameworks.torch  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="habana_frameworks.torch"):
            get_backend("hpu")
    else:  # pragma: no cover - only on Gaudi hosts
        pytest.skip("habana_frameworks is installed here")


@pytest.mark.parametrize("inc_layout", [False, True])
def test_emulated_weight_operand(inc_layout: bool) -> None:
    """weight_operand_t (emulation only): the [in, out] operand of a Linear from its [out, in] codes
    and per-output-channel scales: the codes' fp32 values as a transposed view (``F.linear``'s
    layout; the scales are applied to the accumulator), or with inc_layout the dequantized weight
    in hp, contiguous as INC multiplies it."""
    w = _codes(9, (6, 10), F8)
    s = torch.rand(1, 6, generator=torch.Generator().manual_seed(9)) + 0.1
    got = EmulatedBackend(inc_layout=inc_layout).weight_operand_t(w, s, torch.bfloat16)
    want = (w.float().t() * s).to(torch.bfloat16) if inc_layout else w.float().t()
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got.is_contiguous() == inc_layout


def test_registry() -> None:
    assert get_backend("cpu").name == "cpu"
    with pytest.raises(UnknownBackendError, match="'tpu' is unknown; known: cpu, cuda, hpu"):
        get_backend("tpu")
    with pytest.raises(DuplicateRegistrationError, match="'cpu'"):
        register_backend("cpu", EmulatedBackend)


@pytest.mark.parametrize("device, expected", [("cpu", EmulatedBackend), (torch.device("cpu"), EmulatedBackend),
                                              ("cuda", CudaBackend), ("cuda:1", CudaBackend), ("hpu:0", HpuBackend)],
                         ids=["cpu", "torch.device(cpu)", "cuda", "cuda:1", "hpu:0"])
def test_backend_for_device_of_each_kind(monkeypatch: pytest.MonkeyPatch, device: Any, expected: type) -> None:
    # Building HpuBackend needs torch.ops.hpu; the stand-in lets the lookup be checked off Gaudi.
    monkeypatch.setattr(backends, "_load_hpu_ops", RecordingHpuOps)
    assert type(backend_for_device(device)) is expected


@pytest.mark.parametrize("device", ["xpu", "mps:0", "meta", torch.device("meta")],
                         ids=["xpu", "mps:0", "meta", "torch.device(meta)"])
def test_backend_for_device_refuses_a_device_without_backend(device: Any) -> None:
    kind = torch.device(device).type
    with pytest.raises(UnknownBackendError) as err:
        backend_for_device(device)
    msg = str(err.value)
    assert f"no FP8 backend for device '{torch.device(device)}'" in msg
    assert "backends exist for device types cpu, cuda, hpu" in msg
    assert "move the model to one of them" in msg and "backend=" in msg
    assert f"register one for '{kind}' with shards.quantized.backends.register_backend" in msg


def test_backend_for_device_uses_a_registered_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))  # the registration ends with the test
    register_backend("xpu", EmulatedBackend)
    assert type(backend_for_device("xpu:0")) is EmulatedBackend


@pytest.mark.parametrize(
    "name, expected",
    [("GAUDI2", ScaleDevice.GAUDI2), ("GAUDI3", ScaleDevice.GAUDI3), ("gaudi2", ScaleDevice.GAUDI2),
     ("GAUDI", None), (None, None)],
)
def test_detect_gaudi_maps_the_device_name(name: str | None, expected: ScaleDevice | None) -> None:
    assert detect_gaudi(lambda: name) is expected


def _fake_habana(monkeypatch: pytest.MonkeyPatch, available: bool, device_name: str) -> None:
    """Stand-in modules for ``habana_frameworks.torch.hpu`` (only what detect_gaudi calls)."""
    hpu = types.ModuleType("habana_frameworks.torch.hpu")
    hpu.is_available = lambda: available  # type: ignore[attr-defined]
    hpu.get_device_name = lambda: device_name  # type: ignore[attr-defined]
    top, torch_pkg = types.ModuleType("habana_frameworks"), types.ModuleType("habana_frameworks.torch")
    top.torch, torch_pkg.hpu = torch_pkg, hpu  # type: ignore[attr-defined]
    for name, module in [("habana_frameworks", top), ("habana_frameworks.torch", torch_pkg),
                         ("habana_frameworks.torch.hpu", hpu)]:
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("available, device_name, expected",
                         [(True, "GAUDI3", ScaleDevice.GAUDI3), (True, "GAUDI2", ScaleDevice.GAUDI2),
                          (False, "GAUDI3", None)])
def test_detect_gaudi_probes_the_habana_plugin(monkeypatch: pytest.MonkeyPatch, available: bool, device_name: str,
                                               expected: ScaleDevice | None) -> None:
    _fake_habana(monkeypatch, available, device_name)
    assert detect_gaudi() is expected


def test_detect_gaudi_off_gaudi_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, as on a host without the plugin.
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
    monkeypatch.delitem(sys.modules, "habana_frameworks.torch", raising=False)
    monkeypatch.delitem(sys.modules, "habana_frameworks.torch.hpu", raising=False)
    assert detect_gaudi() is None
