"""Measurable attention ops: ``Matmul``, ``KVCache`` and ``Softmax`` modules, and a HF attention
function that routes q·kᵀ, softmax and attn·v of every HF attention layer through them.

HF models compute attention inside a function chosen by name (``config._attn_implementation``
through transformers' ``AttentionInterface``), not in modules, so there is nothing to hook. We
register one more attention function, ``fp8_orchestrator``, which is the eager computation with
each op done by a child module we attach to the attention layer:

    self_attn.k_cache, self_attn.v_cache   (KVCache: the new keys / values as the cache holds them)
    self_attn.matmul_qk                    (Matmul: q · kᵀ)
    self_attn.softmax                      (Softmax)
    self_attn.matmul_av                    (Matmul: attn · v)

These are the names optimum-habana uses, so INC measurement files of Llama-family models line up.
Measuring and quantizing then work on these modules like on any other (op types matmul, kv_cache,
softmax of ``shards.model.op_types``). They are attached only when a run's allowlist ``types`` name
them (``install_hf_attention_if_asked``): by default a HF model gets the module set INC selects
there, its Linear layers (decisions §6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from shards.model.selection import SelectionRules

ATTENTION_NAME = "fp8_orchestrator"
_PREVIOUS_IMPL = "_fp8_previous_attn_implementation"


class Matmul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that both operands can be measured and quantized."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class KVCache(nn.Module):
    """The values a KV cache stores: identity in high precision.

    The quantized version stores FP8 and hands back the dequantized values (quantize on update,
    dequantize on fetch with the same scale), so the consumer sees exactly what the cache holds.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Softmax(nn.Module):
    """``softmax(x, dim)`` computed in ``dtype`` (default: x's dtype) and returned in x's dtype.

    Attributes:
        dim: the default axis.
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.softmax(x, self.dim if dim is None else dim, dtype=dtype).to(x.dtype)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv_heads, s, d] → [b, kv_heads·n_rep, s, d], each kv head repeated for its query heads."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def fp8_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's eager attention with every op done by ``module``'s attached children."""
    key = module.k_cache(key)
    value = module.v_cache(value)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    attn = module.matmul_qk(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn = attn + attention_mask[:, :, :, : key_states.shape[-2]]
    attn = module.softmax(attn, dim=-1, dtype=torch.float32).to(query.dtype)
    attn = nn.functional.dropout(attn, p=dropout, training=module.training)
    out = module.matmul_av(attn, value_states)
    return out.transpose(1, 2).contiguous(), attn


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_NAME, fp8_attention_forward)
    # Without a mask function of the same name HF builds no causal mask for a custom implementation.
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _is_attention_layer(m: nn.Module) -> bool:
    """HF attention layers call the attention interface; they carry a config and the
    grouped-query attributes the eager function reads."""
    return hasattr(m, "num_key_value_groups") and hasattr(m, "scaling") and hasattr(m, "config")


_CHILDREN: tuple[tuple[str, type[nn.Module]], ...] = (
    ("k_cache", KVCache), ("v_cache", KVCache), ("matmul_qk", Matmul), ("softmax", Softmax), ("matmul_av", Matmul),
)


def supports_hf_attention(model: nn.Module) -> bool:
    """True for HF models that pick their attention function through ``AttentionInterface``."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    return callable(can_set) and bool(can_set()) and any(_is_attention_layer(m) for m in model.modules())


# The attention ops we attach, by class name: selected only when the allowlist types name them.
ATTENTION_CLASSES = ("Matmul", "KVCache", "Softmax")


def wants_hf_attention(rules: "SelectionRules") -> bool:
    """Whether a run asks for HF attention ops: its allowlist ``types`` name one of
    :data:`ATTENTION_CLASSES` (decisions §6: by default we select what INC selects on a HF model,
    whose attention is functions, not modules)."""
    return any(t in rules.allow.types for t in ATTENTION_CLASSES)


def install_hf_attention_if_asked(model: nn.Module, rules: "SelectionRules") -> list[str]:
    """:func:`install_hf_attention` when the run's selection asks for attention ops, else nothing."""
    return install_hf_attention(model) if wants_hf_attention(rules) else []


def install_hf_attention(model: nn.Module) -> list[str]:
    """Attach ``Matmul``/``Softmax``/``KVCache`` children to every attention layer of a HF model and
    switch it to the ``fp8_orchestrator`` attention function. Idempotent.

    Returns:
        the qualified names of the attention layers equipped; empty for models that are not HF
        models with an attention interface (plain ``nn.Module`` models are left untouched).
    """
    if not supports_hf_attention(model):
        return []
    _register()
    names = []
    for name, layer in model.named_modules():
        if not _is_attention_layer(layer):
            continue
        for child, factory in _CHILDREN:
            existing = getattr(layer, child, None)
            if existing is None:
                layer.add_module(child, factory())
            elif not isinstance(existing, nn.Module):
                raise ValueError(
                    f"attention layer {name!r} already has an attribute {child!r} ({type(existing).__name__}); "
                    "it cannot be equipped with measurable attention ops"
                )
        names.append(name)
    current = model.config._attn_implementation
    if current != ATTENTION_NAME:
        setattr(model, _PREVIOUS_IMPL, current)
        model.set_attn_implementation(ATTENTION_NAME)
    return names


def uninstall_hf_attention(model: nn.Module) -> None:
    """Switch a model back to the attention function it had before :func:`install_hf_attention`
    (the attached children stay; they are unused afterwards)."""
    previous = getattr(model, _PREVIOUS_IMPL, None)
    if previous is not None:
        model.set_attn_implementation(previous)
        delattr(model, _PREVIOUS_IMPL)
