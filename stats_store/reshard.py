"""Per-shard statistics for any tp size, derived from the global (reduced) statistics.

- Per-tensor values (shape ``(1,)``) are global maxima and go to every shard unchanged: a shard
  then uses the same per-tensor scale as tp=1, which is what the coordinator's invariant needs.
- Per-channel vectors over a split axis (the tensors named by ``split``) are cut with the rule of
  ``stats_store.shard_map.channel_slice`` (floor-balanced, in whole granules; non-divisor tp sizes
  work when every shard gets at least one granule, anything else is refused naming the tensor).
- Per-channel vectors over a replicated axis go to every shard whole.

Counts go to every tp rank unchanged (the tp ranks of a group see the same batches, and the
``count`` merge takes their max), so re-sharding and reducing again gives back the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from stats_store.records import Measurement
from stats_store.metadata import CommitRecord
from stats_store.shard_map import ChannelSlice, ShardSpec, TensorKey, channel_slice
from stats_store.packing import module_stats_from_tensors


@dataclass(frozen=True)
class SplitRule:
    """A tensor's channel axis is split across tp ranks in whole units of ``granule`` channels."""

    granule: int = 1


SplitLookup = Mapping[TensorKey, SplitRule] | Callable[[str, str], SplitRule | None]


def split_rules_from_commits(commits: Mapping[int, CommitRecord]) -> dict[TensorKey, SplitRule]:
    """The tensors a stored run held as slices (its shard map), each with granule 1."""
    out: dict[TensorKey, SplitRule] = {}
    for rec in commits.values():
        for name, mod in rec.modules.items():
            for label, t in mod.tensors.items():
                if t.slice is not None:
                    out[(name, label)] = SplitRule()
    return out


def _lookup(split: SplitLookup, module: str, label: str) -> SplitRule | None:
    if callable(split):
        return split(module, label)
    return split.get((module, label))


def reshard(global_stats: Measurement, tp: int, split: SplitLookup, dp: int = 1) -> list[tuple[ShardSpec, Measurement]]:
    """Shard specs and statistics of every shard of a dp x tp run, in shard order.

    Every data-parallel group gets the same statistics (dp only replicates); for a single
    measurement use dp=1.

    Args:
        global_stats: reduced statistics in global coordinates.
        tp: the target tensor-parallel size.
        split: which (module, label) tensors have a split channel axis, and their granule.
        dp: data-parallel size of the target run.
    """
    per_rank = [_one_rank(global_stats, rank, tp, split) for rank in range(tp)]
    out = []
    for dp_rank in range(dp):
        for rank, (slices, stats) in enumerate(per_rank):
            out.append((ShardSpec(dp_rank * tp + rank, dp * tp, tp, slices), stats))
    return out


def _one_rank(
    global_stats: Measurement, rank: int, tp: int, split: SplitLookup
) -> tuple[dict[TensorKey, ChannelSlice], Measurement]:
    slices: dict[TensorKey, ChannelSlice] = {}
    out = Measurement(observer=global_stats.observer, num_samples=global_stats.num_samples)
    for name, stats in global_stats.modules.items():
        tensors = {}
        for label, value in stats.tensors().items():
            rule = _lookup(split, name, label) if value.size > 1 else None
            if rule is None:
                tensors[label] = np.array(value, dtype=np.float32, copy=True)
                continue
            sl = channel_slice(value.size, rank, tp, rule.granule, what=f"{name} {label}")
            slices[(name, label)] = sl
            tensors[label] = np.array(value[sl.start : sl.stop], dtype=np.float32, copy=True)
        out.modules[name] = module_stats_from_tensors(name, stats.op_type, tensors, stats.num_samples, stats.nonfinite,
                                                      stats.num_tokens)
    return slices, out
