"""Scales from max-abs statistics or weights: INC's arithmetic, quirks included.

A scale ``s`` maps a value to the FP8 grid by ``q = cast(x / s)``. Every function here is pure:
(max-abs or weight, section spec, context) -> scale tensor. The arithmetic is done with torch ops
in the dtype INC uses, so the results are bit-identical to INC's for the same max-abs
(reference ``inc-fp8-semantics.md`` §2.2, §2.3, §2.9.1-2; ``project-decisions.md`` §2):

- activations: the max-abs is cast to ``hp_dtype`` and divided there by the Python float
  ``fullscale * backoff`` (so the divisor is rounded to fp32 first, as torch does);
- per-tensor weights: max-abs taken in the weight's dtype, then cast to ``hp_dtype``;
- per-channel weights: everything stays in the weight's own dtype;
- POW2 is ``exp2(ceil(log2(s)))`` in the tensor's dtype: in bf16 the log2 is rounded before the
  ceil, so a raw scale just above a power of two can round *down*. That is INC's behaviour and we
  keep it on purpose.

The formulas are elementwise: :func:`pts_scales` computes many per-tensor scales as one vector
(what :mod:`shards.fp8.scale_batch` does for a whole model), each the bits the formula gives alone.

Zero max-abs: INC would produce a zero scale (and NaN on division). We replace a zero raw scale
by the smallest positive normal of its dtype (2**-126 for bf16/fp32). This only changes tensors
that are entirely zero, whose quantized value is zero for any scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from shards.errors import DeviceForScalesError, NonFiniteStatsError, ScaleMethodError
from stats_store.records import as_maxabs
from shards.fp8 import native_cast
from shards.fp8.numerics import HW_TRAITS, Fp8Format, HpDtype, HwScaleTraits, LpDtype, ScaleDevice, fp8_format
from shards.fp8.methods import (
    INC_DYNAMIC_SCALING,
    POW2_OPT_CANDIDATES,
    DynamicScaling,
    Granularity,
    Rounding,
    SectionSpec,
    ValueType,
)

# INC floors per-channel weight max-abs at the smallest positive bf16 normal (reference §2.5).
BF16_TINY: float = torch.finfo(torch.bfloat16).tiny

MaxAbsLike = np.ndarray | torch.Tensor | float | list[float]


@dataclass(frozen=True)
class ScaleContext:
    """What the scale arithmetic depends on besides the statistics.

    Attributes:
        lp: FP8 encoding (``fp8_config``).
        hp: dtype of the scale arithmetic (``hp_dtype``).
        device: ``device_for_scales``; None off Gaudi (full scale 448, no HW-aligned set).
    """

    lp: LpDtype = LpDtype.E4M3
    hp: HpDtype = HpDtype.BF16
    device: ScaleDevice | None = None

    @property
    def fmt(self) -> Fp8Format:
        return fp8_format(self.lp, self.device)

    @property
    def fullscale(self) -> float:
        return self.fmt.fullscale

    @property
    def hp_dtype(self) -> torch.dtype:
        return self.hp.torch_dtype

    def hw_traits(self, what: str) -> HwScaleTraits:
        """The HW-aligned scale set of ``device``; ``what`` names the feature that needs it."""
        if self.device is None:
            raise DeviceForScalesError(what)
        return HW_TRAITS[self.device]


def _floor_zero(s: torch.Tensor) -> torch.Tensor:
    """Replace zero scales (all-zero tensors) by the dtype's smallest normal; see module docstring."""
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(s.dtype).tiny))


def raw_scale(maxabs: torch.Tensor, backoff: float, ctx: ScaleContext) -> torch.Tensor:
    """``maxabs / (fullscale * backoff)`` in ``maxabs``'s dtype, the divisor a Python float as in INC."""
    return _floor_zero(maxabs / (ctx.fullscale * backoff))


