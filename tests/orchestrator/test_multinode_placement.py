"""Where tp groups go, without Ray: the node choice of ``orchestrator.driver.placement`` over node
tables shaped like ``ray.nodes()`` (issue 19; the multi-node cluster test checks it for real)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.driver.placement import groups_fitting, group_resources, node_rooms, pick_node

CARD = {"CPU": 0.25, "HPU": 1.0}  # one simulated card, as the Ray tests reserve it


def _node(node_id: str, hpus: float, cpus: float = 1.0, alive: bool = True) -> dict[str, Any]:
    resources = {"CPU": cpus, "memory": 1e9, "node:127.0.0.1": 1.0} | ({"HPU": hpus} if hpus else {})
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def _place(nodes: list[dict[str, Any]], dp: int, tp: int, held: tuple[str, ...] = ()) -> list[str | None]:
    """The node each of ``dp`` groups is pinned to, reserved one after another as ``make_workers`` does."""
    group = group_resources(CARD, tp)
    placed: list[str | None] = []
    for _ in range(dp):
        node = pick_node(node_rooms(nodes, [*held, *(n for n in placed if n)], group), group)
        placed.append(node)
    return placed


@pytest.mark.parametrize(("nodes", "dp", "tp", "want"), [
    # either node could hold both groups: one each
    ([_node("a", 4), _node("b", 4)], 2, 2, ["a", "b"]),
    # more groups than nodes: stacked evenly, not filled node by node
    ([_node("a", 4), _node("b", 4)], 4, 2, ["a", "b", "a", "b"]),
    # unequal nodes: the roomier first, then the one hosting none
    ([_node("a", 2), _node("b", 4)], 2, 2, ["b", "a"]),
    # the card-less head and a dead node are never chosen
    ([_node("head", 0), _node("dead", 8, alive=False), _node("a", 4)], 2, 2, ["a", "a"]),
    # a node too small for a whole group is skipped; no room left: None (Ray then waits, unpinned)
    ([_node("a", 1), _node("b", 2)], 2, 2, ["b", None]),
    # 4 ranks x 0.25 CPU fit one CPU exactly
    ([_node("a", 4, cpus=1.0)], 1, 4, ["a"]),
], ids=["spread", "even-stacking", "roomier-first", "head-and-dead-skipped", "no-room", "fractional-cpu"])
def test_dp_groups_spread_over_the_nodes_with_room(nodes: list[dict[str, Any]], dp: int, tp: int,
                                                   want: list[str | None]) -> None:
    assert _place(nodes, dp, tp) == want


def test_a_restarted_group_avoids_its_old_node_while_another_has_room() -> None:
    nodes = [_node("a", 2), _node("b", 2), _node("c", 2)]
    group = group_resources(CARD, 2)
    # Group 0 was on "a", group 1 is on "b": "a" may be gone without Ray knowing yet, "c" has room.
    assert pick_node(node_rooms(nodes, ["b"], group), group, avoid=frozenset({"a"})) == "c"
    # No other node has room: the old node is still tried (the actor may have died on a live node).
    assert pick_node(node_rooms(nodes[:2], ["b"], group), group, avoid=frozenset({"a"})) == "a"


def test_room_counts_this_runs_groups_and_whole_groups_only() -> None:
    group = group_resources(CARD, 2)
    (room,) = node_rooms([_node("a", 5, cpus=2.0)], ["a"], group)
    assert room.groups == 1 and room.free["HPU"] == 3.0 and room.free["CPU"] == 1.5
    assert groups_fitting(room.free, group) == 1  # 3 cards left: one more group of 2
    assert groups_fitting({"CPU": 8.0}, group) == 0  # no HPU at all
