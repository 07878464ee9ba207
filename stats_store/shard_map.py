"""Which part of the global (tp=1) statistics a shard holds.

A shard's per-tensor max-abs (shape ``(1,)``) and its per-channel vectors over a replicated axis
cover the whole global axis; the global value is the max over shards. A per-channel vector over a
tensor-parallel axis covers a slice ``[start, stop)`` of the global channel axis; the shard map
records that slice so the store can keep every value in global coordinates.

Slicing rule (used by re-sharding and INC export): an axis of ``length`` channels cut in whole
units of ``granule`` channels (a head, say) gives shard ``r`` of ``n`` the units
``[r*U//n, (r+1)*U//n)`` with ``U = length // granule``. For sizes that divide evenly this is the
Megatron split; otherwise the shard sizes differ by at most one unit. Lengths that are not a
multiple of the granule, or with fewer units than shards, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from stats_store.errors import ReshardError, ShardSpecError

TensorKey = tuple[str, str]  # (module name, tensor label such as "inputs.0")


@dataclass(frozen=True)
class ChannelSlice:
    """The slice ``[start, stop)`` of a global channel axis of ``global_len`` channels."""

    start: int
    stop: int
    global_len: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.global_len:
            raise ShardSpecError(
                f"channel slice [{self.start}, {self.stop}) does not fit an axis of {self.global_len} channels; "
                "use 0 <= start < stop <= global_len"
            )

    @property
    def size(self) -> int:
        return self.stop - self.start

    def to_json(self) -> list[int]:
        return [self.start, self.stop, self.global_len]

    @classmethod
    def from_json(cls, value: list[int]) -> "ChannelSlice":
        start, stop, global_len = (int(v) for v in value)
        return cls(start, stop, global_len)


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a run: its index and, per split tensor, its slice of the channel axis.

    Shards are numbered ``index = dp_rank * tp + tp_rank``. The tp ranks of one data-parallel group
    see the same batches, which matters for counts (see ``stats_store.reduce``).

    Attributes:
        index: this shard, ``0 <= index < num_shards``.
        num_shards: dp * tp.
        tp: tensor-parallel group size (divides ``num_shards``).
        slices: per (module, label) the slice of the global channel axis this shard holds; a tensor
            not listed covers its whole axis (per-tensor values, replicated channels).
    """

    index: int
    num_shards: int
    tp: int = 1
    slices: Mapping[TensorKey, ChannelSlice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_shards < 1 or self.tp < 1 or self.num_shards % self.tp:
            raise ShardSpecError(
                f"shard topology num_shards={self.num_shards}, tp={self.tp}: num_shards must be a positive multiple of tp"
            )
        if not 0 <= self.index < self.num_shards:
            raise ShardSpecError(f"shard index {self.index} is outside 0..{self.num_shards - 1}")
        object.__setattr__(self, "slices", MappingProxyType(dict(self.slices)))

    @property
    def dp_rank(self) -> int:
        return self.index // self.tp

    @property
    def tp_rank(self) -> int:
        return self.index % self.tp

    def slice_of(self, module: str, label: str) -> ChannelSlice | None:
        return self.slices.get((module, label))


def channel_slice(length: int, rank: int, world: int, granule: int = 1, what: str = "axis") -> ChannelSlice:
    """The slice of a ``length``-channel axis that shard ``rank`` of ``world`` holds (module rule).

    Args:
        length: global number of channels.
        rank: shard rank inside the tp group.
        world: tp size.
        granule: channels per indivisible unit (a head); 1 for plain features.
        what: the tensor's name, for error messages.
    """
    if world < 1 or not 0 <= rank < world:
        raise ReshardError(f"{what}: tp rank {rank} is outside a tp group of size {world}")
    if granule < 1 or length % granule:
        raise ReshardError(
            f"{what}: {length} channels are not whole units of {granule}; pass the granule the layer is cut by"
        )
    units = length // granule
    if units < world:
        raise ReshardError(
            f"{what}: {units} unit(s) of {granule} channel(s) cannot be split over tp={world}; "
            f"use tp <= {units}"
        )
    return ChannelSlice(rank * units // world * granule, (rank + 1) * units // world * granule, length)
