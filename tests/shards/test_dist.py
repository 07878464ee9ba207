"""Process-group setup (shards/tp/dist.py). The real gloo group among actors is tested in test_runner_ray.py."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch
import torch.distributed as tdist

from shards.tp.dist import LOOPBACK, DeviceKind, DistSetupError, Rendezvous, TpGroup, free_port
from shards.errors import ShardError


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, port))


def test_rendezvous_init_method() -> None:
    assert Rendezvous("127.0.0.1", 29511).init_method == "tcp://127.0.0.1:29511"


def test_group_of_one_needs_no_process_group() -> None:
    group = TpGroup(0, 1, DeviceKind.CPU, rendezvous=None)
    t = torch.arange(4.0)
    assert group.all_reduce(t) is t and torch.equal(t, torch.arange(4.0))
    assert group.reducer is None
    assert not tdist.is_initialized()
    group.barrier()
    group.close()


@pytest.mark.parametrize(
    "rank, world, rendezvous, match",
    [
        (2, 2, Rendezvous(LOOPBACK, 1), "tp rank 2 is outside a tp group of size 2"),
        (1, 2, None, "tp rank 1 of 2 needs a rendezvous"),
    ],
)
def test_group_refuses(rank: int, world: int, rendezvous: Rendezvous | None, match: str) -> None:
    with pytest.raises(DistSetupError, match=match) as e:
        TpGroup(rank, world, DeviceKind.CPU, rendezvous)
    assert isinstance(e.value, ShardError) and isinstance(e.value, RuntimeError)


@pytest.mark.skipif(importlib.util.find_spec("habana_frameworks") is not None, reason="Habana plugin installed")
def test_hpu_without_plugin_is_named() -> None:
    with pytest.raises(DistSetupError, match="hccl backend from habana_frameworks"):
        TpGroup(0, 2, DeviceKind.HPU, Rendezvous(LOOPBACK, free_port()))
