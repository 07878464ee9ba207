"""QUANTIZE: patched modules that compute with FP8 weights and quantized inputs.

One class per kind of computation; which class serves which op type is the "quantize" role of the
op-type registry (``shards.model.op_types``), read here as ``QUANT_OPS`` (an op type we cannot
quantize says why). Every class does its FP8
work through a ``shards.quantized.backends.Backend``, so the CPU emulation, CUDA and Gaudi share this code.

Semantics (reference §6, decisions §2):
- weights are stored as FP8 codes (``weight``, torch float8 dtype) with their scale (per tensor,
  or per output channel);
- inputs are quantized with their input scale; the gemm runs on (codes, scales) and gives
  ``hp_dtype`` (the emulation multiplies and accumulates in fp32 and rounds once to hp, as the
  hardware does);
  outputs are not quantized; the bias is added afterwards in its own dtype; the result is returned
  in the input's dtype;
- scales are held as Python floats (``scale_format`` SCALAR; one-element scales only) or as
  buffers (CONST, and always for per-channel scales). Both are in ``state_dict``: SCALAR scales are
  saved as 0-d ``hp_dtype`` tensors and read back into floats (reference §6 "Scale storage"), so
  a converted model's scales survive ``state_dict()`` → ``load_state_dict()``;
- dynamic quantization (Linear, Matmul): activation scales are computed per call, per token
  (row) for inputs and input 0 of a matmul, per column for matmul input 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from shards.quantized.backends import Backend
from shards.fp8.module_scales import ModuleScales
from shards.fp8.numerics import Fp8Format
from shards.model.op_types import implementations, register_implementation
from shards.plan import ScaleFormat
from shards.quantized.qdq_memo import SharedInputMemo
from shards.fp8.methods import INC_DYNAMIC_SCALING, DynamicScaling
from shards.fp8.scale_math import ScaleContext, dynamic_activation_scale


@dataclass(frozen=True)
class QuantContext:
    """Everything a patched module needs besides its scales.

    Attributes:
        scale_ctx: FP8 format, hp dtype and device for scales (dynamic scales are computed with it).
        backend: the device's cast and gemm.
        scale_format: SCALAR (Python floats) or CONST (buffers).
        dynamic: activation scales per call instead of from the measurement.
        memo: the last Linear input QDQ'd, shared by the modules of one conversion.
    """

    scale_ctx: ScaleContext
    backend: Backend
    scale_format: ScaleFormat = ScaleFormat.SCALAR
    dynamic: bool = False
    memo: SharedInputMemo = field(default_factory=SharedInputMemo, compare=False, repr=False)

    @property
    def fmt(self) -> Fp8Format:
        return self.scale_ctx.fmt

    @property
    def hp(self) -> torch.dtype:
        return self.scale_ctx.hp_dtype


ScaleValue = torch.Tensor | float


@functools.cache
def _scale_names(kind: str, n: int) -> tuple[str, ...]:
    # The attribute names of a module's scales, made once per (kind, count), not per module.
    return tuple(f"scale_{kind}_{i}" for i in range(n))


_WEIGHT_SCALE_NAMES = ("scale_weight", "scale_weight_in_channel")


class QuantModule(nn.Module):
    """Base of the patched modules: holds scales in the configured format."""

    def __init__(self, qctx: QuantContext, scales: ModuleScales) -> None:
        super().__init__()
        self.qctx: QuantContext
        self._n_inputs: int
        self._n_outputs: int
        self._scalar_scales: list[str]  # names of the scales held as floats
        # How a dynamic module computes activation scales per call (INC's rule unless its method says).
        self.dynamic_scaling: DynamicScaling
        scalar: list[str] = []
        plain: dict[str, object] = {"qctx": qctx, "_n_inputs": len(scales.inputs), "_n_outputs": len(scales.outputs),
                                    "_scalar_scales": scalar, "dynamic_scaling": scales.dynamic or INC_DYNAMIC_SCALING}
        as_floats = qctx.scale_format is ScaleFormat.SCALAR
        for names, values in ((_scale_names("input", len(scales.inputs)), scales.inputs),
                              (_scale_names("output", len(scales.outputs)), scales.outputs),
                              (_WEIGHT_SCALE_NAMES, (scales.weight, scales.weight_in_channel))):
            for name, value in zip(names, values):
                if value is None:
                    plain[name] = None
                elif as_floats and value.numel() == 1:
                    plain[name] = value.item()
                    scalar.append(name)
                else:
                    # CONST, and per-channel scales in any format (INC forces CONST for those).
                    self.register_buffer(name, value.detach().clone())
        self._set_plain(**plain)

    def _set_plain(self, **values: object) -> None:
        """Set attributes that are neither parameters, buffers nor modules. nn.Module.__setattr__
        looks every name up in those tables first (a few microseconds each, a dozen per module,
        which showed in the conversion of a whole model); these names are never in them."""
        self.__dict__.update(values)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._scalar_scales:
            # Exact: the float came from an hp tensor (bf16/fp32 values are floats exactly).
            destination[prefix + name] = torch.tensor(getattr(self, name), dtype=self.qctx.hp)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in self._scalar_scales:
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)  # nn.Module does not know our float attributes
            value = state_dict.get(key)
            if value is None:
                if strict:
                    missing_keys.append(key)
            elif not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(f"{key}: a SCALAR scale needs one element, got {shape}; "
                                  "convert this model with scale_format CONST to load per-channel scales")
            else:
                setattr(self, name, float(value.reshape(-1)[0]))

    def _scale(self, name: str) -> ScaleValue:
        value: ScaleValue | None = getattr(self, name)
        assert value is not None, f"{type(self).__name__} has no {name}"
        return value

    def module_scales(self) -> ModuleScales:
        """The scales this module computes with now (after a state_dict load too)."""

        def tensor(name: str) -> torch.Tensor | None:
            v = getattr(self, name)
            return None if v is None else torch.as_tensor(v, dtype=v.dtype if isinstance(v, torch.Tensor) else self.qctx.hp)

        inputs = tuple(tensor(f"scale_input_{i}") for i in range(self._n_inputs))
        outputs = tuple(tensor(f"scale_output_{i}") for i in range(self._n_outputs))
        return ModuleScales(inputs, outputs, tensor("scale_weight"), tensor("scale_weight_in_channel"),  # type: ignore[arg-type]
                            self.dynamic_scaling if self.qctx.dynamic else None)

    def to_inc_node(self) -> dict[str, object]:
        """This module's node of INC's scale JSON (reference §4.2)."""
        return self.module_scales().to_inc_node()

    def _qdq(self, x: torch.Tensor, scale: ScaleValue) -> torch.Tensor:
        """x after a round trip through FP8, in hp."""
        b = self.qctx.backend
        fused = getattr(b, "fake_quant", None)
        if fused is not None:
            return fused(x, scale, self.qctx.fmt, self.qctx.hp)
        return b.dequantize(b.quantize(x, scale, self.qctx.fmt), scale, self.qctx.hp)

    def _emulated_gemm(self) -> bool:
        """Whether the backend offers its gemm in steps (input_operand, weight_operand_t,
        gemm_operands: ``EmulatedBackend``), so that operands can be reused."""
        return getattr(self.qctx.backend, "emulated_gemm", False)


def _plain_attr(module: nn.Module, name: str, default: Any) -> Any:
    """``getattr(module, name, default)`` for a name that is no parameter, buffer or submodule:
    nn.Module.__getattr__ raises for a missing name (~3 us, per module of a conversion)."""
    if name in module.__dict__:
        return module.__dict__[name]
    return getattr(module, name, default) if hasattr(type(module), name) else default


def _quantize_weight(weight: torch.Tensor, scale: torch.Tensor, qctx: QuantContext) -> torch.Tensor:
    """FP8 codes of a weight; a per-channel scale runs along axis 0 (output channels)."""
    w = weight.detach()
    if w.dtype == torch.float16:
        w = w.to(torch.bfloat16)  # INC casts fp16 weights to bf16 before quantizing (reference §6)
    s = scale.reshape(-1, *([1] * (w.ndim - 1))) if scale.numel() > 1 else scale
    return qctx.backend.quantize(w, s, qctx.fmt)


def _column_scale(s: ScaleValue) -> ScaleValue:
    """A per-output-channel scale laid out along the columns of the [in, out] weight operand."""
    return s.reshape(1, -1) if isinstance(s, torch.Tensor) and s.numel() > 1 else s


class QuantLinear(QuantModule):
    """``y = (Q(x)·s_in) @ (W8·s_w)ᵀ + b`` in hp: the backend's FP8 gemm, then the bias.

    With the emulation (``reuses_dequantized_weights``) the layer keeps its weight operand between
    forwards: the fp32 values of the FP8 codes of Wᵀ (exact; 4 bytes per parameter besides the
    codes), or the dequantized hp weight with ``inc_layout``.

    Also serves row-parallel shards: with ``all_reduce`` and ``tp_world > 1`` the partial product
    is summed over the tp group before the bias is added once.
    """

    def __init__(self, source: nn.Linear, scales: ModuleScales, qctx: QuantContext) -> None:
        super().__init__(qctx, scales)
        assert scales.weight is not None
        self.in_features: int
        self.out_features: int
        self.all_reduce: Callable[..., torch.Tensor] | None
        tp_world = _plain_attr(source, "tp_world", 1)
        bias = source.bias
        # A missing bias is a plain attribute (what nn.Module.__setattr__ makes of None), set
        # without __setattr__'s table lookups.
        self._set_plain(in_features=source.in_features, out_features=source.out_features,
                        all_reduce=getattr(source, "all_reduce", None) if tp_world > 1 else None,
                        **({"bias": None} if bias is None else {}))
        self.weight = nn.Parameter(_quantize_weight(source.weight, scales.weight, qctx), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def input_scale(self, x: torch.Tensor) -> ScaleValue:
        if self.qctx.dynamic:
            # A row-parallel shard holds a slice of each token: its scale is the whole row's.
            reduce = None if self.all_reduce is None else functools.partial(self.all_reduce, op="max")
            return dynamic_activation_scale(x, self.qctx.scale_ctx, dim=-1, scaling=self.dynamic_scaling,
                                            amax_reduce=reduce)
        return self._scale("scale_input_0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s_in, hp = self.qctx.backend, self.input_scale(x), self.qctx.hp
        s_w = _column_scale(self._scale("scale_weight"))
        if getattr(b, "reuses_dequantized_weights", False) and self._emulated_gemm():
            # The emulated gemm with the weight operand kept between forwards and the input operand
            # shared by sibling Linears (same values as b.gemm).
            a = self.qctx.memo.input_operand(x, s_in, lambda: b.input_operand(x, s_in, self.qctx.fmt, hp))
            y = b.gemm_operands(a, self._weight_operand_t(s_w), s_in, s_w, hp)
        else:
            y = b.gemm(b.quantize(x, s_in, self.qctx.fmt), self.weight.t(), s_in, s_w, hp)
        if self.all_reduce is not None:
            y = self.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _weight_operand_t(self, s_w: ScaleValue) -> torch.Tensor:
        """The backend's ``weight_operand_t`` of this weight, recomputed only when the codes or the
        scale change (a state_dict load writes in place and bumps the tensors' versions)."""
        w = self.weight
        s_key = s_w if isinstance(s_w, float) else (s_w.data_ptr(), s_w._version, s_w.device)
        # Inference-mode tensors cannot enter autograd later: one made there is not reused outside.
        key = (w.data_ptr(), w._version, w.device, s_key, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_weight_operand")
        if cached is None or cached[0] != key:
            cached = (key, self.qctx.backend.weight_operand_t(w, s_w, self.qctx.hp))
            self.__dict__["_weight_operand"] = cached  # a plain attribute: never in state_dict
        return cached[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.weight.dtype}"


class QuantConv2d(QuantModule):
    """Conv2d on the QDQ'd input and the dequantized FP8 weight, in hp, the bias inside the convolution."""

    def __init__(self, source: nn.Conv2d, scales: ModuleScales, qctx: QuantContext) -> None:
        super().__init__(qctx, scales)
        assert scales.weight is not None
        self.stride, self.padding, self.dilation, self.groups = source.stride, source.padding, source.dilation, source.groups
        if source.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={source.padding_mode!r} is not supported quantized; block it")
        self.weight = nn.Parameter(_quantize_weight(source.weight, scales.weight, qctx), requires_grad=False)
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_w = self._scale("scale_weight")
        s_w = s_w.reshape(-1, 1, 1, 1) if isinstance(s_w, torch.Tensor) and s_w.numel() > 1 else s_w
        w = self.qctx.backend.dequantize(self.weight, s_w, self.qctx.hp)
        # An hp bias goes into the convolution (conv + bias rounded to hp once), as INC's QDQ
        # Conv2d does; adding it afterwards rounds twice and differs from INC by an hp ulp. A bias
        # of another dtype (an fp32 model with hp bf16, where INC's conv raises) is added after.
        inside = self.bias is not None and self.bias.dtype == w.dtype
        y = F.conv2d(self._qdq(x, self._scale("scale_input_0")), w, self.bias if inside else None, self.stride,
                     self.padding, self.dilation, self.groups)
        if self.bias is not None and not inside:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y.to(x.dtype)


class QuantMatmul(QuantModule):
    """``(Q(a)·s_a) @ (Q(b)·s_b)`` in hp (also B2BMatmul, whose input-1 scale comes from its output)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.qctx.dynamic:
            s_a: ScaleValue = dynamic_activation_scale(a, self.qctx.scale_ctx, dim=-1, scaling=self.dynamic_scaling)
            s_b: ScaleValue = dynamic_activation_scale(b, self.qctx.scale_ctx, dim=-2, scaling=self.dynamic_scaling)
        else:
            s_a, s_b = self._scale("scale_input_0"), self._scale("scale_input_1")
        be, fmt = self.qctx.backend, self.qctx.fmt
        if self._emulated_gemm():
            # Activations only: their operands without materializing FP8 codes.
            hp = self.qctx.hp
            y = be.gemm_operands(be.input_operand(a, s_a, fmt, hp), be.input_operand(b, s_b, fmt, hp), s_a, s_b, hp)
        else:
            y = be.gemm(be.quantize(a, s_a, fmt), be.quantize(b, s_b, fmt), s_a, s_b, self.qctx.hp)
        return y.to(torch.promote_types(a.dtype, b.dtype))


class QuantKVCache(QuantModule):
    """Stores FP8 and hands back the dequantized values (one scale for both directions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._qdq(x, self._scale("scale_input_0")).to(x.dtype)


class QuantSoftmax(QuantModule):
    """Softmax in high precision, its output quantized with the measured output scale."""

    def __init__(self, source: nn.Module, scales: ModuleScales, qctx: QuantContext) -> None:
        super().__init__(qctx, scales)
        self.dim = getattr(source, "dim", -1)

    def forward(self, x: torch.Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        axis = self.dim if dim is None else dim
        y = torch.softmax(x, -1 if axis is None else axis, dtype=dtype)
        return self._qdq(y, self._scale("scale_output_0")).to(x.dtype)


class QuantEmbeddingBag(QuantModule):
    """EmbeddingBag with an FP8 weight, dequantized to hp for the lookup (weight-only)."""

    def __init__(self, source: nn.EmbeddingBag, scales: ModuleScales, qctx: QuantContext) -> None:
        super().__init__(qctx, scales)
        assert scales.weight is not None
        self.source_config = dict(max_norm=source.max_norm, norm_type=source.norm_type,
                                  scale_grad_by_freq=source.scale_grad_by_freq, mode=source.mode,
                                  sparse=source.sparse, include_last_offset=source.include_last_offset,
                                  padding_idx=source.padding_idx)
        self.weight = nn.Parameter(_quantize_weight(source.weight, scales.weight, qctx), requires_grad=False)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        s_w = self._scale("scale_weight")
        s_w = s_w.reshape(-1, 1) if isinstance(s_w, torch.Tensor) and s_w.numel() > 1 else s_w
        w = self.qctx.backend.dequantize(self.weight, s_w, self.qctx.hp)
        return F.embedding_bag(input, w, offsets, per_sample_weights=per_sample_weights, **self.source_config)


QuantFactory = Callable[[nn.Module, ModuleScales, QuantContext], QuantModule]


def _no_source(cls: type[QuantModule]) -> QuantFactory:
    return lambda _source, scales, qctx: cls(qctx, scales)


def _linear_like(source: nn.Module, scales: ModuleScales, qctx: QuantContext) -> QuantModule:
    if isinstance(source, nn.Conv2d):
        return QuantConv2d(source, scales, qctx)
    if isinstance(source, nn.Linear) or (hasattr(source, "weight") and getattr(source, "weight").ndim == 2):
        return QuantLinear(source, scales, qctx)  # type: ignore[arg-type]
    raise ValueError(f"{type(source).__name__}: a linear-type module needs a 2-D weight (or be a Conv2d)")


for _op, _cls in {
    "linear": _linear_like,
    "row_parallel_linear": _linear_like,
    "matmul": _no_source(QuantMatmul),
    "b2b_matmul": _no_source(QuantMatmul),
    "kv_cache": _no_source(QuantKVCache),
    "softmax": QuantSoftmax,
    "embedding": QuantEmbeddingBag,
    "fused_sdpa": "needs Gaudi's fused FP8 SDPA kernel; no emulation here",
    "dynamic_moe": "needs Gaudi/vLLM FP8 MoE kernels; quantize the expert linears instead",
}.items():
    register_implementation(_op, "quantize", _cls)
QUANT_OPS: Mapping[str, QuantFactory | str] = implementations("quantize")  # type: ignore[assignment]


def register_quant_op(op_type: str, factory: QuantFactory, *, replace: bool = False) -> None:
    """Set the patched class of an op type. Replacing an existing one must be explicit."""
    register_implementation(op_type, "quantize", factory, replace=replace)
