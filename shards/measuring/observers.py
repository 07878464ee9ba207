"""Observers: running statistics of the tensors a module sees during MEASURE.

One registry keyed by observer name (the ``observer`` config key). Each entry declares how its
statistic merges across batches, cards and shards (``maxabs`` → ``"max"``), so the stats-store
reducer reads the declaration instead of branching on observer names.

Observers keep fp32 state on the tensor's device and update it with torch ops only: no ``.item()``
or host copy per batch, so measuring never stalls the card. NaN/Inf values are counted (on device)
and left out of the max. Reference ``inc-fp8-semantics.md`` §3.3; decisions §3, §5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from shards.errors import DuplicateRegistrationError, ShardError
from shards.fp8 import native_cast
from shards.fp8.scale_math import magnitude_max
from shards.model.input_memo import InputMemo
from stats_store.records import Measurement
from stats_store.reduce import get_merge


class UnknownObserverError(ShardError, ValueError):
    """The ``observer`` config value names no registered observer."""

@dataclass(frozen=True)
class ObserveTarget:
    """What an observer is attached to.

    Attributes:
        module_name: qualified module name (for file names and error messages).
        label: tensor label: ``inputs.0``, ``outputs.1``, ``params.weight``.
        channel_dim: the channel axis of a per-channel statistic (-1 activations, -2 matmul
            input 1, 0 weights).
        tensors_dir: where the ``save`` observer writes tensors; None when not saving.
        chunk_calls: how many calls the ``save`` observer puts in one file.
        memo: the session's :class:`ReductionMemo` (None: every tensor is reduced by itself).
    """

    module_name: str
    label: str
    channel_dim: int = -1
    tensors_dir: Path | None = None
    chunk_calls: int = 16
    memo: "ReductionMemo | None" = field(default=None, compare=False, repr=False)


class Observer(Protocol):
    """A running statistic of one tensor of one module."""

    def update(self, x: torch.Tensor) -> None:
        """Fold one observed tensor into the state, with device ops only."""

    def result(self) -> np.ndarray | None:
        """The statistic as a float32 1-D vector (host copy), or None when nothing was observed."""

    def nonfinite(self) -> int:
        """How many NaN/Inf values were seen and left out."""

    def flush(self) -> None:
        """Write anything still buffered (only observers with side effects need it)."""


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def _upcast_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) if x.dtype in _FP8 else x  # fp8 has no abs/amax kernels on CPU


def _finite_abs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|x| with NaN/Inf replaced by 0 (left out of any max), and the count of those values."""
    x = _upcast_fp8(x)
    finite = torch.isfinite(x)
    absx = torch.where(finite, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    return absx, (~finite).sum()


_NO_BAD = torch.zeros((), dtype=torch.int64)

# A reduction of one observed tensor: the max-abs (a host float, or a device/CPU tensor) and the
# device-side count of the NaN/Inf values left out (``_NO_BAD`` when the CPU path proved none).
Reduction = tuple["torch.Tensor | float", torch.Tensor]


def _channel_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """``x`` as a 2-D tensor with the channels along one axis, and that axis: reductions along the
    contiguous axis of a row-major view are the fast ones (``movedim`` would copy)."""
    dim = dim % x.ndim
    if dim == x.ndim - 1:
        return x.reshape(-1, x.shape[dim]), 1  # activations: rows of channels, reduce over rows
    if dim == 0:
        return x.reshape(x.shape[0], -1), 0  # weights: one row per output channel
    return x.movedim(dim, 0).reshape(x.shape[dim], -1), 0


def _fast_cpu_maxabs(x: torch.Tensor, channel_dim: int | None) -> "torch.Tensor | float | None":
    """On CPU, the max-abs (per tensor, or per channel along ``channel_dim``) straight away when no
    NaN/Inf is present; None otherwise.

    A CPU tensor has no device queue to stall, so looking at the result costs nothing; it saves the
    isfinite/where/count passes that the accelerator path runs on every tensor to stay sync-free.
    Per tensor it is one pass of the C kernel returning a Python float
    (:func:`shards.fp8.native_cast.maxabs_value`), else :func:`shards.fp8.scale_math.magnitude_max`;
    per channel of activations, one pass down the columns (:func:`native_cast.maxabs_columns`,
    fp32 maxima and a finiteness flag, no |x| temporary), of weights the per-row kernel. NaN
    propagates and inf stays, so a finite result proves every element finite.
    """
    if x.device.type != "cpu":
        return None
    if channel_dim is None or x.ndim == 0:
        m = native_cast.maxabs_value(x)
        if m is None:  # fp8 and other dtypes, layouts or the kernel switched off: torch's route
            m = float(magnitude_max(_upcast_fp8(x)))
        return m if math.isfinite(m) else None
    x = _upcast_fp8(x)
    rows, axis = _channel_rows(x, channel_dim)
    if axis == 1:  # activations: rows of channels, max down each column
        native = native_cast.maxabs_columns(rows)
        if native is not None:
            return native[0] if native[1] else None
        m = rows.abs().amax(dim=0)
    else:
        m = magnitude_max(rows, dim=1)  # weights: the per-row kernel
    return m if bool(torch.isfinite(m).all()) else None


def _reduce(x: torch.Tensor, channel_dim: int | None) -> Reduction:
    """The max-abs of ``x`` (per tensor when ``channel_dim`` is None) and its NaN/Inf count."""
    x = x.detach()
    fast = _fast_cpu_maxabs(x, channel_dim)
    if fast is not None:
        return fast, _NO_BAD
    return _reduce_counting(x, channel_dim)


def _reduce_counting(x: torch.Tensor, channel_dim: int | None) -> Reduction:
    """:func:`_reduce` without the CPU shortcut: NaN/Inf left out of the max and counted."""
    absx, bad = _finite_abs(x.detach())
    if channel_dim is None or absx.ndim == 0:
        return absx.amax().reshape(1), bad
    rows, axis = _channel_rows(absx, channel_dim)
    return rows.amax(dim=1 - axis), bad


class ReductionMemo(InputMemo[Reduction]):
    """The session's memo of the last tensor's reduction (``shards.model.input_memo``): sibling
    modules fed the same tensor (q/k/v projections, gate/up) each observe it, and it is reduced once
    per reduction kind."""

    def reduce(self, x: torch.Tensor, channel_dim: int | None) -> Reduction:
        return self.get(x, channel_dim, lambda: _reduce(x, channel_dim))


class _CountingObserver:
    """State shared by the max-abs observers: fp32 max on the device (or a host float after the CPU
    fast path), a device-side NaN/Inf count."""

    #: the channel axis of the statistic; None: one value per tensor
    channel_dim: int | None = None

    def __init__(self, target: ObserveTarget) -> None:
        self.target = target
        self._state: torch.Tensor | None = None
        self._host: float | None = None  # per-tensor max of CPU tensors: no tensor op per call
        self._nonfinite: torch.Tensor | None = None
        # The kernel's per-call paths, FP8_ORCH_NATIVE_CAST read once here: per tensor a reduction
        # returning a float; per channel of activations (the last axis) a fold into the fp32 state.
        self._cpu_value = native_cast.cpu_maxabs_value() if self.channel_dim is None else None
        self._cpu_fold = native_cast.cpu_maxabs_columns_into() if self.channel_dim == -1 else None

    def update(self, x: torch.Tensor) -> None:
        state, cpu_fold = self._state, self._cpu_fold
        if cpu_fold is not None and state is not None and x.is_cpu and state.is_cpu:
            # Per channel, after the first call has set the state's shape: one pass folding into it.
            folded = cpu_fold(x, state)
            if folded:
                return
            if folded is False:  # a NaN/Inf: the kernel's pass proved it, count without redoing it
                self._fold(*_reduce_counting(x, self.channel_dim))
                return
        cpu_value = self._cpu_value
        if cpu_value is not None and x.is_cpu:
            # The hot path of a MEASURE forward on CPU: one kernel pass returning a float, folded
            # into a float. Every Python step here runs once per observed call, between matmuls
            # that have evicted the interpreter's data from the caches, so each costs several
            # times its warm price: no memo (the kernel is cheaper than its lookup), no tensors.
            m = cpu_value(x)  # None: not applicable (dtype, layout, empty)
            if m is not None:
                if m - m != 0.0:  # not finite (inf - inf and NaN - NaN are NaN): count, no second pass
                    self._fold(*_reduce_counting(x, None))
                    return
                host = self._host
                if host is None or m > host:
                    self._host = m
                return
        if x.numel() == 0:
            return
        memo = self.target.memo  # matched by identity: hand it the caller's tensor, not a detached view
        value, bad = memo.reduce(x, self.channel_dim) if memo is not None else _reduce(x, self.channel_dim)
        self._fold(value, bad)

    def _fold(self, value: "torch.Tensor | float", bad: torch.Tensor) -> None:
        if isinstance(value, float):
            self._host = value if self._host is None else max(self._host, value)
            return
        value = value.to(torch.float32)  # exact: a max of hp values is an hp value
        if self._state is None:
            self._state = value.clone()
            self._nonfinite = bad.clone()
            return
        if self._state.shape != value.shape:
            raise ValueError(
                f"module {self.target.module_name!r} {self.target.label}: channel count changed from "
                f"{tuple(self._state.shape)} to {tuple(value.shape)} between calls; per-channel observers "
                "need a fixed channel axis (use observer 'maxabs' for this model)"
            )
        torch.maximum(self._state, value.to(self._state.device), out=self._state)
        assert self._nonfinite is not None
        if bad is not _NO_BAD:  # the CPU fast path proved the tensor finite: nothing to add
            self._nonfinite += bad.to(self._nonfinite.device)

    def result(self) -> np.ndarray | None:
        host = None if self._host is None else np.array([self._host], dtype=np.float32)  # exact: hp value
        if self._state is None:
            return host
        state = self._state.detach().to("cpu").numpy().astype(np.float32).reshape(-1)
        return state if host is None else np.maximum(state, host)

    def nonfinite(self) -> int:
        return 0 if self._nonfinite is None else int(self._nonfinite.item())

    def flush(self) -> None:
        return None


class MaxAbsObserver(_CountingObserver):
    """Running max of |x| over the whole tensor: a ``(1,)`` vector."""


class MaxAbsPerChannelObserver(_CountingObserver):
    """Running max of |x| per channel along ``target.channel_dim``: a ``(C,)`` vector.

    Unlike INC it needs no shape file: the channel count is taken from the first tensor.
    """

    def __init__(self, target: ObserveTarget) -> None:
        self.channel_dim = target.channel_dim  # before the base class picks its per-tensor path
        super().__init__(target)


class SaveObserver(MaxAbsObserver):
    """Keeps the per-tensor max-abs and also writes every observed tensor to ``.safetensors``.

    Files are ``<tensors_dir>/<module>.<label>.<chunk>.safetensors``, each holding up to
    ``chunk_calls`` tensors keyed ``call_<n>``. Saving copies each tensor to the host, so this
    observer is for debugging, not for speed. Write errors propagate (INC swallows them).
    """

    def __init__(self, target: ObserveTarget) -> None:
        super().__init__(target)
        if target.tensors_dir is None:
            raise ValueError(
                f"observer 'save' on module {target.module_name!r} needs a tensors directory; "
                "set dump_stats_path so that tensors can be written beside the measurement"
            )
        self._buffer: dict[str, torch.Tensor] = {}
        self._calls = 0
        self._chunk = 0
        self.files: list[Path] = []

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self._buffer[f"call_{self._calls}"] = x.detach().to("cpu").contiguous().clone()
        self._calls += 1
        if len(self._buffer) >= self.target.chunk_calls:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        assert self.target.tensors_dir is not None
        self.target.tensors_dir.mkdir(parents=True, exist_ok=True)
        path = self.target.tensors_dir / f"{self.target.module_name}.{self.target.label}.{self._chunk:05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"module": self.target.module_name, "label": self.target.label})
        self.files.append(path)
        self._buffer = {}
        self._chunk += 1


@dataclass(frozen=True)
class ObserverSpec:
    """One registry row.

    Attributes:
        name: the ``observer`` config value.
        merge: how results of this observer combine across batches and cards: a merge declared in
            ``stats_store.reduce.MERGES`` (the one vocabulary of merges); the writers record it
            with every tensor and the reducer applies it.
        factory: builds one observer for one tensor.
        per_channel: activation statistics are per channel (weights are always per channel).
    """

    name: str
    merge: str
    factory: Callable[[ObserveTarget], Observer]
    per_channel: bool = False


_REGISTRY: dict[str, ObserverSpec] = {}


def register_observer(spec: ObserverSpec) -> ObserverSpec:
    """Add an observer; a name that exists already, or an unknown merge, raises."""
    if spec.name in _REGISTRY:
        raise DuplicateRegistrationError(
            f"observer {spec.name!r} is already registered; pick another name (known: {', '.join(_REGISTRY)})"
        )
    get_merge(spec.merge, f"observer {spec.name!r}")  # an unknown merge raises, naming the known ones
    _REGISTRY[spec.name] = spec
    return spec


def get_observer(name: str) -> ObserverSpec:
    """The registry row of ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownObserverError(
            f"observer {name!r} is not implemented; set 'observer' to one of: {', '.join(_REGISTRY)}"
        ) from None


def known_observers() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def merge_values(merge: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Combine two results of one observer (different batches) with its declared merge."""
    return get_merge(merge).other_batches(a, b)


def declared_merges(observer: str, stats: Measurement) -> dict[str, str]:
    """The merge of every tensor label in ``stats`` under ``observer``, for the store's writers:
    values merge as the observer declares (counts are the store's own business)."""
    merge = get_observer(observer).merge
    return {label: merge for st in stats.modules.values() for label in st.tensors()}


def weight_observer(target: ObserveTarget) -> Observer:
    """Weights are always observed per output channel (axis 0): the per-tensor value is their max,
    and per-channel weight scales and tensor-parallel shards need the vector."""
    return MaxAbsPerChannelObserver(target)


register_observer(ObserverSpec("maxabs", "max", MaxAbsObserver))
register_observer(ObserverSpec("maxabs_per_channel", "max", MaxAbsPerChannelObserver, per_channel=True))
register_observer(ObserverSpec("save", "max", SaveObserver))
