"""The fingerprint of an in-memory model, for the stats store of the single-card API.

``orchestrator.driver.run_identity.model_fingerprint`` identifies a checkpoint by its files; a model the
user built or loaded in Python has no files we can trust, so this one reads the parameters
themselves: every parameter's name, shape and dtype (the layout) and a content hash.

The content hash reads every element of small parameters and, of large ones, :data:`BLOCKS`
contiguous blocks of :data:`BLOCK_ELEMENTS` elements spread evenly from the first element to the
last. Hashing all 135M parameters of a SmolLM2-size model costs about a second on two cores (an
evenly strided sample too: it touches every cache line), and a GPU model would have to be copied to
the host first; the blocks cost a few milliseconds and still tell two trainings, fine-tunes or seeds
apart (they change nearly every element). The layout catches any change of architecture or dtype.

The fingerprint records its sampling (``"sample": [blocks, block elements]``) and a check
recomputes a stored fingerprint with the sampling it names (:func:`fingerprint_of_module`'s
``like``). Fingerprints without it were taken with 4,096-element blocks (:data:`LEGACY_SAMPLE`);
the blocks are 256 elements since hashing 35 MB of SmolLM2 samples took a fifth of its convert.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import operator
from json.encoder import encode_basestring_ascii
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

# Blocks hashed per large parameter, and elements per block; a parameter with at most
# BLOCKS * BLOCK_ELEMENTS elements is hashed whole.
BLOCKS = 16
BLOCK_ELEMENTS = 256
# The sampling of fingerprints that do not record theirs.
LEGACY_SAMPLE = (16, 4096)

FINGERPRINT_SOURCE = "module"


@functools.lru_cache(maxsize=1024)
def _byte_ranges(n: int, size: int, blocks: int, block: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` byte offsets of the sampled blocks of an ``n``-element tensor of ``size``-byte
    elements, the first and the last block included; computed once per shape (a model repeats a
    few shapes across its layers)."""
    return tuple((i * (n - block) // (blocks - 1) * size, (i * (n - block) // (blocks - 1) + block) * size)
                 for i in range(blocks))


def _sample(t: torch.Tensor, blocks: int, block: int) -> bytes | memoryview:
    """The stored bits of the elements of ``t`` that enter the content hash: all of them, or
    ``blocks`` blocks of ``block`` elements, the first and the last block included, back to back."""
    n = t.numel()
    flat = t.detach()
    if not flat.is_cpu:
        # Gather the blocks on the device; only they cross to the host.
        flat = flat.reshape(-1)
        if n > blocks * block:
            flat = torch.cat([flat[a : a + block] for a, _ in _byte_ranges(n, 1, blocks, block)])
        return memoryview(flat.cpu().view(torch.uint8).numpy())
    if n == 0:
        return b""
    if flat.ndim == 0 or not flat.is_contiguous():
        flat = flat.reshape(-1)  # dtype views need a last axis, and a contiguous one
    # A uint8 view reads the stored bits of any dtype (bf16 and FP8 have no numpy equivalent).
    data = memoryview(flat.view(torch.uint8).numpy()).cast("B")
    if n <= blocks * block:
        return data
    # One joined copy of the blocks (8 KB at the default sampling).
    return b"".join([data[a:b] for a, b in _byte_ranges(n, flat.element_size(), blocks, block)])


# Dtypes whose stored bytes are their elements, one after the other (not complex, not quantized).
_INTEGERS = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                       torch.uint32, torch.uint64})
_PLAIN = (nn.Parameter, torch.Tensor)  # subclasses may keep their elements elsewhere: _sample reads them


@dataclass(frozen=True)
class _Kind:
    """What the fingerprint needs of every parameter of one dtype and shape, computed once.

    Attributes:
        layout: ``[dtype name, shape]``, the parameter's entry in the layout, as JSON (what
            ``json.dumps`` writes of it).
        buffer: a ctypes array type over its bytes, to read them in place; None where the stored
            bytes are not plain elements (complex, quantized) or there are none: ``_sample`` reads them.
        sample: gives the sampled blocks of those bytes in one call (a loop of slices cost a third
            of the fingerprint); None when the parameter is hashed whole.
    """

    layout: str
    buffer: type[ctypes.Array[ctypes.c_char]] | None
    sample: Callable[[memoryview], tuple[memoryview, ...]] | None


