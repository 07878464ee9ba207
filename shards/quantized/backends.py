"""Backends: the only place where the FP8 cast and the FP8 gemm differ between devices.

Every backend implements the same small interface with the scales of ``shards.fp8.numerics``
(``x ≈ q · s``): ``quantize`` (x → FP8 codes), ``dequantize`` (codes → hp) and ``gemm``
((qa·s_a) @ (qb·s_b) in the output dtype). Quantized modules call nothing else, so one
implementation of the math serves every device (decisions §2).

- ``EmulatedBackend`` ("cpu"): the FP8 values of both operands multiplied and accumulated in fp32,
  scaled and rounded once to hp, as the hardware computes; the reference every other backend is
  tested against. ``inc_layout=True`` computes INC's CPU QDQ instead (dequantize to hp, multiply in hp).
- ``CudaBackend`` ("cuda"): ``torch._scaled_mm`` for 2-D gemms whose sizes it accepts; batched
  (attention) matmuls and odd sizes use the emulation.
- ``HpuBackend`` ("hpu"): ``torch.ops.hpu.cast_to_fp8_v2`` / ``cast_from_fp8`` / ``fp8_gemm_v2``,
  only when ``habana_frameworks.torch`` imports. Untested on Gaudi hardware here: tests drive it
  with a recording stand-in for ``torch.ops.hpu``.

``detect_gaudi`` tells which Gaudi this process runs on (None off Gaudi), the default of
``device_for_scales`` (reference §1.3 step 4). It probes at call time, never at import: the tables
of every device stay buildable and testable anywhere.

Scales are broadcastable tensors or floats: 0-d (per tensor), ``[..., 1]`` for ``qa`` (one per
row, e.g. per token) and ``[1, N]`` for ``qb`` (one per output column, e.g. per channel).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol

import torch

from shards.fp8 import numerics
from shards.errors import DuplicateRegistrationError, ShardError
from shards.fp8.numerics import Fp8Format, ScaleDevice

Scale = torch.Tensor | float


class UnknownBackendError(ShardError, ValueError):
    """No backend is registered under this name (or for this device type)."""


class BackendUnavailableError(ShardError, ImportError):
    """The backend's runtime (e.g. the Habana plugin) is not installed here."""


