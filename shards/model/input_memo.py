"""A one-entry memo of something computed from a module's input tensor, for sibling modules fed
the same tensor.

Attention projections (q/k/v) and gated MLPs (gate/up) call several modules on one input; the
observers reduce it (``shards.measuring.observers``) and the emulated FP8 forward rounds it onto
the FP8 grid (``shards.quantized.qdq_memo``), once for all siblings through this memo. The tensor
is held weakly and matched by identity, version counter and layout (plus the caller's key), so a
tensor changed in place, or freed and its memory reused, is never matched.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Generic, TypeVar

import torch

T = TypeVar("T")


class InputMemo(Generic[T]):
    """The last ``compute()`` result for one tensor and key; dropped when pickled or copied."""

    def __init__(self) -> None:
        self._entry: tuple[object, weakref.ref[torch.Tensor], T] | None = None

    def get(self, x: torch.Tensor, key: object, compute: Callable[[], T]) -> T:
        """``compute()`` for ``x`` and ``key``, or its result from the previous call on them."""
        if x.is_inference() or x.requires_grad:
            return compute()  # inference tensors have no version counter; autograd keeps its graph
        # Identity is checked below, so dtype and device cannot differ; in-place view changes can.
        full = (x._version, x.shape, x.stride(), x.storage_offset(), key)
        entry = self._entry
        if entry is not None and entry[0] == full and entry[1]() is x:
            return entry[2]
        value = compute()
        self._entry = (full, weakref.ref(x), value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"_entry": None}
