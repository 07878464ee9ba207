"""A small Llama-family checkpoint built locally (no downloads) for the demo and the CLI tests.

Fixed seed, tied embeddings and ``initializer_range`` 0.04 (see tests/models.py for why: with
i.i.d. random untied weights the top-1/top-2 logit margins are too small for any FP8 scheme).
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_demo_checkpoint(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Save a fp32 ``LlamaForCausalLM`` (byte-level vocabulary of 256) with safetensors; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.04, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out
