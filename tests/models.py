"""Tiny models built from a config with fixed seeds (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

LLAMA_VOCAB = 256


def tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, dtype: torch.dtype = torch.float32,
               initializer_range: float = 0.04) -> nn.Module:
    """A HF ``LlamaForCausalLM``: 2 layers, hidden 64, 4 heads of which 2 key/value heads (GQA).

    Embeddings are tied (as in SmolLM2). Why this matters for accuracy tests: with untied i.i.d.
    random weights the logits are Gaussian-like, the top-1/top-2 gap is small, and E4M3's ~3-4 %
    error per op flips 5-20 % of the argmaxes whatever the scales (measured: 78-94 %). Tied
    embeddings with ``initializer_range`` 0.04 give a model whose prediction depends on its
    layers (for ~17 % of positions it is not the input token) yet has margins a trained model
    would have: maxabs_pow2 keeps 97-98 % top-1 agreement over seeds 0-2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def llama_tokens(seed: int, batch: int, length: int) -> torch.Tensor:
    """Random token ids for the tiny Llama."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, LLAMA_VOCAB, (batch, length), generator=g)


def tiny_sequential(seed: int = 0, *, width: int = 32, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``Linear → ReLU → Linear → ReLU → Linear``; children are named "0" .. "4" as in INC's tests."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 16)
    ).to(dtype).eval()


def sequential_batches(seed: int, n: int, *, width: int = 32, rows: int = 8) -> list[torch.Tensor]:
    """``n`` random input batches for :func:`tiny_sequential`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g) * (1 + i) for i in range(n)]
