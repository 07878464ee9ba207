"""Column- and row-parallel linear layers that hold only their shard of the weight.

Both subclass ``nn.Linear`` (code that looks for linears finds them; ``in_features`` and
``out_features`` are the local sizes) and keep their place in the global layer as attributes. The
class names are the ones ``shards.model.op_types`` maps: ``ColumnParallelLinear`` to ``linear`` and
``RowParallelLinear`` to ``row_parallel_linear``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shards.tp.rules import TensorParallelError, shard_slice

AllReduce = Callable[..., torch.Tensor]
"""``all_reduce(t, op="sum")``: reduces a tensor over the tp group (``op`` "sum" or "max") and returns
the result (it may work in place). Row-parallel layers sum partial products; a dynamic FP8 layer
takes the max of its per-token max-abs over the ranks, so every rank quantizes a token with the
scale of the whole row, as one card does."""


class ColumnParallelLinear(nn.Linear):
    """``y[..., shard] = x @ W[shard, :].T + b[shard]``: the rank's slice of the output features.

    Attributes:
        global_in_features: input features of the unsharded layer (all of them; input is replicated).
        global_out_features: output features of the unsharded layer.
        tp_rank: this shard's rank in the tp group.
        tp_world: the tp group size.
        shard: the slice of the global output features this layer computes.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_rank: int, tp_world: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        shard = shard_slice(out_features, tp_rank, tp_world)
        super().__init__(in_features, shard.stop - shard.start, bias=bias, device=device, dtype=dtype)
        self.global_in_features = in_features
        self.global_out_features = out_features
        self.tp_rank = tp_rank
        self.tp_world = tp_world
        self.shard = shard

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_rank: int, tp_world: int) -> "ColumnParallelLinear":
        """The shard of an unsharded layer (weights copied, not shared)."""
        layer = cls(linear.in_features, linear.out_features, tp_rank=tp_rank, tp_world=tp_world,
                    bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[layer.shard])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[layer.shard])
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shard={self.shard.start}:{self.shard.stop} of {self.global_out_features}"


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x[..., shard] @ W[:, shard].T) + b``: bias added once, after the reduce.

    The input is the rank's slice of the input features (what the column-parallel layer before it
    produced). ``all_reduce`` may be None only when ``tp_world`` is 1.

    Attributes:
        global_in_features: input features of the unsharded layer.
        global_out_features: output features (all of them; the output is replicated after the reduce).
        tp_rank: this shard's rank in the tp group.
        tp_world: the tp group size.
        shard: the slice of the global input features this layer consumes.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_rank: int, tp_world: int,
                 all_reduce: AllReduce | None, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if all_reduce is None and tp_world > 1:
            raise TensorParallelError(
                f"RowParallelLinear rank {tp_rank} of tp={tp_world} needs an all_reduce over its tp group"
            )
        shard = shard_slice(in_features, tp_rank, tp_world)
        super().__init__(shard.stop - shard.start, out_features, bias=bias, device=device, dtype=dtype)
        self.global_in_features = in_features
        self.global_out_features = out_features
        self.tp_rank = tp_rank
        self.tp_world = tp_world
        self.shard = shard
        self.all_reduce = all_reduce

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_rank: int, tp_world: int,
                    all_reduce: AllReduce | None) -> "RowParallelLinear":
        """The shard of an unsharded layer (weights copied, not shared)."""
        layer = cls(linear.in_features, linear.out_features, tp_rank=tp_rank, tp_world=tp_world,
                    all_reduce=all_reduce, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, layer.shard])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def partial_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This shard's contribution before the reduce (no bias): INC's row-parallel ``outputs[0]``."""
        return F.linear(x, self.weight)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the partial outputs over the tp group and add the bias once."""
        y = self.all_reduce(partial) if self.all_reduce is not None and self.tp_world > 1 else partial
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial_forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shard={self.shard.start}:{self.shard.stop} of {self.global_in_features}"
