"""The emulated FP8 gemm against exact products (issue 18 item 3).

The hardware (Gaudi's fp8_gemm_v2, CUDA's ``_scaled_mm``) multiplies FP8 values exactly, accumulates
in fp32 and rounds once to ``hp_dtype`` after scaling. The reference here never uses the code
under test: FP8 codes are drawn from the code points of the project's bit-level FP8 reference
(``tests.shards.test_numerics``), inputs are rounded onto the grid by its brute-force
``nearest_code``, and the product is computed in float64, where every product of two FP8 values is
exact. The codes' exponent range is limited so that every partial sum is a multiple of the smallest
product's last bit below 2^24 of it (checked, not assumed): then fp32 accumulation is exact in any
order, and so is the float64 sum.

- power-of-two scales: the whole computation is exact up to the final rounding, so the output
  equals the exact value rounded to hp, bit for bit;
- other scales: the fp32 scaling rounds (at most twice, ``|F - E| <= 2^-22·|E|``) before the
  rounding to hp. The output equals the exact value rounded to hp wherever that rounding does
  not depend on such an error, is within ``2^-22·|E| + ½ ulp`` of the exact value everywhere and,
  for bf16/fp16, within one ulp of the exact value rounded.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shards.fp8.methods import INC_DYNAMIC_SCALING, DynamicScaling, Rounding
from shards.fp8.module_scales import ModuleScales
from shards.fp8.numerics import E4M3, E5M2, Fp8Format, HpDtype, LpDtype
from shards.fp8.scale_math import ScaleContext, dynamic_activation_scale
from shards.plan import ScaleFormat
from shards.quantized.backends import CudaBackend, EmulatedBackend
from shards.quantized.modules import QuantContext, QuantLinear, QuantMatmul
from tests.shards.test_numerics import decode, grid, nearest_code

HP = {HpDtype.BF16: torch.bfloat16, HpDtype.FP16: torch.float16, HpDtype.FP32: torch.float32}
SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
# Bound on the relative error of the fp32 scaling: two roundings of 2^-24 each, with margin.
SCALING_ERROR = 2.0**-22


def fp8_codes(fmt: Fp8Format, shape: tuple[int, ...], seed: int, exponents: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes whose values are 0 or have a binary exponent in ``exponents``, chosen among the
    format's code points; returned as FP8 storage and as their exact values in float64."""
    values, codes = grid(fmt.name)
    pool = [c for v, c in zip(values, codes) if v == 0 or math.floor(math.log2(v)) in exponents]
    g = torch.Generator().manual_seed(seed)
    u8 = torch.tensor(pool, dtype=torch.uint8)[torch.randint(len(pool), shape, generator=g)]
    u8 |= (torch.rand(shape, generator=g) < 0.5).to(torch.uint8) << 7
    return u8.view(fmt.storage), code_values(u8, fmt)


