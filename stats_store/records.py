"""The in-memory result of MEASURE: per-module max-abs statistics in exact fp32.

This is the one structure observers produce, the stats store persists and the scale math reads.
Values are numpy float32 vectors: shape ``(1,)`` for a per-tensor max-abs, ``(C,)`` for a
per-channel one (global, unsharded channel coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class ModuleStats:
    """Statistics of one measured module.

    Attributes:
        name: qualified module name (``named_modules()`` name, ``_orig_mod.`` removed).
        op_type: the op type name (see ``shards.model.op_types``).
        inputs: max-abs of each observed input; None where that input was not observed.
        outputs: max-abs of each observed output; None when outputs were not measured.
        params: max-abs of each observed parameter (``"weight"``).
        num_samples: number of forward calls observed.
        nonfinite: per tensor label (``"inputs.0"``, ``"outputs.1"``...) the number of NaN/Inf
            values seen. Observers leave them out of the max; values imported from INC files keep
            them in the vectors as data (so an export gives the file back) and scale code refuses
            to turn them into scales.
        num_tokens: rows (tokens) seen at ``inputs[0]`` over all calls (``numel // shape[-1]`` per
            call): for a routed MoE expert, the tokens routed to it. 0 when unknown (INC imports,
            stores written before it was counted).
    """

    name: str
    op_type: str
    inputs: list[np.ndarray | None] = field(default_factory=list)
    outputs: list[np.ndarray | None] | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    num_samples: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)
    num_tokens: int = 0

    def tensors(self) -> dict[str, np.ndarray]:
        """Every observed array keyed by a stable label: ``inputs.0``, ``outputs.1``, ``params.weight``."""
        out: dict[str, np.ndarray] = {}
        for i, a in enumerate(self.inputs):
            if a is not None:
                out[f"inputs.{i}"] = a
        for i, a in enumerate(self.outputs or []):
            if a is not None:
                out[f"outputs.{i}"] = a
        for k, a in self.params.items():
            out[f"params.{k}"] = a
        return out


@dataclass
class Measurement:
    """All module statistics of one run (or one shard of it).

    Attributes:
        observer: the observer name (part of INC file names).
        modules: statistics by module name, in discovery order.
        num_samples: top-level batches observed (INC's optional ``NumSamples``).
    """

    observer: str = "maxabs"
    modules: dict[str, ModuleStats] = field(default_factory=dict)
    num_samples: int | None = None

    def nonfinite_report(self) -> dict[str, dict[str, int]]:
        """Module name → {tensor label: NaN/Inf count}, for modules that saw any."""
        return {n: dict(m.nonfinite) for n, m in self.modules.items() if any(m.nonfinite.values())}


def as_maxabs(values: object) -> np.ndarray:
    """Normalise a max-abs value (float, nested list, tensor, array) to a float32 1-D vector."""
    arr = np.asarray(values, dtype=np.float32)
    return arr.reshape(-1) if arr.ndim else arr.reshape(1)


@dataclass
class SentCounts:
    """Counts already written to a store, so the next flush sends increments only.

    The store adds counts across flushes while max-abs values merge by max; re-sending a running
    maximum is harmless, re-sending a running count is not.
    """

    calls: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)
    samples: int = 0
    tokens: dict[str, int] = field(default_factory=dict)

    def increment(self, m: Measurement) -> Measurement:
        """``m`` (running totals) with its counts replaced by what is new since the last call."""
        samples = None if m.num_samples is None else m.num_samples - self.samples
        out = Measurement(observer=m.observer, num_samples=samples)
        for name, stats in m.modules.items():
            seen = self.nonfinite.get(name, {})
            nonfinite = {k: v - seen.get(k, 0) for k, v in stats.nonfinite.items() if v - seen.get(k, 0)}
            out.modules[name] = replace(stats, num_samples=stats.num_samples - self.calls.get(name, 0),
                                        nonfinite=nonfinite, num_tokens=stats.num_tokens - self.tokens.get(name, 0))
            self.calls[name] = stats.num_samples
            self.tokens[name] = stats.num_tokens
            self.nonfinite[name] = dict(stats.nonfinite)
        self.samples = m.num_samples or 0
        return out

    def mark_sent(self, before: Measurement, after: Measurement) -> None:
        """Count what happened between two running totals as already sent (a re-run batch)."""
        for name, stats in after.modules.items():
            old = before.modules.get(name)
            self.calls[name] = self.calls.get(name, 0) + stats.num_samples - (old.num_samples if old else 0)
            self.tokens[name] = self.tokens.get(name, 0) + stats.num_tokens - (old.num_tokens if old else 0)
            seen = self.nonfinite.setdefault(name, {})
            for label, n in stats.nonfinite.items():
                seen[label] = seen.get(label, 0) + n - (old.nonfinite.get(label, 0) if old else 0)
        self.samples += (after.num_samples or 0) - (before.num_samples or 0)
