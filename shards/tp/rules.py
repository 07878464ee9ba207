"""The one sharding table for tensor-parallel HF decoders (Megatron style), dense and MoE.

Column-parallel projections split the weight ``[out, in]`` along ``out`` (dim 0): each shard
produces its own slice of the output features from the full input. Row-parallel ones split along
``in`` (dim 1): each shard multiplies its slice of the input features and the partial outputs are
summed by an all-reduce. Every other module (embeddings, norms, routers, low-rank MLA down
projections, lm_head) is replicated.

MoE experts are tensor-sliced like a dense MLP (decisions §6): every rank holds a slice of *every*
expert (gate/up split along the expert's intermediate axis, down along its input), so every rank
sees every routed token and tp=k gives exactly tp=1's per-expert statistics, scales and FP8
weights. Expert parallelism (whole experts per rank) would make each rank measure only its
experts, which is the vLLM-Gaudi calibration gap users complain about.

Rows are matched on the tail of a qualified module name, ``*`` standing for an expert index, so one
table serves every family of ``shards.families`` (a family names the rule sets it uses and the
sizes of the axes). The same table tells the stats store how a shard's per-channel statistic maps
to global (tp=1) coordinates (its ``Placement``): a slice of the global channel axis, or the full
axis, whose shards' values combine with the statistic's merge (``stats_store.reduce``: max for
max-abs). Placement says *where* a shard's values sit, a merge *how* values combine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from shards.errors import ShardError


class TensorParallelError(ShardError, ValueError):
    """A model or a statistic that cannot be sharded as asked (sizes not divisible, unknown label)."""


class Parallel(str, enum.Enum):
    """How a projection's weight is split across the tp group."""

    COLUMN = "column"  # split output features; input replicated; no communication
    ROW = "row"  # split input features; partial outputs all-reduced (sum)


class Placement(str, enum.Enum):
    """Where a shard's values of one per-channel statistic sit on the global channel axis."""

    SLICE = "slice"  # a shard holds its slice of the global channel axis: slices concatenate
    FULL = "full"  # every shard holds the whole axis: values combine elementwise (max for max-abs)


@dataclass(frozen=True)
class Axis:
    """A named feature axis: its global length, the unit it is cut in, and whether tp splits it."""

    features: int
    granule: int = 1
    sharded: bool = True


# Axes every decoder has; a family adds or overrides others (``ModelDims.extra``).
_BASE_SHARDED = ("q", "kv", "intermediate")


@dataclass(frozen=True)
class ModelDims:
    """The global (unsharded) sizes that the sharding table refers to.

    ``extra`` holds the axes of a family beyond the dense Llama ones (expert and shared-expert
    intermediate sizes, MLA head layouts) and may override ``q`` and ``attn_out`` (the input of
    ``o_proj``, ``q`` unless overridden).
    """

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    extra: Mapping[str, Axis] = field(default_factory=dict)

    @classmethod
    def dense(cls, config: Any, **extra: Axis) -> "ModelDims":
        """The Llama-family sizes of a HF config (``head_dim`` defaults like HF's)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads, kv, head_dim, extra)

    def _axis(self, axis: str) -> Axis:
        if axis in self.extra:
            return self.extra[axis]
        base = {
            "hidden": Axis(self.hidden, 1, False),
            "intermediate": Axis(self.intermediate),
            "q": Axis(self.num_heads * self.head_dim, self.head_dim),
            "kv": Axis(self.num_kv_heads * self.head_dim, self.head_dim),
        }
        if axis == "attn_out":
            return self._axis("q")
        try:
            return base[axis]
        except KeyError:
            raise TensorParallelError(f"axis {axis!r} is not defined for this model; known: "
                                      f"{sorted({*base, 'attn_out', *self.extra})}") from None

    def features(self, axis: str) -> int:
        """Number of features of a named axis (``hidden``, ``intermediate``, ``q``, ``kv``, ...)."""
        return self._axis(axis).features

    def granule(self, axis: str) -> int:
        """The unit a sharded axis is cut in: whole heads for attention, single features otherwise."""
        return self._axis(axis).granule

    def sharded_axes(self) -> tuple[str, ...]:
        """Every axis some projection of this model splits over the tp group."""
        extra = [a for a, ax in self.extra.items() if ax.sharded and a not in _BASE_SHARDED]
        return (*_BASE_SHARDED, *extra)


@dataclass(frozen=True)
class ProjectionRule:
    """One row of the table: a projection, its parallel style and its global feature axes.

    Attributes:
        path: the tail of the qualified module name, dotted; ``*`` matches an expert index
            (``mlp.experts.*.gate_proj``).
        parallel: column- or row-parallel.
        in_axis: named axis of the input features (see ``ModelDims.features``).
        out_axis: named axis of the output features.
    """

    path: str
    parallel: Parallel
    in_axis: str
    out_axis: str

    @property
    def name(self) -> str:
        """The projection's own attribute name (``q_proj``)."""
        return self.path.rsplit(".", 1)[-1]

    def matches(self, module_name: str) -> bool:
        """Whether a qualified module name ends with this row's path."""
        want = self.path.split(".")
        parts = module_name.split(".")
        if len(parts) <= len(want):  # the tail alone (``q_proj``) is not a module of a decoder
            return False
        return all(w == p or (w == "*" and p.isdigit()) for w, p in zip(want, parts[-len(want):]))

    @property
    def weight_shard_dim(self) -> int:
        """The dim of the ``[out, in]`` weight that is split: 0 (column) or 1 (row)."""
        return 0 if self.parallel is Parallel.COLUMN else 1

    @property
    def bias_sharded(self) -> bool:
        """Column-parallel bias is split with the outputs; row-parallel bias is whole, added once."""
        return self.parallel is Parallel.COLUMN

    @property
    def sharded_axis(self) -> str:
        """The named feature axis this projection splits."""
        return self.out_axis if self.parallel is Parallel.COLUMN else self.in_axis


