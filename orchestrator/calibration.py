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
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.config import Fp8Config
from orchestrator.coverage import UncoveredPolicy, apply_policy, parse_policy, uncovered_modules
from orchestrator.coordinator import GlobalScales, combine_partials, global_nodes, merge_inventories, opt_requests, weight_scales
from orchestrator.errors import Fp8OrchestratorError
from orchestrator.fingerprint import measurement_config_hash, model_fingerprint
from orchestrator.progress import BatchProgress, PhaseTimer
from orchestrator.shard_actor import CalibrationRunner
from orchestrator.data import Batch
from shards.checkpoint import read_config
from shards.dist import DeviceKind
from shards.errors import ShardError
from shards.measurement import Measurement
from shards.numerics import ScaleDevice
from shards.plan import Mode, RunPlan
from shards.shard_calibration import ModuleInfo
from shards.tp_plan import ModelDims, rule_for
from shards.runner import ShardRunner
from shards.worker import WorkerGroups, WorkerResources, make_workers, worker_resources
from stats_store.errors import StatsStoreError
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


def resume_queues(batches: Sequence[Batch], commits: dict[int, CommitRecord], tp: int, dp: int,
                  where: str) -> tuple[deque[Batch], list[deque[Batch]], int]:
    """Split ``batches`` for a (resumed) run: the shared queue, each group's own queue, and the skip count.

    A batch every tp rank of some group committed is skipped. A batch only some ranks of group
    ``g`` committed (the driver or an actor died between their flushes) must be redone by ``g``
    itself: its other ranks still need it, and the ranks that have it run it uncounted.

    Raises:
        CalibrationError: a partly committed batch is not among ``batches`` (the data changed).
    """
    done = done_batches(commits, tp)
    by_group: dict[int, list[set[int]]] = {}
    for shard, rec in commits.items():
        by_group.setdefault(shard // tp, []).append(set(rec.batch_ids))
    partial: dict[int, int] = {}
    for g, sets in by_group.items():
        common = set.intersection(*sets) if len(sets) == tp else set()
        partial.update({b: g for b in set.union(*sets) - common - done})
    missing = sorted(set(partial) - {b.batch_id for b in batches})
    if missing:
        raise CalibrationError(
            f"{where}: batches {missing[:10]} were committed by only some tp ranks of their group and are not "
            "in this run's data; rerun with the same data (same --data/--seq-len/--batch-size) or pass --overwrite"
        )
    own: list[deque[Batch]] = [deque() for _ in range(dp)]
    shared: deque[Batch] = deque()
    for b in batches:
        if b.batch_id in done:
            continue
        (own[partial[b.batch_id]] if b.batch_id in partial else shared).append(b)
    return shared, own, sum(b.batch_id in done for b in batches)


def _unwrapped(e: RayTaskError) -> BaseException:
    """Our own error raised inside an actor, without Ray's remote traceback around its message."""
    cause = e.cause
    return cause if isinstance(cause, (Fp8OrchestratorError, ShardError, StatsStoreError)) else e


def _get(refs: Sequence[Any]) -> list[Any]:
    """``ray.get`` that re-raises our errors from actors as themselves (one-line messages)."""
    try:
        return ray.get(list(refs))
    except RayTaskError as e:
        raise _unwrapped(e) from e


class IncompleteStoreError(Fp8OrchestratorError, ValueError):
    """A stats store whose measurement is unfinished (some tp ranks of a group did not commit)."""


def read_measured_store(dump_stats_path: str | Path, fingerprint: Any) -> Measurement:
    """The global statistics of a finished measurement of the model with ``fingerprint``.

    Raises:
        StoreNotFoundError, StoreFormatError, RunMismatchError, TornWriteError: from the store,
            each naming its path and what to do.
        IncompleteStoreError: no shard committed, or only some tp ranks of a group did (a commit
            record is missing or the run was interrupted between their flushes).
    """
    store = ZarrStatsStore.open(store_path(dump_stats_path), expect_fingerprint=fingerprint)
    commits, tp = store.commits(), store.meta.tp
    fix = "rerun the measure command with the same config, model and data to finish it, or --overwrite to start over"
    if not commits:
        raise IncompleteStoreError(f"{store.path}: no shard has committed statistics; {fix}")
    for g in sorted({k // tp for k in commits}):
        records = [commits.get(g * tp + r) for r in range(tp)]
        missing = [g * tp + r for r, rec in enumerate(records) if rec is None]
        if missing:
            raise IncompleteStoreError(f"{store.path}: shard(s) {missing} of dp group {g} have no commit record "
                                       f"while their tp peers have one; {fix}")
        sets = [frozenset(rec.batch_ids) for rec in records if rec is not None]
        if len(set(sets)) > 1:
            odd = sorted(frozenset.union(*sets) - frozenset.intersection(*sets))
            raise IncompleteStoreError(f"{store.path}: batches {odd[:10]} were committed by only some tp ranks of "
                                       f"dp group {g}; {fix}")
    stats, _ = store.current()  # merges (checksum-verified) when the reduced arrays are stale
    return stats


def inc_export_prefix(out_dir: str | Path, dump_stats_path: str) -> Path:
    """``out_dir/inc/<name>``: the config's prefix reduced to a plain file name, so INC files stay in ``out_dir/inc``.

    ``dump_stats_path`` comes from a config: ``..``, separators, absolute paths and odd characters
    must never steer where an export writes.
    """
    raw = Path(str(dump_stats_path).replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip(".") or "measure"
    inc = Path(out_dir) / "inc"
    prefix = inc / name
    if prefix.parent != inc:  # cannot happen after the cleaning above; kept as the guarantee it is
        raise CalibrationError(f"dump_stats_path: value {dump_stats_path!r} would export outside {inc}")
    return prefix


@dataclass
class _GroupRun:
    """One data-parallel group's state in the measure loop."""

    refs: list[Any] = field(default_factory=list)  # calls in flight, one per tp rank
    results: list[Any] = field(default_factory=list)
    batch: Batch | None = None  # the batch in flight (None while flushing)
    unflushed: list[tuple[Batch, int]] = field(default_factory=list)  # run since the last flush, with tokens
    restarts: int = 0


class _MeasureLoop:
    """Hand batches to free groups, flush each group every ``flush_every`` batches, survive dead actors.

    When an actor of group ``g`` dies (``RayActorError``), the whole tp group is replaced (its process
    group must be rebuilt, and the survivors hold uncommitted statistics that would count twice),
    and the batches ``g`` ran since its last complete flush go back to ``g``'s own queue, minus
    those every rank of ``g`` committed. A rank whose commit record has a requeued batch runs it
    uncounted, so the store ends up exactly as without the fault.
    """

    #: seconds to wait for the other ranks of a group after one raised: a peer that died makes a
    #: survivor's collective fail too, and the death (recoverable) must win over that error.
    GRACE_S = 10.0

    def __init__(self, cal: "Calibration", plan: RunPlan, store: ZarrStatsStore, shared: deque[Batch],
                 own: list[deque[Batch]]) -> None:
        self.cal, self.plan, self.store = cal, plan, store
        self.shared, self.own = shared, own
        self.state = [_GroupRun() for _ in range(cal.dp)]
        self.waiting: dict[Any, int] = {}
        self.bar = BatchProgress(len(shared) + sum(map(len, own)), cal.dp, enabled=cal.progress)

    def run(self) -> None:
        try:
            for g in range(self.cal.dp):
                self._dispatch(g)
            while self.waiting:
                ready, _ = ray.wait(list(self.waiting), num_returns=1)
                self._resolve(ready[0])
        finally:
            self.bar.close()

    def _dispatch(self, g: int) -> None:
        """Give group ``g`` its next call: a flush when due (or when no batch is left), else a batch."""
        st, actors = self.state[g], self.cal.groups[g]
        more = bool(self.own[g] or self.shared)
        if st.unflushed and (len(st.unflushed) >= self.cal.flush_every or not more):
            st.batch, st.refs = None, [a.flush.remote() for a in actors]
        elif more:
            batch = self.own[g].popleft() if self.own[g] else self.shared.popleft()
            tokens = np.asarray(batch.tokens, dtype=np.int64)
            st.batch, st.refs = batch, [a.measure_batch.remote(batch.batch_id, tokens) for a in actors]
        else:
            return
        st.results = []
        self.waiting.update({r: g for r in st.refs})

    def _resolve(self, ref: Any) -> None:
        g = self.waiting.pop(ref)
        st = self.state[g]
        try:
            st.results.append(ray.get(ref))
        except RayActorError as e:
            self._recover(g, e)
            return
        except RayTaskError as e:
            self._task_failed(g, ref, e)
            return
        st.refs.remove(ref)
        if st.refs:
            return
        if st.batch is None:
            st.unflushed = []  # every rank committed
        else:
            tokens = sum(st.results) // self.cal.tp
            st.unflushed.append((st.batch, tokens))
            self.cal.report.batches += 1
            self.cal.report.tokens += tokens
            self.bar.update(g, tokens)
        self._dispatch(g)

    def _task_failed(self, g: int, ref: Any, error: RayTaskError) -> None:
        """An actor raised: recover if a peer of the group died (its collective failed), else stop."""
        others = [r for r in self.state[g].refs if r is not ref]
        ready, _ = ray.wait(others, num_returns=len(others), timeout=self.GRACE_S) if others else ([], [])
        for r in ready:
            try:
                ray.get(r)
            except RayActorError as e:
                self._recover(g, e)
                return
            except RayTaskError:
                continue
        raise _unwrapped(error) from error

    def _recover(self, g: int, error: RayActorError) -> None:
        """Replace group ``g`` and requeue (to ``g`` itself) the batches not every rank committed."""
        st, cal = self.state[g], self.cal
        for r in st.refs:
            self.waiting.pop(r, None)
        st.restarts += 1
        if st.restarts > cal.max_restarts:
            raise CalibrationError(
                f"dp group {g}: a shard actor died {st.restarts} times while measuring into {self.store.path} "
                f"(last: {type(error).__name__}); fix the cause (memory? device?) and rerun the same command to "
                "resume, or raise max_restarts"
            ) from error
        lost = [b for b, _ in st.unflushed] + ([st.batch] if st.batch is not None else [])
        for _, tokens in st.unflushed:
            cal.report.batches -= 1
            cal.report.tokens -= tokens
        cal.report.restarts += 1
        actors = cal.workers.restart_group(g)
        _get([a.start_measure.remote(self.plan, str(self.store.path)) for a in actors])
        records = [self.store.commits().get(g * cal.tp + r) for r in range(cal.tp)]
        committed = set.intersection(*(set(rec.batch_ids) if rec else set() for rec in records))
        redo = [b for b in lost if b.batch_id not in committed]
        self.own[g].extendleft(reversed(redo))
        st.refs, st.results, st.batch, st.unflushed = [], [], None, []
        self._dispatch(g)


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
        timeout_s: how long to wait for placement and collectives.
        uncovered: what to do with selected modules that saw no data: ``fail``, ``warn`` or
            ``unit_scale`` (None: ``warn`` if the config sets ignore_modules_wo_measures, else ``fail``).
        max_restarts: how often a dp group may lose an actor during one measure() before it gives up.
        runner_cls: the shard actor class (tests inject faults with a subclass).

    The shard actors start on first use, so a bad config or store fails before any actor starts.
    """

    def __init__(self, config: Fp8Config | dict[str, Any] | str | Path, model: str | Path, *, tp: int = 1, dp: int = 1,
                 address: str | None = None, device: str = "cpu", num_cpus: int | None = None, flush_every: int = 8,
                 hpu_device: ScaleDevice | None = None, overwrite: bool = False, progress: bool = True,
                 resources: WorkerResources | None = None, timeout_s: float = 300.0,
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
        self.dims = ModelDims.from_config(read_config(self.checkpoint))
        self.global_stats: Measurement | None = None
        self.scales: GlobalScales | None = None
        self.uncovered = uncovered
        self.max_restarts = max_restarts
        self._resources = resources or worker_resources(self.device)
        self._runner_cls, self._timeout_s = runner_cls, timeout_s
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
                                             runner_cls=self._runner_cls, timeout_s=self._timeout_s)
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
        batches (see :class:`_MeasureLoop`).
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
        _get([a.start_measure.remote(plan, path) for a in self.workers.actors])
        with self.report.timer.phase("measure"):
            _MeasureLoop(self, plan, store, shared, own).run()
            self._finish_measure()
        with self.report.timer.phase("reduce"):
            self.global_stats = store.reduce()
        self.report.modules_measured = len(self.global_stats.modules)
        self.report.nonfinite = self.global_stats.nonfinite_report()
        return self.global_stats

    def _finish_measure(self) -> None:
        """Detach the observers; a group that lost an actor now is restarted (its data is committed)."""
        for g in range(self.dp):
            try:
                ray.get([a.finish_measure.remote() for a in self.groups[g]])
            except RayActorError:
                self.workers.restart_group(g)
            except RayTaskError as e:
                raise _unwrapped(e) from e

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
            modules = merge_inventories(_get([a.inventory.remote(plan) for a in group0]), self.dims)
            self.report.modules_selected = len(modules)
            self.report.uncovered = uncovered_modules(plan, modules, stats)
            plan = apply_policy(plan, self.report.uncovered, policy, str(store_path(plan.dump_stats_path)))
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
            self.report.quantized = len(_get(refs)[0])
        return self.scales

    def _opt_errors(self, plan: RunPlan, requests: dict[str, Any]) -> dict[str, np.ndarray]:
        if not requests:
            return {}
        partials = _get([a.opt_partials.remote(plan, requests) for a in self.groups[0]])
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
        return _get(refs)[0]

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

        prefix = inc_export_prefix(out_dir, plan.dump_stats_path)
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
        return _get([a.scales_of.remote() for a in self.groups[0]])

    def quantized_state_by_rank(self) -> list[dict[str, dict[str, Any]]]:
        """Each tp rank's FP8 weights (uint8 codes) and scales (group 0)."""
        return _get([a.quantized_state.remote() for a in self.groups[0]])
