"""Column/row-parallel linears against the unsharded nn.Linear, tp simulated with threads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shards.model.op_types import op_type_of_class
from shards.tp.layers import ColumnParallelLinear, RowParallelLinear
from shards.tp.rules import TensorParallelError
from tests.shards.tp_fixtures import ThreadSumAllReduce, run_ranks

IN, OUT = 24, 40


def _linear(bias: bool, in_features: int = IN, out_features: int = OUT, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()  # a bias far from 0, so adding it twice would show
    return layer


def _x(features: int = IN) -> torch.Tensor:
    return torch.randn(3, 5, features, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls, op_type", [(ColumnParallelLinear, "linear"), (RowParallelLinear, "row_parallel_linear")])
def test_class_names_map_to_op_types(cls: type, op_type: str) -> None:
    op = op_type_of_class(cls.__name__)
    assert op is not None and op.name == op_type


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_column_shards_concatenate_to_full_output(world: int, bias: bool) -> None:
    full = _linear(bias)
    x = _x()
    shards = [ColumnParallelLinear.from_linear(full, r, world) for r in range(world)]
    with torch.no_grad():
        expected = x @ full.weight.T + (full.bias if bias else 0)
        got = torch.cat([s(x) for s in shards], dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_row_shards_all_reduce_to_full_output(world: int, bias: bool) -> None:
    full = _linear(bias)
    x = _x()
    fake = ThreadSumAllReduce(world)
    shards = [RowParallelLinear.from_linear(full, r, world, fake.reducer(r)) for r in range(world)]
    size = IN // world

    def run(rank: int) -> torch.Tensor:
        with torch.no_grad():
            return shards[rank](x[..., rank * size:(rank + 1) * size])

    outs = run_ranks(world, run)
    with torch.no_grad():
        expected = x @ full.weight.T + (full.bias if bias else 0)
    for out in outs:  # every rank gets the whole output, bias added exactly once
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_row_partial_outputs_sum_to_the_unbiased_product() -> None:
    full = _linear(bias=True)
    x = _x()
    shards = [RowParallelLinear.from_linear(full, r, 2, ThreadSumAllReduce(2).reducer(r)) for r in range(2)]
    with torch.no_grad():
        partials = [s.partial_forward(x[..., s.shard]) for s in shards]
        torch.testing.assert_close(partials[0] + partials[1], x @ full.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_column_then_row_is_the_unsharded_mlp(world: int) -> None:
    up, down = _linear(True, IN, OUT, seed=2), _linear(True, OUT, IN, seed=3)
    x = _x()
    fake = ThreadSumAllReduce(world)
    cols = [ColumnParallelLinear.from_linear(up, r, world) for r in range(world)]
    rows = [RowParallelLinear.from_linear(down, r, world, fake.reducer(r)) for r in range(world)]

    def run(rank: int) -> torch.Tensor:
        with torch.no_grad():
            return rows[rank](torch.relu(cols[rank](x)))  # elementwise op between them needs no comms

    with torch.no_grad():
        expected = down(torch.relu(up(x)))
    for out in run_ranks(world, run):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_shards_hold_only_their_slice() -> None:
    full = _linear(True)
    col = ColumnParallelLinear.from_linear(full, 1, 4)
    row = RowParallelLinear.from_linear(full, 3, 4, lambda t: t)
    assert col.weight.shape == (OUT // 4, IN) and col.bias.shape == (OUT // 4,)
    assert row.weight.shape == (OUT, IN // 4) and row.bias.shape == (OUT,)
    for p in (col.weight, col.bias, row.weight):
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # not a view of the full tensor
    assert torch.equal(col.weight, full.weight[10:20]) and torch.equal(row.weight, full.weight[:, 18:24])
    assert (col.global_out_features, row.global_in_features) == (OUT, IN)
    assert (col.shard, row.shard) == (slice(10, 20), slice(18, 24))


def test_parallel_layers_are_linears() -> None:
    col = ColumnParallelLinear(IN, OUT, tp_rank=0, tp_world=2, device="meta")
    assert isinstance(col, nn.Linear) and (col.in_features, col.out_features) == (IN, OUT // 2)


def test_row_parallel_needs_a_reduce_when_sharded() -> None:
    with pytest.raises(TensorParallelError, match="rank 0 of tp=2 needs an all_reduce"):
        RowParallelLinear(IN, OUT, tp_rank=0, tp_world=2, all_reduce=None)
    RowParallelLinear(IN, OUT, tp_rank=0, tp_world=1, all_reduce=None)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_indivisible_sizes_are_refused(cls: type) -> None:
    kwargs = {"all_reduce": lambda t: t} if cls is RowParallelLinear else {}
    with pytest.raises(TensorParallelError, match="cannot be split evenly over tp=7"):
        cls(IN, OUT, tp_rank=0, tp_world=7, **kwargs)
