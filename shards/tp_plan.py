"""The one sharding table for tensor-parallel HF Llama-family decoders (Megatron style).

q/k/v/gate/up are column-parallel: the weight ``[out, in]`` is split along ``out`` (dim 0), so each
shard produces its own slice of the output features from the full input. o/down are row-parallel:
the weight is split along ``in`` (dim 1), each shard multiplies its slice of the input features, and
the partial outputs are summed by an all-reduce. Every other module (embeddings, norms, lm_head) is
replicated.

The same table tells the stats store how a shard's per-channel statistic maps to global (tp=1)
coordinates: a slice of the global channel axis (``Merge.CONCAT``) or the full axis, combined by
elementwise max (``Merge.MAX``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
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


class Merge(str, enum.Enum):
    """How the shards' values of one per-channel statistic combine into the global value."""

    CONCAT = "concat"  # a shard holds its slice of the global channel axis
    MAX = "max"  # every shard holds the whole axis; the global value is the elementwise max


@dataclass(frozen=True)
class ModelDims:
    """The global (unsharded) sizes that the sharding table refers to."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        """Read the sizes from a HF Llama-family config (``head_dim`` defaults like HF's)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads, kv, head_dim)

    def features(self, axis: str) -> int:
        """Number of features of a named axis: ``hidden``, ``intermediate``, ``q`` or ``kv``."""
        sizes = {
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "q": self.num_heads * self.head_dim,
            "kv": self.num_kv_heads * self.head_dim,
        }
        return sizes[axis]

    def granule(self, axis: str) -> int:
        """The unit a sharded axis is cut in: whole heads for attention, single features otherwise."""
        return self.head_dim if axis in ("q", "kv") else 1


@dataclass(frozen=True)
class ProjectionRule:
    """One row of the table: a projection, its parallel style and its global feature axes.

    Attributes:
        parent: attribute name of the owning block (``self_attn`` or ``mlp``).
        name: attribute name of the projection inside it (``q_proj``...).
        parallel: column- or row-parallel.
        in_axis: named axis of the input features (see ``ModelDims.features``).
        out_axis: named axis of the output features.
    """

    parent: str
    name: str
    parallel: Parallel
    in_axis: str
    out_axis: str

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


def _rule(parent: str, name: str, parallel: Parallel, in_axis: str, out_axis: str) -> ProjectionRule:
    return ProjectionRule(parent, name, parallel, in_axis, out_axis)


TP_RULES: Mapping[str, ProjectionRule] = MappingProxyType(
    {
        r.name: r
        for r in (
            _rule("self_attn", "q_proj", Parallel.COLUMN, "hidden", "q"),
            _rule("self_attn", "k_proj", Parallel.COLUMN, "hidden", "kv"),
            _rule("self_attn", "v_proj", Parallel.COLUMN, "hidden", "kv"),
            _rule("self_attn", "o_proj", Parallel.ROW, "q", "hidden"),
            _rule("mlp", "gate_proj", Parallel.COLUMN, "hidden", "intermediate"),
            _rule("mlp", "up_proj", Parallel.COLUMN, "hidden", "intermediate"),
            _rule("mlp", "down_proj", Parallel.ROW, "intermediate", "hidden"),
        )
    }
)


def rule_for(module_name: str) -> ProjectionRule | None:
    """The rule of a qualified module name (``model.layers.3.mlp.up_proj``), None if replicated."""
    parts = module_name.split(".")
    rule = TP_RULES.get(parts[-1])
    if rule is None or len(parts) < 2 or parts[-2] != rule.parent:
        return None
    return rule


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
    for axis in ("q", "kv", "intermediate"):
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
        merge: how shards combine per channel (per-tensor values always combine by max).
        global_len: channels of the global axis.
        local: the slice of the global axis this shard holds (the whole axis for ``MAX``).
        exact: whether the merged value equals what an unsharded (tp=1) run measures. False only for
            a row-parallel partial output, which INC also max-reduces across ranks.
    """

    merge: Merge
    global_len: int
    local: slice
    exact: bool = True


# Per-channel stats use the feature axis for inputs/outputs and the output channels for weights
# (reference §3.3), so each label maps to one named axis of the projection and a merge per style.
_LAYOUT: Mapping[tuple[Parallel, str], tuple[str, Merge, bool]] = MappingProxyType(
    {
        (Parallel.COLUMN, "inputs.0"): ("in", Merge.MAX, True),  # replicated input
        (Parallel.COLUMN, "outputs.0"): ("out", Merge.CONCAT, True),
        (Parallel.COLUMN, "params.weight"): ("out", Merge.CONCAT, True),
        (Parallel.ROW, "inputs.0"): ("in", Merge.CONCAT, True),
        (Parallel.ROW, "outputs.0"): ("out", Merge.MAX, False),  # partial GEMM before the reduce
        (Parallel.ROW, "outputs.1"): ("out", Merge.MAX, True),  # the all-reduced output
        (Parallel.ROW, "params.weight"): ("out", Merge.MAX, True),  # per-out max over an in slice
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
        return StatShard(Merge.MAX, replicated_len, slice(0, replicated_len))
    try:
        side, merge, exact = _LAYOUT[(rule.parallel, label)]
    except KeyError:
        known = sorted(lbl for (p, lbl) in _LAYOUT if p is rule.parallel)
        raise TensorParallelError(
            f"module {module_name!r} ({rule.parallel.value}-parallel) has no statistic {label!r}; known: {known}"
        ) from None
    axis = rule.in_axis if side == "in" else rule.out_axis
    n = dims.features(axis)
    local = shard_slice(n, rank, world, dims.granule(axis)) if merge is Merge.CONCAT else slice(0, n)
    return StatShard(merge, n, local, exact)


def merge_stat(values: Sequence[np.ndarray], shards: Sequence[StatShard]) -> np.ndarray:
    """Combine one statistic from every shard of a tp group into global coordinates (fp32).

    Per-tensor values (length 1) combine by max. Per-channel ``CONCAT`` values are placed at their
    slices, which must cover the global axis exactly once; ``MAX`` values combine elementwise.
    """
    if len(values) != len(shards) or not values:
        raise TensorParallelError(f"got {len(values)} values for {len(shards)} shards; pass one per shard")
    arrays = [np.asarray(v, dtype=np.float32).reshape(-1) for v in values]
    if all(a.size == 1 for a in arrays) or shards[0].merge is Merge.MAX:
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
    (replicated modules, ``MAX`` merges) are left out, which is how the stats store's shard map
    records "whole axis".
    """
    out: dict[tuple[str, str], tuple[int, int, int]] = {}
    for module, label in keys:
        if rule_for(module) is None:
            continue
        s = stat_shard(module, label, dims, rank, world)
        if s.merge is Merge.CONCAT:
            out[(module, label)] = (s.local.start, s.local.stop, s.global_len)
    return out
