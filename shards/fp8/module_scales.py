"""All scales of a module: inputs, outputs and weight, per op type (reference §2.5, §4.2).

:func:`modules_scales` computes them for many modules at once (convert: a whole model), queueing
every max-abs in one :class:`shards.fp8.scale_batch.ScaleBatch`; :func:`module_scales` is the same
for one module.

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

import functools
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from shards.errors import MissingStatsError
from stats_store.records import ModuleStats
from shards.model.op_types import OpType, OutputRule, Source, get_op_type
from shards.fp8.methods import DynamicScaling, Granularity, MethodSpec, ScalePlan, SectionSpec, ValueType
from shards.fp8.scale_batch import Ready, Scale, ScaleBatch
from shards.fp8.scale_math import ScaleContext, fixed_scale, is_fixed
from shards.fp8.weight_scales import weight_scale as compute_weight_scale


def _to_json(t: torch.Tensor) -> float | list[float]:
    """INC writes scales through float32 arrays: a float for 0-d/1-element, else a list."""
    v = t.detach().to(torch.float32)
    if v.ndim == 0:
        return float(v)
    flat = v.reshape(-1)
    bits = flat.view(torch.int32)
    if flat.numel() > 1 and bool((bits == bits[0]).all()):
        # A constant vector (PCS's placeholder input-channel scale of ones): one float object
        # repeated, not one per element (a third of Llama-405B's 60 M per-channel values).
        return [float(flat[0])] * flat.numel()
    return flat.tolist()  # already Python floats (a per-element float() doubled the cost)


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
    arrays = None if stats is None else (stats.inputs if src.kind == "inputs" else stats.outputs)
    if arrays is None or len(arrays) <= src.index:
        raise MissingStatsError(module, f"{src.kind}.{src.index}",
                                "measure the module (outputs too if the op requires them) first")
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


class ScaleRequest(NamedTuple):
    """One module whose scales are wanted; the fields are :func:`module_scales`' arguments.

    A NamedTuple (immutable, like the frozen dataclasses elsewhere) because a convert makes one per
    module, and a frozen dataclass's __init__ with nine fields costs several times a tuple's."""

    op: OpType
    method: MethodSpec
    stats: ModuleStats | None
    module: str
    weight: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    output_backoff: float | None = None
    in_features: int | None = None
    allreduce_quantization: bool = False


class _Product(NamedTuple):
    """An output scale that is the product of two others (torch promotion: a vector for PCS weights)."""

    a: Scale
    b: Scale

    def get(self) -> torch.Tensor:
        return self.a.get() * self.b.get()


def _input_scales(r: ScaleRequest, section: SectionSpec, batch: ScaleBatch) -> tuple[Scale, ...]:
    scales: list[Scale] = []
    for src in r.op.input_scales:
        if src.kind == "unit":
            continue
        if is_fixed(section):
            scales.extend(Ready(fixed_scale(section, batch.ctx)) for _ in range(_source_count(r.op, r.stats, src)))
            continue
        for offset, arr in enumerate(_measured(r.stats, src, r.module)):
            where = f"module {r.module!r} tensor '{src.kind}.{src.index + offset}'"
            scales.append(batch.activation(arr, section, where=where))
    return tuple(scales)


def _weight_scale(r: ScaleRequest, section: SectionSpec, batch: ScaleBatch) -> Scale:
    where = f"module {r.module!r} tensor 'params.weight'"
    if r.weight_scale is not None:
        return Ready(r.weight_scale)  # computed elsewhere (the coordinator, over shards): wins
    if r.weight is not None:
        if section.value_type is ValueType.MAXABS:
            return batch.weight(r.weight, section, where=where)
        return Ready(compute_weight_scale(r.weight, section, batch.ctx, where=where))  # fixed, OPT
    if is_fixed(section):
        return Ready(fixed_scale(section, batch.ctx))
    if section.value_type is ValueType.MAXABS and r.stats is not None and "weight" in r.stats.params:
        # The weight's dtype is not known here: fp32, the dtype of the stored max-abs.
        return batch.weight_from_maxabs(r.stats.params["weight"], section, torch.float32, where=where)
    raise MissingStatsError(r.module, "params.weight", "pass the weight tensor (OPT and PCS scales need it)")


def _output_scales(r: ScaleRequest, section: SectionSpec, batch: ScaleBatch, inputs: tuple[Scale, ...],
                   w_scale: Scale | None) -> tuple[Scale, ...]:
    rule = r.op.output_rule
    fixed = is_fixed(section)
    n_measured = 2 if r.allreduce_quantization else 1
    if rule is OutputRule.NONE:
        return ()
    if rule is OutputRule.WEIGHT_TIMES_INPUT:
        assert w_scale is not None
        first: Scale = Ready(fixed_scale(section, batch.ctx)) if fixed else _Product(w_scale, inputs[0])
        if n_measured == 1:
            return (first,)
        # Row-parallel FP8 all-reduce: the reduced output's scale is measured (outputs[1]).
        (reduced,) = _measured(r.stats, Source("outputs", 1), r.module)
        return (first, batch.activation(reduced, section, where=f"module {r.module!r} tensor 'outputs.1'"))
    if rule is OutputRule.PRODUCT_OF_INPUTS:
        return (_Product(inputs[0], inputs[1]),)
    if rule is OutputRule.SAME_AS_INPUT:
        return (inputs[0],)
    if fixed:
        return tuple(Ready(fixed_scale(section, batch.ctx)) for _ in range(n_measured))
    return tuple(
        batch.activation(arr, section, where=f"module {r.module!r} tensor 'outputs.{i}'")
        for i in range(n_measured)
        for arr in _measured(r.stats, Source("outputs", i), r.module)
    )


class _Draft(NamedTuple):
    """A module's scales queued in a batch, before it computes them."""

    inputs: tuple[Scale, ...]
    outputs: tuple[Scale, ...]
    weight: Scale | None
    weight_in_channel: torch.Tensor | None
    dynamic: DynamicScaling | None

    def resolve(self) -> ModuleScales:
        return ModuleScales(tuple(s.get() for s in self.inputs), tuple(s.get() for s in self.outputs),
                            None if self.weight is None else self.weight.get(), self.weight_in_channel,
                            self.dynamic)


