"""The fingerprint of an in-memory model, for the stats store of the single-card API.

``orchestrator.driver.run_identity.model_fingerprint`` identifies a checkpoint by its files; a model the
user built or loaded in Python has no files we can trust, so this one reads the parameters
themselves: every parameter's name, shape and dtype (the layout) and a content hash.

The content hash reads every element of small parameters and, of large ones, :data:`BLOCKS`
contiguous blocks of :data:`BLOCK_ELEMENTS` elements spread evenly from the first element to the
last. Hashing all 135M parameters of a SmolLM2-size model costs about a second on two cores (an
evenly strided sample too: it touches every cache line), and a GPU model would have to be copied to
the host first; the blocks cost milliseconds and still tell two trainings, fine-tunes or seeds
apart (they change nearly every element). The layout catches any change of architecture or dtype.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

# Blocks hashed per large parameter, and elements per block; a parameter with at most
# BLOCKS * BLOCK_ELEMENTS elements is hashed whole.
BLOCKS = 16
BLOCK_ELEMENTS = 4096

FINGERPRINT_SOURCE = "module"


def _sample(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` that enter the content hash, as a contiguous CPU tensor."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= BLOCKS * BLOCK_ELEMENTS:
        return flat.contiguous().cpu()
    last = n - BLOCK_ELEMENTS
    starts = [i * last // (BLOCKS - 1) for i in range(BLOCKS)]  # the first and the last block included
    return torch.cat([flat[s : s + BLOCK_ELEMENTS] for s in starts]).cpu()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # A uint8 view reads the stored bits of any dtype (bf16 and FP8 have no numpy equivalent).
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def fingerprint_of_module(model: nn.Module) -> dict[str, object]:
    """Names, shapes and dtypes of every parameter plus a sampled content hash, as a JSON-able dict.

    Shared (tied) parameters count once, under their first name, as ``named_parameters`` gives
    them. Two model objects built the same way (same code, same weights) get the same fingerprint.

    Returns:
        ``{"source": "module", "tensors": n, "layout": hex16, "content": hex16}``.
    """
    layout: dict[str, list[object]] = {}
    content = hashlib.sha256()
    for name, p in model.named_parameters():
        layout[name] = [str(p.dtype).removeprefix("torch."), list(p.shape)]
        content.update(name.encode("utf-8"))
        content.update(_tensor_bytes(_sample(p)))
    layout_hash = hashlib.sha256(json.dumps(layout, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return {"source": FINGERPRINT_SOURCE, "tensors": len(layout), "layout": layout_hash,
            "content": content.hexdigest()[:16]}
