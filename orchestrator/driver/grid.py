"""``ShardWorker``: the Ray actor around ``ShardRunner``, and the factory that starts a dp x tp grid.

Each tp group gets its own placement group, one bundle per rank holding that rank's card:
``{"HPU": 1}`` on Gaudi, one GPU on CUDA, a CPU otherwise. Placement (``orchestrator.driver.placement``):
a tp group's placement group is STRICT_PACK, so all its ranks sit on one node and meet on loopback;
the dp groups are spread, each pinned (``ray.io/node-id`` label) to the node with room that hosts the
fewest of the run's groups, so they land on distinct nodes while such nodes are left.
``WorkerGroups.restart_group`` replaces a whole tp group after one of its actors died: its process
group must be rebuilt anyway, and the survivors' in-memory state is lost with it. The group gets a
new placement group, on another node when one has room (its node may be gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shards.card.actor_errors import ShardActorError, actor_error, forget_actor, register_actor
from orchestrator.driver.placement import WorkerStartError, reserve_group
from shards.tp.dist import DeviceKind
from shards.card.runner import ShardRunner, Topology

__all__ = ["ShardWorker", "WorkerGroups", "WorkerResources", "WorkerStartError", "make_workers", "worker_resources"]

ShardWorker = ray.remote(ShardRunner)


@dataclass(frozen=True)
class WorkerResources:
    """What one shard actor reserves: CPUs, GPUs and custom resources (``HPU``)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def bundle(self) -> dict[str, float]:
        """The placement-group bundle for one rank."""
        b: dict[str, float] = {"CPU": self.num_cpus} if self.num_cpus else {}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        b.update(self.resources)
        return b


def worker_resources(kind: DeviceKind) -> WorkerResources:
    """One card per shard: ``{"HPU": 1}`` on Gaudi, ``num_gpus=1`` on CUDA, one CPU otherwise."""
    kind = DeviceKind(kind)
    if kind is DeviceKind.HPU:
        return WorkerResources(num_cpus=1, resources=MappingProxyType({"HPU": 1.0}))
    if kind is DeviceKind.CUDA:
        return WorkerResources(num_cpus=1, num_gpus=1)
    return WorkerResources(num_cpus=1)


@dataclass(frozen=True)
class _Spawn:
    """What ``make_workers`` started the actors with, so a tp group can be started again."""

    worker_cls: Any
    checkpoint: Path
    dp: int
    tp: int
    kind: DeviceKind
    res: WorkerResources
    runner_kwargs: Mapping[str, Any]
    timeout_s: float
    placement_timeout_s: float


