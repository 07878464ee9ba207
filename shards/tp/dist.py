"""Process-group setup for one tensor-parallel group of shard processes.

Each shard runs in its own process (a Ray actor), and a process belongs to exactly one tp group, so
the tp group is torch.distributed's default group in that process. Rendezvous is TCP on an address
and port that rank 0 picks (``free_port``) and the driver hands to every rank as arguments; nothing
is read from the environment.
"""

from __future__ import annotations

import enum
import time
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from shards.errors import ShardError
from shards.tp.layers import AllReduce

LOOPBACK = "127.0.0.1"


class DistSetupError(ShardError, RuntimeError):
    """A tp process group could not be created (backend missing, rendezvous failed, already set up)."""


class DeviceKind(str, enum.Enum):
    """The kind of card a shard runs on; it fixes the collective backend and the Ray resources."""

    CPU = "cpu"
    CUDA = "cuda"
    HPU = "hpu"

    @property
    def backend(self) -> str:
        """torch.distributed backend: gloo on CPU, nccl on CUDA, hccl on Gaudi."""
        return {DeviceKind.CPU: "gloo", DeviceKind.CUDA: "nccl", DeviceKind.HPU: "hccl"}[self]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; another process could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one tp group meet."""

    host: str
    port: int

    @property
    def init_method(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def _load_backend(kind: DeviceKind) -> None:
    # hccl is registered by the Habana plugin; import it only when a Gaudi run asks for it.
    if kind is DeviceKind.HPU:
        try:
            import habana_frameworks.torch.distributed.hccl  # noqa: F401
        except ImportError as e:
            raise DistSetupError(
                "device kind 'hpu' needs the hccl backend from habana_frameworks; install the Habana "
                "PyTorch plugin or run with device kind 'cpu'"
            ) from e


class TpGroup:
    """One rank's membership in a tp process group; ``all_reduce`` sums over it.

    A group of size 1 creates no process group and its ``all_reduce`` returns its input.
    """

    def __init__(self, rank: int, world: int, kind: DeviceKind, rendezvous: Rendezvous | None,
                 timeout_s: float = 120.0) -> None:
        if not 0 <= rank < world:
            raise DistSetupError(f"tp rank {rank} is outside a tp group of size {world}")
        self.rank = rank
        self.world = world
        self.kind = kind
        self._initialized = False
        #: seconds spent in all_reduce, waiting for slower peers included (the run reports its share)
        self.collective_s = 0.0
        if world == 1:
            return
        if rendezvous is None:
            raise DistSetupError(f"tp rank {rank} of {world} needs a rendezvous (host, port) chosen by rank 0")
        if tdist.is_initialized():
            raise DistSetupError(
                f"tp rank {rank}: this process already has a torch.distributed group; "
                "one process holds one shard, so shut the old group down first"
            )
        _load_backend(kind)
        try:
            tdist.init_process_group(kind.backend, init_method=rendezvous.init_method, rank=rank,
                                     world_size=world, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # re-raised with the rank and address that failed
            raise DistSetupError(
                f"tp rank {rank} of {world} could not join {rendezvous.init_method} with backend "
                f"{kind.backend!r}: {e}"
            ) from e
        self._initialized = True

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or, with ``op="max"``, max) ``t`` over the group in place and return it."""
        if op not in ("sum", "max"):
            raise ValueError(f"all_reduce: op {op!r}; allowed: sum, max")
        if self.world > 1:
            start = time.perf_counter()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
            self.collective_s += time.perf_counter() - start
        return t

    @property
    def reducer(self) -> AllReduce | None:
        """What row-parallel layers call: None for a group of one."""
        return self.all_reduce if self.world > 1 else None

    def barrier(self) -> None:
        """Wait for every rank of the group."""
        if self._initialized:
            tdist.barrier()

    def close(self) -> None:
        """Destroy the process group (idempotent) so the process can join another one."""
        if self._initialized:
            self._initialized = False
            tdist.destroy_process_group()
