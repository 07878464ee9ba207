"""QUANTIZE on one card: compute each selected module's scales and swap in its patched module.

Consumes only a ``RunPlan`` and a ``Measurement`` (wherever it came from: the in-memory result of
MEASURE, INC files, the stats store). A selected module without a measurement is an error that
names it and the place the measurement was read from, or stays in high precision with
``plan.ignore_modules_wo_measures`` (reference §1.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from shards.quantized.backends import Backend
from shards.model.discovery import FoundModule, clean_name, discover, replace_found
from shards.errors import ShardError
from stats_store.gc_pause import without_gc_pauses
from stats_store.records import Measurement, ModuleStats
from shards.fp8.module_scales import ScaleRequest, modules_scales, planned_request
from shards.plan import RunPlan
from shards.quantized.modules import QUANT_OPS, QuantContext, QuantFactory, QuantModule
from shards.fp8.scale_math import ScaleContext

# How many missing module names an error message lists before "... and N more".
_SHOWN = 8


class MissingMeasurementError(ShardError, LookupError):
    """Selected modules have no measurement and ``ignore_modules_wo_measures`` is off."""


class UnquantizableModuleError(ShardError, ValueError):
    """A selected module's op type has no quantized implementation here."""


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_model` did.

    Attributes:
        quantized: names of the modules replaced by patched ones.
        left_high_precision: selected modules without a measurement, left as they were.
    """

    quantized: tuple[str, ...]
    left_high_precision: tuple[str, ...]


def scale_context(plan: RunPlan) -> ScaleContext:
    """The scale arithmetic's context for a plan."""
    return ScaleContext(lp=plan.lp, hp=plan.hp, device=plan.device_for_scales)


def _missing_error(names: list[str], source: str) -> MissingMeasurementError:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return MissingMeasurementError(
        f"no measurement for module(s) {shown}{more} in {source}; these modules are selected for "
        "quantization but were never called while measuring. Measure with data that reaches them, "
        "add them to blocklist.names, or set ignore_modules_wo_measures to leave them in high precision"
    )


def _quant_factory(found: FoundModule) -> QuantFactory:
    factory = QUANT_OPS.get(found.op.name, "no quantized class is registered")
    if isinstance(factory, str):
        raise UnquantizableModuleError(
            f"module {found.name!r} ({found.class_name}, op type {found.op.name!r}) cannot be quantized: "
            f"{factory}; add it to blocklist.names to leave it in high precision"
        )
    return factory


def _weight(found: FoundModule) -> torch.Tensor | None:
    w = getattr(found.module, "weight", None) if found.op.params else None
    return w.detach() if isinstance(w, torch.Tensor) else None


def _device_of(module: nn.Module, weight: torch.Tensor | None) -> torch.device | None:
    if weight is not None:
        return weight.device  # the usual case, without walking the module's tensors
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return t.device
    return None


def _request(found: FoundModule, weight: torch.Tensor | None, plan: RunPlan, stats: ModuleStats | None,
             weight_scale: torch.Tensor | None = None) -> ScaleRequest:
    return planned_request(found.name, found.op.name, found.type_names, plan.scale_plan, stats,
                           weight=weight, weight_scale=weight_scale)


# Paused: the conversion builds thousands of small objects that all live until it returns, and
# each pile-up would make the collector rescan the whole model (see stats_store.gc_pause).
@without_gc_pauses
def convert_model(
    model: nn.Module,
    plan: RunPlan,
    measurement: Measurement | None,
    backend: Backend,
    *,
    source: str = "the in-memory measurement",
    weight_scales: Mapping[str, torch.Tensor] | None = None,
) -> ConvertResult:
    """Replace every module ``plan.selection`` selects by its quantized version, in place.

    Every check (measurements, quantized classes, statistics) runs and every scale is computed
    before the first module is replaced, so a refused conversion leaves the model as it was.

    Args:
        model: the model (modules already patched are not selected again).
        plan: the QUANTIZE plan.
        measurement: the statistics; None when no method needs any (unit scale, dynamic).
        backend: the device's FP8 cast and gemm.
        source: where ``measurement`` was read from, for error messages.
        weight_scales: module name → weight scale computed elsewhere (e.g. over tp shards).

    Raises:
        MissingMeasurementError: selected modules lack a measurement (all of them are named).
        UnquantizableModuleError: a selected module's op type has no quantized class.
    """
    found = discover(model, plan.selection)
    modules = measurement.modules if measurement is not None else {}
    missing = [f.name for f in found
               if f.name not in modules and plan.scale_plan.for_module(f.name, f.type_names).needs_measurement]
    if missing and not plan.ignore_modules_wo_measures:
        raise _missing_error(missing, source)
    skipped = set(missing)
    todo = [f for f in found if f.name not in skipped]
    factories = [_quant_factory(f) for f in todo]
    weights = [_weight(f) for f in todo]
    given = weight_scales or {}
    all_scales = modules_scales([_request(f, w, plan, modules.get(f.name), given.get(f.name))
                                 for f, w in zip(todo, weights)], scale_context(plan))
    qctx = QuantContext(scale_context(plan), backend, plan.scale_format, plan.dynamic)
    names = tuple(f.name for f in todo)
    # Taken one by one and dropped, so that a replaced module (and its high-precision weight,
    # unless the caller holds it) is freed as soon as it is swapped out: the conversion does not
    # hold both copies of the weights, and the allocator hands their memory to the next FP8 codes
    # (fresh pages cost about as much as the cast itself on the development VM).
    jobs = list(zip(todo, weights, factories, all_scales))[::-1]
    del found, todo, weights
    while jobs:
        f, w, factory, scales = jobs.pop()
        qmod: QuantModule = factory(f.module, scales, qctx)
        device = _device_of(f.module, w)
        # Built from the source's tensors, with scales made on the host: only another device moves.
        moved = device is not None and device.type != "cpu"
        replace_found(f, qmod.to(device) if moved else qmod)
        del f, w, qmod
    return ConvertResult(names, tuple(missing))


def quantized_modules(model: nn.Module) -> dict[str, QuantModule]:
    """The patched modules of a converted model by (INC) name."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, QuantModule)}


def scales_of(model: nn.Module) -> dict[str, dict[str, object]]:
    """The scales a converted model computes with, as the ``Nodes`` of INC's scale JSON."""
    return {name: m.to_inc_node() for name, m in quantized_modules(model).items()}
