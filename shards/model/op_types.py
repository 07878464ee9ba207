"""The one table of op types: what each kind of module has, what is measured, where its scales
come from. Reference ``inc-fp8-semantics.md`` §2.5 and §3.1.

Every other registry (patched classes, shard axes) is keyed by the names in this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


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


@dataclass(frozen=True)
class OpType:
    """One row: an op type and everything the code needs to know about it.

    Attributes:
        name: INC's op-type name.
        num_inputs: number of observed inputs.
        params: names of parameters whose max-abs is observed (only "weight" exists).
        num_outputs: number of observed outputs (MoE: 1 + experts, set at measure time).
        outputs_required: outputs are measured even when ``measure_exclude`` is OUTPUT.
        supports_dynamic: can be quantized with dynamic per-token activation scales.
        class_names: module classes (``type(m).__name__``) of this op type.
        input_scales: where each input scale comes from, in the order the kernel takes them.
        output_rule: how the output scale is obtained.
        cpu_supported: INC's CPU device table has it (Linear, Conv2d, EmbeddingBag).
    """

    name: str
    num_inputs: int
    params: tuple[str, ...]
    num_outputs: int
    outputs_required: bool
    supports_dynamic: bool
    class_names: tuple[str, ...]
    input_scales: tuple[Source, ...]
    output_rule: OutputRule


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
            OpType("linear", 1, ("weight",), 1, False, True, _LINEAR_CLASSES, (_in(0),), OutputRule.WEIGHT_TIMES_INPUT),
            OpType(
                "row_parallel_linear", 1, ("weight",), 2, True, True, ("RowParallelLinear",), (_in(0),),
                # Reference §2.5: "like linear". Deliberately not from outputs[0]: that is the partial
                # pre-all-reduce result, which differs between tp sizes and would break the
                # invariant that tp=k gives tp=1's scales.
                OutputRule.WEIGHT_TIMES_INPUT,
            ),
            OpType("matmul", 2, (), 1, False, True, ("Matmul",), (_in(0), _in(1)), OutputRule.PRODUCT_OF_INPUTS),
            OpType("b2b_matmul", 2, (), 1, True, True, ("B2BMatmul",), (_in(0), _out(0)), OutputRule.PRODUCT_OF_INPUTS),
            OpType("kv_cache", 1, (), 1, False, False, ("KVCache", "VLLMKVCache"), (_in(0),), OutputRule.SAME_AS_INPUT),
            OpType("softmax", 1, (), 1, True, False, ("Softmax", "BlockSoftmaxConstMax"), (UNIT,), OutputRule.MEASURED),
            OpType(
                "fused_sdpa", 3, (), 2, True, False, ("ModuleFusedSDPA",), (_in(0), _in(1), _in(2), _out(1)),
                OutputRule.MEASURED,
            ),
            OpType(
                "dynamic_moe", 1, (), 9, True, True,
                (
                    "GaudiMixtralSparseMoeBlock",
                    "GaudiDeepseekV3MoE",
                    "VllmMixtureOfExpertsOp",
                    "VllmMixtureOfExpertsOpFP8",
                    "VllmMixtureOfExpertsOpFP8PerChannel",
                ),
                (_in(0), _out(1, rest=True)), OutputRule.MEASURED,
            ),
            OpType("embedding", 1, ("weight",), 1, False, False, ("EmbeddingBag",), (), OutputRule.NONE),
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
