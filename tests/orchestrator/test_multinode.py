"""A real multi-node Ray cluster (``ray.cluster_utils.Cluster``: one raylet per node on this machine,
each node with its own ``HPU`` count): where the tp and dp groups go, and a node lost mid-measure.

The promise (issue 19; README "Multi-node"): a tp group sits on one node (STRICT_PACK), dp groups
on distinct nodes while nodes with room are left; a node that leaves mid-measure takes its group
down, which restarts on the remaining capacity, or, without capacity, the run stops with one error
line naming the group and the node, keeping every committed batch, and a rerun finishes with the
statistics of a clean run (reduced arrays compared exactly). Starting the four shard actors of a
run costs most of a test's time here, so one run meets both kinds of node loss, one after the other.

Marked ``external_cluster``: the driver connects to this cluster, not to the session's local one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from orchestrator.driver.calibration import Calibration
from orchestrator.driver.measure_loop import done_batches
from orchestrator.errors import CalibrationError
from shards.card.actor import CalibrationRunner
from shards.plan import RunPlan
from stats_store.records import Measurement
from stats_store.zarr_store import ZarrStatsStore
from tests.orchestrator.test_faults import N_BATCHES, SIM_CARD, _assert_same_stats, _batches, _config
from tests.ray_fixtures import multinode_cluster  # noqa: F401  (module fixture)
from tests.shards.tp_fixtures import make_tiny_llama

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.external_cluster,
              pytest.mark.usefixtures("multinode_cluster"), pytest.mark.timeout(300)]

DP, TP = 2, 2
FLUSH_EVERY = 2
HELD = (2, 4)  # the batches during which a node is removed (of N_BATCHES = 6, handed out in order)


class NodeRunner(CalibrationRunner):
    """Says which node it runs on; holds the batches ``<store>.hold.json`` lists until its node is gone.

    The ranks measuring a held batch ``b`` write ``<store>.held-<b>-<tp_rank>`` (their node id) and
    wait; once written, a marker keeps a restarted rank from holding again. A held rank never goes
    on (unless the test fails and 120 s pass): a lost node computes nothing more.
    """

    _hold: tuple[int, ...] = ()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def start_measure(self, plan: RunPlan, store_path: str) -> list[str]:
        spec = Path(store_path + ".hold.json")
        self._hold = tuple(json.loads(spec.read_text())) if spec.is_file() else ()
        self._prefix = store_path
        return super().start_measure(plan, store_path)

    def measure_batch(self, batch_id: int, tokens: np.ndarray) -> int:
        marker = Path(f"{self._prefix}.held-{batch_id}-{self.topology.tp_rank}")
        if batch_id in self._hold and not marker.exists():
            marker.write_text(self.node_id())
            time.sleep(120)
        return super().measure_batch(batch_id, tokens)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("multinode_llama")
    make_tiny_llama(path)
    return path


@contextmanager
def _nodes(cluster: Any, count: int, hpus: int) -> Iterator[list[Any]]:
    """``count`` worker nodes of ``hpus`` simulated cards each, removed again at the end."""
    added = [cluster.add_node(num_cpus=1, resources={"HPU": hpus}) for _ in range(count)]
    cluster.wait_for_nodes()
    try:
        yield added
    finally:
        for node in added:
            if node in cluster.worker_nodes:
                cluster.remove_node(node)


def _calibration(ckpt: Path, tmp: Path) -> Calibration:
    # A lost group waits 10 s for room (the default is timeout_s, for an autoscaler to add a node).
    return Calibration(_config(tmp), ckpt, tp=TP, dp=DP, progress=False, flush_every=FLUSH_EVERY, resources=SIM_CARD,
                       runner_cls=NodeRunner, timeout_s=120, placement_timeout_s=10)


def _store(tmp: Path) -> Path:
    return tmp / "stats" / "run.zarr"


def _done(tmp: Path) -> set[int]:
    return done_batches(ZarrStatsStore.open(_store(tmp)).commits(), TP)


@pytest.fixture(scope="module")
def clean(multinode_cluster: Any, ckpt: Path,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Measurement, list[list[str]], list[str], list[str]]:
    """A clean dp=2, tp=2 run on 2 nodes x 4 cards (either node could hold both groups): its
    statistics, each actor's own node id by group, the grid's node per group, and the nodes' ids."""
    tmp = tmp_path_factory.mktemp("clean")
    with _nodes(multinode_cluster, 2, hpus=4) as nodes, _calibration(ckpt, tmp) as cal:
        stats = cal.measure(_batches())
        actor_nodes = [ray.get([a.node_id.remote() for a in group]) for group in cal.groups]
        assert cal.report.batches == N_BATCHES and cal.report.restarts == 0
        return stats, actor_nodes, list(cal.workers.nodes), [n.node_id for n in nodes]


