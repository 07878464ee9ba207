"""The family table: every architecture we support, one entry each.

Adding a family is one entry here (reusing or adding a rule set in ``shards.tp.rules.RULE_SETS``)
plus its row in the family tests (tests/shards/test_families.py builds a tiny random model of
every entry and checks that every Linear is covered, every weight is read, and tp=k equals tp=1).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

from shards.families.registry import ExpertLayout, ModelFamily, UnsupportedModelError
from shards.fp8.smoothing import DENSE_GROUPS
from shards.tp.rules import Axis


def _moe_axes(config: Any) -> Mapping[str, Axis]:
    return {"expert_intermediate": Axis(config.moe_intermediate_size)}


def _mixtral_axes(config: Any) -> Mapping[str, Axis]:
    return {"expert_intermediate": Axis(config.intermediate_size)}


def _deepseek_axes(config: Any) -> Mapping[str, Axis]:
    heads = config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    kv_b = config.qk_nope_head_dim + config.v_head_dim
    axes = {
        "q": Axis(heads * qk, qk),
        "kv_b": Axis(heads * kv_b, kv_b),
        "attn_out": Axis(heads * config.v_head_dim, config.v_head_dim),
        "kv_lora": Axis(config.kv_lora_rank, 1, sharded=False),
        "expert_intermediate": Axis(config.moe_intermediate_size),
        "shared_intermediate": Axis(config.moe_intermediate_size * config.n_shared_experts),
    }
    if config.q_lora_rank is not None:
        axes["q_lora"] = Axis(config.q_lora_rank, 1, sharded=False)
    return axes


_GATE_UP_DOWN = dict(gate="gate_proj", up="up_proj", down="down_proj")

_ENTRIES = (
    # Llama covers SmolLM2 and Llama-2/3; Mistral and Qwen2 (biased q/k/v) share its layout, Qwen3
    # adds per-head q/k norms (replicated: a head never straddles two ranks).
    ModelFamily("Llama", ("llama",), ("attention", "mlp"), smoothing=DENSE_GROUPS),
    ModelFamily("Mistral", ("mistral",), ("attention", "mlp"), smoothing=DENSE_GROUPS),
    ModelFamily("Qwen2", ("qwen2",), ("attention", "mlp"), smoothing=DENSE_GROUPS),
    ModelFamily("Qwen3", ("qwen3",), ("attention", "mlp"), smoothing=DENSE_GROUPS),
    ModelFamily(
        "Mixtral", ("mixtral",), ("attention", "mixtral_experts"),
        experts=ExpertLayout("MixtralExperts", gate="w1", up="w3", down="w2", num_experts_attr="num_local_experts",
                             intermediate_attr="intermediate_size"),
        high_precision=("MixtralTopKRouter",),
        # transformers 5 calls the MoE block ``mlp``; checkpoints (and vLLM) call it block_sparse_moe.
        disk_renames=((r"^(model\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe."),),
        inc_renames=((r"^(model\.layers\.\d+)\.block_sparse_moe\.", r"\1.mlp."),),
        extra_axes=_mixtral_axes,
    ),
    ModelFamily(
        "Qwen3-MoE", ("qwen3_moe",), ("attention", "mlp", "experts"),
        divided=("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size"),
        experts=ExpertLayout("Qwen3MoeExperts", **_GATE_UP_DOWN, num_experts_attr="num_experts",
                             intermediate_attr="moe_intermediate_size"),
        high_precision=("Qwen3MoeTopKRouter",),
        extra_axes=_moe_axes,
    ),
    ModelFamily(
        "DeepSeek-V3", ("deepseek_v3",), ("mla_attention", "mlp", "experts", "shared_experts"),
        replicated=("lm_head", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        divided=("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size"),
        experts=ExpertLayout("DeepseekV3Experts", **_GATE_UP_DOWN, num_experts_attr="n_routed_experts",
                             intermediate_attr="moe_intermediate_size"),
        high_precision=("DeepseekV3TopkRouter",),
        extra_axes=_deepseek_axes,
        inc_renames=((r"\.self_attn\.mla_attn\.impl\.kv_b_proj$", ".self_attn.kv_b_proj"),),
        keeps_head_dim=False,  # MLA head sizes are their own config keys
    ),
)


def _index() -> Mapping[str, ModelFamily]:
    table: dict[str, ModelFamily] = {}
    for fam in _ENTRIES:
        for mt in fam.model_types:
            if mt in table:
                raise ValueError(f"model_type {mt!r} is listed under families {table[mt].name!r} and {fam.name!r}")
            table[mt] = fam
    return MappingProxyType(table)


FAMILIES: Mapping[str, ModelFamily] = _index()


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def family_for(config: Any) -> ModelFamily:
    """The family of a HF config; one named error for a ``model_type`` outside the table."""
    model_type = getattr(config, "model_type", None)
    if model_type is None and isinstance(config, dict):
        model_type = config.get("model_type")
    fam = FAMILIES.get(str(model_type))
    if fam is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported model family; supported: "
            f"{', '.join(supported_model_types())}. Adding one is an entry in shards/families/catalog.py"
        )
    return fam


def family_or_none(config: Any) -> ModelFamily | None:
    """The family of a HF config (object or ``config.json`` dict); None outside the table, for the
    callers that handle a model without a family (an encoder made of Linears keeps its names)."""
    try:
        return family_for(config)
    except UnsupportedModelError:
        return None


def family_of_model(model: nn.Module) -> ModelFamily | None:
    """The family of a HF model, None for a model without a HF config (``nn.Sequential``...).

    Raises:
        UnsupportedModelError: a HF model whose ``model_type`` is not in the table.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) is None:
        return None
    return family_for(config)