def _col(path: str, in_axis: str, out_axis: str) -> ProjectionRule:
    return ProjectionRule(path, Parallel.COLUMN, in_axis, out_axis)


def _row(path: str, in_axis: str, out_axis: str) -> ProjectionRule:
    return ProjectionRule(path, Parallel.ROW, in_axis, out_axis)


def _mlp(prefix: str, gate: str, up: str, down: str, axis: str) -> tuple[ProjectionRule, ...]:
    return (_col(f"{prefix}.{gate}", "hidden", axis), _col(f"{prefix}.{up}", "hidden", axis),
            _row(f"{prefix}.{down}", axis, "hidden"))


# Rule sets, named by what they shard; a family lists the ones its layers use.
RULE_SETS: Mapping[str, tuple[ProjectionRule, ...]] = MappingProxyType({
    "attention": (
        _col("self_attn.q_proj", "hidden", "q"), _col("self_attn.k_proj", "hidden", "kv"),
        _col("self_attn.v_proj", "hidden", "kv"), _row("self_attn.o_proj", "attn_out", "hidden"),
    ),
    # DeepSeek MLA: q_proj (no q LoRA) or q_a_proj -> q_b_proj, kv_a_proj_with_mqa -> kv_b_proj. The
    # low-rank down projections are replicated (listed in the family), the up projections split by head.
    "mla_attention": (
        _col("self_attn.q_proj", "hidden", "q"), _col("self_attn.q_b_proj", "q_lora", "q"),
        _col("self_attn.kv_b_proj", "kv_lora", "kv_b"), _row("self_attn.o_proj", "attn_out", "hidden"),
    ),
    "mlp": _mlp("mlp", "gate_proj", "up_proj", "down_proj", "intermediate"),
    "experts": _mlp("mlp.experts.*", "gate_proj", "up_proj", "down_proj", "expert_intermediate"),
    "mixtral_experts": _mlp("mlp.experts.*", "w1", "w3", "w2", "expert_intermediate"),
    "shared_experts": _mlp("mlp.shared_experts", "gate_proj", "up_proj", "down_proj", "shared_intermediate"),
})


def _union(sets: Iterable[tuple[ProjectionRule, ...]]) -> Mapping[str, ProjectionRule]:
    table: dict[str, ProjectionRule] = {}
    for rules in sets:
        for r in rules:
            if r.path in table and table[r.path] != r:
                raise ValueError(f"sharding rule {r.path!r} is defined twice with different axes")
            table[r.path] = r
    return MappingProxyType(table)


