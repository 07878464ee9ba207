"""Patched modules: bit-exact against explicit references.

Linear and Matmul compute the FP8 gemm as the hardware does (:func:`fp32_gemm`: the codes multiplied
and accumulated in fp32, scaled, rounded once to hp); with ``EmulatedBackend(inc_layout=True)`` a
Linear computes INC's CPU QDQ (dequantize to hp, multiply in hp). Conv2d, KV cache and softmax are
dequantize-then-compute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shards.quantized.backends import EmulatedBackend
from shards.model.hf_attention import KVCache, Matmul, Softmax
from shards.fp8.module_scales import ModuleScales
from shards.fp8.numerics import HpDtype, LpDtype, ScaleDevice
from shards.model.op_types import OP_TYPES
from shards.plan import ScaleFormat
from shards.quantized.modules import (
    QUANT_OPS,
    QuantContext,
    QuantConv2d,
    QuantKVCache,
    QuantLinear,
    QuantMatmul,
    QuantSoftmax,
)
from shards.fp8.scale_math import ScaleContext

HP = {HpDtype.BF16: torch.bfloat16, HpDtype.FP32: torch.float32}


def qctx(hp: HpDtype = HpDtype.BF16, device: ScaleDevice | None = None, fmt: ScaleFormat = ScaleFormat.SCALAR,
         dynamic: bool = False) -> QuantContext:
    return QuantContext(ScaleContext(LpDtype.E4M3, hp, device), EmulatedBackend(), fmt, dynamic)


def t(v: float | list[float], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype)


def q(x: torch.Tensor, s: torch.Tensor | float, fullscale: float) -> torch.Tensor:
    """Explicit FP8 codes: fp32 divide, clamp, round to nearest even."""
    return (x.float() / torch.as_tensor(s, dtype=torch.float32)).clamp(-fullscale, fullscale).to(torch.float8_e4m3fn)


def fp32_gemm(a8: torch.Tensor, b8: torch.Tensor, s_a: torch.Tensor | float, s_b: torch.Tensor | float,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The hardware's FP8 gemm of codes ``a8 @ b8``: fp32 products and sums, then ``s_a·s_b`` (one
    fp32 factor per tensor) or ``s_a[row]·s_b[col]``, rounded once to ``out_dtype``."""
    acc = torch.matmul(a8.float(), b8.float())
    sa, sb = torch.as_tensor(s_a, dtype=torch.float32), torch.as_tensor(s_b, dtype=torch.float32)
    return (acc * (sa * sb) if sa.numel() == sb.numel() == 1 else acc * sa * sb).to(out_dtype)


def test_every_op_type_has_a_class_or_a_reason() -> None:
    for name in OP_TYPES:
        entry = QUANT_OPS.get(name)
        assert callable(entry) or (isinstance(entry, str) and entry), name


# (input scale, weight scale, device for scales): pow2 per tensor, Gaudi2 / Gaudi3 HW-aligned
# scales, pow2 per channel.
CASES = [
    pytest.param(t(2.0**-4), t(2.0**-6), None, id="pow2-pts"),
    pytest.param(t(1 / 16), t(1.0), ScaleDevice.GAUDI2, id="hw-gaudi2-pts"),
    pytest.param(t(2.0**-5), t(2.0**-7), ScaleDevice.GAUDI3, id="hw-gaudi3-pts"),
    pytest.param(t(2.0**-4), torch.exp2(torch.randint(-9, -4, (24,)).float()), None, id="pow2-pcs"),
]


