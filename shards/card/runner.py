"""``ShardRunner``: one shard of a dp x tp run, as a plain class.

The Ray actor (``orchestrator.driver.grid.ShardWorker``) is this class wrapped by ``ray.remote``; unit tests
call it directly. Everything about the topology arrives as arguments, never from the environment.
Measurement and quantization methods are added on top of ``load``/``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shards.tp.checkpoint import TpShard, build_tp_shard, tensor_bytes
from shards.tp.dist import LOOPBACK, DeviceKind, Rendezvous, TpGroup, free_port
from shards.errors import ShardError


class ShardStateError(ShardError, RuntimeError):
    """A runner method was called before ``load`` (or after ``shutdown``)."""


@dataclass(frozen=True)
class Topology:
    """Where a shard sits: data-parallel group ``dp_rank`` of ``dp``, tp rank ``tp_rank`` of ``tp``.

    ``index`` numbers shards ``dp_rank * tp + tp_rank`` (the stats store's shard index).
    """

    dp: int = 1
    tp: int = 1
    dp_rank: int = 0
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if self.dp < 1 or self.tp < 1 or not 0 <= self.dp_rank < self.dp or not 0 <= self.tp_rank < self.tp:
            raise ShardStateError(
                f"topology dp={self.dp}, tp={self.tp}, dp_rank={self.dp_rank}, tp_rank={self.tp_rank}: "
                "sizes must be >= 1 and ranks within 0..size-1"
            )

    @property
    def index(self) -> int:
        return self.dp_rank * self.tp + self.tp_rank


@dataclass(frozen=True)
class ShardInfo:
    """What a loaded shard reports about itself (sent back to the driver).

    ``num_bytes``: what the shard's parameters and buffers hold (distinct storages, a tied weight
    once): the bytes of its slice of the checkpoint, plus the small buffers the model rebuilds.
    """

    topology: Topology
    device: str
    num_parameters: int
    parameter_shapes: dict[str, tuple[int, ...]]
    num_bytes: int


def _torch_device(kind: DeviceKind) -> torch.device:
    # Ray gives each actor its own card and makes it the only visible one, so index 0 is ours.
    if kind is DeviceKind.HPU:
        import habana_frameworks.torch  # noqa: F401  (registers the "hpu" device)
    return torch.device({DeviceKind.CPU: "cpu", DeviceKind.CUDA: "cuda:0", DeviceKind.HPU: "hpu:0"}[kind])


class ShardRunner:
    """One shard: builds its tp slice of the checkpoint and runs forward passes.

    Args:
        checkpoint: HF checkpoint directory (safetensors, written by ``save_pretrained``).
        topology: this shard's place in the dp x tp grid.
        device_kind: card kind; fixes the torch device and the collective backend.
        dtype: cast floating weights to this dtype; None keeps the stored dtypes.
        num_threads: torch intra-op threads for this process (1 keeps co-located shards from fighting).
        timeout_s: collective timeout, so a missing rank fails instead of hanging.
    """

    def __init__(self, checkpoint: str | Path, topology: Topology, device_kind: DeviceKind = DeviceKind.CPU,
                 dtype: torch.dtype | None = None, num_threads: int | None = 1, timeout_s: float = 120.0) -> None:
        self.checkpoint = Path(checkpoint)
        self.topology = topology
        self.device_kind = DeviceKind(device_kind)
        self.dtype = dtype
        self.timeout_s = timeout_s
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._group: TpGroup | None = None
        self._shard: TpShard | None = None

    def pick_rendezvous(self) -> Rendezvous:
        """Called on tp rank 0: a free loopback port for its group (a tp group lives on one node)."""
        return Rendezvous(LOOPBACK, free_port(LOOPBACK))

    def load(self, rendezvous: Rendezvous | None = None) -> ShardInfo:
        """Join the tp group and build this rank's shard; every rank of the group must call it."""
        t = self.topology
        self._group = TpGroup(t.tp_rank, t.tp, self.device_kind, rendezvous, self.timeout_s)
        device = _torch_device(self.device_kind)
        self._shard = build_tp_shard(self.checkpoint, t.tp_rank, t.tp, self._group.reducer, self.dtype, device)
        return self.info()

    @property
    def model(self) -> nn.Module:
        """The loaded shard's model."""
        if self._shard is None:
            raise ShardStateError(f"shard {self.topology.index}: call load() before using the model")
        return self._shard.model

    def info(self) -> ShardInfo:
        """Topology, device and the local parameter shapes of the loaded shard."""
        model = self.model
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        device = str(next(model.parameters()).device)
        return ShardInfo(self.topology, device, sum(p.numel() for p in model.parameters()), shapes,
                         tensor_bytes(model))

    def forward(self, input_ids: np.ndarray | torch.Tensor,
                attention_mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Logits ``[batch, seq, vocab]`` as float32 numpy (every tp rank of a group must call it)."""
        model = self.model
        device = next(model.parameters()).device
        # Copy: arrays that arrive through Ray's object store are read-only views.
        ids = torch.tensor(np.asarray(input_ids), dtype=torch.long, device=device)
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask), device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits.float().cpu().numpy()

    def shutdown(self) -> None:
        """Leave the process group and drop the model (idempotent)."""
        if self._group is not None:
            self._group.close()
            self._group = None
        self._shard = None
