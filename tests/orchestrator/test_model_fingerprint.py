"""Fingerprint of an in-memory model: equal for equal models, different for any other, fast."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
from torch import nn

from orchestrator.driver.module_fingerprint import BLOCK_ELEMENTS, BLOCKS, LEGACY_SAMPLE, fingerprint_of_module
from tests.models import tiny_llama, tiny_sequential


def test_equal_models_have_equal_fingerprints() -> None:
    a, b = fingerprint_of_module(tiny_sequential(0)), fingerprint_of_module(tiny_sequential(0))
    assert a == b and a["source"] == "module" and a["tensors"] == 6
    json.dumps(a)  # it goes into the store's JSON attributes


def test_layout_is_names_dtypes_and_shapes() -> None:
    model = tiny_sequential(0)
    layout = {"0.weight": ["float32", [64, 32]], "0.bias": ["float32", [64]], "2.weight": ["float32", [32, 64]],
              "2.bias": ["float32", [32]], "4.weight": ["float32", [16, 32]], "4.bias": ["float32", [16]]}
    expected = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint_of_module(model)["layout"] == expected


def test_layout_of_names_json_escapes_and_sorts() -> None:
    model = nn.Module()
    shapes = {"b": (3,), "a": (2, 2), "ü": (1,), 'q"uote\\': (4,), "Z": ()}
    for name, shape in shapes.items():
        model.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=torch.float16), requires_grad=False))
    layout = {name: ["float16", list(shape)] for name, shape in shapes.items()}
    expected = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint_of_module(model)["layout"] == expected


@pytest.mark.parametrize(
    "other",
    [pytest.param(lambda: tiny_sequential(1), id="seed"),
     pytest.param(lambda: tiny_sequential(0, dtype=torch.bfloat16), id="dtype"),
     pytest.param(lambda: tiny_sequential(0, width=48), id="width")],
)
def test_other_models_differ(other) -> None:  # type: ignore[no-untyped-def]
    a, b = fingerprint_of_module(tiny_sequential(0)), fingerprint_of_module(other())
    assert a["content"] != b["content"]


def test_small_parameters_are_hashed_whole() -> None:
    model = tiny_sequential(0)
    before = fingerprint_of_module(model)
    with torch.no_grad():
        model[2].weight[17, 41] += 2.0**-20  # one element, a tiny change
    after = fingerprint_of_module(model)
    assert after["layout"] == before["layout"] and after["content"] != before["content"]


def _big(n: int) -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(n), requires_grad=False)
    return m


@pytest.mark.parametrize("index", [0, -1, BLOCK_ELEMENTS - 1])
def test_large_parameters_hash_blocks_at_both_ends(index: int) -> None:
    model = _big(BLOCKS * BLOCK_ELEMENTS * 10)
    before = fingerprint_of_module(model)
    with torch.no_grad():
        model.w[index] = 1.0
    assert fingerprint_of_module(model)["content"] != before["content"]


def test_large_parameters_are_sampled() -> None:
    # The sample is BLOCKS blocks spread evenly; an element between two blocks is not read.
    n = BLOCKS * BLOCK_ELEMENTS * 10
    model = _big(n)
    before = fingerprint_of_module(model)
    with torch.no_grad():
        model.w[BLOCK_ELEMENTS + 10] = 1.0  # block 1 starts near n / (BLOCKS - 1)
    assert fingerprint_of_module(model) == before


def test_fingerprint_records_its_sampling() -> None:
    assert fingerprint_of_module(tiny_sequential(0))["sample"] == [BLOCKS, BLOCK_ELEMENTS]


def test_a_stored_fingerprint_is_recomputed_with_its_own_sampling() -> None:
    # Stores written before the sampling was recorded hold fingerprints of 4,096-element blocks:
    # their content hash, computed here from its definition, must still match the same model.
    blocks, block = LEGACY_SAMPLE
    model = _big(blocks * block * 3)
    with torch.no_grad():
        model.w.copy_(torch.randn(model.w.numel(), generator=torch.Generator().manual_seed(0)))
    n = model.w.numel()
    starts = [i * (n - block) // (blocks - 1) for i in range(blocks)]
    sample = b"".join(model.w.detach()[s : s + block].numpy().tobytes() for s in starts)
    stored = dict(fingerprint_of_module(model))
    del stored["sample"]
    stored["content"] = hashlib.sha256(b"w" + sample).hexdigest()[:16]
    assert fingerprint_of_module(model, like=stored) == stored
    assert fingerprint_of_module(model)["content"] != stored["content"]  # today's blocks are other elements


class _TaggedParameter(nn.Parameter):
    """A parameter subclass (as quantization libraries define): read through torch, not in place."""


def _mixed() -> nn.Module:
    """Parameters of every kind the hash reads: large and small, 2-D, 0-d, empty, a transposed
    (non-contiguous) view, a view starting inside its storage, 1-, 2-, 4-, 8-byte and complex
    elements, integers and booleans, a parameter subclass."""
    g = torch.Generator().manual_seed(0)
    m = nn.Module()
    tensors = {"big_bf16": torch.randn(300, 70, generator=g).to(torch.bfloat16),
               "transposed": torch.randn(90, 120, generator=g).t(),
               "scalar": torch.tensor(3.5),
               "empty": torch.zeros(0),
               "fp8": torch.randn(64, generator=g).to(torch.float8_e4m3fn),
               "big_f64": torch.randn(5000, generator=g, dtype=torch.float64),
               "offset_view": torch.randn(9000, generator=g)[123:],
               "int32": torch.randint(-1000, 1000, (5000,), generator=g, dtype=torch.int32),
               "bool": torch.rand(77, generator=g) > 0.5,
               "complex": torch.randn(4500, generator=g, dtype=torch.complex64)}
    for name, t in tensors.items():
        m.register_parameter(name, nn.Parameter(t, requires_grad=False))
    m.register_parameter("subclass", _TaggedParameter(torch.randn(6000, generator=g), requires_grad=False))
    assert not m.transposed.is_contiguous() and m.offset_view.storage_offset() == 123
    return m


@pytest.mark.parametrize("sample", [(BLOCKS, BLOCK_ELEMENTS), LEGACY_SAMPLE, (3, 7), (2, 1)])
def test_content_hash_is_its_definition(sample: tuple[int, int]) -> None:
    """Each parameter's name, then its elements' stored bytes in row-major order: all of them, or
    ``blocks`` blocks of ``block`` elements starting at ``i * (n - block) // (blocks - 1)``."""
    blocks, block = sample
    model = _mixed()
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().contiguous().reshape(-1)
        n = flat.numel()
        spans = [(0, n)] if n <= blocks * block else [
            (i * (n - block) // (blocks - 1), i * (n - block) // (blocks - 1) + block) for i in range(blocks)]
        h.update(name.encode() + b"".join(flat[a:b].view(torch.uint8).numpy().tobytes() for a, b in spans))
    like = {"sample": list(sample)} if sample != LEGACY_SAMPLE else {}
    assert fingerprint_of_module(model, like=like)["content"] == h.hexdigest()[:16]


def test_tied_parameters_count_once() -> None:
    model = tiny_llama(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert fingerprint_of_module(model)["tensors"] == len(list(model.named_parameters()))


def test_fp8_parameters_are_read_by_their_bits() -> None:
    m = _big(8)
    m.w = nn.Parameter(torch.arange(8, dtype=torch.float32).to(torch.float8_e4m3fn), requires_grad=False)
    before = fingerprint_of_module(m)
    m.w.data[3] = torch.tensor(5.0).to(torch.float8_e4m3fn)
    assert fingerprint_of_module(m)["content"] != before["content"]


def test_135m_parameters_take_well_under_half_a_second() -> None:
    # SmolLM2-135M's parameter shapes in bf16 (30 layers, hidden 576, 49152 tied embeddings),
    # left uninitialised: only the sampled blocks are read.
    shapes = [(49152, 576)] + [s for _ in range(30) for s in
                               [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536),
                                (576,), (576,)]]
    model = nn.Module()
    model.p = nn.ParameterList([nn.Parameter(torch.empty(s, dtype=torch.bfloat16), requires_grad=False) for s in shapes])
    assert sum(p.numel() for p in model.parameters()) > 134_000_000
    start = time.perf_counter()
    fingerprint_of_module(model)
    assert time.perf_counter() - start < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fingerprint_does_not_depend_on_the_device() -> None:
    # Measured on a GPU, converted on the host (or the other way round): the same model.
    assert fingerprint_of_module(tiny_sequential(0).cuda()) == fingerprint_of_module(tiny_sequential(0))
