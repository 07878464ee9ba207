"""Modules selected for quantization that saw no calibration data, and what to do about them.

Listed before any scale is computed (decisions §5). Policies:

- ``fail`` (default): one error naming the modules and the store they are missing from;
- ``warn``: log a warning and leave them in high precision;
- ``unit_scale``: quantize them with scale 1.0 (the ``unit_scale`` method for those modules only).

A config with ``ignore_modules_wo_measures: true`` and no explicit policy means ``warn`` (INC's key).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from enum import Enum
from typing import Iterable, Mapping

from orchestrator.errors import Fp8OrchestratorError
from shards.measurement import Measurement
from shards.plan import RunPlan
from shards.scale_spec import Granularity, MethodSpec, predefined_plan
from shards.shard_calibration import ModuleInfo

LOG = logging.getLogger(__name__)
_SHOWN = 10


class UncoveredPolicy(str, Enum):
    """What a run does with selected modules that have no measurement."""

    FAIL = "fail"
    WARN = "warn"
    UNIT_SCALE = "unit_scale"


class UncoveredModulesError(Fp8OrchestratorError, ValueError):
    """Selected modules have no measurement and the policy is ``fail``."""


def parse_policy(value: str | UncoveredPolicy | None, plan: RunPlan) -> UncoveredPolicy:
    """The policy asked for; None follows the config (``ignore_modules_wo_measures`` → warn, else fail)."""
    if value is None:
        return UncoveredPolicy.WARN if plan.ignore_modules_wo_measures else UncoveredPolicy.FAIL
    try:
        return UncoveredPolicy(str(getattr(value, "value", value)).lower())
    except ValueError:
        allowed = ", ".join(p.value for p in UncoveredPolicy)
        raise UncoveredModulesError(f"uncovered: value {value!r} is not a policy; allowed: {allowed}") from None


def needs_stats(method: MethodSpec) -> bool:
    """A method whose scales come from a measurement (not fixed, not dynamic per-token)."""
    return method.uses_stats and method.activation.granularity is not Granularity.PCS


def uncovered_modules(plan: RunPlan, modules: Mapping[str, ModuleInfo], stats: Measurement | None) -> list[str]:
    """Selected modules whose method needs a measurement that ``stats`` does not hold, in model order."""
    if stats is None:
        return []
    return [name for name, info in modules.items()
            if name not in stats.modules and needs_stats(plan.scale_plan.for_module(name, info.class_name))]


def apply_policy(plan: RunPlan, uncovered: Iterable[str], policy: UncoveredPolicy, source: str) -> RunPlan:
    """The plan to quantize with, after applying ``policy`` to the ``uncovered`` modules.

    Args:
        plan: the QUANTIZE plan.
        uncovered: modules from :func:`uncovered_modules`.
        policy: what to do with them.
        source: where the statistics were read from (the store path), for the message.

    Raises:
        UncoveredModulesError: there are uncovered modules and the policy is ``fail``.
    """
    names = list(uncovered)
    if not names:
        return plan
    shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    if policy is UncoveredPolicy.FAIL:
        raise UncoveredModulesError(
            f"{len(names)} selected module(s) saw no calibration data in {source}: {shown}; measure with data "
            "that reaches them, add them to blocklist.names, or choose --uncovered warn (leave them in high "
            "precision) or --uncovered unit_scale (quantize them with scale 1.0)"
        )
    if policy is UncoveredPolicy.WARN:
        LOG.warning("%d selected module(s) saw no calibration data in %s and stay in high precision: %s",
                    len(names), source, shown)
        return replace(plan, ignore_modules_wo_measures=True)
    LOG.warning("%d selected module(s) saw no calibration data in %s and get unit scales: %s", len(names), source, shown)
    unit = predefined_plan("unit_scale").default
    scale_plan = replace(plan.scale_plan, nodes={**plan.scale_plan.nodes, **{n: unit for n in names}})
    return replace(plan, scale_plan=scale_plan)