@dataclass
class WorkerGroups:
    """The started shard actors, ``groups[dp_rank][tp_rank]``, their placement groups and nodes."""

    groups: list[list[Any]]
    placement_groups: list[PlacementGroup | None]
    _spawn: _Spawn | None = None
    restarts: int = 0
    nodes: list[str] = field(default_factory=list)  # the node id of each tp group, by dp rank

    @property
    def actors(self) -> list[Any]:
        """Every actor, in shard-index order (``dp_rank * tp + tp_rank``)."""
        return [a for g in self.groups for a in g]

    def shutdown(self) -> None:
        """Kill the actors and free their placement groups (idempotent)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
            forget_actor(actor)
        for pg in self.placement_groups:
            if pg is not None:
                remove_placement_group(pg)
        self.groups, self.placement_groups, self.nodes = [], [], []

    def restart_group(self, dp_rank: int) -> list[Any]:
        """Kill every actor of tp group ``dp_rank`` and start and load fresh ones in a new placement group.

        The new group goes to another node when one has room (its actors may have died with their
        node), else wherever room appears within the start timeout. The new actors hold a freshly
        loaded shard and nothing else (no observers, no statistics).

        Raises:
            WorkerStartError: no node had room for the group in time (the message names its old
                node), a new actor died while starting, or these groups cannot be restarted.
        """
        if self._spawn is None or not 0 <= dp_rank < len(self.groups):
            raise WorkerStartError(f"dp group {dp_rank}: cannot restart it (started groups: {len(self.groups)})")
        for actor in self.groups[dp_rank]:
            ray.kill(actor, no_restart=True)  # also ends a survivor blocked in a collective with the dead rank
            forget_actor(actor)
        old_pg, self.placement_groups[dp_rank] = self.placement_groups[dp_rank], None
        if old_pg is not None:
            remove_placement_group(old_pg)  # its room is free for the new group (a live node's, at least)
        sp = self._spawn
        others = [n for i, n in enumerate(self.nodes) if i != dp_rank]
        pg, node = reserve_group(sp.res.bundle(), sp.tp, dp_rank, others, sp.placement_timeout_s,
                                 lost_node=self.nodes[dp_rank])
        self.placement_groups[dp_rank], self.nodes[dp_rank] = pg, node
        group = _start_group(sp.worker_cls, sp.checkpoint, sp.dp, sp.tp, dp_rank, sp.kind, sp.res, pg, sp.runner_kwargs)
        self.groups[dp_rank] = group
        self.restarts += 1
        _load_all(WorkerGroups([group], []), first_dp_rank=dp_rank, timeout_s=sp.timeout_s)
        return group


def _start_group(worker_cls: Any, checkpoint: Path, dp: int, tp: int, dp_rank: int, kind: DeviceKind,
                 res: WorkerResources, pg: PlacementGroup, runner_kwargs: Mapping[str, Any]) -> list[Any]:
    actors = []
    for tp_rank in range(tp):
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=tp_rank)
        opts: dict[str, Any] = dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus, scheduling_strategy=strategy)
        if res.resources:
            opts["resources"] = dict(res.resources)
        topology = Topology(dp=dp, tp=tp, dp_rank=dp_rank, tp_rank=tp_rank)
        actor = worker_cls.options(**opts).remote(checkpoint, topology, kind, **runner_kwargs)
        register_actor(actor, dp_rank, tp_rank)  # so its errors name its rank (shards.card.actor_errors)
        actors.append(actor)
    return actors


def make_workers(checkpoint: str | Path, dp: int = 1, tp: int = 1, device_kind: DeviceKind = DeviceKind.CPU, *,
                 resources: WorkerResources | None = None, runner_cls: type[ShardRunner] = ShardRunner,
                 dtype: torch.dtype | None = None, num_threads: int | None = 1,
                 timeout_s: float = 120.0, placement_timeout_s: float | None = None) -> WorkerGroups:
    """Start ``dp * tp`` shard actors, one placement group per tp group, and load every shard.

    Args:
        checkpoint: HF safetensors checkpoint directory, readable by every node.
        dp: number of data-parallel groups.
        tp: tensor-parallel size of each group.
        device_kind: card kind of every shard.
        resources: what each actor reserves; default ``worker_resources(device_kind)``. Tests pass
            e.g. ``{"HPU": 1}`` with CPU shards to place simulated cards.
        runner_cls: the plain class to wrap (a subclass injects faults in tests).
        dtype: cast floating weights to this dtype; None keeps the stored dtypes.
        num_threads: torch threads per actor.
        timeout_s: how long to wait for an actor to start and for the process groups.
        placement_timeout_s: how long a (re)started tp group waits for a node with room for it
            (an autoscaler may be adding one); None: ``timeout_s``.

    Raises:
        WorkerStartError: an actor died or its placement group could not be reserved in time.
    """
    kind = DeviceKind(device_kind)
    res = resources or worker_resources(kind)
    worker_cls = ray.remote(runner_cls) if runner_cls is not ShardRunner else ShardWorker
    kwargs = dict(dtype=dtype, num_threads=num_threads, timeout_s=timeout_s)
    placement_timeout_s = timeout_s if placement_timeout_s is None else placement_timeout_s
    started = WorkerGroups([], [], _Spawn(worker_cls, Path(checkpoint), dp, tp, kind, res, kwargs, timeout_s,
                                          placement_timeout_s))
    try:
        for dp_rank in range(dp):
            pg, node = reserve_group(res.bundle(), tp, dp_rank, started.nodes, placement_timeout_s)
            started.placement_groups.append(pg)
            started.nodes.append(node)
            started.groups.append(_start_group(worker_cls, Path(checkpoint), dp, tp, dp_rank, kind, res, pg, kwargs))
        _load_all(started, timeout_s=timeout_s)
    except BaseException:
        started.shutdown()
        raise
    return started


def _load_all(started: WorkerGroups, first_dp_rank: int = 0, timeout_s: float | None = None) -> None:
    """Rank 0 of each group picks the rendezvous; all ranks of all groups then load concurrently.

    Results are taken as they finish, so a rank that dies fails the start at once instead of after
    its peers' rendezvous timeout. Rank 0 must be up within ``timeout_s``: an actor whose node has
    just gone (before Ray noticed) would otherwise never answer.
    """
    where: dict[Any, tuple[int, int]] = {}
    for dp_rank, group in enumerate(started.groups, first_dp_rank):
        rendezvous = _get(group[0].pick_rendezvous.remote(), dp_rank, 0, "pick_rendezvous", timeout_s)
        where.update({a.load.remote(rendezvous): (dp_rank, tp_rank) for tp_rank, a in enumerate(group)})
    pending = list(where)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        _get(ready[0], *where[ready[0]], "load")


def _get(ref: Any, dp_rank: int, tp_rank: int, method: str | None = None, timeout_s: float | None = None) -> Any:
    """``ray.get`` of one start-up call, its errors as one line (see ``shards.card.actor_errors``).

    Raises:
        WorkerStartError: the actor died (the message names its rank and a log of Ray's report),
            or did not answer within ``timeout_s``.
        ShardError: the actor raised one (as itself), or raised another exception
            (``ShardTaskError``, naming the exception type, the rank and the log of its traceback).
    """
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError as e:
        raise WorkerStartError(f"shard actor dp_rank={dp_rank}, tp_rank={tp_rank} did not answer {method} "
                               f"within {timeout_s:.0f} s; check that its node is up and has memory, or raise "
                               "timeout_s") from e
    except RayActorError as e:
        died = actor_error(e, rank=(dp_rank, tp_rank), method=method)
        if not isinstance(died, ShardActorError):
            raise died from e
        call = f" ({died.method})" if died.method else ""
        raise WorkerStartError(f"shard actor dp_rank={dp_rank}, tp_rank={tp_rank} died while starting{call}: "
                               f"{died.exc_type}: {died.summary}; {died.log_text}") from e
    except RayTaskError as e:
        raise actor_error(e, rank=(dp_rank, tp_rank), method=method) from e
