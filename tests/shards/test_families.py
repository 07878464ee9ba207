"""The model-family table (shards/families): every family loads, shards and unfuses its experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from shards.tp.checkpoint import CheckpointError, build_tp_shard
from shards.families import FAMILIES, UnfusedExperts, UnsupportedModelError, family_for, install_family
from shards.families.registry import EXPERT_NAME
from shards.tp.layers import ColumnParallelLinear, RowParallelLinear
from shards.tp.rules import TensorParallelError, rule_for
from tests.family_models import FAMILY_NAMES, MOE_FAMILIES, family_tokens, tiny_config, tiny_model
from tests.shards.tp_fixtures import ThreadSumAllReduce, run_ranks


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tiny model saved with ``save_pretrained`` (per-expert names on disk)."""
    out = {}
    for fam in FAMILY_NAMES:
        path = tmp_path_factory.mktemp(fam)
        tiny_model(fam).save_pretrained(path)
        out[fam] = path
    return out


def _reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids, use_cache=False).logits


def _tp_logits(path: Path, world: int, ids: torch.Tensor) -> list[torch.Tensor]:
    fake = ThreadSumAllReduce(world)
    shards = [build_tp_shard(path, r, world, fake.reducer(r) if world > 1 else None) for r in range(world)]

    def run(rank: int) -> torch.Tensor:
        with torch.no_grad():
            return shards[rank].model(input_ids=ids, use_cache=False).logits

    return run_ranks(world, run)


def test_table_lists_the_issue_families() -> None:
    assert set(FAMILY_NAMES) <= set(FAMILIES)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_tp_logits_equal_hf(family_dirs: dict[str, Path], fam: str, world: int) -> None:
    ids = family_tokens(3, 2, 10)
    expected = _reference_logits(family_dirs[fam], ids)
    for logits in _tp_logits(family_dirs[fam], world, ids):
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_every_linear_is_sharded_or_replicated_by_design(fam: str) -> None:
    config = tiny_config(fam)
    family = family_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    install_family(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        assert (rule_for(name) is not None) != family.is_replicated(name), name
    assert not [n for n, p in model.named_parameters() if p.ndim > 2]


@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_shard_holds_a_slice_of_every_expert(family_dirs: dict[str, Path], fam: str) -> None:
    config = tiny_config(fam)
    layout = family_for(config).experts
    assert layout is not None
    shard = build_tp_shard(family_dirs[fam], 1, 2, ThreadSumAllReduce(2).reducer(1))
    experts = [m for m in shard.model.modules() if isinstance(m, UnfusedExperts)]
    assert experts and all(len(e) == getattr(config, layout.num_experts_attr) for e in experts)
    inter = getattr(config, layout.intermediate_attr)
    for e in experts:
        for expert in e:
            gate, down = getattr(expert, layout.gate), getattr(expert, layout.down)
            assert isinstance(gate, ColumnParallelLinear) and isinstance(down, RowParallelLinear)
            assert gate.weight.shape == (inter // 2, config.hidden_size)
            assert down.weight.shape == (config.hidden_size, inter // 2)


@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_expert_weights_are_the_checkpoints_per_expert_tensors(family_dirs: dict[str, Path], fam: str) -> None:
    family = family_for(tiny_config(fam))
    disk = load_file(str(family_dirs[fam] / "model.safetensors"))
    shard = build_tp_shard(family_dirs[fam], 0, 2, ThreadSumAllReduce(2).reducer(0))
    checked = 0
    for key, t in shard.model.state_dict().items():
        m = EXPERT_NAME.match(key.removesuffix(".weight"))
        if m is None:
            continue
        full = disk[family.disk_name(key)]
        rule = rule_for(key.removesuffix(".weight"))
        assert rule is not None
        want = full[: full.shape[0] // 2] if rule.weight_shard_dim == 0 else full[:, : full.shape[1] // 2]
        torch.testing.assert_close(t, want, rtol=0, atol=0)
        checked += 1
    n_layers = sum(1 for k in disk if k.endswith("experts.0." + family.experts.gate + ".weight"))
    assert checked == 3 * 4 * n_layers > 0


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe"])
def test_checkpoint_with_fused_expert_tensors(tmp_path: Path, fam: str) -> None:
    """A checkpoint saved with transformers 5's in-memory (fused) names loads the same."""
    model = tiny_model(fam)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    ids = family_tokens(4, 2, 9)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for logits in _tp_logits(tmp_path, 2, ids):
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_unknown_family_is_refused_by_name() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*supported: deepseek_v3, llama"):
        family_for(GPT2Config())


def test_single_card_refuses_a_model_whose_weights_would_stay_high_precision() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2': weights transformer\.h\.0\.attn\.c_attn\.weight"):
        install_family(model)


def test_single_card_accepts_an_unknown_family_made_of_linears() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                 vocab_size=32))
    assert install_family(model) is None


@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_unfusing_in_memory_keeps_logits_and_shares_storage(fam: str) -> None:
    model = tiny_model(fam)
    ids = family_tokens(5, 2, 8)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    fused = {n: p.data_ptr() for n, p in model.named_parameters() if p.ndim == 3}
    install_family(model)
    install_family(model)  # idempotent
    with torch.no_grad():
        after = model(ids, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=0, atol=2e-6)
    assert fused and not [n for n, p in model.named_parameters() if p.ndim == 3]


def test_tp_that_does_not_divide_the_experts_intermediate_is_named() -> None:
    config = tiny_config("qwen3_moe", moe_intermediate_size=15)
    with pytest.raises(TensorParallelError, match="'expert_intermediate' axis: axis of length 15"):
        family_for(config).local_config(config, 2)


def test_checkpoint_missing_an_expert_tensor_names_it(tmp_path: Path, family_dirs: dict[str, Path]) -> None:
    src = family_dirs["mixtral"]
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.experts\.2\.w3\.weight' is missing"):
        build_tp_shard(tmp_path, 0, 1)
