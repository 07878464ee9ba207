"""FP8 formats and the quantize/dequantize arithmetic every backend shares.

Formats are frozen records keyed by (lp dtype, device for scales). The cast is the emulation that
every backend is tested against: divide in fp32, clamp to the format's full scale (saturation, as
the hardware does), round to nearest even into the torch fp8 storage dtype. Clamping first matters:
``float8_e4m3fnuz`` turns overflow into NaN and ``float8_e5m2`` keeps inf.

On CPU, :func:`quantize` and :func:`cast_to_fp8` run the same arithmetic in the C kernel of
:mod:`shards.fp8.native_cast` when it applies (bit-identical codes, several times faster than
torch's scalar fp32 -> float8 conversion); ``FP8_ORCH_NATIVE_CAST=0`` forces torch's path.

See ``shared/spec/inc-fp8-semantics.md`` §2.1 and ``project-decisions.md`` §2.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from shards.fp8 import native_cast


class LpDtype(str, enum.Enum):
    """The FP8 encoding the user asks for (``fp8_config``)."""

    E4M3 = "E4M3"
    E5M2 = "E5M2"


class HpDtype(str, enum.Enum):
    """The high-precision dtype used for observer state, scale arithmetic and dequant output."""

    BF16 = "BF16"
    FP16 = "FP16"
    FP32 = "FP32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _HP_TORCH[self]


_HP_TORCH = {HpDtype.BF16: torch.bfloat16, HpDtype.FP16: torch.float16, HpDtype.FP32: torch.float32}


class ScaleDevice(str, enum.Enum):
    """The accelerator whose FP8 range and HW-aligned scale set the scales are computed for."""

    GAUDI2 = "GAUDI2"
    GAUDI3 = "GAUDI3"


@dataclass(frozen=True)
class Fp8Format:
    """One FP8 encoding as a device sees it.

    Attributes:
        name: human-readable name, e.g. ``"E4M3-GAUDI2"``.
        lp: the user-facing encoding.
        storage: the torch dtype that holds the codes.
        fullscale: largest finite magnitude; values above it saturate.
        exp_bits: exponent width; the default bias is ``2**(exp_bits-1) - 1``.
    """

    name: str
    lp: LpDtype
    storage: torch.dtype
    fullscale: float
    exp_bits: int

    @property
    def default_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1


E4M3 = Fp8Format("E4M3", LpDtype.E4M3, torch.float8_e4m3fn, 448.0, 4)
# Gaudi2's E4M3 is IEEE-like (bias 7, top exponent reserved), so its grid is the e4m3fn grid cut at
# 240. Emulated by clamping to 240 before the e4m3fn cast.
E4M3_GAUDI2 = Fp8Format("E4M3-GAUDI2", LpDtype.E4M3, torch.float8_e4m3fn, 240.0, 4)
E5M2 = Fp8Format("E5M2", LpDtype.E5M2, torch.float8_e5m2, 57344.0, 5)


def fp8_format(lp: LpDtype, device: ScaleDevice | None = None) -> Fp8Format:
    """The format used for scales of ``lp`` on ``device`` (None = CPU/CUDA/XPU)."""
    if lp is LpDtype.E5M2:
        return E5M2
    return E4M3_GAUDI2 if device is ScaleDevice.GAUDI2 else E4M3


@dataclass(frozen=True)
class HwScaleTraits:
    """Scales a Gaudi accelerates: powers of ``2**step`` between ``min_scale`` and ``max_scale``.

    ``scales`` is ordered from largest to smallest, as INC lists them (the OPT search's candidate
    order and therefore its tie-breaking depend on that order).
    """

    device: ScaleDevice
    biases: tuple[int, ...]
    min_scale: float
    max_scale: float
    step_exp: int

    @property
    def scales(self) -> tuple[float, ...]:
        # scale = fullscale(bias) / fullscale(default bias) = 2**(7 - bias), always from E4M3.
        return tuple(2.0 ** (E4M3.default_bias - b) for b in self.biases)


HW_TRAITS: dict[ScaleDevice, HwScaleTraits] = {
    ScaleDevice.GAUDI2: HwScaleTraits(ScaleDevice.GAUDI2, (3, 7, 11, 15), 2.0**-8, 2.0**4, 4),
    ScaleDevice.GAUDI3: HwScaleTraits(ScaleDevice.GAUDI3, tuple(range(0, 63)), 2.0**-55, 2.0**7, 1),
}


def cast_to_fp8(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Saturating, round-to-nearest-even cast of already-scaled values.

    NaN stays NaN (there is no finite answer); +-inf saturates to +-fullscale.
    """
    # x / 1.0 is x (NaN signs and -0.0 included), so the kernel's scaling changes nothing.
    q = native_cast.cast(x, 1.0, fmt.storage, fmt.fullscale)
    if q is not None:
        return q
    x32 = x.to(torch.float32)
    return x32.clamp(-fmt.fullscale, fmt.fullscale).to(fmt.storage)


