"""Reuse of one activation's gemm operand by sibling Linears that are fed the same tensor.

Attention projections (q/k/v) and gated MLPs (gate/up) call several Linears on one input, and
their measured input scales are equal because they saw the same values. The emulated forward
rounds that input onto the FP8 grid once per Linear (its operand: the fp32 values of its FP8
codes, or its QDQ in hp with ``inc_layout``); this memo keeps the last result so the siblings
reuse it. The input is held weakly and matched by identity, version counter, layout and scale, so
an input changed in place (or freed and its memory reused) is never matched. The result never
leaves the Linear (only the matmul output does), so sharing it is safe.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

Scale = torch.Tensor | float


def _scale_key(scale: Scale) -> object:
    """One-element scales by value (CONST scales are separate buffers of equal value per module)."""
    if isinstance(scale, torch.Tensor) and (scale.numel() != 1 or scale.device.type != "cpu"):
        return (id(scale), scale._version, scale.device)
    return float(scale)


class SharedInputMemo:
    """One-entry memo of an input's gemm operand for a scale; dropped when pickled or copied."""

    def __init__(self) -> None:
        self._entry: tuple[object, weakref.ref[torch.Tensor], torch.Tensor] | None = None

    def input_operand(self, x: torch.Tensor, scale: Scale, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` (the operand of ``x`` with ``scale``), or its result from the previous call."""
        if x.is_inference() or x.requires_grad:
            return compute()  # inference tensors have no version counter; autograd keeps its graph
        key = (x._version, x.shape, x.stride(), x.storage_offset(), x.dtype, _scale_key(scale))
        entry = self._entry
        if entry is not None and entry[0] == key and entry[1]() is x:
            return entry[2]
        y = compute()
        self._entry = (key, weakref.ref(x), y)
        return y

    def __getstate__(self) -> dict[str, Any]:
        return {"_entry": None}
