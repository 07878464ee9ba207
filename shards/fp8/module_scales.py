"""All scales of one module: inputs, outputs and weight, per op type (reference §2.5, §4.2).

Where each scale comes from is read from the op-type table (``OpType.input_scales`` and
``OpType.output_rule``); this module never branches on op-type names. Rules INC applies:

- an input scale comes from ``inputs[i]`` or ``outputs[i]`` (b2b_matmul input 1, fused_sdpa's
  softmax amax, MoE experts) through the activation section; a ``unit`` source (softmax input) has
  no scale at all, INC's scale file lists no input for it;
- WEIGHT_TIMES_INPUT (linear): ``s_w * s_in`` with torch promotion (a vector for PCS weights),
  but a FIXED_VALUE activation section gives the fixed value (INC: 16 / 128, not 256 / 16384);
- PRODUCT_OF_INPUTS (matmul): ``s_in0 * s_in1``, fixed methods included (INC multiplies there too);
- SAME_AS_INPUT (kv_cache): the input scale itself; MEASURED: ``outputs[0]`` through the
  activation section with ``output_backoff`` if given (``outputs[1]`` too for a row-parallel
  linear with all-reduce quantization);
- dynamic methods (PCS activation section): activation scales are computed per call by
  :func:`shards.fp8.scale_math.dynamic_activation_scale`, so only the weight scale is static here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from shards.errors import MissingStatsError
from stats_store.records import ModuleStats
from shards.model.op_types import OpType, OutputRule, Source, get_op_type
from shards.fp8.methods import DynamicScaling, Granularity, MethodSpec, ScalePlan, SectionSpec, ValueType
from shards.fp8.scale_math import (
    ScaleContext,
    activation_scale,
    fixed_scale,
    weight_scale_from_maxabs,
)
from shards.fp8.weight_scales import weight_scale as compute_weight_scale


def _to_json(t: torch.Tensor) -> float | list[float]:
    """INC writes scales through float32 arrays: a float for 0-d/1-element, else a list."""
    v = t.detach().to(torch.float32)
    return float(v.reshape(-1)[0]) if v.ndim == 0 else [float(e) for e in v.reshape(-1).tolist()]


@dataclass(frozen=True)
class ModuleScales:
    """The scales of one module, as INC's scale file holds them.

    Attributes:
        inputs: one scale per quantized input, in kernel order.
        outputs: output scales (empty when the op has none or the method is dynamic).
        weight: PTS 0-d or PCS ``[out]`` weight scale; None for ops without weight.
        weight_in_channel: PCS only: INC's placeholder input-channel weight scale (ones).
        dynamic: dynamic methods only: how the activation scales are computed per call (not part
            of INC's scale file, which has no place for it).
    """

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    weight: torch.Tensor | None = None
    weight_in_channel: torch.Tensor | None = None
    dynamic: DynamicScaling | None = None

    def to_inc_node(self) -> dict[str, Any]:
        """The per-node dict of INC's scale JSON (reference §4.2)."""
        params: dict[str, Any] = {}
        if self.weight is not None:
            if self.weight_in_channel is not None:
                params["weight"] = {"0": _to_json(self.weight), "1": _to_json(self.weight_in_channel)}
            else:
                params["weight"] = _to_json(self.weight)
        return {
            "inputs": [_to_json(s) for s in self.inputs],
            "outputs": [_to_json(s) for s in self.outputs],
            "params": params,
        }


def _measured(stats: ModuleStats | None, src: Source, module: str) -> list[np.ndarray]:
    """The measurement(s) a source names; ``rest`` sources give every array from the index on."""
    label = f"{src.kind}.{src.index}"
    arrays = None if stats is None else (stats.inputs if src.kind == "inputs" else stats.outputs)
    if arrays is None or len(arrays) <= src.index:
        raise MissingStatsError(module, label, "measure the module (outputs too if the op requires them) first")
    picked = arrays[src.index :] if src.rest else [arrays[src.index]]
    for offset, a in enumerate(picked):
        if a is None:
            raise MissingStatsError(module, f"{src.kind}.{src.index + offset}", "this tensor was never observed")
    return [a for a in picked if a is not None]


def _source_count(op: OpType, stats: ModuleStats | None, src: Source) -> int:
    """How many scales a source gives without reading values (fixed methods need no stats)."""
    if not src.rest:
        return 1
    arrays = None if stats is None else (stats.inputs if src.kind == "inputs" else stats.outputs)
    if arrays is not None:
        return max(0, len(arrays) - src.index)
    # No measurement: INC falls back to the op's default count (MoE: 8 experts).
    total = op.num_inputs if src.kind == "inputs" else op.num_outputs
    return max(0, total - src.index)


def _input_scales(
    op: OpType, section: SectionSpec, ctx: ScaleContext, stats: ModuleStats | None, module: str
) -> tuple[torch.Tensor, ...]:
    scales: list[torch.Tensor] = []
    for src in op.input_scales:
        if src.kind == "unit":
            continue
        if section.value_type in (ValueType.FIXED_VALUE, ValueType.DUMMY_SCALES):
            scales.extend(fixed_scale(section, ctx) for _ in range(_source_count(op, stats, src)))
            continue
        for offset, arr in enumerate(_measured(stats, src, module)):
            where = f"module {module!r} tensor '{src.kind}.{src.index + offset}'"
            scales.append(activation_scale(arr, section, ctx, where=where))
    return tuple(scales)


def _weight_scale(
    op: OpType,
    section: SectionSpec,
    ctx: ScaleContext,
    stats: ModuleStats | None,
    weight: torch.Tensor | None,
    module: str,
) -> torch.Tensor:
    where = f"module {module!r} tensor 'params.weight'"
    if weight is not None:
        return compute_weight_scale(weight, section, ctx, where=where)
    if section.value_type in (ValueType.FIXED_VALUE, ValueType.DUMMY_SCALES):
        return fixed_scale(section, ctx)
    if section.value_type is ValueType.MAXABS and stats is not None and "weight" in stats.params:
        return weight_scale_from_maxabs(stats.params["weight"], section, ctx, where=where)
    raise MissingStatsError(module, "params.weight", "pass the weight tensor (OPT and PCS scales need it)")


def _output_scales(
    op: OpType,
    section: SectionSpec,
    ctx: ScaleContext,
    stats: ModuleStats | None,
    inputs: tuple[torch.Tensor, ...],
    w_scale: torch.Tensor | None,
    module: str,
    n_measured_outputs: int,
) -> tuple[torch.Tensor, ...]:
    rule = op.output_rule
    fixed = section.value_type in (ValueType.FIXED_VALUE, ValueType.DUMMY_SCALES)
    if rule is OutputRule.NONE:
        return ()
    if rule is OutputRule.WEIGHT_TIMES_INPUT:
        assert w_scale is not None
        first = fixed_scale(section, ctx) if fixed else w_scale * inputs[0]
        if n_measured_outputs == 1:
            return (first,)
        # Row-parallel FP8 all-reduce: the reduced output's scale is measured (outputs[1]).
        (reduced,) = _measured(stats, Source("outputs", 1), module)
        return (first, activation_scale(reduced, section, ctx, where=f"module {module!r} tensor 'outputs.1'"))
    if rule is OutputRule.PRODUCT_OF_INPUTS:
        return (inputs[0] * inputs[1],)
    if rule is OutputRule.SAME_AS_INPUT:
        return (inputs[0],)
    if fixed:
        return tuple(fixed_scale(section, ctx) for _ in range(n_measured_outputs))
    return tuple(
        activation_scale(arr, section, ctx, where=f"module {module!r} tensor 'outputs.{i}'")
        for i in range(n_measured_outputs)
        for arr in _measured(stats, Source("outputs", i), module)
    )


def module_scales(
    op: OpType,
    method: MethodSpec,
    ctx: ScaleContext,
    stats: ModuleStats | None,
    weight: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    output_backoff: float | None = None,
    *,
    module: str | None = None,
    in_features: int | None = None,
    allreduce_quantization: bool = False,
) -> ModuleScales:
    """Every scale of one module from its statistics (and weight), following reference §2.5.

    Args:
        op: the module's op type.
        method: the scale method chosen for the module.
        ctx: FP8 format, hp dtype and device for scales.
        stats: the module's max-abs statistics (None only for methods that need none).
        weight: the full weight, for MAXABS / OPT weight scales.
        weight_scale: a weight scale computed elsewhere (the coordinator, over shards); wins.
        output_backoff: backoff for measured outputs; None = the activation section's.
        module: name used in error messages (default: ``stats.name``).
        in_features: PCS only, when no weight is passed: length of INC's input-channel
            placeholder (without it the placeholder is omitted).
        allreduce_quantization: row-parallel linear with FP8 all-reduce: a second output scale
            from ``outputs[1]``.
    """
    name = module or (stats.name if stats is not None else "<unnamed>")
    act = method.activation
    dynamic = act.granularity is Granularity.PCS and act.value_type is ValueType.MAXABS
    w_scale: torch.Tensor | None = None
    w_in: torch.Tensor | None = None
    if op.params:
        w_scale = weight_scale if weight_scale is not None else _weight_scale(op, method.weight, ctx, stats, weight, name)
        if method.weight.granularity is Granularity.PCS and method.weight.value_type is not ValueType.FIXED_VALUE:
            n_in = weight.shape[1] if weight is not None else in_features
            # INC's placeholder input-channel scale: ones of length in_features, in hp dtype.
            w_in = None if n_in is None else torch.ones(n_in, dtype=ctx.hp_dtype)
    if dynamic:
        return ModuleScales((), (), w_scale, w_in, DynamicScaling.of(act))
    inputs = _input_scales(op, act, ctx, stats, name)
    out_section = act if output_backoff is None else replace(act, backoff=output_backoff)
    n_out = 2 if allreduce_quantization else 1
    outputs = _output_scales(op, out_section, ctx, stats, inputs, w_scale, name, n_out)
    return ModuleScales(inputs, outputs, w_scale, w_in)


def planned_scales(name: str, op_type: str, type_names: str | tuple[str, ...], scale_plan: ScalePlan,
                   ctx: ScaleContext, stats: ModuleStats | None, **kwargs: Any) -> ModuleScales:
    """The scales of one module under a run's scale plan: the method the plan picks for it (by
    node, layer or type), then :func:`module_scales`. The one per-module loop body of convert,
    the global scales and ``stats-store scales``; ``kwargs`` go to :func:`module_scales`."""
    method = scale_plan.for_module(name, type_names)
    return module_scales(get_op_type(op_type), method, ctx, stats, output_backoff=scale_plan.output_backoff,
                         module=name, **kwargs)
