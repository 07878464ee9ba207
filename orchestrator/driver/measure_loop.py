"""The measuring loop of a distributed calibration: a shared batch queue for the data-parallel
groups, periodic flushes, resume from commit records, and recovery from dead shard actors."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.driver.data import Batch
from orchestrator.driver.placement import WorkerStartError
from orchestrator.errors import CalibrationError, Fp8OrchestratorError
from orchestrator.driver.progress import BatchProgress
from shards.card.actor_errors import actor_error
from shards.errors import ShardError
from shards.plan import RunPlan
from stats_store.errors import StatsStoreError
from stats_store.zarr_store import ZarrStatsStore
from stats_store.metadata import CommitRecord

if TYPE_CHECKING:
    from orchestrator.driver.calibration import Calibration

log = logging.getLogger(__name__)


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


#: our error classes: raised in an actor, they reach the caller as themselves (one-line messages)
OWN_ERRORS: tuple[type[Exception], ...] = (Fp8OrchestratorError, ShardError, StatsStoreError)


def actor_failure(e: RayTaskError | RayActorError) -> BaseException:
    """The one-line error to raise for an exception raised in (or the death of) a shard actor.

    Our own errors come back as themselves; anything else becomes a ``ShardTaskError`` (or
    ``ShardActorDiedError``) naming the exception type, the rank, the method and the log file
    holding Ray's full traceback (see ``shards.card.actor_errors``). Chained to ``e``.
    """
    return actor_error(e, own=OWN_ERRORS)


def get_all(refs: Sequence[Any]) -> list[Any]:
    """``ray.get`` whose errors from actors are one line each (see :func:`actor_failure`)."""
    try:
        return ray.get(list(refs))
    except (RayTaskError, RayActorError) as e:
        raise actor_failure(e) from e


@dataclass
class _GroupRun:
    """One data-parallel group's state in the measure loop."""

    refs: list[Any] = field(default_factory=list)  # calls in flight, one per tp rank
    results: list[Any] = field(default_factory=list)
    batch: Batch | None = None  # the batch in flight (None while flushing)
    unflushed: list[tuple[Batch, int]] = field(default_factory=list)  # run since the last flush, with tokens
    restarts: int = 0


class MeasureLoop:
    """Hand batches to free groups, flush each group every ``flush_every`` batches, survive dead actors.

    When an actor of group ``g`` dies (``RayActorError``), the whole tp group is replaced (its process
    group must be rebuilt, and the survivors hold uncommitted statistics that would count twice),
    and the batches ``g`` ran since its last complete flush go back to ``g``'s own queue, minus
    those every rank of ``g`` committed. A rank whose commit record has a requeued batch runs it
    uncounted, so the store ends up exactly as without the fault. The new group goes to another node
    when one has room (an actor dies with its node, too); when no node has room for it, the other
    groups finish and flush what they ran and the run stops with one error: a rerun resumes.
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
        self.stopping = False  # a group could not be replaced: finish and flush the others, then raise
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
        raise actor_failure(error) from error

    def _recover(self, g: int, error: RayActorError) -> None:
        """Replace group ``g`` and requeue (to ``g`` itself) the batches not every rank committed.

        When ``g`` cannot be replaced (it died too often, or no node has room for it: its node left
        the cluster), the run stops cleanly: see :meth:`_stop`.
        """
        st, cal = self.state[g], self.cal
        for r in st.refs:
            self.waiting.pop(r, None)
        if self.stopping:
            return  # already stopping: the group's uncommitted batches are redone by a rerun
        st.restarts += 1
        if st.restarts > cal.max_restarts:
            self._stop(CalibrationError(
                f"dp group {g}: a shard actor died {st.restarts} times while measuring into {self.store.location} "
                f"(last: {type(error).__name__}); fix the cause (memory? device?) and rerun the same command to "
                "resume, or raise max_restarts"
            ), error)
        lost = [b for b, _ in st.unflushed] + ([st.batch] if st.batch is not None else [])
        for _, tokens in st.unflushed:
            cal.report.batches -= 1
            cal.report.tokens -= tokens
        try:
            actors = cal.workers.restart_group(g)
        except WorkerStartError as e:
            self._stop(CalibrationError(
                f"measure stopped: {e}; every batch committed so far stays in {self.store.location}: then rerun the "
                "same command to resume"
            ), e)
        cal.report.restarts += 1
        get_all([a.start_measure.remote(self.plan, self.store.location) for a in actors])
        records = [self.store.commits().get(g * cal.tp + r) for r in range(cal.tp)]
        committed = set.intersection(*(set(rec.batch_ids) if rec else set() for rec in records))
        redo = [b for b in lost if b.batch_id not in committed]
        self.own[g].extendleft(reversed(redo))
        st.refs, st.results, st.batch, st.unflushed = [], [], None, []
        self._dispatch(g)

    def _stop(self, error: CalibrationError, cause: BaseException) -> NoReturn:
        """Raise ``error`` after the other groups finished their calls in flight and flushed what they ran.

        No new batch is handed out; so a rerun redoes only what the failed group had not committed.
        An error while draining is logged (one line) and ``error`` is raised all the same.
        """
        self.stopping = True
        self.shared.clear()
        for q in self.own:
            q.clear()
        try:
            while self.waiting:
                ready, _ = ray.wait(list(self.waiting), num_returns=1)
                self._resolve(ready[0])
        except Exception as drain_error:  # the first error is the one to report; this one is logged
            log.warning("while stopping after %s: %s: %s", type(cause).__name__, type(drain_error).__name__,
                        " ".join(str(drain_error).split()))
        raise error from cause
