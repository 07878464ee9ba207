"""A quantized model as a format-neutral checkpoint: FP8 Linear weights with their scales, and every
other tensor of the HF state dict in high precision.

:class:`QuantizedCheckpoint` is what the writers consume (``orchestrator.export_ct`` writes the
compressed-tensors layout vLLM loads). It is built either from a model converted on one card
(:func:`checkpoint_from_model`) or by the sharded path, which concatenates its shards' pieces; the
writers never see a model.

Scale convention (ours, INC's and compressed-tensors'): ``w ≈ q · s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from orchestrator.errors import Fp8OrchestratorError
from shards.discovery import clean_name
from shards.qmodules import QuantLinear, QuantModule

# The FP8 dtype of compressed-tensors' "float-quantized" 8-bit format (and vLLM's FP8 kernels).
FP8_DTYPE = torch.float8_e4m3fn


class ExportError(Fp8OrchestratorError, ValueError):
    """A model or checkpoint cannot be written in the requested checkpoint format."""


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized Linear layer as stored on disk.

    Attributes:
        weight_fp8: ``[out, in]`` FP8 codes (``float8_e4m3fn``).
        weight_scale: 0-d (per tensor) or ``[out]`` (per output channel); ``w ≈ weight_fp8 · s``.
        input_scale: 0-d static activation scale, or None for dynamic per-token scales.
        bias: ``[out]`` in high precision, or None.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def per_channel(self) -> bool:
        """Whether the weight scale runs along the output channels."""
        return self.weight_scale.ndim > 0 and self.weight_scale.numel() > 1

    def check(self, name: str) -> None:
        """Raise :class:`ExportError` naming ``name`` if the shapes or dtypes do not fit together."""
        w = self.weight_fp8
        if w.dtype != FP8_DTYPE or w.ndim != 2:
            raise ExportError(f"linear {name!r}: weight_fp8 is {w.dtype} with shape {tuple(w.shape)}; "
                              f"a 2-D {FP8_DTYPE} tensor [out, in] is needed (E5M2 has no compressed-tensors layout)")
        out = w.shape[0]
        if self.weight_scale.numel() not in (1, out):
            raise ExportError(f"linear {name!r}: weight_scale has {self.weight_scale.numel()} values; "
                              f"1 (per tensor) or {out} (per output channel) are allowed")
        if self.input_scale is not None and self.input_scale.numel() != 1:
            raise ExportError(f"linear {name!r}: input_scale has {self.input_scale.numel()} values; a static "
                              "input scale is one value per tensor (use input_scale=None for dynamic per-token)")
        if self.bias is not None and tuple(self.bias.shape) != (out,):
            raise ExportError(f"linear {name!r}: bias has shape {tuple(self.bias.shape)}; expected ({out},)")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight_fp8 · weight_scale`` in ``dtype`` (computed in fp32)."""
        s = self.weight_scale.to(torch.float32)
        s = s.reshape(-1, 1) if self.per_channel else s.reshape(())
        return (self.weight_fp8.to(torch.float32) * s).to(dtype)


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A quantized model ready to be written.

    Attributes:
        hf_config: the HF ``config.json`` content (without ``quantization_config``; writers add theirs).
        linears: module name (state-dict prefix) → its quantized layer.
        other: every other tensor of the HF state dict (embeddings, norms, unquantized Linears...).
        ignored: names of Linear modules left in high precision (their weights are in ``other``).
        dynamic: activation scales per token at run time (no ``input_scale``).
        scale_method: the scale method the scales come from (recorded as provenance only).
    """

    hf_config: dict[str, Any]
    linears: dict[str, QuantizedLinear]
    other: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)
    dynamic: bool = False
    scale_method: str = "unspecified"

    def check(self) -> None:
        """Raise :class:`ExportError` on an inconsistent checkpoint (each problem names the tensor)."""
        for name, lin in self.linears.items():
            lin.check(name)
            if (lin.input_scale is None) != self.dynamic:
                want = "no input_scale (dynamic per-token)" if self.dynamic else "a static input_scale"
                raise ExportError(f"linear {name!r}: the checkpoint has dynamic={self.dynamic}, so it needs {want}")
        for name in self.linears:
            clash = [k for k in self.other if k.startswith(name + ".")]
            if clash:
                raise ExportError(f"tensor(s) {clash} of 'other' belong to quantized linear {name!r}; remove them")
        both = sorted(set(self.ignored) & set(self.linears))
        if both:
            raise ExportError(f"module(s) {both} are both quantized and ignored; drop them from 'ignored'")


def _as_tensor(value: torch.Tensor | float | None) -> torch.Tensor | None:
    """A scale as a float32 CPU tensor (SCALAR scales are Python floats, exact in fp32 from hp)."""
    if value is None:
        return None
    return torch.as_tensor(value).detach().to("cpu", torch.float32).clone()


def _linear_from_module(name: str, m: QuantLinear) -> QuantizedLinear:
    if m.all_reduce is not None:
        raise ExportError(f"linear {name!r} is a row-parallel tp shard; export the concatenated checkpoint that "
                          "the sharded run builds, not one shard's model")
    in_channel = m.scale_weight_in_channel
    if in_channel is not None and not torch.all(torch.as_tensor(in_channel) == 1):
        raise ExportError(f"linear {name!r} has an input-channel weight scale other than ones, which "
                          "compressed-tensors cannot express")
    weight_scale = _as_tensor(getattr(m, "scale_weight"))
    assert weight_scale is not None
    weight_scale = weight_scale.reshape(-1) if weight_scale.numel() > 1 else weight_scale.reshape(())
    input_scale = None if m.qctx.dynamic else _as_tensor(getattr(m, "scale_input_0"))
    return QuantizedLinear(
        weight_fp8=m.weight.detach().cpu(),
        weight_scale=weight_scale,
        input_scale=None if input_scale is None else input_scale.reshape(()),
        bias=None if m.bias is None else m.bias.detach().cpu(),
    )


def _other_tensors(model: nn.Module, quantized: Mapping[str, QuantModule]) -> dict[str, torch.Tensor]:
    """State-dict tensors outside the quantized modules; a tied tensor is kept once (first name)."""
    prefixes = tuple(f"{n}." for n in quantized)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    other: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        name = clean_name(key)
        if name.startswith(prefixes):
            continue
        # Tied tensors (embed_tokens / lm_head) share storage; HF writes them once and re-ties on load.
        ident = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        other[name] = t.detach().cpu()
    return other


def _hf_config(model: nn.Module, quantized: Mapping[str, QuantModule]) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError(f"{type(model).__name__} has no HF config (model.config.to_dict()); only HF models export")
    d: dict[str, Any] = config.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    out_emb = get_output_embeddings() if callable(get_output_embeddings) else None
    if d.get("tie_word_embeddings") and any(m is out_emb for m in quantized.values()):
        # The output projection now has its own FP8 weight; a loader that re-ties would drop it.
        d["tie_word_embeddings"] = False
    return d


def checkpoint_from_model(model: nn.Module, *, scale_method: str = "unspecified") -> QuantizedCheckpoint:
    """The checkpoint of an HF model converted on one card by ``orchestrator.convert``.

    Quantized Linears give their FP8 weight and scales; Linears left in high precision are listed
    in ``ignored``. Other quantized ops without weights (attention matmuls, softmax, KV cache)
    have no place in the format and are left out (their inference falls back to high precision).

    Raises:
        ExportError: a quantized module with FP8 weights that is not a Linear (Conv2d, EmbeddingBag),
            a tp shard, or a model without an HF config.
    """
    quantized = {clean_name(n): m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    weighted = [n for n, m in quantized.items()
                if not isinstance(m, QuantLinear) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if weighted:
        raise ExportError(f"quantized module(s) {weighted} hold FP8 weights but are not Linear layers; the "
                          "compressed-tensors layout only has FP8 Linears: add them to blocklist.names")
    linears = {n: _linear_from_module(n, m) for n, m in quantized.items() if isinstance(m, QuantLinear)}
    dynamic = {m.qctx.dynamic for m in quantized.values() if isinstance(m, QuantLinear)}
    ignored = [clean_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ckpt = QuantizedCheckpoint(
        hf_config=_hf_config(model, quantized),
        linears=linears,
        other=_other_tensors(model, quantized),
        ignored=ignored,
        dynamic=dynamic == {True},
        scale_method=scale_method,
    )
    ckpt.check()
    return ckpt


__all__ = ["FP8_DTYPE", "ExportError", "QuantizedLinear", "QuantizedCheckpoint", "checkpoint_from_model"]