@pytest.mark.parametrize("s_in, s_w, device", CASES)
@pytest.mark.parametrize("hp", [HpDtype.BF16, HpDtype.FP32])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_the_fp32_gemm_of_the_codes(s_in: torch.Tensor, s_w: torch.Tensor, device: ScaleDevice | None,
                                          hp: HpDtype, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 24, bias=bias)
    ctx = qctx(hp, device, ScaleFormat.CONST if s_w.numel() > 1 else ScaleFormat.SCALAR)
    scales = ModuleScales((s_in,), (s_w * s_in,), s_w)
    ql = QuantLinear(lin, scales, ctx)
    x = torch.randn(3, 5, 16) * 3
    fs = ctx.fmt.fullscale
    assert fs == (240.0 if device is ScaleDevice.GAUDI2 else 448.0)
    wq = q(lin.weight, s_w.reshape(-1, 1) if s_w.numel() > 1 else s_w, fs)
    assert ql.weight.dtype == torch.float8_e4m3fn and torch.equal(ql.weight.view(torch.uint8), wq.view(torch.uint8))
    ref = fp32_gemm(q(x, s_in, fs), wq.t(), s_in, s_w.reshape(1, -1) if s_w.numel() > 1 else s_w, HP[hp])
    if bias:
        ref = ref + lin.bias
    assert torch.equal(ql(x), ref.to(x.dtype))


@pytest.mark.parametrize("reuse_weights", [True, False])
@pytest.mark.parametrize("inc_layout", [False, True])
@pytest.mark.parametrize("hp", [HpDtype.BF16, HpDtype.FP32])
def test_linear_weight_operand_layout(reuse_weights: bool, inc_layout: bool, hp: HpDtype) -> None:
    """By default the fp32 gemm of the codes, the weight operand a transposed view of the [out, in]
    codes (``F.linear``'s layout); with ``inc_layout`` INC's QDQ, a bf16/fp32 matmul of dequantized
    operands with the contiguous [in, out] weight INC multiplies with (the CPU kernel, and so the
    last bit of some hp outputs, follows the layout)."""
    torch.manual_seed(5)
    lin = nn.Linear(576, 192, bias=False).to(HP[hp])
    backend = EmulatedBackend(reuse_weights=reuse_weights, inc_layout=inc_layout)
    s_in, s_w = t(2.0**-4), t(2.0**-8)
    ql = QuantLinear(lin, ModuleScales((s_in,), (s_in * s_w,), s_w),
                     QuantContext(ScaleContext(LpDtype.E4M3, hp, None), backend))
    x = torch.randn(4, 64, 576).to(HP[hp])
    if inc_layout:
        xd = (q(x, s_in, 448).float() * s_in.float()).to(HP[hp])
        ref = torch.matmul(xd, (q(lin.weight, s_w, 448).float() * s_w.float()).to(HP[hp]).t().contiguous())
    else:
        ref = fp32_gemm(q(x, s_in, 448), q(lin.weight, s_w, 448).t(), s_in, s_w, HP[hp])
    assert torch.equal(ql(x), ref)
    if reuse_weights:
        kept = ql._weight_operand_t(ql.scale_weight)
        assert kept.is_contiguous() == inc_layout and kept.dtype == (HP[hp] if inc_layout else torch.float32)


def test_gaudi2_linear_saturates_input_at_240() -> None:
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
    ql = QuantLinear(lin, ModuleScales((t(1.0),), (t(1.0),), t(1.0)), qctx(HpDtype.FP32, ScaleDevice.GAUDI2))
    assert ql(torch.tensor([[1000.0, 0.0]])).item() == 240.0
    ql448 = QuantLinear(lin, ModuleScales((t(1.0),), (t(1.0),), t(1.0)), qctx(HpDtype.FP32))
    assert ql448(torch.tensor([[1000.0, 0.0]])).item() == 448.0


def test_scalar_versus_const_storage() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(8, 4)
    scales = ModuleScales((t(0.125),), (t(0.125 * 0.25),), t(0.25))
    scalar = QuantLinear(lin, scales, qctx(fmt=ScaleFormat.SCALAR))
    const = QuantLinear(lin, scales, qctx(fmt=ScaleFormat.CONST))
    assert isinstance(scalar.scale_input_0, float) and isinstance(scalar.scale_weight, float)
    assert not dict(scalar.named_buffers())
    # Reference §6: SCALAR scales are saved as hp tensors, so the state_dicts hold the same keys.
    assert set(scalar.state_dict()) == set(const.state_dict()) == {
        "weight", "bias", "scale_input_0", "scale_output_0", "scale_weight"}
    sd = const.state_dict()
    assert {"scale_input_0", "scale_output_0", "scale_weight"} <= set(sd)
    assert sd["scale_input_0"].dtype == torch.bfloat16 and not any(p.requires_grad for p in const.parameters())
    x = torch.randn(2, 8)
    assert torch.equal(scalar(x), const(x))
    assert scalar.to_inc_node() == const.to_inc_node() == {"inputs": [0.125], "outputs": [0.03125], "params": {"weight": 0.25}}