TP_RULES: Mapping[str, ProjectionRule] = _union(RULE_SETS.values())
"""Every row, keyed by its path (the rows are the same in every family that uses them)."""


def _by_leaf(table: Mapping[str, ProjectionRule]) -> Mapping[str, tuple[ProjectionRule, ...]]:
    by: dict[str, list[ProjectionRule]] = {}
    for r in table.values():
        by.setdefault(r.name, []).append(r)
    return MappingProxyType({leaf: tuple(rules) for leaf, rules in by.items()})


# Rows by projection name: a lookup tries only the rows of its own leaf (MoE models have tens of
# thousands of expert projections, and every scale, slice and export step looks them up).
_RULES_BY_LEAF = _by_leaf(TP_RULES)


def rule_for(module_name: str) -> ProjectionRule | None:
    """The rule of a qualified module name (``model.layers.3.mlp.up_proj``), None if replicated."""
    for rule in _RULES_BY_LEAF.get(module_name.rpartition(".")[2], ()):
        if rule.matches(module_name):
            return rule
    return None


def shard_slice(global_len: int, rank: int, world: int, granule: int = 1) -> slice:
    """The contiguous slice of a length-``global_len`` axis owned by ``rank`` of ``world``.

    Shards are equal (Megatron style) and cut in whole ``granule`` units (a head), so the length
    must divide into ``world * granule``.
    """
    if world < 1 or not 0 <= rank < world:
        raise TensorParallelError(f"tp rank {rank} is outside a tp group of size {world}; use 0 <= rank < world")
    if global_len % (world * granule):
        units = f" ({global_len // granule} units of {granule})" if granule > 1 else ""
        raise TensorParallelError(
            f"axis of length {global_len}{units} cannot be split evenly over tp={world}; "
            "choose a tp size that divides it"
        )
    size = global_len // world
    return slice(rank * size, (rank + 1) * size)


def check_shardable(dims: ModelDims, world: int) -> None:
    """Raise naming the first axis that tp=``world`` cannot split into whole heads/features."""
    for axis in dims.sharded_axes():
        try:
            shard_slice(dims.features(axis), 0, world, dims.granule(axis))
        except TensorParallelError as e:
            raise TensorParallelError(f"cannot shard the {axis!r} axis: {e}") from None


def axis_slice(rule: ProjectionRule, dims: ModelDims, rank: int, world: int) -> slice:
    """This rank's slice of the projection's sharded feature axis."""
    axis = rule.sharded_axis
    return shard_slice(dims.features(axis), rank, world, dims.granule(axis))


def weight_index(rule: ProjectionRule, dims: ModelDims, rank: int, world: int) -> tuple[slice, slice]:
    """``(rows, cols)`` of the global ``[out, in]`` weight that this rank holds."""
    s = axis_slice(rule, dims, rank, world)
    return (s, slice(None)) if rule.parallel is Parallel.COLUMN else (slice(None), s)


def bias_index(rule: ProjectionRule, dims: ModelDims, rank: int, world: int) -> slice:
    """The slice of the global bias that this rank holds (all of it for row-parallel)."""
    return axis_slice(rule, dims, rank, world) if rule.bias_sharded else slice(None)


@dataclass(frozen=True)
class StatShard:
    """Where one shard's statistic sits in global coordinates.

    Attributes:
        placement: where the shard's values sit on the global axis (per-tensor values always
            combine by max).
        global_len: channels of the global axis.
        local: the slice of the global axis this shard holds (the whole axis for ``MAX``).
        exact: whether the merged value equals what an unsharded (tp=1) run measures. False only for
            a row-parallel partial output, which INC also max-reduces across ranks.
    """

    placement: Placement
    global_len: int
    local: slice
    exact: bool = True


