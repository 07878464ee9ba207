"""A quantized model as a format-neutral checkpoint: FP8 Linear weights with their scales, and every
other tensor of the HF state dict in high precision.

:class:`QuantizedCheckpoint` is what the writers consume (``orchestrator.export.compressed_tensors`` writes the
compressed-tensors layout vLLM loads). It is built either from a model converted on one card
(:func:`checkpoint_from_model`) or by the sharded path, which concatenates its shards' pieces; the
writers never see a model.

Names are the source checkpoint's on-disk names (``ModelFamily.disk_name``: Mixtral's MoE block is
``block_sparse_moe`` on disk, ``mlp`` in transformers 5), with routed experts stored per expert
(``experts.<e>.w1`` / ``gate_proj``...) as the HF checkpoints of MoE families store them, so that
transformers and vLLM load the export with their ordinary name mapping.

Scale convention (ours, INC's, compressed-tensors' and vLLM's): ``w ≈ q · s``, ``x ≈ Q(x / s_in) · s_in``
and, for a quantized KV cache, ``k ≈ Q(k / k_scale) · k_scale`` (same for v).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from orchestrator.errors import Fp8OrchestratorError
from shards.model.discovery import clean_name
from shards.families import ModelFamily, family_or_none
from shards.fp8.methods import METHODS, DynamicScaling, Rounding
from shards.quantized.modules import QuantKVCache, QuantLinear, QuantModule

logger = logging.getLogger(__name__)

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
        ignored: names of Linear modules (and MoE routers) left in high precision (their weights
            are in ``other``).
        dynamic: activation scales per token at run time (no ``input_scale``).
        scale_method: the scale method the scales come from (recorded as provenance only).
        kv_cache: attention module name → ``(k_scale, v_scale)`` (0-d float32) when the KV cache
            is quantized (written as ``<attention>.k_scale`` / ``.v_scale`` with a ``kv_cache_scheme``);
            empty otherwise.
        source_dir: the source checkpoint directory; its tokenizer, chat template and generation
            config are copied beside the weights (:func:`copy_serving_files`).
        generation_config: ``generation_config.json`` content to write when ``source_dir`` has none
            (single-card exports take it from ``model.generation_config``).

    Every name is an on-disk name (see the module docstring).
    """

    hf_config: dict[str, Any]
    linears: dict[str, QuantizedLinear]
    other: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)
    dynamic: bool = False
    scale_method: str = "unspecified"
    kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source_dir: Path | None = None
    generation_config: dict[str, Any] | None = None

    def check(self) -> None:
        """Raise :class:`ExportError` on an inconsistent checkpoint (each problem names the tensor)."""
        for name, scales in self.kv_cache.items():
            for label, t in zip(("k_scale", "v_scale"), scales):
                if t.numel() != 1 or not bool(torch.isfinite(t).all()) or float(t.reshape(-1)[0]) <= 0:
                    raise ExportError(f"KV cache of {name!r}: {label} must be one finite positive value, got "
                                      f"{t.reshape(-1).tolist()}")
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


Namer = Callable[[str], str]


def disk_namer(family: ModelFamily | None) -> Namer:
    """In-model state-dict name → on-disk name (identity without a family)."""
    return family.disk_name if family is not None else (lambda key: key)


def split_fused_experts(key: str, t: torch.Tensor, family: ModelFamily | None) -> dict[str, torch.Tensor]:
    """A fused 3-D expert tensor of transformers 5 (``<layer>.experts.gate_up_proj`` ``[E, 2·I, H]``,
    ``<layer>.experts.down_proj`` ``[E, H, I]``) as the per-expert 2-D weights HF checkpoints store
    (``<layer>.experts.<e>.<gate|up|down>.weight``, the family's projection names); any other tensor
    is returned under its own name. Names are in-model names (apply :func:`disk_namer` after)."""
    layout = family.experts if family is not None else None
    prefix, _, leaf = key.rpartition(".")
    if layout is None or t.ndim != 3 or prefix.rpartition(".")[2] != "experts" or leaf not in ("gate_up_proj", "down_proj"):
        return {key: t}
    if leaf == "down_proj":
        return {f"{prefix}.{e}.{layout.down}.weight": t[e] for e in range(t.shape[0])}
    inter = t.shape[1] // 2
    out: dict[str, torch.Tensor] = {}
    for e in range(t.shape[0]):
        out[f"{prefix}.{e}.{layout.gate}.weight"] = t[e, :inter]
        out[f"{prefix}.{e}.{layout.up}.weight"] = t[e, inter:]
    return out


