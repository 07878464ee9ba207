"""The sharding table and the shard map of statistics (shards/tp/rules.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shards.families import family_for
from shards.tp.rules import (
    RULE_SETS,
    TP_RULES,
    Placement,
    ModelDims,
    Parallel,
    TensorParallelError,
    bias_index,
    check_shardable,
    merge_stat,
    rule_for,
    shard_slice,
    split_channel_slices,
    stat_shard,
    weight_index,
)

# Megatron's split for Llama, written out independently of the table.
EXPECTED_STYLE = {
    "q_proj": "column", "k_proj": "column", "v_proj": "column", "gate_proj": "column", "up_proj": "column",
    "o_proj": "row", "down_proj": "row",
}  # fmt: skip

# The dense Llama rows by projection name.
DENSE = {r.name: r for r in RULE_SETS["attention"] + RULE_SETS["mlp"]}

DIMS = ModelDims(hidden=48, intermediate=96, num_heads=8, num_kv_heads=4, head_dim=8)


def test_table_matches_megatron_split() -> None:
    dense = RULE_SETS["attention"] + RULE_SETS["mlp"]
    assert {r.name: r.parallel.value for r in dense} == EXPECTED_STYLE
    # Experts and shared experts are split like a dense MLP: gate/up by columns, down by rows.
    for set_name in ("experts", "mixtral_experts", "shared_experts"):
        assert [r.parallel.value for r in RULE_SETS[set_name]] == ["column", "column", "row"]


def test_rows_shared_by_rule_sets_agree() -> None:
    for rules in RULE_SETS.values():
        for r in rules:
            assert TP_RULES[r.path] == r


def test_table_covers_every_llama_linear_but_lm_head() -> None:
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=64)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    uncovered = [n for n in linears if rule_for(n) is None]
    assert uncovered == ["lm_head"]
    assert sum(rule_for(n) is not None for n in linears) == 7 * config.num_hidden_layers


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0.self_attn.q_proj", "q_proj"),
        ("model.layers.11.mlp.down_proj", "down_proj"),
        ("model.layers.0.self_attn.up_proj", None),  # right leaf, wrong parent
        ("lm_head", None),
        ("model.embed_tokens", None),
        ("q_proj", None),
        ("model.layers.1.mlp.experts.3.gate_proj", "gate_proj"),
        ("model.layers.1.mlp.experts.3.w2", "w2"),
        ("model.layers.1.mlp.experts.gate_proj", None),  # no expert index
        ("model.layers.1.mlp.shared_experts.down_proj", "down_proj"),
        ("model.layers.1.self_attn.kv_b_proj", "kv_b_proj"),
        ("model.layers.1.self_attn.kv_a_proj_with_mqa", None),  # MLA's low-rank down projection: replicated
    ],
)
def test_rule_for(name: str, expected: str | None) -> None:
    rule = rule_for(name)
    assert (rule.name if rule else None) == expected


@pytest.mark.parametrize("global_len, world", [(1, 1), (8, 1), (8, 2), (8, 4), (8, 8), (96, 3), (96, 6)])
def test_shard_slices_partition_the_axis(global_len: int, world: int) -> None:
    slices = [shard_slice(global_len, r, world) for r in range(world)]
    owner = np.full(global_len, -1)
    for r, s in enumerate(slices):
        assert s.stop - s.start == global_len // world
        assert (owner[s] == -1).all()
        owner[s] = r
    assert (owner == np.repeat(np.arange(world), global_len // world)).all()


@pytest.mark.parametrize(
    "global_len, rank, world, granule, match",
    [
        (10, 0, 4, 1, "cannot be split evenly over tp=4"),
        (32, 0, 4, 16, r"2 units of 16\) cannot be split evenly"),
        (8, 2, 2, 1, "rank 2 is outside"),
        (8, -1, 2, 1, "rank -1 is outside"),
        (8, 0, 0, 1, "outside a tp group of size 0"),
    ],
)
def test_shard_slice_refuses(global_len: int, rank: int, world: int, granule: int, match: str) -> None:
    with pytest.raises(TensorParallelError, match=match):
        shard_slice(global_len, rank, world, granule)


def test_shard_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        shard_slice(3, 0, 2)


def test_check_shardable_names_the_axis() -> None:
    check_shardable(DIMS, 4)
    with pytest.raises(TensorParallelError, match="'kv' axis"):
        check_shardable(DIMS, 8)  # 4 kv heads over 8 ranks


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("path", sorted(r.path for r in RULE_SETS["attention"] + RULE_SETS["mlp"]))
def test_weight_slices_reassemble_the_global_weight(path: str, world: int) -> None:
    rule = TP_RULES[path]
    name = rule.name
    out, inn = DIMS.features(rule.out_axis), DIMS.features(rule.in_axis)
    weight = torch.arange(out * inn, dtype=torch.float32).reshape(out, inn)
    bias = torch.arange(out, dtype=torch.float32)
    parts = [weight[weight_index(rule, DIMS, r, world)] for r in range(world)]
    dim = 0 if EXPECTED_STYLE[name] == "column" else 1
    assert all(p.shape[dim] == weight.shape[dim] // world for p in parts)
    assert torch.equal(torch.cat(parts, dim=dim), weight)
    biases = [bias[bias_index(rule, DIMS, r, world)] for r in range(world)]
    expected_bias = torch.cat(biases) if dim == 0 else biases[0]
    assert torch.equal(expected_bias, bias)
    if dim == 1:
        assert all(torch.equal(b, bias) for b in biases)  # row-parallel bias is whole on every rank


@pytest.mark.parametrize("name", ["q_proj", "k_proj", "v_proj"])
def test_attention_shards_hold_whole_heads(name: str) -> None:
    rule = DENSE[name]
    for r in range(4):
        rows, _ = weight_index(rule, DIMS, r, 4)
        assert rows.start % DIMS.head_dim == 0 and rows.stop % DIMS.head_dim == 0


def _maxabs(t: torch.Tensor, dim: int) -> np.ndarray:
    """Per-channel max-abs along ``dim`` (the channel axis), brute force over every other axis."""
    t = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    return t.abs().amax(dim=1).numpy().astype(np.float32)


def _tp1_and_shard_stats(name: str, world: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Per-channel stats of an unsharded projection and of each shard, computed from explicit slices."""
    rule = DENSE[name]
    g = torch.Generator().manual_seed(3)
    out, inn = DIMS.features(rule.out_axis), DIMS.features(rule.in_axis)
    weight = torch.randn(out, inn, generator=g)
    x = torch.randn(5, 3, inn, generator=g)
    full = {"inputs.0": _maxabs(x, -1), "params.weight": _maxabs(weight, 0), "outputs.0": _maxabs(x @ weight.T, -1)}
    shards = []
    size = (out if rule.parallel is Parallel.COLUMN else inn) // world
    for r in range(world):
        s = slice(r * size, (r + 1) * size)
        if rule.parallel is Parallel.COLUMN:
            w, xs = weight[s], x
            y = xs @ w.T
            shards.append({"inputs.0": _maxabs(xs, -1), "params.weight": _maxabs(w, 0), "outputs.0": _maxabs(y, -1)})
        else:
            w, xs = weight[:, s], x[..., s]
            shards.append({"inputs.0": _maxabs(xs, -1), "params.weight": _maxabs(w, 0)})
    return full, shards


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(r.name for r in RULE_SETS["attention"] + RULE_SETS["mlp"]))
def test_merged_shard_stats_equal_unsharded_stats(name: str, world: int) -> None:
    module = f"model.layers.0.{DENSE[name].path}"
    full, shard_stats = _tp1_and_shard_stats(name, world)
    for label in shard_stats[0]:
        maps = [stat_shard(module, label, DIMS, r, world) for r in range(world)]
        assert all(m.exact for m in maps)
        assert all(v[label].size == m.local.stop - m.local.start for v, m in zip(shard_stats, maps))
        merged = merge_stat([v[label] for v in shard_stats], maps)
        if label == "outputs.0":
            np.testing.assert_allclose(merged, full[label], rtol=1e-6)
        else:
            np.testing.assert_array_equal(merged, full[label])
        # A per-tensor value is the max over shards, whatever the channel layout.
        per_tensor = merge_stat([np.array([v[label].max()]) for v in shard_stats], maps)
        assert per_tensor.shape == (1,)
        np.testing.assert_allclose(per_tensor[0], full[label].max(), rtol=1e-6 if label == "outputs.0" else 0)


