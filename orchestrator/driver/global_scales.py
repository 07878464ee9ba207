"""The coordinator: global scales from the reduced statistics of every shard.

Everything is computed in global (unsharded) coordinates so a tp=k run gets exactly tp=1's
scales: per-tensor weight max-abs is the max over shards, per-channel weight max-abs is the shards'
vectors concatenated (column-parallel) or maxed (row-parallel), and OPT errors are added over the
shards that split a channel's elements before the pick (decisions §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from orchestrator.errors import Fp8OrchestratorError
from shards.quantized.swap import scale_context
from stats_store.records import Measurement
from shards.fp8.module_scales import modules_scales, planned_request
from shards.fp8.opt_search import pick_pcs, pick_pts
from shards.plan import RunPlan
from shards.fp8.methods import Granularity, ValueType
from shards.fp8.scale_math import round_scale, weight_scale_from_maxabs
from shards.card.calibration import ModuleInfo, OptRequest, opt_request
from shards.tp.rules import ModelDims, Parallel, Placement, merge_stat, rule_for, stat_shard
from stats_store.inc_write import ChannelSlicer


class CoordinatorError(Fp8OrchestratorError, ValueError):
    """Shards disagree about the model, or a module cannot get a scale."""


@dataclass(frozen=True)
class GlobalScales:
    """The coordinator's result, broadcast once to every shard.

    Attributes:
        weight_scales: module → weight scale in global coordinates (0-d or ``[out]``).
        nodes: module → INC scale-file node (global), for export and reports.
    """

    weight_scales: dict[str, torch.Tensor]
    nodes: dict[str, dict[str, Any]]


def merge_inventories(per_rank: Sequence[Mapping[str, ModuleInfo]], dims: ModelDims) -> dict[str, ModuleInfo]:
    """One tp group's module inventories → global modules with global weight max-abs."""
    world = len(per_rank)
    names = list(per_rank[0])
    for r, inv in enumerate(per_rank[1:], 1):
        if list(inv) != names:
            raise CoordinatorError(f"tp rank {r} selects modules {sorted(set(inv) ^ set(names))[:5]} differently "
                                   "from rank 0; every rank must load the same checkpoint and config")
    out: dict[str, ModuleInfo] = {}
    for name in names:
        first = per_rank[0][name]
        if first.weight_maxabs is None:
            out[name] = first
            continue
        values = [inv[name].weight_maxabs for inv in per_rank]
        shards = [stat_shard(name, "params.weight", dims, r, world, replicated_len=first.weight_maxabs.size)
                  for r in range(world)]
        amax = merge_stat(values, shards)  # type: ignore[arg-type]
        rule = rule_for(name)
        in_features = first.in_features if rule is None or rule.parallel is not Parallel.ROW else dims.features(rule.in_axis)
        out[name] = ModuleInfo(first.class_name, first.op_type, first.weight_dtype, amax, in_features)
    return out


def opt_requests(plan: RunPlan, modules: Mapping[str, ModuleInfo]) -> dict[str, OptRequest]:
    """The OPT searches the plan needs, one per module with an OPT weight section."""
    out: dict[str, OptRequest] = {}
    for name, info in modules.items():
        if info.weight_dtype is None:
            continue
        req = opt_request(plan, name, info.class_name, info.weight_maxabs, getattr(torch, info.weight_dtype))
        if req is not None:
            out[name] = req
    return out


def combine_partials(name: str, partials: Sequence[np.ndarray], dims: ModelDims) -> np.ndarray:
    """Add error partials over shards that split a channel's elements; concatenate split channels."""
    rule = rule_for(name)
    if rule is None:  # replicated: every rank searched the same weight
        return partials[0]
    if partials[0].ndim == 2 and rule.parallel is Parallel.COLUMN:
        return np.concatenate(partials, axis=1)
    return np.sum(np.stack(partials), axis=0)


def _opt_scale(plan: RunPlan, name: str, info: ModuleInfo, req: OptRequest, errors: np.ndarray) -> torch.Tensor:
    ctx = scale_context(plan)
    section = plan.scale_plan.for_module(name, info.class_name).weight
    err = torch.from_numpy(np.array(errors, dtype=np.float64))  # writable copy
    if req.granularity is Granularity.PTS:
        best = pick_pts(err, req.candidates)
        return round_scale(torch.tensor(best, dtype=ctx.hp_dtype), section.rounding, ctx)
    assert req.reference is not None
    ref = torch.from_numpy(np.asarray(req.reference, np.float32)).to(getattr(torch, req.reference_dtype))
    return pick_pcs(err, ref, req.candidates, ctx, rounding=section.rounding)


def weight_scales(plan: RunPlan, modules: Mapping[str, ModuleInfo],
                  opt_errors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Global weight scales of every selected module with a weight."""
    ctx = scale_context(plan)
    requests = opt_requests(plan, modules)
    out: dict[str, torch.Tensor] = {}
    for name, info in modules.items():
        if info.weight_dtype is None:
            continue
        section = plan.scale_plan.for_module(name, info.class_name).weight
        if section.value_type is ValueType.OPT:
            out[name] = _opt_scale(plan, name, info, requests[name], opt_errors[name])
            continue
        amax = info.weight_maxabs if section.granularity is Granularity.PCS else np.array(
            [np.max(info.weight_maxabs)], dtype=np.float32)
        out[name] = weight_scale_from_maxabs(amax, section, ctx, getattr(torch, info.weight_dtype),
                                             where=f"module {name!r} weight")
    return out


def global_nodes(plan: RunPlan, modules: Mapping[str, ModuleInfo], stats: Measurement | None,
                 w_scales: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """INC scale-file nodes of every module that will be quantized, in global coordinates."""
    measured = stats.modules if stats is not None else {}
    requests = []
    for name, info in modules.items():
        module_stats = measured.get(name)
        if module_stats is None and plan.scale_plan.for_module(name, info.class_name).needs_measurement:
            continue  # reported as missing by the shards' convert (or left in high precision)
        requests.append(planned_request(name, info.op_type, info.class_name, plan.scale_plan, module_stats,
                                        weight_scale=w_scales.get(name), in_features=info.in_features))
    # One batch: the formulas run once per group of tensors sharing them, not once per module
    # (thousands of modules on an MoE model; bit-identical to planned_scales module by module).
    return {r.module: s.to_inc_node() for r, s in zip(requests, modules_scales(requests, scale_context(plan)))}


def inc_rank_slicer(dims: ModelDims, observer: str) -> ChannelSlicer:
    """Each rank's part of a global per-channel statistic, for INC measurement files of a world size;
    INC's ``maxabs`` files hold one value per tensor (the max of that part)."""

    def slicer(module: str, label: str, vector: np.ndarray, rank: int, world: int) -> np.ndarray:
        part = vector
        if rule_for(module) is not None:
            s = stat_shard(module, label, dims, rank, world)
            part = vector[s.local] if s.placement is Placement.SLICE else vector
        return np.array([part.max()], np.float32) if observer == "maxabs" else part

    return slicer