def high_precision_modules(model: nn.Module, family: ModelFamily | None, quantized: Any, disk: Namer) -> list[str]:
    """On-disk names of the modules that hold a matmul weight and stay in high precision: every
    ``nn.Linear`` not in ``quantized`` (in-model names) and the family's routers (``high_precision``
    classes: vLLM builds MoE routers as Linear layers, so they are listed in ``ignore`` by name)."""
    keep = set(family.high_precision) if family is not None else set()
    names = []
    for path, m in model.named_modules():
        name = clean_name(path)
        if name in quantized or not (isinstance(m, nn.Linear) or type(m).__name__ in keep):
            continue
        names.append(disk(name))
    return sorted(set(names))


def kv_cache_scales(scales: Mapping[str, torch.Tensor | float], attention_layers: Any, family: ModelFamily | None,
                    disk: Namer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(k_scale, v_scale)`` per attention layer (on-disk name) from the scales of the quantized
    ``<layer>.k_cache`` / ``<layer>.v_cache`` modules (in-model names); empty when none is quantized.

    Raises:
        ExportError: the K and V caches of some attention layers only are quantized
            (compressed-tensors' ``kv_cache_scheme`` covers every layer, K and V alike), or an MLA
            family (vLLM caches MLA's compressed latent, whose scale our per-head K/V caches are not).
    """
    if not scales:
        return {}
    if family is not None and "mla_attention" in family.rule_sets:
        raise ExportError(f"{family.name}: vLLM caches the compressed MLA latent, not the per-head keys and values "
                          "our k_cache/v_cache modules quantize, so their scales have no place in the checkpoint; "
                          "leave the KV cache unquantized (do not select KVCache) for this family")
    layers = sorted(set(attention_layers))
    missing = [f"{layer}.{kind}" for layer in layers for kind in ("k_cache", "v_cache") if f"{layer}.{kind}" not in scales]
    stray = sorted(n for n in scales if n.rpartition(".")[0] not in layers)
    if missing or stray:
        raise ExportError(f"compressed-tensors' kv_cache_scheme quantizes the K and V cache of every attention layer; "
                          f"{missing or stray} {'are not quantized' if missing else 'are not KV caches of an attention layer'}"
                          "; select every k_cache and v_cache (allowlist types KVCache) or none")
    out = {}
    for layer in layers:
        k, v = (_as_tensor(scales[f"{layer}.{kind}"]) for kind in ("k_cache", "v_cache"))
        assert k is not None and v is not None
        out[disk(layer)] = (k.reshape(()), v.reshape(()))
    return out


def warn_dropped_ops(names: Any) -> None:
    """Say which quantized ops the format has no place for (attention matmuls, softmax): a serving
    engine runs them in high precision, so the export does not compute exactly what our model does."""
    names = sorted(names)
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        logger.warning("export: %d quantized op(s) without weights (%s) have no place in a compressed-tensors "
                       "checkpoint and run in high precision there; select Linear (and KVCache) only to export "
                       "exactly what the quantized model computes", len(names), shown)


# compressed-tensors' (and vLLM's) per-token rule: amax / 448, no backoff, no rounding.
CLIENT_DYNAMIC_RULE = DynamicScaling(1.0, Rounding.IDENTITY)


def warn_client_dynamic_rule(rules: Any) -> None:
    """Say so when dynamic modules compute per-token scales by another rule than the client's (INC's
    POW2 with backoff 0.5): the format has no place for the rule, the client applies its own, so
    the export is one FP8 rounding of the activations away from the quantized model."""
    other = sorted({f"{r.rounding.value} backoff {r.backoff}" for r in rules if r != CLIENT_DYNAMIC_RULE})
    if other:
        exact = " / ".join(n.lower() for n, m in METHODS.items()
                           if m.dynamic_only and DynamicScaling.of(m.activation) == CLIENT_DYNAMIC_RULE)
        logger.warning("export: per-token activation scales here use %s; compressed-tensors clients compute "
                       "amax/448 per token instead, so the served model rounds activations differently from this "
                       "one. scale_method %s computes exactly the client's rule", ", ".join(other), exact)


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


def _other_tensors(model: nn.Module, quantized: Mapping[str, QuantModule], family: ModelFamily | None,
                   disk: Namer) -> dict[str, torch.Tensor]:
    """State-dict tensors outside the quantized modules under their on-disk names, fused experts
    split per expert; a tied tensor is kept once (first name)."""
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
        for part, tensor in split_fused_experts(name, t.detach().cpu(), family).items():
            other[disk(part)] = tensor
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
        # Discovery never selects a tied head (it stays high precision, listed in ``ignore``, and the
        # config stays tied). A head quantized anyway has its own FP8 weight, which a loader that
        # re-ties would drop: the config is untied to match the tensors.
        d["tie_word_embeddings"] = False
    return d


def _generation_config(model: nn.Module) -> dict[str, Any] | None:
    gen = getattr(model, "generation_config", None)
    to_diff = getattr(gen, "to_diff_dict", None)
    return dict(to_diff()) if callable(to_diff) else None


def attention_layers(model: nn.Module) -> list[str]:
    """The attention layers of ``model`` that carry a KV cache module (quantized or not)."""
    from shards.model.hf_attention import KVCache

    return sorted({clean_name(n).rpartition(".")[0] for n, m in model.named_modules()
                   if isinstance(m, (KVCache, QuantKVCache))})


def checkpoint_from_model(model: nn.Module, *, scale_method: str = "unspecified",
                          source_dir: str | Path | None = None) -> QuantizedCheckpoint:
    """The checkpoint of an HF model converted on one card by ``orchestrator.convert``.

    Quantized Linears give their FP8 weight and scales; Linears (and MoE routers) left in high
    precision are listed in ``ignored``; a quantized KV cache gives ``k_scale``/``v_scale`` per
    attention layer. Other quantized ops without weights (attention matmuls, softmax) have no place
    in the format and are left out (their inference falls back to high precision). Names are the
    on-disk names of the model's family, experts stored per expert.

    Args:
        model: the converted HF model.
        scale_method: provenance recorded in the weight files.
        source_dir: the checkpoint the model was loaded from; its tokenizer, chat template and
            generation config are copied into the export (see :func:`copy_serving_files`). Without
            it the model's own ``generation_config`` is written; pass a tokenizer to
            ``write_compressed_tensors(..., tokenizer=...)``.

    Raises:
        ExportError: a quantized module with FP8 weights that is not a Linear (Conv2d, EmbeddingBag),
            a tp shard, a model without an HF config, or a KV cache quantized in some layers only.
    """
    quantized = {clean_name(n): m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    weighted = [n for n, m in quantized.items()
                if not isinstance(m, QuantLinear) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if weighted:
        raise ExportError(f"quantized module(s) {weighted} hold FP8 weights but are not Linear layers; the "
                          "compressed-tensors layout only has FP8 Linears: add them to blocklist.names")
    hf_config = _hf_config(model, quantized)
    family = family_or_none(model.config)
    disk = disk_namer(family)
    linears = {disk(n): _linear_from_module(n, m) for n, m in quantized.items() if isinstance(m, QuantLinear)}
    dynamic = {m.qctx.dynamic for m in quantized.values() if isinstance(m, QuantLinear)}
    kv = {n: m.module_scales().inputs[0] for n, m in quantized.items() if isinstance(m, QuantKVCache)}
    warn_dropped_ops(n for n, m in quantized.items() if not isinstance(m, (QuantLinear, QuantKVCache)))
    warn_client_dynamic_rule(m.dynamic_scaling for m in quantized.values() if isinstance(m, QuantLinear) and m.qctx.dynamic)
    ckpt = QuantizedCheckpoint(
        hf_config=hf_config,
        linears=linears,
        other=_other_tensors(model, quantized, family, disk),
        ignored=high_precision_modules(model, family, quantized, disk),
        dynamic=dynamic == {True},
        scale_method=scale_method,
        kv_cache=kv_cache_scales(kv, attention_layers(model), family, disk),  # type: ignore[arg-type]
        source_dir=None if source_dir is None else Path(source_dir),
        generation_config=_generation_config(model),
    )
    ckpt.check()
    return ckpt


__all__ = ["FP8_DTYPE", "ExportError", "QuantizedLinear", "QuantizedCheckpoint", "attention_layers",
           "checkpoint_from_model", "disk_namer", "warn_client_dynamic_rule",
           "high_precision_modules", "kv_cache_scales", "split_fused_experts", "warn_dropped_ops"]