@functools.lru_cache(maxsize=64)
def _with_backoff(section: SectionSpec, backoff: float) -> SectionSpec:
    # Once per (section, backoff), not per module: dataclasses.replace costs ~10 us.
    return replace(section, backoff=backoff)


def _draft(r: ScaleRequest, batch: ScaleBatch) -> _Draft:
    act = r.method.activation
    dynamic = act.granularity is Granularity.PCS and act.value_type is ValueType.MAXABS
    w_scale: Scale | None = None
    w_in: torch.Tensor | None = None
    if r.op.params:
        w_scale = _weight_scale(r, r.method.weight, batch)
        if r.method.weight.granularity is Granularity.PCS and r.method.weight.value_type is not ValueType.FIXED_VALUE:
            n_in = r.weight.shape[1] if r.weight is not None else r.in_features
            # INC's placeholder input-channel scale: ones of length in_features, in hp dtype.
            w_in = None if n_in is None else torch.ones(n_in, dtype=batch.ctx.hp_dtype)
    if dynamic:
        return _Draft((), (), w_scale, w_in, DynamicScaling.of(act))
    inputs = _input_scales(r, act, batch)
    out_section = act if r.output_backoff is None else _with_backoff(act, r.output_backoff)
    return _Draft(inputs, _output_scales(r, out_section, batch, inputs, w_scale), w_scale, w_in, None)


def modules_scales(requests: Sequence[ScaleRequest], ctx: ScaleContext) -> list[ModuleScales]:
    """Every scale of many modules (reference §2.5), the formulas evaluated once per group of
    tensors that share one (:class:`shards.fp8.scale_batch.ScaleBatch`): the same scales as
    :func:`module_scales` module by module, at a fraction of the cost.

    Errors are raised in request order, before anything is computed (an hp overflow: after).
    """
    batch = ScaleBatch(ctx)
    drafts = [_draft(r, batch) for r in requests]
    batch.compute()
    return [d.resolve() for d in drafts]


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
    request = ScaleRequest(op, method, stats, name, weight, weight_scale, output_backoff, in_features,
                           allreduce_quantization)
    return modules_scales([request], ctx)[0]


def planned_request(name: str, op_type: str, type_names: str | tuple[str, ...], scale_plan: ScalePlan,
                    stats: ModuleStats | None, **kwargs: Any) -> ScaleRequest:
    """The request of one module under a run's scale plan: the method the plan picks for it (by
    node, layer or type); ``kwargs`` are :class:`ScaleRequest` fields (weight, weight_scale...)."""
    method = scale_plan.for_module(name, type_names)
    return ScaleRequest(get_op_type(op_type), method, stats, name, output_backoff=scale_plan.output_backoff,
                        **kwargs)


def planned_scales(name: str, op_type: str, type_names: str | tuple[str, ...], scale_plan: ScalePlan,
                   ctx: ScaleContext, stats: ModuleStats | None, **kwargs: Any) -> ModuleScales:
    """The scales of one module under a run's scale plan (:func:`planned_request`): what
    ``stats-store scales`` falls back to, module by module, to report every failing module;
    convert and the global scales batch :func:`planned_request` s instead."""
    return modules_scales([planned_request(name, op_type, type_names, scale_plan, stats, **kwargs)], ctx)[0]