def round_scale(s_raw: torch.Tensor, rounding: Rounding, ctx: ScaleContext) -> torch.Tensor:
    """Apply a rounding method of reference §2.3, in ``s_raw``'s own dtype."""
    if rounding is Rounding.IDENTITY:
        return s_raw
    if rounding is Rounding.POW2:
        return torch.exp2(torch.ceil(torch.log2(s_raw)))
    if rounding is Rounding.HW_ALIGNED:
        traits = ctx.hw_traits("rounding HW_ALIGNED")
        pow2 = torch.exp2(torch.ceil(torch.log2(s_raw)))
        k = traits.step_exp
        snapped = torch.exp2(torch.ceil(torch.log2(pow2) / k) * k)
        lo = torch.tensor(traits.min_scale, dtype=s_raw.dtype, device=s_raw.device)
        hi = torch.tensor(traits.max_scale, dtype=s_raw.dtype, device=s_raw.device)
        return torch.minimum(torch.maximum(snapped, lo), hi)
    if rounding is Rounding.HW_ALIGNED_FIXED:
        return torch.full_like(s_raw, ctx.hw_traits("rounding HW_ALIGNED_FIXED").scales[0])
    if rounding is Rounding.SCALE_UNIT:
        return torch.ones_like(s_raw)
    raise ScaleMethodError(f"rounding: unknown method {rounding!r}; allowed: {[r.value for r in Rounding]}")


def fixed_scale(section: SectionSpec, ctx: ScaleContext) -> torch.Tensor:
    """The 0-d ``hp_dtype`` scale of a FIXED_VALUE (or DUMMY_SCALES) section: 1.0 or the first HW scale."""
    if section.value_type is ValueType.DUMMY_SCALES or section.rounding is Rounding.SCALE_UNIT:
        return torch.tensor(1.0, dtype=ctx.hp_dtype)
    if section.rounding is Rounding.HW_ALIGNED_FIXED:
        return torch.tensor(ctx.hw_traits("rounding HW_ALIGNED_FIXED").scales[0], dtype=ctx.hp_dtype)
    raise ScaleMethodError(
        f"scale_method: value type FIXED_VALUE needs rounding SCALE_UNIT or HW_ALIGNED_FIXED, got {section.rounding.value}"
    )


def is_fixed(section: SectionSpec) -> bool:
    return section.value_type in (ValueType.FIXED_VALUE, ValueType.DUMMY_SCALES)


def check_finite(t: torch.Tensor, where: str, shown: object | Callable[[], object]) -> None:
    """Raise ``NonFiniteStatsError(where, shown)`` when an element of ``t`` is NaN or infinite.
    ``shown`` may be a function, called only then (a reduction over ``t`` costs a pass)."""
    # One element (every per-tensor scale path): a host float is ~10x cheaper than isfinite+all.
    finite = math.isfinite(float(t)) if t.numel() == 1 else bool(torch.isfinite(t).all())
    if not finite:
        raise NonFiniteStatsError(where, shown() if callable(shown) else shown)


def _empty_maxabs(where: str) -> ScaleMethodError:
    return ScaleMethodError(f"{where}: empty max-abs array; re-measure the module")


def maxabs_vector(maxabs: MaxAbsLike, dtype: torch.dtype, where: str) -> torch.Tensor:
    """A 1-D tensor of max-abs values in ``dtype``; non-finite values (also after the cast) raise."""
    if isinstance(maxabs, torch.Tensor):
        src = maxabs.detach().reshape(-1)
    else:
        src = torch.from_numpy(as_maxabs(maxabs).copy())  # Ray hands over read-only arrays
    if src.numel() == 0:
        raise _empty_maxabs(where)
    check_finite(src, where, lambda: float(src.float().abs().max()))
    out = src.to(dtype)
    # A finite fp32 value can overflow a narrower hp dtype (fp16 max is 65504).
    check_finite(out, f"{where} (in {dtype})", lambda: float(src.float().max()))
    return out


