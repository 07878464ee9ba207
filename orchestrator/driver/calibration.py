"""The distributed calibration driver: ``Calibration(config, model=..., tp=..., dp=...)``.

    with Calibration("maxabs_quant.json", model="ckpt/", tp=2, dp=1) as cal:
        cal.measure(batches)          # shards measure in parallel, stream stats into the store
        cal.quantize()                # coordinator computes global scales, shards quantize in place
        cal.export("out/")            # compressed-tensors FP8 checkpoint (+ INC files on request)

Data-parallel groups pull batches from one shared queue (the driver hands the next batch to
whichever group is free); every tp rank of a group runs the same batch. Each shard flushes its
statistics into its own chunk of the store every ``flush_every`` batches and commits them, so a
restarted driver resumes from the store and skips batches already committed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.configuration.fp8_config import Fp8Config
from orchestrator.driver.coverage import (UncoveredPolicy, expert_token_counts, parse_policy, resolve_uncovered,
                                   uncovered_modules, with_expert_siblings)
from orchestrator.driver.global_scales import GlobalScales, combine_partials, global_nodes, merge_inventories, opt_requests, weight_scales
from orchestrator.errors import CalibrationError
from orchestrator.driver.measure_loop import get_all, MeasureLoop, actor_failure, resume_queues
from orchestrator.driver.run_store import inc_export_prefix, read_measured_store
from orchestrator.driver.run_identity import measurement_config_hash, model_fingerprint
from orchestrator.driver.progress import PhaseTimer
from shards.card.actor import CalibrationRunner
from orchestrator.driver.data import Batch
from shards.tp.checkpoint import check_checkpoint, read_config
from shards.tp.dist import DeviceKind
from stats_store.records import Measurement
from shards.fp8.methods import DynamicScaling
from shards.fp8.numerics import ScaleDevice
from shards.plan import Mode, RunPlan
from shards.tp.rules import rule_for
from shards.card.runner import ShardRunner
from orchestrator.driver.grid import WorkerGroups, WorkerResources, make_workers, worker_resources
from stats_store.zarr_store import ZarrStatsStore, store_path
from stats_store.metadata import RunMeta
from stats_store.reshard import reshard, split_rules_from_commits


def ensure_ray(address: str | None = None, num_cpus: int | None = None, resources: dict[str, float] | None = None) -> None:
    """Connect to ``address`` or start an in-process local cluster (the embedded default)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit` jobs
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": always a new in-process cluster, never one a stale `ray start` left a pointer to.
        ray.init(address="local", num_cpus=num_cpus, resources=resources or None, include_dashboard=False,
                 log_to_driver=True)


@dataclass
class RunReport:
    """What a run did, for the summary table."""

    batches: int = 0
    skipped: int = 0
    tokens: int = 0
    modules_measured: int = 0
    modules_selected: int = 0
    restarts: int = 0
    uncovered: list[str] = field(default_factory=list)
    uncovered_policy: str = ""  # the policy applied to ``uncovered`` (fail, warn, unit_scale, expert_max)
    filled: list[str] = field(default_factory=list)  # idle expert projections expert_max filled
    # MoE layer → expert index → tokens routed to it (0: idle; None: measured, count not stored)
    expert_tokens: dict[str, dict[int, int | None]] = field(default_factory=dict)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)
    scales: int = 0
    quantized: int = 0
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    # per shard (global index order): forward_s, all_reduce_s, quantize_s, quantize_bytes
    shard_times: list[dict[str, float]] = field(default_factory=list)

    def profile(self) -> dict[str, float]:
        """The shards' figures the summary shows: the tp all-reduce share of the measure forwards
        (all ranks together) and the slowest shard's in-place quantization with its bytes/s."""
        out: dict[str, float] = {}
        forward = sum(t["forward_s"] for t in self.shard_times)
        if forward > 0:
            out["all_reduce_share_of_measure"] = sum(t["all_reduce_s"] for t in self.shard_times) / forward
        slowest = max(self.shard_times, key=lambda t: t["quantize_s"], default=None)
        if slowest is not None and slowest["quantize_s"] > 0:
            out["quantize_slowest_shard_s"] = slowest["quantize_s"]
            out["quantize_slowest_shard_gb_per_s"] = slowest["quantize_bytes"] / slowest["quantize_s"] / 1e9
        return out


class Calibration:
    """A dp x tp calibration of one HF checkpoint on a Ray cluster.

    Args:
        config: an ``Fp8Config``, a dict of INC keys or the path of an INC JSON config.
        model: HF checkpoint directory (safetensors) readable by every node.
        tp: tensor-parallel size (shards per data-parallel group).
        dp: data-parallel groups.
        address: Ray cluster address; None starts (or reuses) an in-process local cluster.
        device: ``cpu`` (simulated cards), ``cuda`` or ``hpu``.
        flush_every: batches between a shard's flushes to the store.
        hpu_device: the Gaudi generation the shards run on (device_for_scales default).
        overwrite: replace an existing store of a different run at dump_stats_path.
        progress: show progress bars.
        resources: per-shard resources override (e.g. ``{"HPU": 1}`` to place simulated cards).
        timeout_s: how long to wait for placement, an actor's start and collectives.
        placement_timeout_s: how long a (re)started tp group waits for a node with room for it
            (None: ``timeout_s``); a group that lost its node and finds none stops the measure.
        uncovered: what to do with selected modules that saw no data: ``fail``, ``warn``,
            ``unit_scale`` or ``expert_max`` (see ``orchestrator.driver.coverage``; None: ``warn`` if the
            config sets ignore_modules_wo_measures, else ``fail``).
        max_restarts: how often a dp group may lose an actor during one measure() before it gives up.
        runner_cls: the shard actor class (tests inject faults with a subclass).

    The shard actors start on first use, so a bad config or store fails before any actor starts.
    """

    def __init__(self, config: Fp8Config | dict[str, Any] | str | Path, model: str | Path, *, tp: int = 1, dp: int = 1,
                 address: str | None = None, device: str = "cpu", num_cpus: int | None = None, flush_every: int = 8,
                 hpu_device: ScaleDevice | None = None, overwrite: bool = False, progress: bool = True,
                 resources: WorkerResources | None = None, timeout_s: float = 300.0,
                 placement_timeout_s: float | None = None,
                 uncovered: str | UncoveredPolicy | None = None, max_restarts: int = 3,
                 runner_cls: type[ShardRunner] = CalibrationRunner) -> None:
        self.config = Fp8Config.load(config)
        self.checkpoint = Path(model)
        self.tp, self.dp = tp, dp
        self.device = DeviceKind(device)
        self.flush_every = max(1, flush_every)
        self.hpu_device = hpu_device
        self.overwrite = overwrite
        self.progress = progress
        self.report = RunReport()
        # Before any actor starts: the family is supported, tp divides its heads and intermediate
        # sizes, and every tensor the shards will read is in the checkpoint with the config's shape.
        self.family = check_checkpoint(self.checkpoint, tp)
        self.dims = self.family.dims(read_config(self.checkpoint))
        self.global_stats: Measurement | None = None
        self.scales: GlobalScales | None = None
        self.uncovered = uncovered
        self.max_restarts = max_restarts
        self._resources = resources or worker_resources(self.device)
        self._runner_cls, self._timeout_s, self._placement_timeout_s = runner_cls, timeout_s, placement_timeout_s
        self._address, self._num_cpus = address, num_cpus if num_cpus is not None else max(2, tp * dp)
        self._workers: WorkerGroups | None = None

    def __enter__(self) -> "Calibration":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the shard actors (the store and anything exported stay on disk)."""
        if self._workers is not None:
            self._workers.shutdown()
            self._workers = None

    @property
    def workers(self) -> WorkerGroups:
        """The shard actors, started (and Ray connected) on first use."""
        if self._workers is None:
            ensure_ray(self._address, self._num_cpus)
            with self.report.timer.phase("start shards"):
                self._workers = make_workers(self.checkpoint, self.dp, self.tp, self.device, resources=self._resources,
                                             runner_cls=self._runner_cls, timeout_s=self._timeout_s,
                                             placement_timeout_s=self._placement_timeout_s)
        return self._workers

    @property
    def groups(self) -> list[list[Any]]:
        return self.workers.groups

    # ---- MEASURE --------------------------------------------------------------------------------
    def _open_store(self, plan: RunPlan) -> ZarrStatsStore:
        meta = RunMeta(measurement_config_hash(self.config), model_fingerprint(self.checkpoint), self.dp, self.tp,
                       self.device.value, plan.observer)
        return ZarrStatsStore.open_run(store_path(plan.dump_stats_path), meta, overwrite=self.overwrite)

    def measure(self, batches: Iterable[Batch]) -> Measurement:
        """Measure ``batches`` on every shard; returns the reduced global statistics.

        Batches the store already holds for every tp rank of a group are skipped (a rerun resumes);
        a shard actor that dies is replaced with its whole tp group, which redoes its uncommitted
        batches (see :class:`MeasureLoop`).
        """
        plan = self.config.to_plan(Mode.MEASURE, hpu_device=self.hpu_device)
        store = self._open_store(plan)  # before any actor starts: a wrong store fails fast
        self.overwrite = False  # a resumed measure() must never wipe what this run wrote
        batches = list(batches)
        commits = store.commits()
        if commits:
            store.merged()  # checks every committed chunk: a damaged store fails here, naming its path
        shared, own, skipped = resume_queues(batches, commits, self.tp, self.dp, str(store.path))
        self.report.skipped += skipped
        path = str(store.path)
        selected = get_all([a.start_measure.remote(plan, path) for a in self.workers.actors])
        store.record_selected([n for names in selected for n in names])  # idle experts have no commit
        with self.report.timer.phase("measure"):
            MeasureLoop(self, plan, store, shared, own).run()
            self._finish_measure()
        self._collect_shard_times()
        with self.report.timer.phase("reduce"):
            self.global_stats = store.reduce()
        self.report.modules_measured = len(self.global_stats.modules)
        self.report.nonfinite = self.global_stats.nonfinite_report()
        self.report.expert_tokens = expert_token_counts(store.selected_modules() or [], self.global_stats)
        return self.global_stats

    def _finish_measure(self) -> None:
        """Detach the observers; a group that lost an actor now is restarted (its data is committed)."""
        for g in range(self.dp):
            try:
                ray.get([a.finish_measure.remote() for a in self.groups[g]])
            except RayActorError:
                self.workers.restart_group(g)
            except RayTaskError as e:
                raise actor_failure(e) from e

    def _reduced(self, plan: RunPlan) -> Measurement | None:
        if self.global_stats is not None:
            return self.global_stats
        if not plan.scale_plan.uses_stats or plan.dynamic:
            return None
        self.global_stats = read_measured_store(plan.dump_stats_path, model_fingerprint(self.checkpoint))
        return self.global_stats

    # ---- QUANTIZE -------------------------------------------------------------------------------
    def quantize(self) -> GlobalScales:
        """Compute global scales once, broadcast them, and quantize every shard in place.

        Selected modules without a measurement are listed first and handled by the ``uncovered``
        policy; non-finite statistics never become scales (the scale code raises naming the module).
        """
        plan = self.config.to_plan(Mode.QUANTIZE, hpu_device=self.hpu_device)
        policy = parse_policy(self.uncovered, plan)
        stats = self._reduced(plan)
        group0 = self.groups[0]
        with self.report.timer.phase("scales"):
            modules = merge_inventories(get_all([a.inventory.remote(plan) for a in group0]), self.dims)
            self.report.modules_selected = len(modules)
            self.report.uncovered = uncovered_modules(plan, modules, stats)
            self.report.expert_tokens = expert_token_counts(modules, stats)
            resolved = resolve_uncovered(plan, self.report.uncovered, policy, str(store_path(plan.dump_stats_path)), stats)
            plan, stats, self.report.filled = resolved.plan, resolved.stats, resolved.filled
            self.report.uncovered_policy = policy.value if self.report.uncovered else ""
            requests = opt_requests(plan, modules)
            errors = self._opt_errors(plan, requests)
            w_scales = weight_scales(plan, modules, errors)
            nodes = global_nodes(plan, modules, stats, w_scales)
            self.scales = GlobalScales(w_scales, nodes)
            self.report.scales = len(nodes)
        with self.report.timer.phase("quantize"):
            scales_ref = ray.put(w_scales)
            local = self._local_stats(plan, stats)
            refs = [a.quantize.remote(plan, local[i % self.tp] if local else None, scales_ref)
                    for i, a in enumerate(self.workers.actors)]
            self.report.quantized = len(get_all(refs)[0])
        self._collect_shard_times()
        return self.scales

    def _collect_shard_times(self) -> None:
        self.report.shard_times = get_all([a.shard_times.remote() for a in self.workers.actors])

    def _opt_errors(self, plan: RunPlan, requests: dict[str, Any]) -> dict[str, np.ndarray]:
        if not requests:
            return {}
        partials = get_all([a.opt_partials.remote(plan, requests) for a in self.groups[0]])
        return {name: combine_partials(name, [p[name] for p in partials], self.dims) for name in requests}

    def _local_stats(self, plan: RunPlan, stats: Measurement | None) -> list[Measurement]:
        """The global statistics cut to each tp rank's channels (per-tensor values stay global)."""
        if stats is None:
            return []
        store = ZarrStatsStore.open(store_path(plan.dump_stats_path))
        split = with_expert_siblings(split_rules_from_commits(store.commits()))  # filled experts: as their siblings
        return [m for _, m in reshard(stats, self.tp, split)]

    # ---- using the result -----------------------------------------------------------------------
    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits of data-parallel group 0 (every tp rank runs; rank 0's result is returned)."""
        refs = [a.forward.remote(np.asarray(input_ids)) for a in self.groups[0]]
        return get_all(refs)[0]

    exported: Any = None  # the last export()'s ExportSummary (orchestrator.export.streamed)

    def export(self, out_dir: str | Path, *, inc_world: int | None = None, max_shard_bytes: int | None = None) -> Path:
        """Write the quantized model as a compressed-tensors FP8 checkpoint (and INC files on request).

        Streamed (``orchestrator.export.streamed``): the driver plans the files from shapes, then asks
        the tp ranks of group 0 for one tensor at a time and writes it, so neither the driver nor a
        rank ever holds more than a few tensors. ``max_shard_bytes`` bounds each safetensors file
        (default 5 GB; a bigger tensor gets a file of its own); ``self.exported`` says what was written.
        """
        from orchestrator.export.safetensors_files import DEFAULT_MAX_SHARD_BYTES
        from orchestrator.export.streamed import export_from_shards
        from orchestrator.export.writer import warn_client_dynamic_rule

        if self.scales is None:
            raise CalibrationError("export: call quantize() first")
        plan = self.config.to_plan(Mode.QUANTIZE, hpu_device=self.hpu_device)
        group0 = self.groups[0]

        def parts(module: str, part: str) -> list[Any]:
            return get_all([a.quantized_part.remote(module, part) for a in group0])

        with self.report.timer.phase("export"):
            if plan.dynamic:
                warn_client_dynamic_rule(DynamicScaling.of(m.activation) for m in plan.scale_plan.all_methods())
            self.exported = export_from_shards(
                self.checkpoint, get_all([a.quantized_layout.remote() for a in group0]), parts,
                self.scales.weight_scales, out_dir, dynamic=plan.dynamic, scale_method=plan.scale_plan.name,
                nodes=self.scales.nodes,
                max_shard_bytes=DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
            if inc_world:
                self._export_inc(plan, Path(out_dir), inc_world)
        return self.exported.out

    def _export_inc(self, plan: RunPlan, out_dir: Path, world: int) -> None:
        """INC measurement files for ``world`` ranks and the global scale file, under ``out_dir/inc``."""
        from stats_store.inc_write import export_measurement, write_scales

        prefix = inc_export_prefix(out_dir, plan.dump_stats_path)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if self.global_stats is not None:
            export_measurement(self.global_stats, prefix, world, slicer=self._inc_slicer(plan))
        assert self.scales is not None
        write_scales(self.scales.nodes, prefix, plan.observer, plan.scale_plan.name)

    def _inc_slicer(self, plan: RunPlan) -> Any:
        """Each rank's part of a per-channel statistic; INC's ``maxabs`` files hold one value each."""
        from shards.tp.rules import Placement, stat_shard

        def slicer(module: str, label: str, vector: np.ndarray, rank: int, world: int) -> np.ndarray:
            part = vector
            if rule_for(module) is not None:
                s = stat_shard(module, label, self.dims, rank, world)
                part = vector[s.local] if s.placement is Placement.SLICE else vector
            return np.array([part.max()], np.float32) if plan.observer == "maxabs" else part

        return slicer

    def scales_by_rank(self) -> list[dict[str, dict[str, Any]]]:
        """Each tp rank's local scale nodes (group 0)."""
        return get_all([a.scales_of.remote() for a in self.groups[0]])

    def quantized_state_by_rank(self) -> list[dict[str, dict[str, Any]]]:
        """Each tp rank's FP8 weights (uint8 codes) and scales (group 0), all in this process: for
        tests on small models (:meth:`export` streams one tensor at a time instead)."""
        return get_all([a.quantized_state.remote() for a in self.groups[0]])