def test_a_tp_group_sits_on_one_node_and_dp_groups_on_distinct_nodes(clean: Any) -> None:
    _, actor_nodes, grid_nodes, cluster_nodes = clean
    assert [len(set(ranks)) for ranks in actor_nodes] == [1] * DP  # STRICT_PACK: every rank on its group's node
    group_nodes = [ranks[0] for ranks in actor_nodes]
    assert len(set(group_nodes)) == DP  # spread, though either node could hold both groups
    assert set(group_nodes) <= set(cluster_nodes)  # worker nodes, never the card-less head
    assert group_nodes == grid_nodes  # what the grid recorded is where the actors run


def _wait_for(check: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _remove_held_nodes(cluster: Any, tmp: Path, committed_then: list[set[int]]) -> list[str]:
    """For each held batch: wait until both ranks of a group hold it (and the group restarted after
    the previous loss has committed the batch it redid), note the committed batches, and remove the
    holding group's node: a node lost, not drained, so its processes die at once."""
    removed: list[str] = []
    for i, batch in enumerate(HELD):
        markers = [Path(f"{_store(tmp)}.held-{batch}-{r}") for r in range(TP)]
        _wait_for(lambda: all(m.exists() and m.read_text() for m in markers), f"a group to hold batch {batch}")
        if i:
            _wait_for(lambda: HELD[i - 1] in _done(tmp), f"the restarted group to commit batch {HELD[i - 1]}")
        node_id = markers[0].read_text()
        committed_then.append(_done(tmp))
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node_id), allow_graceful=False)
        removed.append(node_id)
    return removed


def test_a_lost_node_restarts_its_group_on_remaining_capacity_else_the_run_stops_and_a_rerun_equals_a_clean_run(
        multinode_cluster: Any, ckpt: Path, tmp_path: Path, clean: Any) -> None:
    # 3 nodes x 2 cards, dp=2 x tp=2: the first loss leaves one node with room, the second none.
    _store(tmp_path).parent.mkdir(parents=True)
    Path(f"{_store(tmp_path)}.hold.json").write_text(json.dumps(HELD))
    committed_then: list[set[int]] = []
    with _nodes(multinode_cluster, 3, hpus=2) as nodes, ThreadPoolExecutor(1) as pool:
        with _calibration(ckpt, tmp_path) as cal:
            removing = pool.submit(_remove_held_nodes, multinode_cluster, tmp_path, committed_then)
            with pytest.raises(CalibrationError) as info:
                cal.measure(_batches())
            first, second = removing.result()
            # The first loss: the group restarted on the one node with room left, and measured on.
            third = ({n.node_id for n in nodes} - {first, second}).pop()
            assert cal.report.restarts == 1 and first != second and third in cal.workers.nodes
        message = str(info.value)
        assert "\n" not in message and str(_store(tmp_path)) in message
        assert f"last on node {second}, left the cluster): no node had room" in message
        assert message.startswith("measure stopped: dp group") and "rerun the same command to resume" in message
        done = _done(tmp_path)
        assert done >= committed_then[0] | committed_then[1]  # every batch committed before a loss is kept
        # Only the batches the second lost group had not committed are missing (the survivor flushed).
        missing = set(range(N_BATCHES)) - done
        assert HELD[1] in missing and HELD[0] not in missing and len(missing) <= FLUSH_EVERY
        with _nodes(multinode_cluster, 1, hpus=2), _calibration(ckpt, tmp_path) as rerun:  # a node comes back
            stats = rerun.measure(_batches())
            assert rerun.report.skipped == len(done) and rerun.report.batches == len(missing)
    _assert_same_stats(stats, clean[0])
    assert _done(tmp_path) == set(range(N_BATCHES))