def code_values(u8: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    table = torch.tensor([decode(c, fmt.exp_bits) for c in range(256)], dtype=torch.float64)
    return table[u8.long()]


def nearest_values(y: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """fp32 values ``y`` rounded onto the FP8 grid by the brute-force reference (float64)."""
    codes = [nearest_code(v, fmt) for v in y.reshape(-1).tolist()]
    return code_values(torch.tensor(codes, dtype=torch.uint8).reshape(y.shape), fmt)


def assert_exact_accumulation(a: torch.Tensor, b: torch.Tensor, fmt: Fp8Format) -> None:
    """Every partial sum of ``a @ b`` (float64 code values) is a multiple of the smallest product's
    last bit and below 2^24 of those: exact in fp32 in any summation order."""
    man = 7 - fmt.exp_bits

    def last_bit(v: torch.Tensor) -> float:
        return 2.0 ** (math.floor(math.log2(float(v[v != 0].abs().min()))) - man)

    assert float((a.abs() @ b.abs()).max()) <= 2**24 * last_bit(a) * last_bit(b), "fp32 accumulation would round"


def _ulp(x: torch.Tensor, hp: torch.dtype) -> torch.Tensor:
    """The spacing of ``hp`` values in the binade of each float64 value (subnormals: the smallest)."""
    emin = math.frexp(torch.finfo(hp).tiny)[1] - 1
    e = torch.frexp(x)[1].to(torch.float64) - 1
    return torch.exp2(e.clamp_min(emin) - (SIGNIFICAND_BITS[hp] - 1))


def round_to(x: torch.Tensor, hp: torch.dtype) -> torch.Tensor:
    """float64 values rounded to the nearest ``hp`` value, ties to even (computed exactly in float64)."""
    step = _ulp(x, hp)
    return torch.round(x / step) * step


def assert_matches_exact(got: torch.Tensor, exact: torch.Tensor, hp: torch.dtype, pow2: bool) -> None:
    got, want = got.double(), round_to(exact, hp)
    if pow2:
        assert torch.equal(got, want)
        return
    sure = round_to(exact * (1 - SCALING_ERROR), hp) == round_to(exact * (1 + SCALING_ERROR), hp)
    assert torch.equal(got[sure], want[sure])
    ulp = _ulp(torch.maximum(got.abs(), exact.abs()), hp)
    assert bool(((got - exact).abs() <= SCALING_ERROR * exact.abs() + ulp / 2).all())
    if hp is not torch.float32:
        assert bool(((got - want).abs() <= ulp).all())
        assert float(sure.double().mean()) > 0.9  # the exact comparison covers nearly every element


def _scales(pow2: bool, shape: tuple[int, ...], hp: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if pow2:
        return torch.exp2(torch.randint(-4, 4, shape, generator=g).double()).to(hp)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 0.5 + 0.05).to(hp)


# (s_a's shape, s_b's shape) of a [8, K] @ [K, N] gemm; "row" is a dynamic (per-token) input scale.
SCALE_SHAPES = {"tensor": lambda n: ((), ()), "row": lambda n: ((8, 1), ()), "column": lambda n: ((), (1, n)),
                "row-column": lambda n: ((8, 1), (1, n))}
# (backend, N): CudaBackend's emulated fallback (N not a multiple of 16), and its _scaled_mm path run
# by torch's CPU implementation.
BACKEND_CASES = {"emulated": (EmulatedBackend, 32), "cuda-fallback": (CudaBackend, 24),
                 "cuda-scaled-mm-on-cpu": (CudaBackend, 32)}


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "arbitrary"])
@pytest.mark.parametrize("scales", list(SCALE_SHAPES))
@pytest.mark.parametrize("hp", list(HP.values()), ids=str)
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backend_gemm_against_exact_products(case: str, fmt: Fp8Format, hp: torch.dtype, scales: str,
                                             pow2: bool) -> None:
    if case == "cuda-scaled-mm-on-cpu" and scales == "tensor" and not pow2:
        pytest.skip("torch's CPU _scaled_mm applies other per-tensor scales with ~5e-5 relative error "
                    "(measured; torch's kernel, not ours, bounded by test_backends' conformance suite)")
    make, n = BACKEND_CASES[case]
    # K = 256 terms: with exponents in [-2, 1] every partial sum is exact in fp32.
    qa, a = fp8_codes(fmt, (8, 256), 1, range(-2, 2))
    qb, b = fp8_codes(fmt, (256, n), 2, range(-2, 2))
    assert_exact_accumulation(a, b, fmt)
    sa_shape, sb_shape = SCALE_SHAPES[scales](n)
    sa, sb = _scales(pow2, sa_shape, hp, 3), _scales(pow2, sb_shape, hp, 4)
    got = make().gemm(qa, qb, sa, sb, hp)
    assert got.dtype == hp
    assert_matches_exact(got, (a @ b) * sa.double() * sb.double(), hp, pow2)


