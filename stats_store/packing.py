"""Many statistics in one flat float32 vector with an index: how the store keeps them.

A packed set holds every tensor of every module back to back in ``values``; its index lists the
modules in order, each with its op type, counts and, per tensor label, the ``(offset, length)`` of
its values. Writing or reading a whole run is then one array write or read plus the index, instead
of one zarr array per tensor (see ``stats_store.zarr_store`` for the measured difference). Per-module
views are numpy slices of ``values``: no copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from stats_store.records import Measurement, ModuleStats
from stats_store.errors import ShardSpecError


@functools.cache
def _parse_label(label: str) -> tuple[str, int | str]:
    """``inputs.0`` → ``("inputs", 0)``, ``params.weight`` → ``("params", "weight")``; once per label
    (a model repeats a few labels over all its modules)."""
    kind, _, key = label.partition(".")
    if kind in ("inputs", "outputs"):
        return kind, int(key)
    if kind == "params":
        return kind, key
    return "", label


def _vector(value: np.ndarray) -> np.ndarray:
    if type(value) is np.ndarray and value.dtype == np.float32 and value.ndim == 1:
        return value  # already what the conversion gives (slices of a packed vector)
    return np.asarray(value, dtype=np.float32).reshape(-1)


def module_stats_from_tensors(
    name: str, op_type: str, tensors: Mapping[str, np.ndarray], num_samples: int, nonfinite: Mapping[str, int],
    num_tokens: int = 0,
) -> ModuleStats:
    """Rebuild a ``ModuleStats`` from label → vector (``inputs.0``, ``outputs.2``, ``params.weight``)."""
    slots = _slots(tuple(tensors))
    if slots is None:
        label = next(lb for lb in tensors if not _parse_label(lb)[0])
        raise ShardSpecError(f"module {name}: tensor label {label!r} is not inputs.N, outputs.N or params.NAME")
    ins, outs, params = slots
    vecs = [_vector(v) for v in tensors.values()]
    return ModuleStats(
        name=name,
        op_type=op_type,
        inputs=[vecs[i] if i >= 0 else None for i in ins],
        outputs=None if outs is None else [vecs[i] if i >= 0 else None for i in outs],
        params={key: vecs[i] for key, i in params},
        num_samples=num_samples,
        nonfinite=dict(nonfinite),
        num_tokens=num_tokens,
    )


_Slots = tuple[tuple[int, ...], tuple[int, ...] | None, tuple[tuple[str, int], ...]]


# Modules share a few label sets: each is parsed once, not per module (a convert reads every
# module of the store: 210 for SmolLM2).
@functools.lru_cache(maxsize=4096)
def _slots(labels: tuple[str, ...]) -> _Slots | None:
    """Where each input, output and parameter of a module comes from among tensors labelled
    ``labels`` (their position; -1: not observed, None); outputs None when there is none; None
    when a label is of none of these kinds."""
    inputs: dict[int, int] = {}
    outputs: dict[int, int] = {}
    params: dict[str, int] = {}
    for pos, label in enumerate(labels):
        kind, key = _parse_label(label)
        if kind == "inputs":
            inputs[key] = pos  # type: ignore[index]
        elif kind == "outputs":
            outputs[key] = pos  # type: ignore[index]
        elif kind == "params":
            params[key] = pos  # type: ignore[index]
        else:
            return None
    return (tuple(inputs.get(i, -1) for i in range(max(inputs) + 1)) if inputs else (),
            tuple(outputs.get(i, -1) for i in range(max(outputs) + 1)) if outputs else None,
            tuple(params.items()))


@dataclass(frozen=True)
class ModuleEntry:
    """One module of a packed set.

    Attributes:
        name: qualified module name.
        op_type: op type name (``shards.model.op_types``).
        num_samples: forward calls observed.
        nonfinite: tensor label → NaN/Inf count.
        tensors: ``(label, offset, length)`` of each tensor, in label order of ``ModuleStats.tensors``.
        num_tokens: rows (tokens) seen at ``inputs[0]``; 0 when unknown.
    """

    name: str
    op_type: str
    num_samples: int
    nonfinite: Mapping[str, int]
    tensors: tuple[tuple[str, int, int], ...]
    num_tokens: int = 0


@dataclass(frozen=True)
class Packed:
    """Statistics of many modules: one float32 vector and the index into it."""

    values: np.ndarray
    modules: tuple[ModuleEntry, ...]

    def module_stats(self, entry: ModuleEntry) -> ModuleStats:
        """One module's statistics; its vectors are views of ``values``."""
        tensors = {label: self.values[off : off + n] for label, off, n in entry.tensors}
        return module_stats_from_tensors(entry.name, entry.op_type, tensors, entry.num_samples, entry.nonfinite,
                                         entry.num_tokens)

    def to_measurement(self, observer: str, num_samples: int | None) -> Measurement:
        """All modules as a ``Measurement`` (vectors are views of ``values``)."""
        out = Measurement(observer=observer, num_samples=num_samples)
        for entry in self.modules:
            out.modules[entry.name] = self.module_stats(entry)
        return out


def pack_measurement(stats: Measurement) -> Packed:
    """Pack every module of ``stats`` (in its order) into one vector."""
    pieces: list[np.ndarray] = []
    entries = []
    offset = 0
    for name, module in stats.modules.items():
        tensors = []
        for label, value in module.tensors().items():
            vec = np.asarray(value, dtype=np.float32).reshape(-1)
            tensors.append((label, offset, vec.size))
            pieces.append(vec)
            offset += vec.size
        entries.append(ModuleEntry(name, module.op_type, int(module.num_samples),
                                   MappingProxyType(dict(module.nonfinite)), tuple(tensors), int(module.num_tokens)))
    values = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return Packed(values, tuple(entries))
