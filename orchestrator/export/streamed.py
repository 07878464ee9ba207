"""The FP8 export of a sharded run, streamed: no process ever holds the model.

The driver plans the checkpoint from names, dtypes and shapes only: each tp rank's
``quantized_state(data=False)`` (meta tensors for codes and biases, the small scales as they are)
and the source checkpoint's safetensors headers (:func:`~orchestrator.export.gather.plan_checkpoint`).
The shard files are then written one tensor at a time in the files' own order; a quantized weight
(or bias) is asked of every tp rank of group 0 when its turn comes (one small call per rank),
concatenated by the tp rules and written; an unquantized tensor is read from the source checkpoint.

Why the driver writes, one tensor at a time, rather than the ranks writing their layers: a tensor's
tp slices live on different ranks, so some process has to join them anyway, and which file a tensor
lies in depends on every tensor before it in name order (HF's sharding rule); one writer keeps the
files, their index and their content exactly those of the in-memory export. What any process holds
is bounded by the largest tensors, whatever the model size: the driver holds one tensor's tp slices
and the joined tensor (plus two fused source expert tensors for MoE checkpoints stored fused), each
rank one slice on its way out. Every byte crosses from a rank to the driver once, as it would between
ranks. The ledger of what the export holds (:class:`~orchestrator.export.source.HeldBytes`) is
returned with the result, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from orchestrator.export.compressed_tensors import DEFAULT_MAX_SHARD_BYTES, write_compressed_tensors
from orchestrator.export.gather import CheckpointPlan, assemble_bias, assemble_weight, plan_checkpoint
from orchestrator.export.safetensors_files import TensorSpec
from orchestrator.export.source import HeldBytes, nbytes

# (in-model module name, "weight" | "bias") -> that tensor's piece on each tp rank, in rank order
# (weights as uint8 codes): what ``ShardCalibration.quantized_part`` returns, gathered.
FetchParts = Callable[[str, str], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ExportSummary:
    """What a streamed export wrote and held.

    Attributes:
        out: the export folder.
        tensors: tensors written.
        total_bytes: their bytes (the index's ``total_size``).
        largest_tensor_bytes: the largest one's bytes.
        peak_held_bytes: the most tensor bytes the export held at once (:class:`HeldBytes`).
    """

    out: Path
    tensors: int
    total_bytes: int
    largest_tensor_bytes: int
    peak_held_bytes: int


class _StreamedTensors:
    """The tensors of a planned checkpoint that it does not hold, fetched one at a time; each is held
    (in the ledger) from its fetch until the writer says it is written."""

    def __init__(self, plan: CheckpointPlan, dtypes: Mapping[str, str], fetch_parts: FetchParts,
                 held: HeldBytes) -> None:
        self.plan, self.dtypes, self.fetch_parts, self.held = plan, dtypes, fetch_parts, held
        self._fetched: dict[str, int] = {}

    def fetch(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        in_model = self.plan.modules.get(module)
        if in_model is None or leaf not in ("weight", "bias"):
            t = self.plan.source.load(name)
            self.held.hold(nbytes(t))
        else:
            t = self._from_ranks(in_model, leaf)
        self._fetched[name] = nbytes(t)
        return t

    def _from_ranks(self, module: str, leaf: str) -> torch.Tensor:
        parts = list(self.fetch_parts(module, leaf))
        parts_bytes = sum(nbytes(p) for p in parts)
        self.held.hold(parts_bytes)
        t = assemble_weight(module, parts, self.dtypes[module]) if leaf == "weight" else assemble_bias(module, parts)
        storage = t.untyped_storage().data_ptr()
        joined = all(p.untyped_storage().data_ptr() != storage for p in parts)
        # The slices are dropped on return; a tensor that is one of them (tp=1, replicated) stays held.
        self.held.hold(nbytes(t) if joined else 0)
        self.held.release(parts_bytes - (0 if joined else nbytes(t)))
        return t

    def written(self, spec: TensorSpec) -> None:
        self.held.release(self._fetched.pop(spec.name, 0))


def export_from_shards(checkpoint: Path, per_rank: Sequence[Mapping[str, Mapping[str, Any]]],
                       fetch_parts: FetchParts, weight_scales: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                       dynamic: bool, scale_method: str, nodes: Mapping[str, Mapping[str, Any]] | None = None,
                       ignored: Sequence[str] | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportSummary:
    """Write the compressed-tensors FP8 export of one tp group's quantized shards into ``out_dir``.

    Args:
        checkpoint: the source HF checkpoint.
        per_rank: each tp rank's ``quantized_state(data=False)`` in rank order (full states work too).
        fetch_parts: gives one module's weight codes or bias from every tp rank (:data:`FetchParts`).
        weight_scales, dynamic, scale_method, nodes, ignored: as in
            :func:`~orchestrator.export.gather.plan_checkpoint`.
        out_dir: the export folder (new or empty).
        max_shard_bytes: the most bytes per safetensors file (a bigger tensor gets a file of its own).
    """
    held = HeldBytes()
    plan = plan_checkpoint(checkpoint, per_rank, weight_scales, dynamic=dynamic, scale_method=scale_method,
                           ignored=ignored, nodes=nodes, held=held)
    dtypes = {module: str(per_rank[0][module]["dtype"]) for module in plan.modules.values()}
    streamed = _StreamedTensors(plan, dtypes, fetch_parts, held)
    specs: list[TensorSpec] = []

    def written(spec: TensorSpec) -> None:
        specs.append(spec)
        streamed.written(spec)

    try:
        out = write_compressed_tensors(plan.ckpt, out_dir, max_shard_bytes=max_shard_bytes, fetch=streamed.fetch,
                                       on_written=written)
    finally:
        plan.source.close()
    return ExportSummary(out, len(specs), sum(s.nbytes for s in specs),
                         max((s.nbytes for s in specs), default=0), held.peak)


__all__ = ["ExportSummary", "FetchParts", "export_from_shards"]
