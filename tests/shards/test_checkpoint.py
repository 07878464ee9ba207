"""Building tp shards of a HF Llama from a safetensors checkpoint (shards/tp/checkpoint.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shards.tp import checkpoint as ckpt
from shards.tp.checkpoint import CheckpointError, CheckpointNotFoundError, build_tp_shard, local_config, read_config
from shards.errors import ShardError
from shards.model.op_types import op_type_of_class
from shards.tp.rules import TensorParallelError
from tests.shards.tp_fixtures import (
    ThreadSumAllReduce,
    make_tiny_llama,
    reference_model,
    run_ranks,
    sample_ids,
    tiny_llama_bias_dir,
    tiny_llama_dir,
)

__all__ = ["tiny_llama_bias_dir", "tiny_llama_dir"]  # fixtures used by name below

# The tiny model's slices for tp=2, rank r, written out by hand: (dim, size) of the split axis.
# hidden 64, 4 heads x 16, 2 kv heads x 16, intermediate 128.
TP2_SPLIT = {
    "self_attn.q_proj.weight": (0, 32),
    "self_attn.k_proj.weight": (0, 16),
    "self_attn.v_proj.weight": (0, 16),
    "self_attn.o_proj.weight": (1, 32),
    "mlp.gate_proj.weight": (0, 64),
    "mlp.up_proj.weight": (0, 64),
    "mlp.down_proj.weight": (1, 64),
    "self_attn.q_proj.bias": (0, 32),
    "self_attn.k_proj.bias": (0, 16),
    "self_attn.v_proj.bias": (0, 16),
    "mlp.gate_proj.bias": (0, 64),
    "mlp.up_proj.bias": (0, 64),
}


def _tp_logits(path: Path, world: int, ids: torch.Tensor) -> list[torch.Tensor]:
    fake = ThreadSumAllReduce(world)
    shards = [build_tp_shard(path, r, world, fake.reducer(r) if world > 1 else None) for r in range(world)]

    def run(rank: int) -> torch.Tensor:
        with torch.no_grad():
            return shards[rank].model(ids).logits

    return run_ranks(world, run)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_bias_dir"])
def test_tp_logits_equal_unsharded(fixture: str, world: int, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    ids = sample_ids()
    with torch.no_grad():
        expected = reference_model(path)(ids).logits
    for logits in _tp_logits(path, world, ids):
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_parameters_are_the_global_tensors_sliced(tiny_llama_bias_dir: Path, rank: int) -> None:
    full = load_file(tiny_llama_bias_dir / "model.safetensors")
    shard = build_tp_shard(tiny_llama_bias_dir, rank, 2, ThreadSumAllReduce(2).reducer(rank))
    params = dict(shard.model.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        source = full.get(name, full["model.embed_tokens.weight"] if name == "lm_head.weight" else None)
        assert source is not None, name
        split = next((v for k, v in TP2_SPLIT.items() if name.endswith(k)), None)
        if split is None:  # replicated: embeddings, norms, lm_head, row-parallel bias
            expected = source
        else:
            dim, size = split
            expected = source.narrow(dim, rank * size, size)
        assert torch.equal(p, expected), name


def test_reads_only_this_ranks_slices(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: dict[str, tuple[int, ...]] = {}
    original = ckpt.SafetensorsReader.read

    def recording_read(self: ckpt.SafetensorsReader, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        t = original(self, name, index)
        read[name] = tuple(t.shape)
        return t

    monkeypatch.setattr(ckpt.SafetensorsReader, "read", recording_read)
    build_tp_shard(tiny_llama_dir, 1, 2, ThreadSumAllReduce(2).reducer(1))
    stored = {k: tuple(v.shape) for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    assert read.keys() == stored.keys()
    for name, shape in read.items():
        split = next((v for k, v in TP2_SPLIT.items() if name.endswith(k)), None)
        expected = list(stored[name])
        if split is not None:
            expected[split[0]] //= 2
        assert shape == tuple(expected), name


def test_projection_classes_and_op_types(tiny_llama_dir: Path) -> None:
    for world in (1, 2):
        model = build_tp_shard(tiny_llama_dir, 0, world, ThreadSumAllReduce(world).reducer(0)).model
        kinds = {n.split(".")[-1]: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert kinds == {
            "q_proj": "ColumnParallelLinear", "k_proj": "ColumnParallelLinear", "v_proj": "ColumnParallelLinear",
            "gate_proj": "ColumnParallelLinear", "up_proj": "ColumnParallelLinear",
            "o_proj": "RowParallelLinear", "down_proj": "RowParallelLinear", "lm_head": "Linear",
        }  # fmt: skip
        ops = {op_type_of_class(c).name for c in kinds.values()}  # type: ignore[union-attr]
        assert ops == {"linear", "row_parallel_linear"}


def test_local_config_divides_heads(tiny_llama_dir: Path) -> None:
    config = read_config(tiny_llama_dir)
    local = local_config(config, 2)
    got = (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size, local.head_dim)
    assert got == (2, 1, 64, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 128)
    shard = build_tp_shard(tiny_llama_dir, 0, 2, ThreadSumAllReduce(2).reducer(0))
    assert shard.model.config.num_attention_heads == 2 and shard.global_config.num_attention_heads == 4
    assert shard.dims.num_kv_heads == 2


def test_indexed_multi_file_checkpoint(tmp_path: Path, tiny_llama_dir: Path) -> None:
    model = reference_model(tiny_llama_dir)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = sample_ids(seed=11)
    with torch.no_grad():
        expected = model(ids).logits
    for logits in _tp_logits(tmp_path, 2, ids):
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_dtype_override(tiny_llama_dir: Path) -> None:
    model = build_tp_shard(tiny_llama_dir, 0, 1, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


def test_too_many_ranks_for_kv_heads(tiny_llama_dir: Path) -> None:
    with pytest.raises(TensorParallelError, match="'kv' axis.*tp=4"):
        build_tp_shard(tiny_llama_dir, 0, 4, lambda t: t)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no config.json") as e:
        build_tp_shard(tmp_path / "nowhere", 0, 1)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ShardError)


def test_missing_weights_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        build_tp_shard(tmp_path, 0, 1)


def _rewrite(src: Path, dst: Path, change: dict[str, torch.Tensor | None]) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for k, v in change.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path: Path, tiny_llama_dir: Path) -> None:
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(tiny_llama_dir, tmp_path / "c", {key: None})
    with pytest.raises(CheckpointError, match=f"'{key}' is missing"):
        build_tp_shard(tmp_path / "c", 0, 1)


def test_wrong_shape_is_named(tmp_path: Path, tiny_llama_dir: Path) -> None:
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(tiny_llama_dir, tmp_path / "c", {key: torch.zeros(64, 48)})
    with pytest.raises(CheckpointError, match=rf"'{key}'.*shape \(64, 48\), the config gives \(64, 64\)"):
        build_tp_shard(tmp_path / "c", 1, 2, lambda t: t)


def test_bias_checkpoint_fixture_is_tied_and_biased(tiny_llama_bias_dir: Path) -> None:
    # Guards the fixture itself: the bias test above is only meaningful with nonzero biases.
    stored = load_file(tiny_llama_bias_dir / "model.safetensors")
    assert "lm_head.weight" not in stored
    assert stored["model.layers.0.self_attn.o_proj.bias"].abs().min() > 0


def test_fixture_is_deterministic(tmp_path: Path, tiny_llama_dir: Path) -> None:
    make_tiny_llama(tmp_path)
    a, b = load_file(tmp_path / "model.safetensors"), load_file(tiny_llama_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
