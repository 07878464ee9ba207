"""Which node each tp group goes to: a whole group on one node, data-parallel groups spread over nodes.

Each tp group is one STRICT_PACK placement group (every rank on one node: its process group talks
over loopback, never across the network). Groups are reserved one after another. Before reserving
a group the driver reads the alive nodes' resources (``ray.nodes()``), takes off what this run's
other groups hold, and picks the node that can hold the whole group and hosts the fewest of this
run's groups (ties: the most groups' worth of room left, then the node id); the placement group is
pinned there with a ``ray.io/node-id`` bundle label selector. So dp groups land on distinct nodes
while some node with room holds none of them, and stack evenly after that.

The pin is a preference, never a reason to fail: a pinned group not placed within ``PIN_GRACE_S``
(another job took the room, or the node is going away) is released and reserved unpinned, wherever
Ray finds room before the deadline. A restarted group prefers any node but the one it was on: after
a node is lost, Ray may still list it as alive for a few seconds.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from shards.errors import ShardError

#: the label Ray gives every node (its hex id); bundle label selectors pin a placement group with it
NODE_ID_LABEL = "ray.io/node-id"
#: seconds a pinned placement group may take before the group is reserved unpinned instead
PIN_GRACE_S = 10.0


class WorkerStartError(ShardError, RuntimeError):
    """A shard actor died or could not be placed while the workers were starting."""


@dataclass(frozen=True)
class NodeRoom:
    """One alive node as this run sees it: what is left after this run's groups, and how many it hosts."""

    node_id: str
    free: Mapping[str, float]
    groups: int


def groups_fitting(free: Mapping[str, float], group: Mapping[str, float]) -> int:
    """How many copies of ``group`` (the resources of one whole tp group) fit in ``free``."""
    need = {k: v for k, v in group.items() if v > 0}
    if not need:
        return 0
    # A small epsilon: Ray keeps fractional resources in 1/10000 units, so 4 x 0.25 CPU fits 1.0.
    return min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in need.items())


def pick_node(rooms: Iterable[NodeRoom], group: Mapping[str, float], avoid: frozenset[str] = frozenset()) -> str | None:
    """The node the next tp group should be pinned to, or None when no node can hold it whole.

    Order: nodes not in ``avoid`` first, then the fewest of this run's groups, then the most
    room left (in whole groups), then the node id (so equal clusters give equal placements).
    """
    fitting = [r for r in rooms if groups_fitting(r.free, group) >= 1]
    if not fitting:
        return None
    best = min(fitting, key=lambda r: (r.node_id in avoid, r.groups, -groups_fitting(r.free, group), r.node_id))
    return best.node_id


def group_resources(bundle: Mapping[str, float], tp: int) -> dict[str, float]:
    """What one tp group of ``tp`` ranks, one ``bundle`` each, reserves on its node."""
    return {k: v * tp for k, v in bundle.items()}


def node_rooms(nodes: Sequence[Mapping[str, Any]], held: Sequence[str], group: Mapping[str, float]) -> list[NodeRoom]:
    """``NodeRoom`` of every alive node in ``nodes`` (``ray.nodes()`` entries), given the nodes of
    this run's other groups (``held``, one entry per group, each holding ``group``)."""
    count = Counter(held)
    rooms = []
    for n in nodes:
        if not n.get("Alive"):
            continue
        node_id = n["NodeID"]
        total = n.get("Resources", {})
        free = {k: total.get(k, 0.0) - count[node_id] * group.get(k, 0.0) for k in set(total) | set(group)}
        rooms.append(NodeRoom(node_id, free, count[node_id]))
    return rooms


def node_state(node_id: str) -> str:
    """``still listed alive`` or ``left the cluster``, as Ray's node table says now."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return "still listed alive" if node_id in alive else "left the cluster"


def reserve_group(bundle: Mapping[str, float], tp: int, dp_rank: int, held: Sequence[str], timeout_s: float, *,
                  lost_node: str | None = None) -> tuple[PlacementGroup, str]:
    """Reserve one tp group (``tp`` bundles on one node); returns its placement group and node id.

    Args:
        bundle: one rank's resources.
        tp: ranks in the group.
        dp_rank: the group's data-parallel rank (for the error message).
        held: the nodes of this run's other groups, one entry per group.
        timeout_s: how long to wait for room in all.
        lost_node: the node a restarted group was on (tried last, named in the error).

    Raises:
        WorkerStartError: no node had room for the whole group within ``timeout_s``.
    """
    bundles = [dict(bundle) for _ in range(tp)]
    deadline = time.monotonic() + timeout_s
    avoid = frozenset({lost_node}) if lost_node else frozenset()
    target = pick_node(node_rooms(ray.nodes(), held, group_resources(bundle, tp)), group_resources(bundle, tp), avoid)
    if target is not None:
        pg = placement_group(bundles, strategy="STRICT_PACK", bundle_label_selector=[{NODE_ID_LABEL: target}] * tp)
        if _ready(pg, min(PIN_GRACE_S, timeout_s / 2)):
            return pg, target
        remove_placement_group(pg)  # the room went elsewhere (or the node is going): take any node
    pg = placement_group(bundles, strategy="STRICT_PACK")
    if not _ready(pg, max(0.0, deadline - time.monotonic())):
        remove_placement_group(pg)
        if lost_node:  # a restart: the run's dp and tp are fixed by its store, so only room helps
            raise WorkerStartError(
                f"dp group {dp_rank} (last on node {lost_node}, {node_state(lost_node)}): no node had room for its "
                f"{tp} x {dict(bundle)} within {timeout_s:.0f} s; add a node with that room"
            )
        raise WorkerStartError(
            f"dp group {dp_rank}: could not reserve {tp} x {dict(bundle)} on one node within {timeout_s:.0f} s; "
            "lower tp/dp or add resources to the cluster"
        )
    return pg, _node_of(pg)


def _ready(pg: PlacementGroup, timeout_s: float) -> bool:
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        return False
    return True


def _node_of(pg: PlacementGroup) -> str:
    """The node a ready STRICT_PACK placement group sits on."""
    return str(placement_group_table(pg)["bundles_to_node_id"][0])