def measured_max(maxabs: MaxAbsLike, where: str) -> tuple[float, torch.dtype]:
    """The per-tensor max-abs of a measurement and the dtype it is exact in (float32 for arrays,
    lists and floats; a tensor's own dtype). A per-channel measurement is reduced with max(), as
    INC does (reference §2.2); an empty or non-finite measurement raises, naming ``where``."""
    if isinstance(maxabs, torch.Tensor):
        return float(maxabs_vector(maxabs, maxabs.dtype, where).max()), maxabs.dtype
    a = maxabs if isinstance(maxabs, np.ndarray) and maxabs.dtype == np.float32 else as_maxabs(maxabs)
    if a.size == 1:  # the usual per-tensor measurement: no numpy reductions
        value = float(a.item())
        if not math.isfinite(value):
            raise NonFiniteStatsError(where, abs(value))
        return value, torch.float32
    if a.size == 0:
        raise _empty_maxabs(where)
    lo, hi = float(a.min()), float(a.max())  # NaN propagates into both; -inf shows in the min
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteStatsError(where, float(np.abs(a).max()))
    return hi, torch.float32


def pts_scales(values: Sequence[float], dtype: torch.dtype, backoff: float, rounding: Rounding, ctx: ScaleContext,
               wheres: Sequence[str]) -> torch.Tensor:
    """Per-tensor scales of many max-abs values at once, a 1-D ``hp_dtype`` tensor.

    Each value (finite and exact in ``dtype``) is cast to ``hp_dtype``, then :func:`raw_scale` and
    :func:`round_scale` run there. Every op is elementwise, so element i is the scale the formula
    gives for value i alone (``tests/shards/test_scale_batch.py`` compares them for every bf16 and
    fp16 value). A value that overflows ``hp_dtype`` raises, naming ``wheres[i]``.
    """
    m = torch.tensor(values, dtype=dtype).to(ctx.hp_dtype)
    finite = torch.isfinite(m)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        raise NonFiniteStatsError(f"{wheres[i]} (in {ctx.hp_dtype})", values[i])
    return round_scale(raw_scale(m, backoff, ctx), rounding, ctx)


def require_maxabs(section: SectionSpec, where: str) -> None:
    """Activation scales come from a max-abs (or a fixed value, handled before this check)."""
    if section.value_type is not ValueType.MAXABS:
        raise ScaleMethodError(f"{where}: activations support MAXABS or FIXED_VALUE, got {section.value_type.value}")


def activation_scale(
    maxabs: MaxAbsLike, section: SectionSpec, ctx: ScaleContext, *, where: str = "activation"
) -> torch.Tensor:
    """The 0-d ``hp_dtype`` scale of an activation from its measured max-abs.

    A per-channel measurement is reduced with max() first, as INC does (reference §2.2).
    ``where`` names the module and tensor in error messages.
    """
    if is_fixed(section):
        return fixed_scale(section, ctx)
    require_maxabs(section, where)
    value, dtype = measured_max(maxabs, where)
    return pts_scales([value], dtype, section.backoff, section.rounding, ctx, [where])[0]


def magnitude_codes(w: torch.Tensor) -> torch.Tensor:
    """The sign-cleared bit patterns of a 16-bit float tensor, as int16: they order like the
    magnitudes (inf above every finite value, NaNs above inf), and 16-bit integer reductions are
    several times faster than float ones on CPU."""
    return w.detach().contiguous().view(torch.int16) & 0x7FFF


