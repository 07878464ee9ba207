"""Module discovery: op types by class, allow/block rules, HF attention ops."""

from __future__ import annotations

import torch

import re

import pytest
from torch import nn

from shards.errors import DuplicateRegistrationError
from shards.model.discovery import (
    clean_name,
    discover,
    op_type_of,
    register_module_class,
    replace_found,
    supported_modules,
)
from shards.model.hf_attention import KVCache, Matmul, Softmax, install_hf_attention
from shards.model.selection import ModuleFilter, SelectionRules
from shards.tp.layers import ColumnParallelLinear
from tests.models import tiny_llama, tiny_sequential


@pytest.mark.parametrize(
    "module, op",
    [
        (nn.Linear(2, 3), "linear"),
        (nn.Conv2d(1, 2, 3), "linear"),
        (nn.EmbeddingBag(4, 2), "embedding"),
        (Matmul(), "matmul"),
        (KVCache(), "kv_cache"),
        (Softmax(), "softmax"),
        (ColumnParallelLinear(4, 4, tp_rank=0, tp_world=2), "linear"),
        (nn.ReLU(), None),
    ],
)
def test_op_type_of(module: nn.Module, op: str | None) -> None:
    found = op_type_of(module)
    assert (found.name if found else None) == op


def _rules(allow_names=(), allow_types=(), block_names=(), block_types=()) -> SelectionRules:
    return SelectionRules(
        allow=ModuleFilter(tuple(re.compile(n) for n in allow_names), tuple(allow_types)),
        block=ModuleFilter(tuple(re.compile(n) for n in block_names), tuple(block_types)),
    )


@pytest.mark.parametrize(
    "rules, expected",
    [
        (_rules(), ["0", "2", "4"]),
        (_rules(allow_names=["^2$"]), ["2"]),
        (_rules(allow_names=["4"], allow_types=["Conv2d"]), ["4"]),
        (_rules(block_names=["[02]"]), ["4"]),  # re.search: a pattern matches anywhere
        (_rules(block_types=["Linear"]), []),
        (_rules(allow_types=["ReLU"]), []),  # a type without an op type is never selected
    ],
)
def test_allow_and_block_rules(rules: SelectionRules, expected: list[str]) -> None:
    assert [f.name for f in discover(tiny_sequential(), rules)] == expected


def test_hf_llama_attention_ops_are_discovered() -> None:
    model = tiny_llama()
    assert install_hf_attention(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert install_hf_attention(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]  # idempotent
    ops = {f.name: f.op.name for f in supported_modules(model)}
    attn = "model.layers.1.self_attn"
    for child, op in [("k_cache", "kv_cache"), ("v_cache", "kv_cache"), ("matmul_qk", "matmul"),
                      ("softmax", "softmax"), ("matmul_av", "matmul"), ("q_proj", "linear"), ("o_proj", "linear")]:
        assert ops[f"{attn}.{child}"] == op
    assert "lm_head" not in ops  # tied to the embedding: stays high precision
    assert len(ops) == 2 * (7 + 5)


def test_tied_head_is_not_selected_an_untied_one_is() -> None:
    tied = tiny_llama()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head" not in {f.name for f in supported_modules(tied)}
    untied = tiny_llama()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert "lm_head" in {f.name for f in supported_modules(untied)}


def test_plain_models_get_no_attention_ops() -> None:
    model = tiny_sequential()
    assert install_hf_attention(model) == []
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "2", "3", "4"]


def test_compiled_names_are_cleaned() -> None:
    assert clean_name("_orig_mod.model.layers.0._orig_mod.q_proj") == "model.layers.0.q_proj"


def test_register_module_class_by_identity() -> None:
    class MyProjection(nn.Linear):
        pass

    assert op_type_of(MyProjection(2, 2)) is None
    register_module_class(MyProjection, "linear")
    assert op_type_of(MyProjection(2, 2)).name == "linear"
    with pytest.raises(DuplicateRegistrationError, match="MyProjection"):
        register_module_class(MyProjection, "linear")
    with pytest.raises(KeyError, match="unknown op type 'nope'"):
        register_module_class(nn.ReLU, "nope")


def test_found_modules_are_replaced_in_the_parent_they_were_found_in() -> None:
    model = tiny_llama(0)
    found = supported_modules(model)
    modules = dict(model.named_modules())
    assert all(f.parent is modules[f.path.rpartition(".")[0]] for f in found)
    for f in found:
        replace_found(f, nn.Identity())
    assert all(isinstance(model.get_submodule(f.path), nn.Identity) for f in found)
    assert supported_modules(model) == []


def test_a_shared_module_is_found_and_replaced_once_at_its_first_path() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    (found,) = supported_modules(model)
    assert found.path == "0.0" and found.parent is model[0]
    replace_found(found, new := nn.Identity())
    assert model[0][0] is new and model[1][0] is shared  # the first path only
    with pytest.raises(ValueError, match="root module"):
        replace_found(supported_modules(nn.Linear(2, 2))[0], new)


def test_tensor_parallel_layers_count_as_linear_for_allow_and_block_lists() -> None:
    """A config written for the unsharded model (types ["Linear"]) selects the same layers when sharded."""
    from shards.fp8.methods import PREDEFINED, ScalePlan
    from shards.tp.layers import RowParallelLinear

    model = nn.Sequential(ColumnParallelLinear(8, 8, tp_rank=0, tp_world=1, bias=False),
                          RowParallelLinear(8, 8, tp_rank=0, tp_world=1, all_reduce=None, bias=False))
    allow = SelectionRules(allow=ModuleFilter(types=("Linear",)))
    assert [f.name for f in discover(model, allow)] == ["0", "1"]
    assert discover(model, SelectionRules(block=ModuleFilter(types=("Linear",)))) == []
    assert [f.name for f in discover(model, SelectionRules(allow=ModuleFilter(names=(re.compile("^1$"),))))] == ["1"]
    found = discover(model, SelectionRules())
    assert found[0].type_names[:2] == ("ColumnParallelLinear", "Linear")
    plan = ScalePlan("MAXABS_POW2", PREDEFINED["MAXABS_POW2"], layer_types={"Linear": PREDEFINED["MAXABS_HW"]})
    assert plan.for_module("0", found[0].type_names) == PREDEFINED["MAXABS_HW"]