def _scalar_linear(s_in: float, s_w: float, seed: int, fmt: ScaleFormat = ScaleFormat.SCALAR) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear(nn.Linear(8, 4), ModuleScales((t(s_in),), (t(s_in * s_w),), t(s_w)), qctx(fmt=fmt))


@pytest.mark.parametrize("hp", [HpDtype.BF16, HpDtype.FP32])
def test_scalar_scales_are_saved_as_hp_tensors(hp: HpDtype) -> None:
    ql = QuantLinear(nn.Linear(8, 4), ModuleScales((t(0.375),), (t(0.375 * 2.0**-5),), t(2.0**-5)),
                     qctx(hp, fmt=ScaleFormat.SCALAR))
    sd = ql.state_dict()
    expected = {"scale_input_0": 0.375, "scale_output_0": 0.375 * 2.0**-5, "scale_weight": 2.0**-5}
    for key, value in expected.items():
        assert sd[key].dtype == HP[hp] and sd[key].shape == () and sd[key].item() == value


@pytest.mark.parametrize("source_fmt", [ScaleFormat.SCALAR, ScaleFormat.CONST])
def test_scalar_scales_survive_a_state_dict_round_trip(source_fmt: ScaleFormat) -> None:
    source = _scalar_linear(2.0**-3, 2.0**-6, seed=1, fmt=source_fmt)
    target = _scalar_linear(1.0, 1.0, seed=2)  # other weights, other scales
    target.load_state_dict(source.state_dict())
    assert isinstance(target.scale_input_0, float)
    assert (target.scale_input_0, target.scale_output_0, target.scale_weight) == (2.0**-3, 2.0**-9, 2.0**-6)
    x = torch.randn(3, 8)
    assert torch.equal(target(x), source(x))


def test_missing_scalar_scale_is_reported() -> None:
    target = _scalar_linear(1.0, 1.0, seed=0)
    sd = _scalar_linear(0.5, 0.5, seed=0).state_dict()
    del sd["scale_input_0"]
    with pytest.raises(RuntimeError, match="Missing key.*scale_input_0"):
        target.load_state_dict(sd)
    result = target.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["scale_input_0"] and target.scale_input_0 == 1.0 and target.scale_weight == 0.5


def test_per_channel_scale_into_a_scalar_is_refused() -> None:
    target = _scalar_linear(1.0, 1.0, seed=0)
    sd = target.state_dict()
    sd["scale_weight"] = t([0.5, 0.25, 0.5, 0.5])
    with pytest.raises(RuntimeError, match="scale_weight: a SCALAR scale needs one element, got \\(4,\\)"):
        target.load_state_dict(sd)


def test_per_channel_node_shape() -> None:
    lin = nn.Linear(3, 2)
    s_w = t([0.5, 0.25])
    ql = QuantLinear(lin, ModuleScales((t(1.0),), (s_w,), s_w, torch.ones(3, dtype=torch.bfloat16)),
                     qctx(fmt=ScaleFormat.CONST))
    assert ql.to_inc_node() == {"inputs": [1.0], "outputs": [[0.5, 0.25]],
                                "params": {"weight": {"0": [0.5, 0.25], "1": [1.0, 1.0, 1.0]}}}


@pytest.mark.parametrize("hp", [HpDtype.BF16, HpDtype.FP32])
def test_dynamic_linear_uses_per_token_pow2_scales(hp: HpDtype) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(16, 8, bias=False)
    s_w = t(2.0**-6)
    ql = QuantLinear(lin, ModuleScales((), (), s_w), qctx(hp, fmt=ScaleFormat.CONST, dynamic=True))
    x = torch.randn(4, 16) * torch.tensor([[0.01], [1.0], [30.0], [500.0]])
    # s = 2**ceil(log2(amax_row / (448 * 0.5))): one scale per token (row), backoff 0.5.
    s_tok = torch.exp2(torch.ceil(torch.log2(x.abs().amax(dim=-1, keepdim=True) / 224.0)))
    ref = fp32_gemm(q(x, s_tok, 448), q(lin.weight, s_w, 448).t(), s_tok, s_w, HP[hp])
    assert torch.equal(ql(x), ref.to(x.dtype))
    assert ql.to_inc_node() == {"inputs": [], "outputs": [], "params": {"weight": 2.0**-6}}