def magnitude_max(w: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``amax(|w|)`` over ``dim`` (None: every element) in ``w``'s dtype; NaN if any element is NaN.

    Contiguous CPU fp32/bf16/fp16 tensors, per tensor or per row (``dim=1`` of a 2-D tensor), go
    through the C kernel (:func:`shards.fp8.native_cast.maxabs`: one pass, the same bits, NaNs
    included); other 16-bit floats on CPU take the max of :func:`magnitude_codes` instead of
    abs + amax.
    """
    w = w.detach()
    if dim is None or (w.ndim == 2 and dim in (1, -1)):
        native = native_cast.maxabs(w, per_row=dim is not None)
        if native is not None:
            return native
    if w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu" and w.numel() > 0:
        bits = magnitude_codes(w)
        return (bits.amax() if dim is None else bits.amax(dim=dim)).view(w.dtype)
    a = w.abs()
    return a.amax() if dim is None else a.amax(dim=dim)


def per_channel_maxabs(weight: torch.Tensor) -> torch.Tensor:
    """``amax(|w|)`` over every axis but the first (output channels), in the weight's dtype."""
    return magnitude_max(weight.reshape(weight.shape[0], -1), dim=1)


def weight_maxabs(weight: torch.Tensor, section: SectionSpec, where: str) -> tuple[float, torch.Tensor | None]:
    """The weight's max-abs (a float: exact for every fp32/bf16/fp16 value) and, for a PCS section,
    its per-channel max-abs in its dtype; a NaN or infinite element raises, naming ``where``. One
    pass: the max-abs is NaN or inf exactly when some element is (amax propagates NaN). Per tensor
    the kernel's float is read directly: a convert reads one per Linear, and a 0-d output tensor
    and its read-back cost more than the kernel's pass over a small weight."""
    if section.granularity is Granularity.PCS:
        per_channel = per_channel_maxabs(weight)
        amax = per_channel.max()
        check_finite(amax, where, "non-finite weight element")
        return float(amax), per_channel
    value = native_cast.maxabs_value(weight) if weight.numel() else None
    if value is None:
        value = float(magnitude_max(weight))
    if not math.isfinite(value):
        raise NonFiniteStatsError(where, "non-finite weight element")
    return value, None


def pcs_scale_from_amax(
    amax: torch.Tensor, backoff: float, rounding: Rounding, ctx: ScaleContext
) -> torch.Tensor:
    """Per-channel weight scales from per-channel max-abs, in ``amax``'s dtype (the weight's)."""
    floored = amax.clamp_min(BF16_TINY)
    return round_scale(raw_scale(floored, backoff, ctx), rounding, ctx)


def opt_candidates(section: SectionSpec, ctx: ScaleContext) -> tuple[float, ...]:
    """Absolute PTS candidates: the section's list, else the device's HW set or 2**-10..2**9."""
    if section.candidates is not None:
        return section.candidates
    if section.rounding in (Rounding.HW_ALIGNED, Rounding.HW_ALIGNED_FIXED):
        return ctx.hw_traits("the OPT candidate list of maxabs_hw_opt_weight").scales
    return POW2_OPT_CANDIDATES


def weight_scale_from_maxabs(
    maxabs: MaxAbsLike,
    section: SectionSpec,
    ctx: ScaleContext,
    weight_dtype: torch.dtype = torch.float32,
    *,
    where: str = "weight",
) -> torch.Tensor:
    """The weight scale from stored max-abs (no weights at hand, e.g. the stats-store CLI).

    ``maxabs`` is one value (PTS) or one per output channel (PCS; a per-tensor value cannot give
    per-channel scales). Gives the same result as :func:`weight_scale` on the weight itself.
    """
    if is_fixed(section):
        return fixed_scale(section, ctx)
    if section.value_type is ValueType.OPT:
        raise ScaleMethodError(f"{where}: OPT weight scales need the weight tensor itself, not its max-abs")
    amax = maxabs_vector(maxabs, weight_dtype, where)
    if section.granularity is Granularity.PCS:
        return pcs_scale_from_amax(amax, section.backoff, section.rounding, ctx)
    return pts_scales([float(amax.max())], weight_dtype, section.backoff, section.rounding, ctx, [where])[0]


def dynamic_activation_scale(
    x: torch.Tensor, ctx: ScaleContext, dim: int = -1, per_tensor: bool = False,
    scaling: DynamicScaling = INC_DYNAMIC_SCALING, amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-call scales of dynamic quantization (reference §2.8), in ``x``'s dtype.

    ``s = rounding(amax(|x|, dim, keepdim) / (fullscale * backoff))``, INC's POW2 with backoff 0.5
    unless ``scaling`` says otherwise: ``dim=-1`` gives one scale per row (per token), ``dim=-2``
    one per column (matmul input 1); ``per_tensor`` one 0-d scale. An all-zero row gets the
    dtype's smallest normal (its values quantize to 0 all the same). ``amax_reduce`` maxes the
    max-abs over the tp ranks holding the other slices of a row (row-parallel layers).
    """
    ax = x.detach().abs()
    amax = ax.amax() if per_tensor else ax.amax(dim=dim, keepdim=True)
    if amax_reduce is not None:
        amax = amax_reduce(amax.contiguous())
    return round_scale(raw_scale(amax, scaling.backoff, ctx), scaling.rounding, ctx)