def _broadcast_scale(scale: torch.Tensor | float, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.device == x.device:
        s = scale  # as_tensor would return it as well, after building the target device
    else:
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if axis is None or s.ndim == 0:
        return s
    shape = [1] * x.ndim
    shape[axis] = -1
    return s.reshape(shape)


# Elements per block of the blocked quantize: the fp32 temporary of a block stays in cache.
QUANT_BLOCK = 1 << 16


def _quantize_block(x: torch.Tensor, s: torch.Tensor, inverse: torch.Tensor | float | None, fmt: Fp8Format,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    y = x.to(torch.float32, copy=True)
    y = y.mul_(inverse) if inverse is not None else y.div_(s)
    y.clamp_(-fmt.fullscale, fmt.fullscale)
    return y.to(fmt.storage) if out is None else out.copy_(y)


def _inverse_scale(s: torch.Tensor) -> torch.Tensor | float | None:
    """``1 / s`` when every scale is a power of two with a normal fp32 inverse (then ``x * (1/s)``
    equals ``x / s`` bit for bit, and a multiply is ~2x faster than a divide), else None."""
    if s.device.type != "cpu" or s.numel() == 0:
        return None
    if s.numel() == 1:
        mant, ex = math.frexp(float(s))
        return 2.0 ** (1 - ex) if mant == 0.5 and -125 <= 1 - ex <= 127 else None
    mant, ex = torch.frexp(s)
    if not bool((mant == 0.5).all()) or not bool(((1 - ex >= -125) & (1 - ex <= 127)).all()):
        return None
    return torch.ldexp(torch.ones_like(s), 1 - ex)


def quantize(
    x: torch.Tensor, scale: torch.Tensor | float, fmt: Fp8Format, axis: int | None = None
) -> torch.Tensor:
    """q = cast_fp8(x / s), in fp32. ``axis`` names the channel axis of a per-channel scale.

    On CPU the C kernel of :mod:`shards.fp8.native_cast` computes it when it applies. Otherwise
    large tensors are processed in blocks of rows (per-tensor scales, or per-channel scales along
    the first axis): the same element-wise arithmetic, without full-size fp32 temporaries.
    """
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        # One scale (most weights): the kernel reads an hp scale itself, without the fp32 copy
        # _broadcast_scale makes of it.
        q = native_cast.cast(x, scale, fmt.storage, fmt.fullscale)
        if q is not None:
            return q
    s = _broadcast_scale(scale, x, axis)
    # The kernel takes the whole tensor at once (no temporaries); it declines what it does not cover.
    q = native_cast.cast(x, s, fmt.storage, fmt.fullscale)
    if q is not None:
        return q
    inverse = _inverse_scale(s)
    # Row blocks need the scale's first axis to be x's first axis (same rank, one entry per row).
    per_row = s.ndim == x.ndim and s.shape[0] == x.shape[0] != 1
    blockable = x.ndim >= 1 and x.numel() > QUANT_BLOCK and (s.ndim == 0 or per_row)
    if not blockable:
        return _quantize_block(x, s, inverse, fmt)
    out = torch.empty(x.shape, dtype=fmt.storage, device=x.device)
    rows = max(1, QUANT_BLOCK // max(1, x[0].numel()))
    for i in range(0, x.shape[0], rows):
        block = slice(i, i + rows)
        s_i = s if s.ndim == 0 else s[block]
        inv_i = inverse if not isinstance(inverse, torch.Tensor) else inverse[block]
        _quantize_block(x[block], s_i, inv_i, fmt, out[block])
    return out


# FP8 codes moved into float16 bit patterns: (left shift of the sign-extended code, log2 of the
# factor the float16 value is below the FP8 value). E5M2 is float16's top byte; E4M3 lands in
# float16 with bias 15 instead of 7 (subnormals included), i.e. 2**8 too small.
_AS_FLOAT16 = {torch.float8_e5m2: (8, 0), torch.float8_e4m3fn: (7, 8)}
_E4M3_NAN_BITS = 0x7F << 7  # where e4m3fn's NaN codes land (a float16 value, 480 * 2**-8)


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """The exact values of FP8 codes in fp32 (NaN codes stay NaN).

    On CPU torch's FP8 -> float cast is ~20x slower than its other casts, so the codes are moved
    into float16 bit patterns with integer ops and widened from there (every step exact); on other
    devices, and for other dtypes, this is torch's cast.
    """
    moves = _AS_FLOAT16.get(q.dtype)
    if moves is None or q.device.type != "cpu" or q.numel() == 0:
        return q.to(torch.float32)
    bits = q.view(torch.int8).to(torch.int16).bitwise_left_shift_(moves[0])
    if q.dtype is torch.float8_e4m3fn:
        bits.bitwise_and_(~0x4000)  # sign extension also set bit 14: keep the sign in bit 15 only
    values = bits.view(torch.float16).to(torch.float32)
    if moves[1]:
        values.mul_(2.0 ** moves[1])
    if q.dtype is torch.float8_e4m3fn:
        magnitude = bits.bitwise_and_(0x7FFF)
        if int(magnitude.max()) == _E4M3_NAN_BITS:  # e4m3fn has no inf; NaN codes must stay NaN
            values[magnitude == _E4M3_NAN_BITS] = float("nan")
    return values


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    out_dtype: torch.dtype = torch.float32,
    axis: int | None = None,
) -> torch.Tensor:
    """x_hat = q * s computed in fp32, then cast to ``out_dtype``."""
    s = _broadcast_scale(scale, q, axis)
    return (fp8_to_float32(q) * s).to(out_dtype)


_EXPONENT_BITS = 0x7F800000


def _round_to_grid_(y: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Round fp32 values already clamped to the full scale onto the FP8 grid, in place, ties to even.

    The FP8 step at ``y`` is ``g = 2**(e - p)`` (``e``: y's binary exponent, at least the smallest
    normal one; ``p``: mantissa bits), a power of two read off y's exponent bits, so
    ``round(y / g) * g`` is exact apart from the rounding itself; NaN stays NaN.
    """
    p, emin = 7 - fmt.exp_bits, 2 - 2 ** (fmt.exp_bits - 1)
    e_top = math.frexp(fmt.fullscale)[1] - 1
    g = (y.view(torch.int32) & _EXPONENT_BITS).clamp_((emin + 127) << 23, (e_top + 127) << 23)
    g = g.sub_(p << 23).view(torch.float32)
    return y.div_(g).round_().mul_(g)


def quantize_to_float32(x: torch.Tensor, scale: torch.Tensor | float, fmt: Fp8Format) -> torch.Tensor:
    """The FP8 codes of ``x / s`` as fp32 values, ``fp8_to_float32(quantize(x, s, fmt))``, without
    materializing FP8: the same values (every FP8 value is an fp32 value).

    The operands of the emulated FP8 gemm: on CPU casting to and from FP8 costs several times the
    arithmetic, so the grid rounding is done in fp32 instead.
    """
    s = _broadcast_scale(scale, x, None)
    if torch.broadcast_shapes(x.shape, s.shape) != x.shape:
        return fp8_to_float32(quantize(x, s, fmt))
    y = x.to(torch.float32, copy=True)
    inverse = _inverse_scale(s)
    y = y.mul_(inverse) if inverse is not None else y.div_(s)
    return _round_to_grid_(y.clamp_(-fmt.fullscale, fmt.fullscale), fmt)


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, fmt: Fp8Format, out_dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(quantize(x, s), s)`` in ``out_dtype`` without the FP8 codes: the same values
    (the codes' fp32 values of :func:`quantize_to_float32` times s in fp32, rounded once)."""
    s = _broadcast_scale(scale, x, None)
    return quantize_to_float32(x, s, fmt).mul_(s).to(out_dtype)


def quant_dequant(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    fmt: Fp8Format,
    out_dtype: torch.dtype | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    """The QDQ emulation: the value ``x`` takes after a round trip through FP8 with scale ``s``."""
    return dequantize(quantize(x, scale, fmt, axis), scale, out_dtype or x.dtype, axis)


def fp8_to_bytes(q: torch.Tensor) -> tuple[torch.Tensor, str]:
    """FP8 tensors cannot be pickled (Ray, multiprocessing): ship the raw codes and the dtype name."""
    return q.view(torch.uint8), str(q.dtype).removeprefix("torch.")


def fp8_from_bytes(codes: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Inverse of :func:`fp8_to_bytes`."""
    dtype = getattr(torch, dtype_name)
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"not an FP8 dtype name: {dtype_name!r} (expected float8_e4m3fn or float8_e5m2)")
    return codes.view(dtype)