# Per-channel stats use the feature axis for inputs/outputs and the output channels for weights
# (reference §3.3), so each label maps to one named axis of the projection and a placement per style.
_LAYOUT: Mapping[tuple[Parallel, str], tuple[str, Placement, bool]] = MappingProxyType(
    {
        (Parallel.COLUMN, "inputs.0"): ("in", Placement.FULL, True),  # replicated input
        (Parallel.COLUMN, "outputs.0"): ("out", Placement.SLICE, True),
        (Parallel.COLUMN, "params.weight"): ("out", Placement.SLICE, True),
        (Parallel.ROW, "inputs.0"): ("in", Placement.SLICE, True),
        (Parallel.ROW, "outputs.0"): ("out", Placement.FULL, False),  # partial GEMM before the reduce
        (Parallel.ROW, "outputs.1"): ("out", Placement.FULL, True),  # the all-reduced output
        (Parallel.ROW, "params.weight"): ("out", Placement.FULL, True),  # per-out max over an in slice
    }
)


def stat_shard(module_name: str, label: str, dims: ModelDims, rank: int, world: int,
               replicated_len: int | None = None) -> StatShard:
    """The shard map entry of statistic ``label`` (``inputs.0``...) of a module on ``rank``.

    Args:
        module_name: qualified module name.
        label: tensor label as in ``ModuleStats.tensors()``.
        dims: global model sizes.
        rank: tp rank.
        world: tp size.
        replicated_len: channel count for a module outside the table (replicated on every shard);
            required only for those.
    """
    rule = rule_for(module_name)
    if rule is None:
        if replicated_len is None:
            raise TensorParallelError(
                f"module {module_name!r} is replicated across tp shards; pass replicated_len for {label!r}"
            )
        return StatShard(Placement.FULL, replicated_len, slice(0, replicated_len))
    try:
        side, placement, exact = _LAYOUT[(rule.parallel, label)]
    except KeyError:
        known = sorted(lbl for (p, lbl) in _LAYOUT if p is rule.parallel)
        raise TensorParallelError(
            f"module {module_name!r} ({rule.parallel.value}-parallel) has no statistic {label!r}; known: {known}"
        ) from None
    axis = rule.in_axis if side == "in" else rule.out_axis
    n = dims.features(axis)
    local = shard_slice(n, rank, world, dims.granule(axis)) if placement is Placement.SLICE else slice(0, n)
    return StatShard(placement, n, local, exact)


def merge_stat(values: Sequence[np.ndarray], shards: Sequence[StatShard]) -> np.ndarray:
    """Combine one statistic from every shard of a tp group into global coordinates (fp32).

    Per-tensor values (length 1) combine by max. Per-channel ``CONCAT`` values are placed at their
    slices, which must cover the global axis exactly once; ``MAX`` values combine elementwise.
    """
    if len(values) != len(shards) or not values:
        raise TensorParallelError(f"got {len(values)} values for {len(shards)} shards; pass one per shard")
    arrays = [np.asarray(v, dtype=np.float32).reshape(-1) for v in values]
    if all(a.size == 1 for a in arrays) or shards[0].placement is Placement.FULL:
        return np.maximum.reduce(arrays) if len(arrays) > 1 else arrays[0].copy()
    out = np.zeros(shards[0].global_len, dtype=np.float32)
    # Count writes per channel rather than testing for NaN: imported stats may hold NaN as data.
    covered = np.zeros(shards[0].global_len, dtype=np.int64)
    for a, s in zip(arrays, shards):
        if a.size != s.local.stop - s.local.start:
            raise TensorParallelError(f"shard value of length {a.size} does not fit its slice {s.local}")
        out[s.local] = a
        covered[s.local] += 1
    if (covered != 1).any():
        raise TensorParallelError(
            f"shard slices must cover the global axis of length {shards[0].global_len} exactly once; "
            f"got {[s.local for s in shards]}"
        )
    return out


def split_channel_slices(keys: Iterable[tuple[str, str]], dims: ModelDims, rank: int,
                         world: int) -> dict[tuple[str, str], tuple[int, int, int]]:
    """The shard map of a rank: ``(start, stop, global_len)`` for every split (``CONCAT``) statistic.

    ``keys`` are ``(module name, tensor label)`` pairs. Statistics that cover their whole axis
    (replicated modules, ``FULL`` placements) are left out, which is how the stats store's shard map
    records "whole axis".
    """
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    for module, label in keys:
        if rule_for(module) is None:
            continue
        s = stat_shard(module, label, dims, rank, world)
        if s.placement is Placement.SLICE:
            out[(module, label)] = (s.local.start, s.local.stop, s.global_len)
    return out