@pytest.mark.parametrize(
    "name, label, placement, exact",
    [
        ("q_proj", "inputs.0", Placement.FULL, True),
        ("q_proj", "outputs.0", Placement.SLICE, True),
        ("q_proj", "params.weight", Placement.SLICE, True),
        ("o_proj", "inputs.0", Placement.SLICE, True),
        ("o_proj", "params.weight", Placement.FULL, True),
        ("o_proj", "outputs.0", Placement.FULL, False),  # INC max-reduces the partial GEMM
        ("o_proj", "outputs.1", Placement.FULL, True),
    ],
)
def test_stat_shard_layout(name: str, label: str, placement: Placement, exact: bool) -> None:
    rule = DENSE[name]
    s = stat_shard(f"model.layers.2.{rule.path}", label, DIMS, 1, 2)
    assert (s.placement, s.exact) == (placement, exact)
    if placement is Placement.SLICE:
        assert s.local == slice(s.global_len // 2, s.global_len)


def test_stat_shard_of_replicated_module() -> None:
    s = stat_shard("lm_head", "inputs.0", DIMS, 1, 2, replicated_len=48)
    assert (s.placement, s.global_len, s.local) == (Placement.FULL, 48, slice(0, 48))
    with pytest.raises(TensorParallelError, match="'lm_head' is replicated.*replicated_len"):
        stat_shard("lm_head", "inputs.0", DIMS, 1, 2)


def test_stat_shard_unknown_label() -> None:
    match = r"'model.layers.0.mlp.up_proj' \(column-parallel\) has no statistic 'outputs.1'"
    with pytest.raises(TensorParallelError, match=match):
        stat_shard("model.layers.0.mlp.up_proj", "outputs.1", DIMS, 0, 2)


def test_merge_stat_refuses_gaps_and_misfits() -> None:
    maps = [stat_shard("model.layers.0.mlp.up_proj", "params.weight", DIMS, r, 2) for r in range(2)]
    with pytest.raises(TensorParallelError, match="exactly once"):
        merge_stat([np.ones(48), np.ones(48)], [maps[0], maps[0]])
    with pytest.raises(TensorParallelError, match="length 3 does not fit"):
        merge_stat([np.ones(3), np.ones(48)], maps)
    with pytest.raises(TensorParallelError, match="2 values for 1 shards"):
        merge_stat([np.ones(48), np.ones(48)], maps[:1])


def test_merge_stat_keeps_nan_as_data() -> None:
    maps = [stat_shard("model.layers.0.mlp.up_proj", "params.weight", DIMS, r, 2) for r in range(2)]
    a = np.full(48, np.nan, dtype=np.float32)
    merged = merge_stat([a, np.ones(48)], maps)
    assert np.isnan(merged[:48]).all() and (merged[48:] == 1).all()


def test_dims_from_config() -> None:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    assert family_for(config).dims(config) == ModelDims(64, 128, 4, 2, 16)


def test_split_channel_slices_lists_only_split_stats() -> None:
    keys = [
        ("model.layers.0.self_attn.k_proj", "outputs.0"),
        ("model.layers.0.self_attn.k_proj", "inputs.0"),
        ("model.layers.0.mlp.down_proj", "inputs.0"),
        ("model.layers.0.mlp.down_proj", "params.weight"),
        ("lm_head", "inputs.0"),
    ]
    # k_proj: 4 kv heads x 8 = 32 outputs, rank 1 of 2 holds 16..32; down_proj: 96 inputs, 48..96.
    assert split_channel_slices(keys, DIMS, 1, 2) == {
        ("model.layers.0.self_attn.k_proj", "outputs.0"): (16, 32, 32),
        ("model.layers.0.mlp.down_proj", "inputs.0"): (48, 96, 96),
    }
