"""The scales of many tensors at once: each max-abs is queued with its section, then every group of
values that share a formula (dtype, backoff, rounding) is computed as one vector.

A scale's formula is a dozen torch ops; on a 0-d tensor each costs a few microseconds of dispatch,
which made the scale formulas of a model's modules cost more than quantizing its weights
(SmolLM2-135M: ~50 ms for 211 Linears). The ops are elementwise, so one op over a vector gives
each element what it gives that element alone: the batch computes the same formulas
(:func:`shards.fp8.scale_math.pts_scales`, :func:`~shards.fp8.scale_math.pcs_scale_from_amax`)
with the same bits (``tests/shards/test_scale_batch.py``: every bf16 and fp16 value, every method).

Checks that name a tensor (non-finite statistics, empty arrays, a weight with a NaN) run when a
value is queued, in queue order, as the per-tensor functions run them; only an overflow of the hp
dtype is found when its group is computed (it names the first such tensor in queue order).

Usage: queue with :meth:`ScaleBatch.activation`, :meth:`~ScaleBatch.weight` and
:meth:`~ScaleBatch.weight_from_maxabs` (each returns a :class:`Scale`), call
:meth:`~ScaleBatch.compute` once, then read each scale with ``get()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from shards.fp8.methods import Granularity, Rounding, SectionSpec
from shards.fp8.scale_math import (
    MaxAbsLike,
    ScaleContext,
    maxabs_vector,
    require_maxabs,
    fixed_scale,
    is_fixed,
    measured_max,
    pcs_scale_from_amax,
    pts_scales,
    weight_maxabs,
)


class Scale(Protocol):
    """A scale that may be computed later: ``get()`` after the batch's ``compute()``."""

    def get(self) -> torch.Tensor: ...


# Ready, _Slot (and module_scales' drafts) are NamedTuples, not frozen dataclasses: a conversion
# makes a few per module, and a frozen dataclass's __init__ costs ~4x a tuple's.
class Ready(NamedTuple):
    """A scale known when it is queued (fixed values, OPT weight scales, scales given by the caller)."""

    value: torch.Tensor

    def get(self) -> torch.Tensor:
        return self.value


# Group key: (dtype of the values, backoff, rounding); per-tensor and per-channel groups apart.
_Key = tuple[torch.dtype, float, Rounding]


@dataclass
class _Group:
    """Values that share a formula; ``results`` holds one scale per value after ``compute``."""

    values: list[Any] = field(default_factory=list)  # floats (per tensor) or 1-D tensors (per channel)
    wheres: list[str] = field(default_factory=list)
    results: list[torch.Tensor] | None = None

    def add(self, value: object, where: str) -> "_Slot":
        self.values.append(value)
        self.wheres.append(where)
        return _Slot(self, len(self.values) - 1)


class _Slot(NamedTuple):
    group: _Group
    index: int

    def get(self) -> torch.Tensor:
        if self.group.results is None:
            raise RuntimeError("ScaleBatch.compute() must run before its scales are read")
        return self.group.results[self.index]


class ScaleBatch:
    """Queues max-abs values and computes their scales group by group (see the module docstring)."""

    def __init__(self, ctx: ScaleContext) -> None:
        self.ctx = ctx
        self._pts: dict[_Key, _Group] = {}
        self._pcs: dict[_Key, _Group] = {}

    def _queue(self, groups: dict[_Key, _Group], dtype: torch.dtype, section: SectionSpec, value: object,
               where: str) -> Scale:
        key = (dtype, section.backoff, section.rounding)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group()
        return group.add(value, where)

    def activation(self, maxabs: MaxAbsLike, section: SectionSpec, *, where: str) -> Scale:
        """What :func:`shards.fp8.scale_math.activation_scale` gives: a 0-d ``hp_dtype`` scale."""
        if is_fixed(section):
            return Ready(fixed_scale(section, self.ctx))
        require_maxabs(section, where)
        value, dtype = measured_max(maxabs, where)
        return self._queue(self._pts, dtype, section, value, where)

    def weight(self, weight: torch.Tensor, section: SectionSpec, *, where: str) -> Scale:
        """The MAXABS weight scale of :func:`shards.fp8.weight_scales.weight_scale`: 0-d in
        ``hp_dtype`` (PTS) or ``[out_channels]`` in the weight's dtype (PCS)."""
        amax, per_channel = weight_maxabs(weight, section, where)
        if per_channel is not None:
            return self._queue(self._pcs, weight.dtype, section, per_channel, where)
        return self._queue(self._pts, weight.dtype, section, amax, where)

    def weight_from_maxabs(self, maxabs: MaxAbsLike, section: SectionSpec, weight_dtype: torch.dtype, *,
                           where: str) -> Scale:
        """What :func:`shards.fp8.scale_math.weight_scale_from_maxabs` gives for a MAXABS or fixed section."""
        if is_fixed(section):
            return Ready(fixed_scale(section, self.ctx))
        amax = maxabs_vector(maxabs, weight_dtype, where)
        if section.granularity is Granularity.PCS:
            return self._queue(self._pcs, weight_dtype, section, amax, where)
        return self._queue(self._pts, weight_dtype, section, float(amax.max()), where)

    def compute(self) -> None:
        """Compute every scale queued since the last call: one vector evaluation per group."""
        for (dtype, backoff, rounding), g in self._pts.items():
            if g.results is None or len(g.results) != len(g.values):
                # Clones: each module gets a scale of its own, not a view into the group's vector.
                scales = pts_scales(g.values, dtype, backoff, rounding, self.ctx, g.wheres)
                g.results = [s.clone() for s in scales.unbind()]
        for (_dtype, backoff, rounding), g in self._pcs.items():
            if g.results is None or len(g.results) != len(g.values):
                scales = pcs_scale_from_amax(torch.cat(g.values), backoff, rounding, self.ctx)
                g.results = [s.clone() for s in scales.split([v.numel() for v in g.values])]