@functools.lru_cache(maxsize=4096)
def _kind(dtype: torch.dtype, shape: torch.Size, blocks: int, block: int) -> _Kind:
    n, size = shape.numel(), dtype.itemsize
    plain = n > 0 and (dtype.is_floating_point or dtype in _INTEGERS)
    sample = None
    if n > blocks * block:
        ranges = _byte_ranges(n, size, blocks, block)
        first = ranges[0]
        sample = operator.itemgetter(*(slice(a, b) for a, b in ranges)) if len(ranges) > 1 else \
            (lambda data: (data[first[0] : first[1]],))
    return _Kind(json.dumps([_dtype_name(dtype), list(shape)]), ctypes.c_char * (n * size) if plain else None, sample)


@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sample_of(like: Mapping[str, object] | None) -> tuple[int, int]:
    if like is None:
        return BLOCKS, BLOCK_ELEMENTS
    recorded = like.get("sample")
    if isinstance(recorded, (list, tuple)) and len(recorded) == 2 and all(isinstance(v, int) for v in recorded):
        return int(recorded[0]), int(recorded[1])
    return LEGACY_SAMPLE


def fingerprint_of_module(model: nn.Module, *, like: Mapping[str, object] | None = None) -> dict[str, object]:
    """Names, shapes and dtypes of every parameter plus a sampled content hash, as a JSON-able dict.

    Shared (tied) parameters count once, under their first name, as ``named_parameters`` gives
    them. Two model objects built the same way (same code, same weights) get the same fingerprint.

    Args:
        like: a fingerprint taken earlier (a stats store's): sample the elements it sampled, so
            that the two compare equal exactly when the models do.

    Returns:
        ``{"source": "module", "tensors": n, "layout": hex16, "content": hex16, "sample": [16, 256]}``
        (no ``"sample"`` when ``like`` has none).
    """
    blocks, block = _sample_of(like)
    layout: dict[str, str] = {}
    # Every name and sample, hashed in one update at the end (a few MB at most): a call per
    # parameter costs more than hashing its sample. The bytes of a plain, contiguous CPU tensor
    # are read in place, through no tensor, array or view object of its own (torch's detach,
    # uint8 view and numpy() cost ~5 us a parameter); the model holds every parameter, so the
    # memory the pieces point at stays valid until they are joined.
    pieces: list[bytes | memoryview] = []
    add, extend = pieces.append, pieces.extend
    for name, p in model.named_parameters():
        kind = _kind(p.dtype, p.shape, blocks, block)
        layout[name] = kind.layout
        add(name.encode("utf-8"))
        if kind.buffer is None or type(p) not in _PLAIN or not p.is_cpu or p.layout is not torch.strided \
                or not p.is_contiguous() or p.is_neg():
            add(_sample(p, blocks, block))
        elif kind.sample is None:
            add(memoryview(kind.buffer.from_address(p.data_ptr())))
        else:
            extend(kind.sample(memoryview(kind.buffer.from_address(p.data_ptr()))))
    content = hashlib.sha256(b"".join(pieces))
    # json.dumps(layout, sort_keys=True) of the entries as lists, written from their JSON: a
    # third of its time.
    layout_json = "{" + ", ".join([encode_basestring_ascii(k) + ": " + layout[k] for k in sorted(layout)]) + "}"
    layout_hash = hashlib.sha256(layout_json.encode("utf-8")).hexdigest()[:16]
    out: dict[str, object] = {"source": FINGERPRINT_SOURCE, "tensors": len(layout), "layout": layout_hash,
                              "content": content.hexdigest()[:16]}
    if (blocks, block) != LEGACY_SAMPLE:
        out["sample"] = [blocks, block]
    return out
