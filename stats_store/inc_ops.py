"""INC's op types as its measurement files see them: the one table of op-type names.

Reference ``inc-fp8-semantics.md`` §3.1 fixes, per op type, the observed inputs, the observed
parameters and the outputs (and whether they are measured even with ``measure_exclude: OUTPUT``).
This is the vocabulary everything else hangs on: ``shards.model.op_types`` adds module classes and
scale rules to these rows, measuring and quantized modules register their code under these names,
and importing an INC file (whose nodes carry no op type) infers it from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

UNKNOWN_OP = "unknown"


@dataclass(frozen=True)
class IncOp:
    """One op type of INC's table.

    Attributes:
        name: INC's op-type name.
        num_inputs: observed inputs.
        params: observed parameters (only ``"weight"`` exists).
        num_outputs: observed outputs; None for MoE's ``1 + E`` (one per expert).
        outputs_required: outputs are measured even when ``measure_exclude`` is OUTPUT.
        name_hints: substrings of the module's leaf name that identify this op when another op
            has the same counts; an op without hints is the default among its look-alikes.
    """

    name: str
    num_inputs: int
    params: tuple[str, ...]
    num_outputs: int | None
    outputs_required: bool
    name_hints: tuple[str, ...] = ()

    def matches(self, num_inputs: int, has_weight: bool, num_outputs: int | None) -> bool:
        """Whether a node with these counts (``num_outputs`` None: outputs not measured) can be one."""
        if self.num_inputs != num_inputs or ("weight" in self.params) != has_weight:
            return False
        if num_outputs is None:
            return True
        if self.num_outputs is None:  # MoE: 1 + E outputs, any count but a single one
            return num_outputs != 1
        return self.num_outputs == num_outputs


INC_OPS: Mapping[str, IncOp] = MappingProxyType(
    {
        op.name: op
        for op in (
            IncOp("linear", 1, ("weight",), 1, False),
            IncOp("row_parallel_linear", 1, ("weight",), 2, True),
            IncOp("matmul", 2, (), 1, False),
            IncOp("b2b_matmul", 2, (), 1, True, ("batch2block", "block2batch")),  # vLLM's batch2block
            IncOp("kv_cache", 1, (), 1, False, ("cache",)),
            IncOp("softmax", 1, (), 1, True, ("softmax",)),
            IncOp("fused_sdpa", 3, (), 2, True),
            IncOp("dynamic_moe", 1, (), None, True),
            IncOp("embedding", 1, ("weight",), 1, False),
        )
    }
)


def infer_op_type(name: str, num_inputs: int, params: Iterable[str] | None, num_outputs: int | None) -> str:
    """The op type of a measured node from its counts and name, or ``"unknown"``.

    The candidates are the table's rows with these counts. A node without outputs was measured
    with outputs excluded, so rows that always measure outputs drop out unless nothing else fits
    (a fused SDPA); a single candidate is the answer. Among look-alikes a row whose name hint is in the module's leaf name wins, else
    the first row without hints (a weighted 1-in/1-out node is a linear; a 2-input one a matmul);
    a 1-input/1-output node named neither ``*softmax*`` nor ``*cache*`` stays unknown.
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    has_weight = params is not None and "weight" in set(params)
    candidates = [op for op in INC_OPS.values() if op.matches(num_inputs, has_weight, num_outputs)]
    if num_outputs is None:
        candidates = [op for op in candidates if not op.outputs_required] or candidates
    if len(candidates) == 1:
        return candidates[0].name
    hinted = [op for op in candidates if any(h in leaf for h in op.name_hints)]
    if hinted:
        return hinted[0].name
    defaults = [op for op in candidates if not op.name_hints]
    return defaults[0].name if defaults else UNKNOWN_OP
