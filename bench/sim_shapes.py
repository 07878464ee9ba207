"""Synthetic statistics of a Llama-shaped dp x tp measurement, as each shard of a real run holds them.

What a shard of a ``maxabs`` run holds for every Linear (``shards.measuring.observers``): the
per-tensor max-abs of its input and output (shape ``(1,)``) and the per-output-channel max-abs of
its weight slice. Where each value sits comes from the one sharding table (``shards.tp.rules``):

- q/k/v/gate/up are column-parallel: a rank holds its slice of the weight's output channels (a
  ``ChannelSlice`` in its ``ShardSpec``); its input is the replicated hidden state, the same on
  every tp rank of a data-parallel group.
- o/down are row-parallel: a rank's weight covers all output channels over its slice of the input
  features, so its per-output-channel max-abs is a partial maximum (every rank holds a full-length
  vector and the reducer takes the max); its input and output (before the all-reduce) are its own.
- lm_head is replicated: every rank holds all of it.

Values come from seeded generators, chosen so that the global (tp=1) result is known without
the shards: a weight's global per-channel max-abs is drawn once per module (every data-parallel
group loads the same weights), and a row-parallel rank holds the global value on the channels
``c % tp == tp_rank`` and half of it elsewhere, so the max over ranks is the global vector again.
Activations are drawn per (dp group, flush), and per tp rank where ranks see different tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from shards.tp.rules import ModelDims, Placement, rule_for, stat_shard
from stats_store.records import Measurement, ModuleStats
from stats_store.shard_map import ChannelSlice, ShardSpec

# (leaf name under model.layers.<i>) of one decoder layer, in discovery order
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LABELS = ("inputs.0", "outputs.0")  # the per-tensor statistics of a Linear
BATCHES_PER_FLUSH = 4  # batches one flush of a shard covers (its num_samples)


@dataclass(frozen=True)
class SimShape:
    """A Llama-family decoder and the dp x tp grid that measures it."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dp: int
    tp: int

    @property
    def num_shards(self) -> int:
        return self.dp * self.tp

    @cached_property
    def dims(self) -> ModelDims:
        return ModelDims(self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim)

    @cached_property
    def modules(self) -> tuple[str, ...]:
        """Every measured Linear, in discovery order (lm_head last)."""
        return (*(f"model.layers.{i}.{leaf}" for i in range(self.layers) for leaf in LAYER_LINEARS), "lm_head")

    def out_features(self, name: str) -> int:
        rule = rule_for(name)
        return self.vocab if rule is None else self.dims.features(rule.out_axis)

    def in_features(self, name: str) -> int:
        rule = rule_for(name)
        return self.hidden if rule is None else self.dims.features(rule.in_axis)

    def with_layers(self, layers: int) -> "SimShape":
        return SimShape(layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim, self.vocab,
                        self.dp, self.tp)


# Llama-3.1-405B (126 layers, hidden 16384, intermediate 53248, 128 q / 8 kv heads of 128, vocab
# 128256) on 8 nodes x 8 Gaudi3: tp=8 inside a node, dp=8 over nodes.
LLAMA_405B = SimShape(126, 16384, 53248, 128, 8, 128, 128256, dp=8, tp=8)
# Seconds-sized: what the smoke test writes (tp=8 needs at least 8 kv heads).
TINY = SimShape(2, 64, 128, 8, 8, 8, 96, dp=2, tp=8)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _weight_block(shape: SimShape, module: int, block: int, seed: int) -> np.ndarray:
    n = shape.out_features(shape.modules[module])
    start, stop = block * n // shape.tp, (block + 1) * n // shape.tp
    return _rng(seed, 0, module, block).random(stop - start, dtype=np.float32) * 4 + np.float32(0.01)


def global_weight_maxabs(shape: SimShape, module: int, seed: int) -> np.ndarray:
    """The global per-output-channel weight max-abs of module number ``module`` (the same on every dp
    group). Drawn in ``tp`` blocks, so that a column-parallel rank draws only its own block."""
    return np.concatenate([_weight_block(shape, module, b, seed) for b in range(shape.tp)])