class Backend(Protocol):
    """The FP8 cast and gemm of one device."""

    name: str

    def quantize(self, x: torch.Tensor, scale: Scale, fmt: Fp8Format) -> torch.Tensor:
        """FP8 codes of ``x / scale``, saturated at ``fmt.fullscale`` (``scale`` broadcasts to x)."""

    def dequantize(self, q: torch.Tensor, scale: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        """``q · scale`` in ``out_dtype``."""

    def gemm(self, qa: torch.Tensor, qb: torch.Tensor, s_a: Scale, s_b: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        """``(qa · s_a) @ (qb · s_b)`` with the result in ``out_dtype`` (batched like torch.matmul)."""


def _as_scale(scale: Scale, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float32, device=like.device)


def scale_accumulator(acc: torch.Tensor, s_a: Scale, s_b: Scale, out_dtype: torch.dtype) -> torch.Tensor:
    """``acc · s_a · s_b`` in fp32, rounded once to ``out_dtype``; ``acc`` is the fp32 product of codes.

    Per-tensor scales are one fp32 factor ``s_a · s_b`` (cuBLASLt's alpha, the descale of Gaudi's
    fp8_gemm_v2); a row or column scale multiplies element by element, ``acc · s_a[row] · s_b[col]``.
    """
    sa, sb = _as_scale(s_a, acc), _as_scale(s_b, acc)
    if sa.numel() == 1 and sb.numel() == 1:
        return acc.mul_((sa * sb).reshape(())).to(out_dtype)
    if torch.broadcast_shapes(acc.shape, sa.shape, sb.shape) == acc.shape:
        return acc.mul_(sa).mul_(sb).to(out_dtype)  # acc is the gemm's own result: scale it in place
    return (acc * sa * sb).to(out_dtype)


class EmulatedBackend:
    """Exact emulation of the FP8 cast (fp32 divide, clamp, round to nearest even) and of the FP8 gemm.

    The gemm computes as the hardware does (Gaudi's fp8_gemm_v2, CUDA's ``_scaled_mm``): the FP8
    values of both operands, exact in fp32, multiplied in fp32 (every product of two FP8 values is
    exact there, the sums accumulate in fp32), then scaled (:func:`scale_accumulator`) and rounded
    once to the output dtype. Operands are never rounded to hp first. On CPUs without bf16 units
    this fp32 gemm is also ~7x faster than a bf16 one.

    Modules call the gemm in steps so that they can reuse operands (``emulated_gemm``):
    ``input_operand`` (shared by sibling Linears, ``shards.quantized.qdq_memo``),
    ``weight_operand_t`` (kept by a Linear between forwards) and ``gemm_operands``.

    ``reuses_dequantized_weights``: a Linear may keep its weight operand between forwards: the fp32
    values of its FP8 codes (exact; 4 bytes per parameter, twice a bf16 copy), or with
    ``inc_layout`` the dequantized hp weight. Pass ``reuse_weights=False`` to keep only the codes.

    ``inc_layout``: compute as INC's CPU QDQ does, bit for bit, instead: both operands dequantized
    to hp (rounded there, which with scales that are not powers of two the hardware never does),
    the weight operand of a Linear contiguous as [in, out] (the layout INC multiplies with; the CPU
    gemm kernel, and so the last bit of some outputs, follows the layout) and ``torch.matmul`` in
    hp. With it a quantized model's outputs equal INC's bit for bit (measured on SmolLM2-135M,
    README "Where we differ from INC"). Off by default: on CPUs without bf16 units that bf16 gemm
    is several times slower.
    """

    name = "cpu"
    # The gemm is available as input_operand / weight_operand_t / gemm_operands (see above).
    emulated_gemm = True

    def __init__(self, reuse_weights: bool = True, inc_layout: bool = False) -> None:
        self.reuses_dequantized_weights = reuse_weights
        self.inc_layout = inc_layout

    def quantize(self, x: torch.Tensor, scale: Scale, fmt: Fp8Format) -> torch.Tensor:
        # numerics.quantize makes the scale an fp32 tensor on x's device itself (once per weight).
        return numerics.quantize(x, scale, fmt)

    def fake_quant(self, x: torch.Tensor, scale: Scale, fmt: Fp8Format, out_dtype: torch.dtype) -> torch.Tensor:
        """``dequantize(quantize(x, s), s)`` without materializing the codes (same values)."""
        return numerics.fake_quant(x, _as_scale(scale, x), fmt, out_dtype)

    def dequantize(self, q: torch.Tensor, scale: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        # The fp32 product rounded once to out_dtype: what torch computes for q.to(hp) * s too.
        return numerics.dequantize(q, _as_scale(scale, q), out_dtype)

    def input_operand(self, x: torch.Tensor, scale: Scale, fmt: Fp8Format, out_dtype: torch.dtype) -> torch.Tensor:
        """The gemm operand of an activation: the fp32 values of its FP8 codes (never materialized),
        or with ``inc_layout`` its QDQ in ``out_dtype``."""
        if self.inc_layout:
            return self.fake_quant(x, scale, fmt, out_dtype)
        return numerics.quantize_to_float32(x, _as_scale(scale, x), fmt)

    def weight_operand_t(self, w: torch.Tensor, scale: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        """The [in, out] gemm operand of a Linear from its [out, in] FP8 weight (per-channel scales
        laid out as [1, out]): the fp32 values of the codes as a transposed view (``F.linear``'s
        layout), or with ``inc_layout`` the dequantized weight in ``out_dtype``, contiguous."""
        if self.inc_layout:
            return self.dequantize(w.t(), scale, out_dtype).contiguous()
        return numerics.fp8_to_float32(w).t()

    def gemm_operands(self, a: torch.Tensor, b: torch.Tensor, s_a: Scale, s_b: Scale,
                      out_dtype: torch.dtype) -> torch.Tensor:
        """The gemm of operands made by ``input_operand`` / ``weight_operand_t`` / ``code_operand``."""
        if self.inc_layout:
            return torch.matmul(a, b)  # the scales are in the operands already
        return scale_accumulator(torch.matmul(a, b), s_a, s_b, out_dtype)

    def code_operand(self, q: torch.Tensor, scale: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        """The gemm operand of FP8 codes: their fp32 values, or with ``inc_layout`` their dequantized
        values in ``out_dtype``."""
        return self.dequantize(q, scale, out_dtype) if self.inc_layout else numerics.fp8_to_float32(q)

    def gemm(self, qa: torch.Tensor, qb: torch.Tensor, s_a: Scale, s_b: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        b = self.code_operand(qb, s_b, out_dtype)
        b = b.contiguous() if self.inc_layout else b  # INC's layout of the second operand
        return self.gemm_operands(self.code_operand(qa, s_a, out_dtype), b, s_a, s_b, out_dtype)


class CudaBackend(EmulatedBackend):
    """``torch._scaled_mm`` (fp32 accumulation) for 2-D gemms; the emulation (the same arithmetic)
    otherwise.

    Per-tensor scales go to the kernel directly. Row/column scales (per token, per channel) are
    applied to the fp32 result of a unit-scaled ``_scaled_mm`` by :func:`scale_accumulator`:
    mathematically the same product, and it works for every output dtype and on CPU tensors too
    (the CPU reference path of ``_scaled_mm`` handles per-tensor scales only).
    """

    name = "cuda"
    emulated_gemm = False
    # _scaled_mm needs K and N to be multiples of 16 on the GPU kernels.
    ALIGN = 16

    def __init__(self) -> None:
        super().__init__(reuse_weights=False)  # the kernel takes the FP8 codes themselves

    def gemm(self, qa: torch.Tensor, qb: torch.Tensor, s_a: Scale, s_b: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        if qb.ndim != 2 or qb.shape[0] % self.ALIGN or qb.shape[1] % self.ALIGN:
            return super().gemm(qa, qb, s_a, s_b, out_dtype)
        if qa.device.type == "cuda" and qa.dtype == qb.dtype == torch.float8_e5m2:
            # cuBLASLt has no E5M2 x E5M2 FP8 gemm (one operand must be E4M3): emulate it.
            return super().gemm(qa, qb, s_a, s_b, out_dtype)
        k, n = qb.shape
        lead = qa.shape[:-1]
        a2 = qa.reshape(-1, k).contiguous()
        b2 = qb.t().contiguous().t()  # _scaled_mm wants the second operand column-major
        sa, sb = _as_scale(s_a, qa), _as_scale(s_b, qb)
        if sa.numel() == 1 and sb.numel() == 1:
            y = torch._scaled_mm(a2, b2, scale_a=sa.reshape(()), scale_b=sb.reshape(()), out_dtype=out_dtype)
        else:
            one = torch.ones((), dtype=torch.float32, device=qa.device)
            acc = torch._scaled_mm(a2, b2, scale_a=one, scale_b=one, out_dtype=torch.float32)
            row = sa.reshape(-1, 1) if sa.numel() > 1 else sa
            y = scale_accumulator(acc, row, sb.reshape(1, -1), out_dtype)
        return y.reshape(*lead, n)


class HpuBackend:
    """Gaudi FP8 kernels through ``torch.ops.hpu``.

    Args:
        ops: the op namespace; None means ``torch.ops.hpu`` after importing
            ``habana_frameworks.torch`` (raises BackendUnavailableError when that fails). Tests pass
            a recording stand-in.

    The kernels take the inverse scale when casting to FP8 and the scale itself when casting back
    or as gemm descales (reference §6).
    """

    name = "hpu"

    def __init__(self, ops: Any | None = None) -> None:
        self.ops = ops if ops is not None else _load_hpu_ops()

    def quantize(self, x: torch.Tensor, scale: Scale, fmt: Fp8Format) -> torch.Tensor:
        # The kernel multiplies by the inverse scale and saturates (at 240 on Gaudi2 E4M3).
        inv = torch.reciprocal(_as_scale(scale, x))
        return self.ops.cast_to_fp8_v2(x, inv, False, False, fmt.storage)[0]

    def dequantize(self, q: torch.Tensor, scale: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        return self.ops.cast_from_fp8(q, _as_scale(scale, q), out_dtype)

    def gemm(self, qa: torch.Tensor, qb: torch.Tensor, s_a: Scale, s_b: Scale, out_dtype: torch.dtype) -> torch.Tensor:
        return self.ops.fp8_gemm_v2(
            qa, False, qb, False, None, out_dtype, _as_scale(s_a, qa), _as_scale(s_b, qb), None, False
        )


def _load_hpu_ops() -> Any:
    try:
        import habana_frameworks.torch  # noqa: F401  (registers torch.ops.hpu)
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend 'hpu' needs habana_frameworks.torch, which does not import here ({e}); "
            "run on a Gaudi host with the Habana PyTorch plugin, or use backend 'cpu'"
        ) from e
    return torch.ops.hpu


# Device names habana_frameworks.torch.hpu.get_device_name() reports for the cards with FP8.
# Gaudi (first generation, "GAUDI") has no FP8 and is treated like a host without Gaudi.
_GAUDI_NAMES: Mapping[str, ScaleDevice] = MappingProxyType({"GAUDI2": ScaleDevice.GAUDI2, "GAUDI3": ScaleDevice.GAUDI3})


def _hpu_device_name() -> str | None:
    """The Gaudi's device name, None when the Habana plugin does not import or sees no card."""
    try:
        import habana_frameworks.torch.hpu as hthpu
    except ImportError:
        return None  # off Gaudi: the expected case, nothing to report
    if not hthpu.is_available():
        return None
    return str(hthpu.get_device_name())


def detect_gaudi(device_name: Callable[[], str | None] = _hpu_device_name) -> ScaleDevice | None:
    """The Gaudi this process runs on (GAUDI2 or GAUDI3), None off Gaudi.

    Args:
        device_name: returns the Habana device name or None; tests pass a stand-in.
    """
    name = device_name()
    if name is None:
        return None
    # Match the start, so that a variant suffix after the generation still maps to it.
    for prefix, device in _GAUDI_NAMES.items():
        if name.upper().startswith(prefix):
            return device
    return None


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Add a backend; a name that exists already raises."""
    if name in _BACKENDS:
        raise DuplicateRegistrationError(f"backend {name!r} is already registered (known: {', '.join(_BACKENDS)})")
    _BACKENDS[name] = factory


def get_backend(name: str) -> Backend:
    """Build the backend called ``name``; an unknown name lists the known ones."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(f"backend {name!r} is unknown; known: {', '.join(_BACKENDS)}") from None
    return factory()


def backend_for_device(device: torch.device | str) -> Backend:
    """The backend registered under the type of ``device`` (cpu, cuda, hpu, or one added with
    :func:`register_backend`); a device type without one raises UnknownBackendError.

    Never a silent fallback to "cpu": its emulation was never checked on another device's tensors
    (xpu, mps), and a model left on "meta" by mistake would be converted without an error.
    """
    dev = torch.device(device)
    if dev.type not in _BACKENDS:
        raise UnknownBackendError(
            f"no FP8 backend for device {str(dev)!r}: backends exist for device types {', '.join(_BACKENDS)}; "
            "move the model to one of them, pass a backend explicitly (convert(..., backend=...)), "
            f"or register one for {dev.type!r} with shards.quantized.backends.register_backend"
        )
    return get_backend(dev.type)


register_backend("cpu", EmulatedBackend)
register_backend("cuda", CudaBackend)
register_backend("hpu", HpuBackend)

BACKENDS: Mapping[str, Callable[[], Backend]] = MappingProxyType(_BACKENDS)
