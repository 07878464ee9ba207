"""The export's safetensors files, written one tensor at a time: they read back as ``save_file``'s
files of the same tensors (safetensors' own reader is the reference), shard as
``huggingface_hub``'s splitter does, and the source checkpoint is read one tensor at a time."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.export.safetensors_files import (DTYPE_CODES, INDEX_FILE, SINGLE_FILE, TensorSpec, plan_shards,
                                                   read_specs, write_file, write_shards)
from orchestrator.export.source import HeldBytes, SourceTensors, nbytes
from orchestrator.export.writer import ExportError, split_fused_experts
from shards.families import family_for
from tests.family_models import tiny_config

METADATA = {"format": "pt", "fp8_orchestrator.scale_method": "maxabs_pow2"}


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor per dtype the export writes, with 0-d, empty and odd-sized ones among them."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPE_CODES):
        x = torch.randn(3 + i, 5, generator=g) * 50
        if dtype.is_floating_point:
            out[f"layer.{i}.{str(dtype)[6:]}"] = x.clamp(-400, 400).to(dtype)
        elif dtype is torch.bool:
            out[f"layer.{i}.bool"] = x > 0
        else:
            out[f"layer.{i}.{str(dtype)[6:]}"] = x.to(torch.int64).clamp(0 if dtype is torch.uint8 else -100, 100).to(dtype)
    out["scalar"] = torch.tensor(0.125)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["odd.u8"] = torch.arange(7, dtype=torch.uint8)
    return out


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Header entries (without ``__metadata__``), tensors and metadata of a safetensors file."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    with safe_open(str(path), framework="pt") as f:
        return header, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat = lambda t: t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def test_streamed_file_reads_back_as_save_files_file(tmp_path: Path) -> None:
    tensors = every_dtype()
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=METADATA)
    fetched: list[str] = []

    def fetch(name: str) -> torch.Tensor:
        fetched.append(name)
        return tensors[name]

    write_file(tmp_path / "ours.safetensors", [TensorSpec.of(k, t) for k, t in tensors.items()], fetch, METADATA)
    theirs, ours = read_file(tmp_path / "theirs.safetensors"), read_file(tmp_path / "ours.safetensors")
    assert ours[0] == theirs[0]  # dtype, shape and byte offsets of every tensor
    assert ours[2] == theirs[2] == METADATA
    assert ours[1].keys() == tensors.keys() and all(same_tensor(ours[1][k], tensors[k]) for k in tensors)
    assert (tmp_path / "ours.safetensors").stat().st_size == (tmp_path / "theirs.safetensors").stat().st_size
    assert sorted(fetched) == sorted(tensors) and len(fetched) == len(tensors)  # each tensor asked for once
    assert read_specs(tmp_path / "theirs.safetensors") == {k: TensorSpec.of(k, t) for k, t in tensors.items()}


def test_a_tensor_that_does_not_match_the_plan_is_refused_naming_it(tmp_path: Path) -> None:
    spec = TensorSpec("model.layers.0.mlp.up_proj.weight", torch.float8_e4m3fn, (4, 8))
    with pytest.raises(ExportError, match=r"'model.layers.0.mlp.up_proj.weight' arrived as torch.uint8 \(4, 8\)"):
        write_file(tmp_path / "x.safetensors", [spec], lambda name: torch.zeros(4, 8, dtype=torch.uint8), METADATA)
    with pytest.raises(ExportError, match="no data"):
        write_file(tmp_path / "y.safetensors", [spec], lambda name: spec.meta(), METADATA)
    with pytest.raises(ExportError, match="complex64"):
        TensorSpec.of("c", torch.zeros(2, dtype=torch.complex64))


def sizes_checkpoint(sizes: list[int]) -> dict[str, torch.Tensor]:
    """Tensors ``t00``, ``t01``, ... of the given byte sizes, keyed in an order other than sorted."""
    return {f"t{i:02d}": torch.full((n,), i, dtype=torch.uint8) for i, n in reversed(list(enumerate(sizes)))}


@pytest.mark.parametrize("max_bytes", [10, 17, 40, 1000])
def test_shards_are_huggingface_hubs_split_of_the_sorted_tensors(tmp_path: Path, max_bytes: int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = sizes_checkpoint([3, 9, 4, 10, 1, 7, 2, 8, 6, 5])  # none above the smallest limit
    hub = split_torch_state_dict_into_shards(dict(sorted(tensors.items())), max_shard_size=max_bytes)
    paths = write_shards(tmp_path, [TensorSpec.of(k, t) for k, t in tensors.items()], tensors.__getitem__, METADATA,
                         max_bytes)
    assert [p.name for p in paths] == list(hub.filename_to_tensors)
    for p in paths:
        assert sorted(read_file(p)[1]) == sorted(hub.filename_to_tensors[p.name])
    if hub.is_sharded:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert index == {"metadata": {"total_size": hub.metadata["total_size"]}, "weight_map": hub.tensor_to_filename}
    else:
        assert paths == [tmp_path / SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()


def test_a_tensor_above_the_limit_gets_a_file_of_its_own() -> None:
    specs = [TensorSpec.of(k, t) for k, t in sizes_checkpoint([3, 4, 30, 2, 2]).items()]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 10)] == [["t00", "t01"], ["t02"], ["t03", "t04"]]
    with pytest.raises(ExportError, match="max_shard_bytes=0"):
        plan_shards(specs, 0)


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe"])
def test_fused_source_experts_are_read_per_expert_keeping_two_fused_tensors(tmp_path: Path, fam: str) -> None:
    """A source that stores transformers 5's fused 3-D experts: each expert's projection reads as the
    in-memory split does, while at most two fused tensors (one layer's gate_up and down) are kept."""
    family = family_for(tiny_config(fam))
    g = torch.Generator().manual_seed(1)
    stored = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        stored[f"{prefix}.gate_up_proj"] = torch.randn(4, 2 * 6, 8, generator=g)
        stored[f"{prefix}.down_proj"] = torch.randn(4, 8, 6, generator=g)
        stored[f"model.layers.{layer}.input_layernorm.weight"] = torch.randn(8, generator=g)
    save_file(stored, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    expected = {family.disk_name(part): t for key, fused in stored.items()
                for part, t in split_fused_experts(key, fused, family).items()}
    held = HeldBytes()
    source = SourceTensors(tmp_path, ["model.layers.1.input_layernorm"], family, held)
    assert set(source.specs) == set(expected) - {"model.layers.1.input_layernorm.weight"}
    assert all(source.specs[n] == TensorSpec.of(n, expected[n]) for n in source.specs)
    largest_fused = max(nbytes(t) for t in stored.values())
    for name in sorted(source.specs):
        assert torch.equal(source.load(name), expected[name]), name
    # One layer's gate_up and down while its experts are read; two fused tensors at most at a layer change.
    assert largest_fused < held.peak <= 2 * largest_fused
    assert source.fused_reads == 4  # each fused tensor read once
    source.close()
    assert held.now == 0
    with pytest.raises(ExportError, match="no tensor 'model.layers.1.input_layernorm.weight'"):
        source.load("model.layers.1.input_layernorm.weight")
