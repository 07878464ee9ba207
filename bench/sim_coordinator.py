"""The coordinator's side of the dp x tp simulation, in one process of its own: reduce, global scales
for two methods, INC export, then a check of every reduced value against the known answer.

The steps are the driver's (``orchestrator.driver.calibration.Calibration``): ``store.reduce()``,
then per scale method ``weight_scales`` and ``global_nodes`` (``orchestrator.driver.global_scales``),
then ``export_measurement`` for a world size with the INC rank slicer and ``write_scales`` (its
``_export_inc``). The modules' global weight max-abs, which a real coordinator merges from the
shards' inventories (``merge_inventories``), is read from the reduced statistics: the same vectors,
without a model to take an inventory of.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator


import numpy as np

from bench.rss import peak_rss_mb
from bench.sim_shapes import BATCHES_PER_FLUSH, SimShape, expected_global
from stats_store.records import Measurement

if TYPE_CHECKING:
    from shards.card.calibration import ModuleInfo
    from shards.plan import RunPlan

# torch and the orchestrator are imported inside the functions: the writer processes import this
# module's constants (through bench.bench_405b) and should not pay ~200 MB RSS for torch.

# The scale methods timed: INC's default, and a static per-channel-weight method (PCS weight scales
# from the stored per-channel weight max-abs, per-tensor activations).
METHODS = ("maxabs_hw", "act_maxabs_hw_weights_pcs_maxabs_pow2")
DEVICE = "GAUDI3"
WEIGHT_DTYPE = "bfloat16"


@dataclass(frozen=True)
class Phase:
    wall_s: float
    cpu_s: float


@dataclass
class CoordinatorFigures:
    """Wall and CPU seconds of each phase, the process's peak RSS (taken before the check) and counts."""

    phases: dict[str, Phase] = field(default_factory=dict)
    max_rss_mb: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)
    export_bytes: int = 0
    export_files: int = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.phases[name] = Phase(time.perf_counter() - wall, time.process_time() - cpu)


def plan_for(method: str, dump_stats_path: str) -> RunPlan:
    """The QUANTIZE plan of an INC config using ``method`` with scales for Gaudi3."""
    from orchestrator.configuration.fp8_config import Fp8Config
    from shards.plan import Mode

    config = {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": method, "device_for_scales": DEVICE,
              "dump_stats_path": dump_stats_path}
    return Fp8Config.load(config).to_plan(Mode.QUANTIZE)


def module_infos(shape: SimShape, stats: Measurement) -> dict[str, ModuleInfo]:
    """What ``merge_inventories`` returns for these Linears: global weight max-abs, input features."""
    from shards.card.calibration import ModuleInfo

    return {name: ModuleInfo(("Linear",), "linear", WEIGHT_DTYPE, stats.modules[name].params["weight"],
                             shape.in_features(name))
            for name in shape.modules}


def coordinate(location: str, shape: SimShape, flushes: int, seed: int, inc_dir: str) -> CoordinatorFigures:
    """Reduce the store at ``location``, compute both methods' scales, export INC files for world ``tp``."""
    import torch

    from orchestrator.driver.global_scales import global_nodes, inc_rank_slicer, weight_scales
    from stats_store.inc_write import export_measurement, write_scales
    from stats_store.zarr_store import ZarrStatsStore

    torch.set_num_threads(1)
    fig = CoordinatorFigures()
    store = ZarrStatsStore.open(location)
    with fig.phase("reduce"):
        stats = store.reduce()
    nodes: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        plan = plan_for(method, str(Path(inc_dir) / "llama405b"))
        with fig.phase(f"scales {method}"):
            modules = module_infos(shape, stats)
            nodes[method] = global_nodes(plan, modules, stats, weight_scales(plan, modules, {}))
        fig.nodes[method] = len(nodes[method])
    plan = plan_for(METHODS[0], str(Path(inc_dir) / "llama405b"))
    with fig.phase("export"):
        paths = export_measurement(stats, plan.dump_stats_path, shape.tp, slicer=inc_rank_slicer(shape.dims, plan.observer))
        paths += write_scales(nodes[METHODS[0]], plan.dump_stats_path, plan.observer, plan.scale_plan.name)
    fig.max_rss_mb = peak_rss_mb()
    fig.export_bytes, fig.export_files = sum(p.stat().st_size for p in paths), len(paths)
    check_reduced(stats, shape, flushes, seed)
    return fig


def check_reduced(stats: Measurement, shape: SimShape, flushes: int, seed: int) -> None:
    """Every reduced value and count equals the independently computed global statistics."""
    want_samples = shape.dp * flushes * BATCHES_PER_FLUSH  # tp ranks saw the same batches; dp groups add
    if stats.num_samples != want_samples or list(stats.modules) != list(shape.modules):
        raise AssertionError(f"reduced {len(stats.modules)} modules, {stats.num_samples} samples; want "
                             f"{len(shape.modules)}, {want_samples}")
    for (name, label), want in expected_global(shape, flushes, seed).items():
        got = stats.modules[name].tensors()[label]
        if not np.array_equal(got, want):
            raise AssertionError(f"reduced {name} {label} differs from the known global value")
        if stats.modules[name].num_samples != want_samples:
            raise AssertionError(f"reduced {name} num_samples {stats.modules[name].num_samples}, want {want_samples}")
