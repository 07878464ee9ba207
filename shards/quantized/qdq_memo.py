"""Reuse of one activation's gemm operand by sibling Linears that are fed the same tensor.

Attention projections (q/k/v) and gated MLPs (gate/up) call several Linears on one input, and
their measured input scales are equal because they saw the same values. The emulated forward
rounds that input onto the FP8 grid once per Linear (its operand: the fp32 values of its FP8
codes, or its QDQ in hp with ``inc_layout``); this memo keeps the last result so the siblings
reuse it (``shards.model.input_memo``, keyed also by the scale). The result never
leaves the Linear (only the matmul output does), so sharing it is safe.
"""

from __future__ import annotations

from typing import Callable

import torch

from shards.model.input_memo import InputMemo

Scale = torch.Tensor | float


def _scale_key(scale: Scale) -> object:
    """One-element scales by value (CONST scales are separate buffers of equal value per module)."""
    if isinstance(scale, torch.Tensor) and (scale.numel() != 1 or scale.device.type != "cpu"):
        return (id(scale), scale._version, scale.device)
    return float(scale)


class SharedInputMemo(InputMemo[torch.Tensor]):
    """One-entry memo of an input's gemm operand for a scale; dropped when pickled or copied."""

    def input_operand(self, x: torch.Tensor, scale: Scale, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()`` (the operand of ``x`` with ``scale``), or its result from the previous call."""
        return self.get(x, _scale_key(scale), compute)
