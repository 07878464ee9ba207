"""The record of one model family and the error for a model outside the table."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from shards.errors import ShardError
from shards.fp8.smoothing import SmoothingGroup
from shards.measuring.expert_coverage import EXPERT_RE
from shards.tp.rules import RULE_SETS, Axis, ModelDims, ProjectionRule, check_shardable


class UnsupportedModelError(ShardError, ValueError):
    """A model whose family is not in the table (or that does not match its own config)."""


@dataclass(frozen=True)
class ExpertLayout:
    """How a family's routed experts are held in memory (transformers 5) and named per expert.

    Attributes:
        fused_class: class name of HF's module holding the fused 3-D expert parameters.
        gate, up, down: per-expert projection names, as the on-disk checkpoint names them
            (``w1``/``w3``/``w2`` for Mixtral, ``gate_proj``/``up_proj``/``down_proj`` otherwise).
        num_experts_attr: the config attribute with the number of routed experts.
        intermediate_attr: the config attribute with one expert's intermediate size.
    """

    fused_class: str
    gate: str
    up: str
    down: str
    num_experts_attr: str
    intermediate_attr: str

    @property
    def projections(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)


# An expert projection: ``<layer>.experts.<index>.<projection>`` (one pattern, shared with coverage).
EXPERT_NAME = EXPERT_RE


@dataclass(frozen=True)
class ModelFamily:
    """One row of the family table.

    Attributes:
        name: the family's name (README and messages).
        model_types: the HF ``config.model_type`` values it covers.
        rule_sets: names of ``shards.tp.rules.RULE_SETS`` its layers use.
        replicated: Linear path tails kept whole on every tp rank (``lm_head``, MLA's low-rank down
            projections).
        divided: config attributes tp divides (heads and intermediate sizes).
        experts: the MoE layout, None for dense families.
        high_precision: module classes that hold matmul weights and stay in high precision by design
            (MoE routers: vLLM loads them unquantized, and routing decides which expert runs).
        disk_renames: (in-model regex, on-disk replacement) pairs applied to state-dict names, in
            order (transformers 5 renames Mixtral's ``block_sparse_moe`` to ``mlp`` on load).
        extra_axes: the family's axes beyond the dense Llama ones, read from a config.
        keeps_head_dim: ``head_dim`` is a plain config key tp must keep (not MLA's own head sizes).
        inc_renames: (regex, replacement) pairs from INC / vLLM-Gaudi measurement names to ours.
        smoothing: the groups activation smoothing may fold per decoder layer (empty: the family
            cannot be smoothed, e.g. MoE experts reading a routed input).
    """

    name: str
    model_types: tuple[str, ...]
    rule_sets: tuple[str, ...]
    replicated: tuple[str, ...] = ("lm_head",)
    divided: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    experts: ExpertLayout | None = None
    high_precision: tuple[str, ...] = ()
    disk_renames: tuple[tuple[str, str], ...] = ()
    extra_axes: Callable[[Any], Mapping[str, Axis]] = field(default=lambda config: {})
    keeps_head_dim: bool = True
    inc_renames: tuple[tuple[str, str], ...] = ()
    smoothing: tuple[SmoothingGroup, ...] = ()

    @property
    def rules(self) -> tuple[ProjectionRule, ...]:
        return tuple(r for s in self.rule_sets for r in RULE_SETS[s])

    def dims(self, config: Any) -> ModelDims:
        """The global sizes the sharding table refers to."""
        return ModelDims.dense(config, **dict(self.extra_axes(config)))

    def local_config(self, config: Any, world: int) -> Any:
        """A copy of ``config`` with heads and intermediate sizes divided by ``world``.

        Raises:
            TensorParallelError: naming the first axis ``world`` does not divide.
        """
        dims = self.dims(config)
        check_shardable(dims, world)
        cfg = copy.deepcopy(config)
        if self.keeps_head_dim:
            cfg.head_dim = dims.head_dim  # HF derives it from hidden/heads otherwise, which would change it
        for attr in self.divided:
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                setattr(cfg, attr, value // world)
        return cfg

    def is_replicated(self, module_name: str) -> bool:
        """Whether a Linear is kept whole on every rank by design."""
        parts = module_name.split(".")
        return any(parts[-len(p.split(".")):] == p.split(".") for p in self.replicated)

    def disk_name(self, key: str) -> str:
        """The on-disk (HF checkpoint) name of an in-model state-dict key."""
        for pattern, repl in self.disk_renames:
            key = re.sub(pattern, repl, key)
        return key
