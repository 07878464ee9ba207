"""Tiny random configs of every supported model family (no downloads), shared by the tests.

Sizes are the smallest that keep each family's structure: GQA (4 query / 2 KV heads, so tp=2
splits whole heads), MoE layers with 4 routed experts of which 2 per token, DeepSeek's MLA with a
q LoRA rank, one dense layer before the MoE ones and a shared expert. Vocab 128.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3")
MOE_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
VOCAB = 128

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05)


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The HF config of a tiny model of ``model_type`` (one of :data:`FAMILY_NAMES`)."""
    from transformers import AutoConfig

    kw: dict[str, Any] = dict(_COMMON, intermediate_size=64)
    if model_type == "qwen3":
        kw.update(head_dim=8)
    if model_type == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True)
    if model_type == "deepseek_v3":
        kw.update(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  rope_interleave=False, num_hidden_layers=3)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A random HF causal LM of ``model_type`` with a fixed seed, in eval mode.

    MoE routers are given random weights (HF initialises some to zero, which would route every
    token to the same experts).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.ndim == 2:
                p.normal_(0.0, 0.5)
    return model


def family_tokens(seed: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def idle_expert_mixtral(seed: int = 0) -> nn.Module:
    """A tiny top-1 Mixtral whose router never picks experts 2 and 3.

    Each layer's router rows are ``-10v, 10v, 5v, 0`` for a random ``v``: the top-1 of
    ``(-10, 10, 5, 0)·(v·x)`` is expert 1 when ``v·x > 0`` and expert 0 otherwise.
    """
    model = tiny_model("mixtral", seed, num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            v = torch.randn(w.shape[1])
            w.copy_(torch.stack([-10 * v, 10 * v, 5 * v, 0 * v]))
    return model
