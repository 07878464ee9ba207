"""The source checkpoint's unquantized tensors, planned from the safetensors headers and read one
tensor at a time (never the whole checkpoint), and the byte ledger an export keeps of what it holds.

Each read opens its file for that one tensor and closes it again. A tensor safetensors returns is
backed by a mapping of the file (checked with torch 2.13, safetensors 0.8): its pages count
towards the process's resident memory once touched, and are given back when the tensor is dropped,
so the export holds the tensor it writes and nothing else of the source.

Fused 3-D expert tensors (transformers 5 layout) are written per expert; the two most recently read
fused tensors are kept, which covers one MoE layer's ``gate_up_proj`` and ``down_proj`` while its
experts are written in name order.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from orchestrator.export.safetensors_files import TensorSpec, read_specs
from orchestrator.export.writer import ExportError, disk_namer, split_fused_experts
from shards.families import ModelFamily

_FUSED_KEPT = 2


class HeldBytes:
    """Bytes of tensor data an export holds at once, as its parts declare them: each part holds what
    it creates and releases what it drops (the bound the export's memory tests check)."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def hold(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def release(self, nbytes: int) -> None:
        self.now -= nbytes


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SourceTensors:
    """The tensors of ``checkpoint`` outside the quantized Linears, under on-disk names.

    Args:
        checkpoint: the source HF checkpoint folder (safetensors).
        skip_prefixes: on-disk module names whose tensors the export writes itself (quantized Linears).
        family: the checkpoint's model family (on-disk names, fused expert layout); None: names as they are.
        held: the export's ledger (the fused tensors kept count there).
    """

    def __init__(self, checkpoint: Path, skip_prefixes: Sequence[str], family: ModelFamily | None,
                 held: HeldBytes | None = None) -> None:
        disk = disk_namer(family)
        skip = tuple(p + "." for p in skip_prefixes)
        self.family = family
        self.held = held or HeldBytes()
        self.specs: dict[str, TensorSpec] = {}
        self._where: dict[str, tuple[Path, str, str]] = {}  # on-disk name -> (file, stored key, in-model part)
        self._fused: OrderedDict[tuple[Path, str], torch.Tensor] = OrderedDict()
        self.fused_reads = 0  # fused tensors read from disk (each once when experts come in name order)
        for f in sorted(Path(checkpoint).glob("*.safetensors")):
            for key, spec in read_specs(f).items():
                if key.startswith(skip):
                    continue
                for part, t in split_fused_experts(key, spec.meta(), family).items():
                    name = disk(part)
                    if not name.startswith(skip):
                        self.specs[name] = TensorSpec.of(name, t)
                        self._where[name] = (f, key, part)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor (name, dtype and shape; no data)."""
        return {name: spec.meta() for name, spec in self.specs.items()}

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read from its file (the caller holds it until it drops it)."""
        if name not in self._where:
            raise ExportError(f"the source checkpoint has no tensor {name!r} outside the quantized Linears")
        f, key, part = self._where[name]
        if part == key:
            return _read(f, key)
        fused = self._fused_tensor(f, key)
        return split_fused_experts(key, fused, self.family)[part].contiguous()

    def _fused_tensor(self, f: Path, key: str) -> torch.Tensor:
        if (f, key) in self._fused:
            self._fused.move_to_end((f, key))
            return self._fused[(f, key)]
        while len(self._fused) >= _FUSED_KEPT:
            self.held.release(nbytes(self._fused.popitem(last=False)[1]))
        t = self._fused[(f, key)] = _read(f, key)
        self.fused_reads += 1
        self.held.hold(nbytes(t))
        return t

    def close(self) -> None:
        """Drop the fused tensors kept."""
        while self._fused:
            self.held.release(nbytes(self._fused.popitem()[1]))


def _read(f: Path, key: str) -> torch.Tensor:
    with safe_open(str(f), framework="pt") as h:
        return h.get_tensor(key)


__all__ = ["HeldBytes", "SourceTensors", "nbytes"]
