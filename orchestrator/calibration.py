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
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import ray

from orchestrator.config import Fp8Config
from orchestrator.coordinator import GlobalScales, combine_partials, global_nodes, merge_inventories, opt_requests, weight_scales
from orchestrator.errors import Fp8OrchestratorError
from orchestrator.fingerprint import measurement_config_hash, model_fingerprint
from orchestrator.progress import BatchProgress, PhaseTimer
from orchestrator.shard_actor import CalibrationRunner
from orchestrator.data import Batch
from shards.checkpoint import read_config
from shards.dist import DeviceKind
from shards.measurement import Measurement
from shards.numerics import ScaleDevice
from shards.plan import Mode, RunPlan
from shards.shard_calibration import ModuleInfo
from shards.tp_plan import ModelDims, rule_for
from shards.worker import WorkerGroups, WorkerResources, make_workers, worker_resources
from stats_store.layout import ZarrStatsStore, store_path
from stats_store.metadata import CommitRecord, RunMeta
from stats_store.reshard import reshard, split_rules_from_commits


class CalibrationError(Fp8OrchestratorError, RuntimeError):
    """A calibration step was called out of order, or the run cannot continue."""


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


def done_batches(commits: dict[int, CommitRecord], tp: int) -> set[int]:
    """Batches every tp rank of some data-parallel group has committed."""
    by_group: dict[int, list[set[int]]] = {}
    for shard, rec in commits.items():
        by_group.setdefault(shard // tp, []).append(set(rec.batch_ids))
    done: set[int] = set()
    for sets in by_group.values():
        if len(sets) == tp:
            done |= set.intersection(*sets)
    return done


@dataclass
class RunReport:
    """What a run did, for the summary table."""

    batches: int = 0
    skipped: int = 0
    tokens: int = 0
    modules_measured: int = 0
    modules_selected: int = 0
    uncovered: list[str] = field(default_factory=list)
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)
    scales: int = 0
    quantized: int = 0
    timer: PhaseTimer = field(default_factory=PhaseTimer)


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
    """

    def __init__(self, config: Fp8Config | dict[str, Any] | str | Path, model: str | Path, *, tp: int = 1, dp: int = 1,
                 address: str | None = None, device: str = "cpu", num_cpus: int | None = None, flush_every: int = 8,
                 hpu_device: ScaleDevice | None = None, overwrite: bool = False, progress: bool = True,
                 resources: WorkerResources | None = None, timeout_s: float = 300.0) -> None:
        self.config = Fp8Config.load(config)
        self.checkpoint = Path(model)
        self.tp, self.dp = tp, dp
        self.device = DeviceKind(device)
        self.flush_every = max(1, flush_every)
        self.hpu_device = hpu_device
        self.overwrite = overwrite
        self.progress = progress
        self.report = RunReport()
        self.dims = ModelDims.from_config(read_config(self.checkpoint))
        self.global_stats: Measurement | None = None
        self.scales: GlobalScales | None = None
        local_cpus = num_cpus if num_cpus is not None else max(2, tp * dp)
        ensure_ray(address, local_cpus)
        with self.report.timer.phase("start shards"):
            self.workers: WorkerGroups = make_workers(
                self.checkpoint, dp, tp, self.device, resources=resources or worker_resources(self.device),
                runner_cls=CalibrationRunner, timeout_s=timeout_s)

    def __enter__(self) -> "Calibration":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the shard actors (the store and anything exported stay on disk)."""
        self.workers.shutdown()

    @property
    def groups(self) -> list[list[Any]]:
        return self.workers.groups

    # ---- MEASURE --------------------------------------------------------------------------------
    def _open_store(self, plan: RunPlan) -> ZarrStatsStore:
        meta = RunMeta(measurement_config_hash(self.config), model_fingerprint(self.checkpoint), self.dp, self.tp,
                       self.device.value, plan.observer)
        return ZarrStatsStore.open_run(store_path(plan.dump_stats_path), meta, overwrite=self.overwrite)

    def measure(self, batches: Iterable[Batch]) -> Measurement:
        """Measure ``batches`` on every shard; returns the reduced global statistics."""
        plan = self.config.to_plan(Mode.MEASURE, hpu_device=self.hpu_device)
        store = self._open_store(plan)
        self.overwrite = False  # a resumed measure() must never wipe what this run wrote
        done = done_batches(store.commits(), self.tp)
        todo = [b for b in batches if b.batch_id not in done]
        self.report.skipped += len(done)
        path = str(store.path)
        ray.get([a.start_measure.remote(plan, path) for a in self.workers.actors])
        with self.report.timer.phase("measure"):
            self._run_batches(todo)
            ray.get([a.finish_measure.remote() for a in self.workers.actors])
        with self.report.timer.phase("reduce"):
            self.global_stats = store.reduce()
        self.report.modules_measured = len(self.global_stats.modules)
        self.report.nonfinite = self.global_stats.nonfinite_report()
        return self.global_stats

    def _run_batches(self, todo: Sequence[Batch]) -> None:
        queue: deque[Batch] = deque(todo)
        since_flush = [0] * self.dp
        inflight: dict[Any, tuple[int, Batch, list[Any]]] = {}
        bar = BatchProgress(len(todo), self.dp, enabled=self.progress)

        def submit(g: int) -> None:
            if not queue:
                return
            batch = queue.popleft()
            tokens = np.asarray(batch.tokens, dtype=np.int64)
            refs = [a.measure_batch.remote(batch.batch_id, tokens) for a in self.groups[g]]
            inflight[refs[0]] = (g, batch, refs)

        for g in range(self.dp):
            submit(g)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            g, batch, refs = inflight.pop(ready[0])
            tokens = sum(ray.get(refs)) // self.tp
            self.report.batches += 1
            self.report.tokens += tokens
            bar.update(g, tokens)
            since_flush[g] += 1
            if since_flush[g] >= self.flush_every:
                ray.get([a.flush.remote() for a in self.groups[g]])
                since_flush[g] = 0
            submit(g)
        bar.close()

    def _reduced(self, plan: RunPlan) -> Measurement | None:
        if self.global_stats is not None:
            return self.global_stats
        if not plan.scale_plan.uses_stats or plan.dynamic:
            return None
        store = ZarrStatsStore.open(store_path(plan.dump_stats_path), expect_fingerprint=model_fingerprint(self.checkpoint))
        self.global_stats = store.read_reduced()
        return self.global_stats

    # ---- QUANTIZE -------------------------------------------------------------------------------
    def quantize(self) -> GlobalScales:
        """Compute global scales once, broadcast them, and quantize every shard in place."""
        plan = self.config.to_plan(Mode.QUANTIZE, hpu_device=self.hpu_device)
        stats = self._reduced(plan)
        group0 = self.groups[0]
        with self.report.timer.phase("scales"):
            modules = merge_inventories(ray.get([a.inventory.remote(plan) for a in group0]), self.dims)
            self.report.modules_selected = len(modules)
            measured = stats.modules if stats is not None else {}
            self.report.uncovered = [n for n in modules if n not in measured] if stats is not None else []
            requests = opt_requests(plan, modules)
            errors = self._opt_errors(plan, requests)
            w_scales = weight_scales(plan, modules, errors)
            nodes = global_nodes(plan, modules, stats, w_scales)
            self.scales = GlobalScales(w_scales, nodes)
            self.report.scales = len(nodes)
        with self.report.timer.phase("quantize"):
            scales_ref = ray.put(w_scales)
            local = self._local_stats(stats)
            refs = [a.quantize.remote(plan, local[i % self.tp] if local else None, scales_ref)
                    for i, a in enumerate(self.workers.actors)]
            self.report.quantized = len(ray.get(refs)[0])
        return self.scales

    def _opt_errors(self, plan: RunPlan, requests: dict[str, Any]) -> dict[str, np.ndarray]:
        if not requests:
            return {}
        partials = ray.get([a.opt_partials.remote(plan, requests) for a in self.groups[0]])
        return {name: combine_partials(name, [p[name] for p in partials], self.dims) for name in requests}

    def _local_stats(self, stats: Measurement | None) -> list[Measurement]:
        """The global statistics cut to each tp rank's channels (per-tensor values stay global)."""
        if stats is None:
            return []
        store = ZarrStatsStore.open(store_path(self.config.to_plan(Mode.MEASURE).dump_stats_path))
        split = split_rules_from_commits(store.commits())
        return [m for _, m in reshard(stats, self.tp, split)]

    # ---- using the result -----------------------------------------------------------------------
    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits of data-parallel group 0 (every tp rank runs; rank 0's result is returned)."""
        refs = [a.forward.remote(np.asarray(input_ids)) for a in self.groups[0]]
        return ray.get(refs)[0]

    def export(self, out_dir: str | Path, *, inc_world: int | None = None) -> Path:
        """Write the quantized model as a compressed-tensors FP8 checkpoint (and INC files on request)."""
        from orchestrator.export_ct import write_compressed_tensors
        from orchestrator.gather import gather_checkpoint

        if self.scales is None:
            raise CalibrationError("export: call quantize() first")
        plan = self.config.to_plan(Mode.QUANTIZE, hpu_device=self.hpu_device)
        with self.report.timer.phase("export"):
            ckpt = gather_checkpoint(self.checkpoint, self.quantized_state_by_rank(), self.scales.weight_scales,
                                     dynamic=plan.dynamic, scale_method=plan.scale_plan.name)
            out = write_compressed_tensors(ckpt, out_dir)
            if inc_world:
                self._export_inc(plan, Path(out_dir), inc_world)
        return out

    def _export_inc(self, plan: RunPlan, out_dir: Path, world: int) -> None:
        """INC measurement files for ``world`` ranks and the global scale file, under ``out_dir/inc``."""
        from stats_store.inc_format import export_measurement, write_scales

        prefix = out_dir / "inc" / Path(plan.dump_stats_path).name
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if self.global_stats is not None:
            export_measurement(self.global_stats, prefix, world, slicer=self._inc_slicer(plan))
        assert self.scales is not None
        write_scales(self.scales.nodes, prefix, plan.observer, plan.scale_plan.name)

    def _inc_slicer(self, plan: RunPlan) -> Any:
        """Each rank's part of a per-channel statistic; INC's ``maxabs`` files hold one value each."""
        from shards.tp_plan import Merge, stat_shard

        def slicer(module: str, label: str, vector: np.ndarray, rank: int, world: int) -> np.ndarray:
            part = vector
            if rule_for(module) is not None:
                s = stat_shard(module, label, self.dims, rank, world)
                part = vector[s.local] if s.merge is Merge.CONCAT else vector
            return np.array([part.max()], np.float32) if plan.observer == "maxabs" else part

        return slicer

    def scales_by_rank(self) -> list[dict[str, dict[str, Any]]]:
        """Each tp rank's local scale nodes (group 0)."""
        return ray.get([a.scales_of.remote() for a in self.groups[0]])

    def quantized_state_by_rank(self) -> list[dict[str, dict[str, Any]]]:
        """Each tp rank's FP8 weights (uint8 codes) and scales (group 0)."""
        return ray.get([a.quantized_state.remote() for a in self.groups[0]])
