"""The op types the code works with: INC's table (``stats_store.inc_ops``: names and observed
counts, the one vocabulary) extended with module classes and where each scale comes from.
Reference ``inc-fp8-semantics.md`` §2.5 and §3.1.

Every other registry (measuring behaviours, patched classes, shard axes) is keyed by these names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from shards.errors import DuplicateRegistrationError
from stats_store.inc_ops import INC_OPS, IncOp


class OutputRule(str, enum.Enum):
    """How the output scale of an op is obtained."""

    WEIGHT_TIMES_INPUT = "weight_times_input"  # linear: s_w * s_in (elementwise for PCS)
    PRODUCT_OF_INPUTS = "product_of_inputs"  # matmul, b2b_matmul: s_in0 * s_in1
    SAME_AS_INPUT = "same_as_input"  # kv_cache: the input scale object itself
    MEASURED = "measured"  # softmax, fused_sdpa, moe: from outputs[0]
    NONE = "none"  # embedding: weight only


@dataclass(frozen=True)
class Source:
    """Which measurement a scale is computed from: ``inputs[i]`` or ``outputs[i]``.

    ``rest=True`` means "this index and every later one" (MoE: one scale per expert output).
    ``kind == "unit"`` means the kernel uses 1.0 and no measurement is read (softmax input).
    """

    kind: str
    index: int = 0
    rest: bool = False


def _in(i: int) -> Source:
    return Source("inputs", i)


def _out(i: int, rest: bool = False) -> Source:
    return Source("outputs", i, rest)


UNIT = Source("unit")


# Observed outputs of a MoE op before the model says how many experts it has: 1 + 8.
MOE_DEFAULT_OUTPUTS = 9


@dataclass(frozen=True)
class OpType:
    """One row: an op type of INC's table (``stats_store.inc_ops``, its counts) and what the code
    needs to know besides.

    Attributes:
        inc: the row of INC's table: name, observed inputs, params and outputs.
        supports_dynamic: can be quantized with dynamic per-token activation scales.
        class_names: module classes (``type(m).__name__``) of this op type.
        input_scales: where each input scale comes from, in the order the kernel takes them.
        output_rule: how the output scale is obtained.
    """

    inc: IncOp
    supports_dynamic: bool
    class_names: tuple[str, ...]
    input_scales: tuple[Source, ...]
    output_rule: OutputRule

    @property
    def name(self) -> str:
        return self.inc.name

    @property
    def num_inputs(self) -> int:
        return self.inc.num_inputs

    @property
    def params(self) -> tuple[str, ...]:
        """Names of parameters whose max-abs is observed (only "weight" exists)."""
        return self.inc.params

    @property
    def num_outputs(self) -> int:
        """Observed outputs (MoE: 1 + experts, set at measure time)."""
        return self.inc.num_outputs if self.inc.num_outputs is not None else MOE_DEFAULT_OUTPUTS

    @property
    def outputs_required(self) -> bool:
        """Outputs are measured even when ``measure_exclude`` is OUTPUT."""
        return self.inc.outputs_required


_LINEAR_CLASSES = (
    "Linear",
    "FalconLinear",
    "Conv2d",
    "LoRACompatibleLinear",
    "LoRACompatibleConv",
    "ParallelLMHead",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "MoeMatmul",
    "MoeFP8Matmul",
    "GaudiFP8Linear",
    "LinearLayer",
    "LinearAllreduce",
    "ScopedLinearAllReduce",
    "LmHeadLinearAllreduce",
)

OP_TYPES: Mapping[str, OpType] = MappingProxyType(
    {
        op.name: op
        for op in (
            OpType(INC_OPS["linear"], True, _LINEAR_CLASSES, (_in(0),), OutputRule.WEIGHT_TIMES_INPUT),
            OpType(INC_OPS["row_parallel_linear"], True, ("RowParallelLinear",), (_in(0),),
                # Reference §2.5: "like linear". Deliberately not from outputs[0]: that is the partial
                # pre-all-reduce result, which differs between tp sizes and would break the
                # invariant that tp=k gives tp=1's scales.
                OutputRule.WEIGHT_TIMES_INPUT,
            ),
            OpType(INC_OPS["matmul"], True, ("Matmul",), (_in(0), _in(1)), OutputRule.PRODUCT_OF_INPUTS),
            OpType(INC_OPS["b2b_matmul"], True, ("B2BMatmul",), (_in(0), _out(0)), OutputRule.PRODUCT_OF_INPUTS),
            OpType(INC_OPS["kv_cache"], False, ("KVCache", "VLLMKVCache"), (_in(0),), OutputRule.SAME_AS_INPUT),
            OpType(INC_OPS["softmax"], False, ("Softmax", "BlockSoftmaxConstMax"), (UNIT,), OutputRule.MEASURED),
            OpType(INC_OPS["fused_sdpa"], False, ("ModuleFusedSDPA",), (_in(0), _in(1), _in(2), _out(1)),
                   OutputRule.MEASURED),
            OpType(
                INC_OPS["dynamic_moe"], True,
                (
                    "GaudiMixtralSparseMoeBlock",
                    "GaudiDeepseekV3MoE",
                    "VllmMixtureOfExpertsOp",
                    "VllmMixtureOfExpertsOpFP8",
                    "VllmMixtureOfExpertsOpFP8PerChannel",
                ),
                (_in(0), _out(1, rest=True)), OutputRule.MEASURED,
            ),
            OpType(INC_OPS["embedding"], False, ("EmbeddingBag",), (), OutputRule.NONE),
        )
    }
)

# INC's CPU table; we measure everything in OP_TYPES on every device, but keep the list for the
# default allowlist of the high-level FP8Config (reference §1.2).
CPU_CLASS_NAMES: tuple[str, ...] = ("Linear", "Conv2d", "EmbeddingBag")


def _class_index() -> dict[str, OpType]:
    index: dict[str, OpType] = {}
    for op in OP_TYPES.values():
        for cls in op.class_names:
            if cls in index:
                raise ValueError(f"class {cls!r} is listed under op types {index[cls].name!r} and {op.name!r}")
            index[cls] = op
    return index


_BY_CLASS = _class_index()


def op_type_of_class(class_name: str) -> OpType | None:
    """The op type of a module class name, or None when the class is not supported."""
    return _BY_CLASS.get(class_name)


def get_op_type(name: str) -> OpType:
    """Look up an op type by name; an unknown name lists the ones that exist."""
    try:
        return OP_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown op type {name!r}; known: {', '.join(OP_TYPES)}") from None


# ---- what each op type runs as --------------------------------------------------------------------
# One registry hangs the code of every op type on this table: the package that implements a role
# registers under the op type's name ("measure": how shards.measuring.session reads its inputs and
# outputs; "quantize": the patched class of shards.quantized.modules). A string instead of code says
# why the op type has no implementation of that role here.
ROLES = ("measure", "quantize")
_IMPLEMENTATIONS: dict[str, dict[str, object]] = {role: {} for role in ROLES}


def register_implementation(op_type: str, role: str, impl: object, *, replace: bool = False) -> None:
    """Register ``impl`` (or a reason string) as the ``role`` of ``op_type``."""
    get_op_type(op_type)
    if role not in _IMPLEMENTATIONS:
        raise KeyError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    current = _IMPLEMENTATIONS[role].get(op_type)
    if current is not None and not isinstance(current, str) and not replace:
        raise DuplicateRegistrationError(
            f"op type {op_type!r} already has a {role} implementation; pass replace=True")
    _IMPLEMENTATIONS[role][op_type] = impl


def implementations(role: str) -> Mapping[str, object]:
    """Op type → implementation (or reason) of ``role``, read-only."""
    return MappingProxyType(_IMPLEMENTATIONS[role])