# (model dtype, hp dtype): a bf16 or fp32 model computed in its own dtype, and an fp32 model with
# hp bf16 (its fp32 bias cannot enter a bf16 convolution; INC's QDQ conv raises there).
CONV_DTYPES = [(torch.bfloat16, HpDtype.BF16), (torch.float32, HpDtype.FP32), (torch.float32, HpDtype.BF16)]


@pytest.mark.parametrize("s_in, s_w, device", CASES[:3] + [
    pytest.param(t(16.0), t(16.0), ScaleDevice.GAUDI2, id="hw-fixed-gaudi2"),
    pytest.param(t(1.0), t(1.0), None, id="unit"),
    pytest.param(t(2.0**-5), t([2.0**-7, 2.0**-6, 2.0**-8, 2.0**-7]), None, id="pow2-pcs"),
])
@pytest.mark.parametrize("model_dtype, hp", CONV_DTYPES)
def test_conv2d_computes_like_inc_qdq(s_in: torch.Tensor, s_w: torch.Tensor, device: ScaleDevice | None,
                                      model_dtype: torch.dtype, hp: HpDtype) -> None:
    """INC's QDQ Conv2d: ``conv2d(QDQ(x), dequant(W8), bias)`` in hp, the bias inside the convolution
    (one rounding); adding it afterwards (our earlier code) differed by an hp ulp, up to ~0.7 % of
    max|y| in bf16."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(model_dtype)
    fmt = ScaleFormat.CONST if s_w.numel() > 1 else ScaleFormat.SCALAR
    ctx = qctx(hp, device, fmt)
    qc = QuantConv2d(conv, ModuleScales((s_in,), (s_w * s_in,), s_w), ctx)
    x = (torch.randn(2, 3, 9, 9) * 4).to(model_dtype)
    fs, hpd = ctx.fmt.fullscale, HP[hp]
    sw4 = s_w.float().reshape(-1, 1, 1, 1) if s_w.numel() > 1 else s_w.float()
    xd = (q(x, s_in, fs).float() * s_in.float()).to(hpd)
    wd = (q(conv.weight, sw4, fs).float() * sw4).to(hpd)
    if conv.bias.dtype == hpd:
        ref = F.conv2d(xd, wd, conv.bias, 1, 1)
    else:
        ref = F.conv2d(xd, wd, None, 1, 1) + conv.bias.reshape(1, -1, 1, 1)
    assert torch.equal(qc(x), ref.to(model_dtype))


@torch.no_grad()
def test_conv2d_arbitrary_scales_quantize_and_dequantize_with_the_same_scale() -> None:
    """Decisions §2: no ``1/round(1/s)`` detour. INC quantizes a SCALAR weight with
    ``1/round_bf16(1/s_w)`` (float64) and dequantizes with ``s_w``, and QDQs inputs with
    ``round_bf16(1/round_bf16(1/s_in))`` (reference §2.9.3); with the scales of a real
    maxabs_arbitrary run this moves some weight codes by one step: a few % of max|y|."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(4, 8, 12, 12).to(torch.bfloat16)
    s_in, s_w = 0.03662109375, 0.00052642822265625  # INC 3.10's maxabs_arbitrary scales for this conv
    qc = QuantConv2d(conv, ModuleScales((t(s_in),), (t(s_in * s_w),), t(s_w)), qctx())
    w8 = q(conv.weight, s_w, 448)
    ours = F.conv2d((q(x, s_in, 448).float() * s_in).to(torch.bfloat16), (w8.float() * s_w).to(torch.bfloat16),
                    conv.bias, 1, 1)
    assert torch.equal(qc(x), ours)
    s_w_q = 1.0 / float(torch.tensor(1.0 / s_w, dtype=torch.bfloat16))  # 1/1896
    s_in_qdq = float(torch.reciprocal(torch.reciprocal(torch.tensor(s_in, dtype=torch.bfloat16))))
    w8_inc = q(conv.weight, s_w_q, 448)
    inc = F.conv2d((q(x, s_in_qdq, 448).float() * s_in_qdq).to(torch.bfloat16),
                   (w8_inc.float() * s_w).to(torch.bfloat16), conv.bias, 1, 1)
    moved = int((w8_inc.float() != w8.float()).sum())
    gap = float((inc.float() - ours.float()).abs().max() / inc.float().abs().max())
    assert moved == 31 and 0.01 < gap < 0.05, (moved, gap)  # INC 3.10 measured: 2.3 % of max|y|


