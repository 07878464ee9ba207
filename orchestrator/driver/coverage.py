"""Modules selected for quantization that saw no calibration data, and what to do about them.

Listed before any scale is computed (decisions §5). A routed MoE expert projection
(``<layer>.experts.<E>.<proj>``, see ``shards.measuring.expert_coverage``) is uncovered when no token was
routed to that expert: it was never called (no measurement), or called with empty inputs only.
Policies:

- ``fail`` (default): one error naming the modules and the store they are missing from; idle
  experts are named as "expert E of layer L saw no token";
- ``warn``: log a warning and leave them in high precision;
- ``unit_scale``: quantize them with scale 1.0 (the ``unit_scale`` method for those modules only).
  A scale of 1.0 is not calibrated: announced in the log and the run summary;
- ``expert_max``: an idle routed expert projection gets activation statistics (inputs and outputs)
  equal to the elementwise max over the same projection of the same layer's experts that saw
  tokens — what vLLM does with expert input scales anyway (one scale per layer). Its weight scale
  still comes from its own weight. The filled names are logged and listed in the run summary.
  Uncovered modules that are not routed experts, and experts of a layer where no expert saw a
  token, fall back to ``fail``.

An idle expert never gets a NaN, zero or unannounced 1.0 scale: its projections are removed from
the statistics the scales are computed from unless ``expert_max`` filled them.

A config with ``ignore_modules_wo_measures: true`` and no explicit policy means ``warn`` (INC's key).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from orchestrator.errors import Fp8OrchestratorError
from shards.measuring.expert_coverage import (
    ExpertTokens,
    expert_saw_tokens,
    expert_token_counts,
    idle_experts,
    layer_text,
    parse_expert,
    tokens_recorded,
)
from stats_store.records import Measurement, ModuleStats
from shards.plan import RunPlan
from shards.fp8.methods import predefined_plan
from shards.card.calibration import ModuleInfo

LOG = logging.getLogger(__name__)
_SHOWN = 10

__all__ = ["UncoveredPolicy", "UncoveredModulesError", "Resolution", "apply_policy", "expert_token_counts",
           "fill_expert_max", "parse_policy", "resolve_uncovered", "summary_rows",
           "uncovered_modules", "with_expert_siblings"]


class UncoveredPolicy(str, Enum):
    """What a run does with selected modules that have no measurement."""

    FAIL = "fail"
    WARN = "warn"
    UNIT_SCALE = "unit_scale"
    EXPERT_MAX = "expert_max"


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


def uncovered_modules(plan: RunPlan, modules: Mapping[str, ModuleInfo], stats: Measurement | None) -> list[str]:
    """Selected modules whose method needs a measurement that ``stats`` does not hold, in model order.

    A routed expert projection measured on empty inputs only (0 tokens) is uncovered too.
    """
    if stats is None:
        return []
    recorded = tokens_recorded(stats)

    def covered(name: str) -> bool:
        if parse_expert(name) is not None:
            return expert_saw_tokens(name, stats, recorded)
        return name in stats.modules

    return [name for name, info in modules.items()
            if not covered(name) and plan.scale_plan.for_module(name, info.class_name).needs_measurement]


def _expert_text(names: Sequence[str], why: str = "saw no token") -> str:
    """``experts 5, 7 of layer model.layers.3.mlp saw no token; expert 2 of layer ...``."""
    by_layer: dict[str, dict[int, None]] = {}
    for name in names:
        e = parse_expert(name)
        assert e is not None
        by_layer.setdefault(e.layer, {})[e.expert] = None
    parts = []
    for layer, experts in by_layer.items():
        idx = sorted(experts)
        parts.append(f"expert{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))} of layer {layer} {why}")
    return "; ".join(parts)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _fail_error(names: Sequence[str], source: str) -> UncoveredModulesError:
    plain = [n for n in names if parse_expert(n) is None]
    experts = [n for n in names if parse_expert(n) is not None]
    what = "; ".join(([_shown(plain)] if plain else []) + ([_expert_text(experts)] if experts else []))
    if not experts:
        return UncoveredModulesError(
            f"{len(names)} selected module(s) saw no calibration data in {source}: {what}; measure with data "
            "that reaches them, add them to blocklist.names, or choose --uncovered warn (leave them in high "
            "precision) or --uncovered unit_scale (quantize them with scale 1.0)"
        )
    return UncoveredModulesError(
        f"{len(names)} selected module(s) saw no calibration data in {source}: {what}; measure with more (or "
        "more varied) data so the router reaches every expert, choose --uncovered expert_max (an idle expert "
        "gets its layer's max over the experts that saw tokens, as vLLM does for expert input scales), "
        "add them to blocklist.names, or choose --uncovered warn (leave them in high precision) or "
        "--uncovered unit_scale (quantize them with scale 1.0)"
    )


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
    shown = _shown(names)
    if policy is UncoveredPolicy.FAIL:
        raise _fail_error(names, source)
    if policy is UncoveredPolicy.EXPERT_MAX:
        raise UncoveredModulesError("apply_policy: expert_max fills statistics; call resolve_uncovered(..., stats)")
    if policy is UncoveredPolicy.WARN:
        LOG.warning("%d selected module(s) saw no calibration data in %s and stay in high precision: %s",
                    len(names), source, shown)
        return replace(plan, ignore_modules_wo_measures=True)
    LOG.warning("%d selected module(s) saw no calibration data in %s and get scale 1.0 (unit_scale; not "
                "calibrated): %s", len(names), source, shown)
    unit = predefined_plan("unit_scale").default
    scale_plan = replace(plan.scale_plan, nodes={**plan.scale_plan.nodes, **{n: unit for n in names}})
    return replace(plan, scale_plan=scale_plan)


@dataclass(frozen=True)
class Resolution:
    """What quantizing does about the uncovered modules.

    Attributes:
        plan: the plan to quantize with (``warn`` / ``unit_scale`` change it).
        stats: the statistics to compute scales from: without the uncovered modules (an idle
            expert measured on empty inputs never reaches the scale code), plus the modules
            ``expert_max`` filled.
        filled: the expert projections ``expert_max`` gave their layer's statistics, in model order.
    """

    plan: RunPlan
    stats: Measurement | None
    filled: list[str] = field(default_factory=list)


def _without(stats: Measurement, names: Iterable[str]) -> Measurement:
    """``stats`` less the modules ``names`` (an idle expert measured on empty inputs never reaches
    the scale code)."""
    drop = set(names)
    return Measurement(observer=stats.observer, num_samples=stats.num_samples,
                       modules={n: s for n, s in stats.modules.items() if n not in drop})


def fill_expert_max(stats: Measurement, names: Iterable[str]) -> tuple[Measurement, list[str], dict[str, str]]:
    """Statistics for idle routed expert projections from the same layer's experts that saw tokens.

    Each of ``names`` that is a routed expert projection ``L.experts.E.P`` gets inputs and outputs
    equal to the elementwise max (``np.fmax``: NaN only where every sibling has none) over the
    projections ``L.experts.E'.P`` that saw tokens, ``E' != E``; no parameters (its weight scale
    comes from its own weight), 0 calls and 0 tokens.

    Returns:
        a new ``Measurement``: ``stats`` without ``names``, plus the filled modules; the filled
        names; and for each name that could not be filled, why (not a routed expert, no expert of
        its layer saw a token, or the siblings' shapes differ).
    """
    names = list(names)
    recorded = tokens_recorded(stats)
    out = _without(stats, names)
    siblings: dict[tuple[str, str], list[ModuleStats]] = {}
    for name, s in out.modules.items():
        e = parse_expert(name)
        if e is not None and expert_saw_tokens(name, stats, recorded):
            siblings.setdefault((e.layer, e.proj), []).append(s)
    filled: list[str] = []
    failed: dict[str, str] = {}
    for name in names:
        e = parse_expert(name)
        if e is None:
            failed[name] = "not a routed expert"
            continue
        sibs = siblings.get((e.layer, e.proj), [])
        if not sibs:
            failed[name] = f"no expert of layer {e.layer} saw a token"
            continue
        try:
            out.modules[name] = ModuleStats(
                name=name, op_type=sibs[0].op_type,
                inputs=_max_over([s.inputs for s in sibs], name, "inputs"),
                outputs=None if all(s.outputs is None for s in sibs) else _max_over([s.outputs or [] for s in sibs], name, "outputs"),
            )
        except ValueError as err:
            failed[name] = str(err)
            continue
        filled.append(name)
    return out, filled, failed


def _max_over(lists: Sequence[Sequence[np.ndarray | None]], name: str, kind: str) -> list[np.ndarray | None]:
    """Position by position, the elementwise max of the vectors present (None where none is)."""
    out: list[np.ndarray | None] = []
    for i in range(max((len(x) for x in lists), default=0)):
        vecs = [np.asarray(x[i], dtype=np.float32).reshape(-1) for x in lists if i < len(x) and x[i] is not None]
        if not vecs:
            out.append(None)
            continue
        if len({v.shape for v in vecs}) > 1:
            raise ValueError(f"the experts' {kind}.{i} of {name}'s layer have different shapes "
                             f"{sorted({v.shape for v in vecs})}")
        out.append(np.fmax.reduce(np.stack(vecs), axis=0).astype(np.float32))
    return out


def resolve_uncovered(plan: RunPlan, uncovered: Iterable[str], policy: UncoveredPolicy, source: str,
                      stats: Measurement | None) -> Resolution:
    """Apply ``policy`` to the ``uncovered`` modules: the plan and statistics to quantize with.

    ``fail``, ``warn`` and ``unit_scale`` are :func:`apply_policy`'s; ``expert_max`` fills idle
    routed experts (:func:`fill_expert_max`), announces every filled name in the log, and fails
    as ``fail`` does for what it cannot fill.

    Raises:
        UncoveredModulesError: ``fail`` with uncovered modules, or ``expert_max`` with uncovered
            modules that are not routed experts or whose layer has no expert that saw a token.
    """
    names = list(uncovered)
    if not names:
        return Resolution(plan, stats)
    if policy is not UncoveredPolicy.EXPERT_MAX:
        return Resolution(apply_policy(plan, names, policy, source), None if stats is None else _without(stats, names))
    filled_stats, filled, failed = fill_expert_max(stats if stats is not None else Measurement(), names)
    if failed:
        experts = [n for n in failed if parse_expert(n) is not None]
        plain = [n for n in failed if parse_expert(n) is None]
        reasons = sorted(set(failed[n] for n in experts if failed[n].startswith("the experts'")))
        what = "; ".join(([f"{_shown(plain)} (not routed experts)"] if plain else [])
                         + ([_expert_text(experts, "saw no token, nor did any other expert of that layer")]
                            if experts else []) + reasons)
        raise UncoveredModulesError(
            f"--uncovered expert_max cannot fill {len(failed)} of {len(names)} uncovered module(s) in {source}: "
            f"{what}; measure with data that reaches them, add them to blocklist.names, or choose "
            "--uncovered warn (leave them in high precision) or --uncovered unit_scale (quantize them with scale 1.0)"
        )
    LOG.warning("%d expert projection(s) saw no token in %s and get their layer's max over the experts that did "
                "(expert_max): %s; filled: %s", len(filled), source, _expert_text(filled), ", ".join(filled))
    return Resolution(plan, filled_stats, filled)


def with_expert_siblings(split: Mapping[Any, Any]) -> Callable[[str, str], Any]:
    """A split lookup (``stats_store.reshard``) where a filled expert projection, which no shard
    committed, is cut like the same projection of its layer's other experts (same tp layout)."""
    by_proj: dict[tuple[str, str, str], Any] = {}
    for (name, label), rule in split.items():
        e = parse_expert(name)
        if e is not None:
            by_proj.setdefault((e.layer, e.proj, label), rule)

    def lookup(name: str, label: str) -> Any:
        rule = split.get((name, label))
        if rule is None and (e := parse_expert(name)) is not None:
            rule = by_proj.get((e.layer, e.proj, label))
        return rule

    return lookup


def summary_rows(report: Any) -> list[tuple[str, str]]:
    """Rows for the run summary: idle experts per MoE layer, what the uncovered policy did.

    ``report`` is a ``RunReport`` (``expert_tokens``, ``filled``, ``uncovered``, ``uncovered_policy``).
    """
    counts: ExpertTokens = getattr(report, "expert_tokens", {}) or {}
    filled: list[str] = getattr(report, "filled", []) or []
    uncovered: list[str] = getattr(report, "uncovered", []) or []
    policy: str = getattr(report, "uncovered_policy", "") or ""
    rows: list[tuple[str, str]] = []
    if counts:
        idle = idle_experts(counts)
        lines = [f"{layer}: {layer_text(counts[layer])}" for layer in idle]
        if len(idle) < len(counts):
            lines.append(f"{len(counts) - len(idle)} {'other ' if idle else ''}MoE layer(s): no idle expert")
        rows.append(("idle experts (per MoE layer)", "\n".join(lines)))
    if filled:
        rows.append(("experts given their layer's max (expert_max)", _expert_text(filled)))
    if uncovered and policy == UncoveredPolicy.UNIT_SCALE.value:
        rows.append(("CAUTION: quantized with scale 1.0, not calibrated (unit_scale)", _shown(uncovered)))
    elif uncovered and policy == UncoveredPolicy.WARN.value:
        rows.append(("left in high precision (warn)", _shown(uncovered)))
    return rows