def _shared_by_tp(name: str, label: str, shape: SimShape) -> bool:
    """True when every tp rank of a group observes the same tensor (replicated input or module)."""
    if rule_for(name) is None:
        return True
    s = stat_shard(name, label, shape.dims, 0, shape.tp)
    return s.placement is Placement.FULL and s.exact


def per_tensor_values(shape: SimShape, index: int, flush: int, seed: int) -> np.ndarray:
    """Shard ``index``'s per-tensor max-abs in flush ``flush``: ``(modules, len(LABELS))`` float32."""
    dp_rank, tp_rank = divmod(index, shape.tp)
    n = (len(shape.modules), len(LABELS))
    group = _rng(seed, 1, dp_rank, flush).random(n, dtype=np.float32) * 16 + np.float32(0.5)
    own = _rng(seed, 2, dp_rank, tp_rank, flush).random(n, dtype=np.float32) * 16 + np.float32(0.5)
    shared = np.array([[_shared_by_tp(m, lb, shape) for lb in LABELS] for m in shape.modules])
    return np.where(shared, group, own)


def _local_weight(shape: SimShape, module: int, tp_rank: int, seed: int) -> tuple[np.ndarray, ChannelSlice | None]:
    """A rank's per-output-channel weight max-abs and, for a split axis, its slice."""
    name = shape.modules[module]
    s = stat_shard(name, "params.weight", shape.dims, tp_rank, shape.tp) if rule_for(name) is not None else None
    if s is not None and s.placement is Placement.SLICE:
        block = _weight_block(shape, module, tp_rank, seed)
        assert block.size == s.local.stop - s.local.start  # the blocks are the Megatron split
        return block, ChannelSlice(s.local.start, s.local.stop, s.global_len)
    full = global_weight_maxabs(shape, module, seed)
    if s is None:
        return full, None
    own = np.arange(full.size) % shape.tp == tp_rank  # partial maxima: the global value on own channels
    return np.where(own, full, full * np.float32(0.5)), None


def shard_flush(shape: SimShape, index: int, flush: int, seed: int) -> tuple[ShardSpec, Measurement, list[int]]:
    """What shard ``index`` hands the store in its flush number ``flush``: spec, statistics, batch ids."""
    dp_rank, tp_rank = divmod(index, shape.tp)
    acts = per_tensor_values(shape, index, flush, seed)
    m = Measurement(observer="maxabs", num_samples=BATCHES_PER_FLUSH)
    slices: dict[tuple[str, str], ChannelSlice] = {}
    for k, name in enumerate(shape.modules):
        weight, sl = _local_weight(shape, k, tp_rank, seed)
        if sl is not None:
            slices[(name, "params.weight")] = sl
        m.modules[name] = ModuleStats(name, "linear", [acts[k, 0:1].copy()], [acts[k, 1:2].copy()],
                                      {"weight": weight}, BATCHES_PER_FLUSH)
    first = (flush * shape.dp + dp_rank) * BATCHES_PER_FLUSH  # dp groups pull disjoint batches
    return ShardSpec(index, shape.num_shards, shape.tp, slices), m, list(range(first, first + BATCHES_PER_FLUSH))


def expected_global(shape: SimShape, flushes: int, seed: int) -> dict[tuple[str, str], np.ndarray]:
    """The global statistics the reducer must produce, computed without the shards' data."""
    acts = np.max([per_tensor_values(shape, k, f, seed) for k in range(shape.num_shards) for f in range(flushes)],
                  axis=0)
    out: dict[tuple[str, str], np.ndarray] = {}
    for k, name in enumerate(shape.modules):
        for j, label in enumerate(LABELS):
            out[(name, label)] = acts[k, j : j + 1]
        out[(name, "params.weight")] = global_weight_maxabs(shape, k, seed)
    return out


def shard_bytes(shape: SimShape) -> int:
    """float32 bytes of one shard's packed chunk (rank 0; every rank holds as many)."""
    total = 0
    for name in shape.modules:
        rule = rule_for(name)
        n = shape.out_features(name)
        if rule is not None and stat_shard(name, "params.weight", shape.dims, 0, shape.tp).placement is Placement.SLICE:
            n //= shape.tp
        total += n + len(LABELS)
    return 4 * total