@pytest.mark.parametrize("hp", [HpDtype.BF16, HpDtype.FP32])
@pytest.mark.parametrize("dynamic", [False, True])
def test_matmul_reference(dynamic: bool, hp: HpDtype) -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 8, 5, generator=g) * 4
    s_a, s_b = t(2.0**-6), t(2.0**-4)
    scales = ModuleScales(() if dynamic else (s_a, s_b), () if dynamic else (s_a * s_b,))
    qm = QuantMatmul(qctx(hp, fmt=ScaleFormat.CONST, dynamic=dynamic), scales)
    if dynamic:  # per row of a, per column of b
        s_a = torch.exp2(torch.ceil(torch.log2(a.abs().amax(-1, keepdim=True) / 224.0)))
        s_b = torch.exp2(torch.ceil(torch.log2(b.abs().amax(-2, keepdim=True) / 224.0)))
    ref = fp32_gemm(q(a, s_a, 448), q(b, s_b, 448), s_a, s_b, HP[hp])
    assert torch.equal(qm(a, b), ref.to(a.dtype))


def test_kv_cache_and_softmax_reference() -> None:
    x = torch.randn(2, 4, 6) * 10
    kv = QuantKVCache(qctx(HpDtype.FP32), ModuleScales((t(2.0**-3),), (t(2.0**-3),)))
    assert torch.equal(kv(x), q(x, 2.0**-3, 448).float() * 2.0**-3)
    sm = QuantSoftmax(Softmax(), ModuleScales((), (t(2.0**-6),)), qctx(HpDtype.FP32))
    p = torch.softmax(x, -1)
    assert torch.equal(sm(x), q(p, 2.0**-6, 448).float() * 2.0**-6)
    assert sm.to_inc_node() == {"inputs": [], "outputs": [2.0**-6], "params": {}}
    assert isinstance(KVCache()(x), torch.Tensor) and torch.equal(Matmul()(x, x.transpose(1, 2)), x @ x.transpose(1, 2))


@pytest.mark.parametrize("fmt", [ScaleFormat.SCALAR, ScaleFormat.CONST])
def test_kept_weight_operand_gives_the_same_output_and_follows_state_dict_loads(fmt: ScaleFormat) -> None:
    """The emulation may keep a layer's weight operand; outputs equal the plain gemm path, and a
    state_dict load of other codes and scales is picked up (never a stale weight)."""
    torch.manual_seed(4)
    ctx_keep, ctx_plain = qctx(fmt=fmt), QuantContext(qctx(fmt=fmt).scale_ctx, EmulatedBackend(reuse_weights=False), fmt)
    scales = ModuleScales((t(0.048095703125),), (t(0.048095703125 * 2.0**-6),), t(2.0**-6))
    lin, other = nn.Linear(16, 8), nn.Linear(16, 8)
    keep, plain = QuantLinear(lin, scales, ctx_keep), QuantLinear(lin, scales, ctx_plain)
    x = torch.randn(3, 16)
    assert torch.equal(keep(x), plain(x)) and torch.equal(keep(x), plain(x))  # second call: the kept weight
    replacement = QuantLinear(other, ModuleScales((t(0.25),), (t(0.25 * 2.0**-5),), t(2.0**-5)), ctx_plain)
    keep.load_state_dict(replacement.state_dict())
    assert torch.equal(keep(x), replacement(x))