LINEAR_KINDS = ("per-tensor", "per-channel", "dynamic")


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "arbitrary"])
@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("hp", list(HP))
@pytest.mark.parametrize("reuse", [True, False], ids=["kept-weight", "codes-only"])
@torch.no_grad()
def test_linear_against_exact_products(reuse: bool, hp: HpDtype, kind: str, pow2: bool) -> None:
    """QuantLinear's forward; dynamic: per-token scales, INC's power-of-two rule or amax / 448."""
    hpd, (k, n) = HP[hp], (64, 24)
    _, vx = fp8_codes(E4M3, (2, 4, k), 5, range(-3, 2))
    _, vw = fp8_codes(E4M3, (n, k), 6, range(-3, 2))
    s_gen = _scales(pow2, (2, 4, 1), hpd, 7) if kind == "dynamic" else _scales(pow2, (), hpd, 7)
    s_w = _scales(pow2, (n,) if kind == "per-channel" else (), hpd, 8)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.copy_(vw * s_w.double().reshape(-1, 1))
    x = (vx * s_gen.double()).float()
    dynamic = (INC_DYNAMIC_SCALING if pow2 else DynamicScaling(1.0, Rounding.IDENTITY)) if kind == "dynamic" else None
    inputs = () if dynamic else (s_gen,)
    fmt = ScaleFormat.SCALAR if kind == "per-tensor" else ScaleFormat.CONST
    qctx = QuantContext(ScaleContext(LpDtype.E4M3, hp), EmulatedBackend(reuse_weights=reuse), fmt, dynamic is not None)
    ql = QuantLinear(lin, ModuleScales(inputs, (), s_w, dynamic=dynamic), qctx)
    s_in = torch.as_tensor(ql.input_scale(x))
    w_values = nearest_values(lin.weight / s_w.float().reshape(-1, 1), E4M3)
    assert torch.equal(code_values(ql.weight.view(torch.uint8), E4M3), w_values)
    x_values = nearest_values(x / s_in.float(), E4M3)
    assert_exact_accumulation(x_values, w_values.t(), E4M3)
    exact = (x_values @ w_values.t()) * s_in.double() * s_w.double()
    for _ in range(2):  # the second call reuses the kept weight operand
        assert_matches_exact(ql(x), exact, hpd, pow2)


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "arbitrary"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("hp", list(HP))
@torch.no_grad()
def test_matmul_against_exact_products(hp: HpDtype, dynamic: bool, pow2: bool) -> None:
    """QuantMatmul (attention): per-tensor scales, or per row of a and per column of b."""
    hpd = HP[hp]
    _, va = fp8_codes(E4M3, (2, 3, 4, 64), 9, range(-3, 2))
    _, vb = fp8_codes(E4M3, (2, 3, 64, 5), 10, range(-3, 2))
    s_a, s_b = _scales(pow2, (), hpd, 11), _scales(pow2, (), hpd, 12)
    a, b = (va * s_a.double()).float(), (vb * s_b.double()).float()
    scaling = INC_DYNAMIC_SCALING if pow2 else DynamicScaling(1.0, Rounding.IDENTITY)
    ctx = ScaleContext(LpDtype.E4M3, hp)
    qm = QuantMatmul(QuantContext(ctx, EmulatedBackend(), ScaleFormat.CONST, dynamic),
                     ModuleScales(() if dynamic else (s_a, s_b), (), dynamic=scaling if dynamic else None))
    if dynamic:
        s_a = dynamic_activation_scale(a, ctx, dim=-1, scaling=scaling)
        s_b = dynamic_activation_scale(b, ctx, dim=-2, scaling=scaling)
    qa, qb = nearest_values(a / s_a.float(), E4M3), nearest_values(b / s_b.float(), E4M3)
    assert_exact_accumulation(qa, qb, E4M3)
    assert_matches_exact(qm(a, b), (qa @ qb) * s_a.double() * s_b.double(), hpd, pow2)
