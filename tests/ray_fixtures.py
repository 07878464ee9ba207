"""One real local Ray cluster per test session (2 CPUs, 8 simulated ``HPU`` cards), and a multi-node one.

Import the fixture into a test module (``from tests.ray_fixtures import ray_cluster``). Starting Ray
costs seconds, so every Ray test shares this cluster; tests must leave no actors behind.

``multinode_cluster`` is Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``): a head
without cards, to which each test adds the nodes it needs (each a raylet of its own on this
machine, with its own ``HPU`` count). The driver can be connected to one cluster only, so its tests
are marked ``external_cluster`` and run in their own pytest process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Loopback-only listeners and no usage reporting; set before ray is imported by the fixture.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
SIMULATED_HPUS = 8


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local cluster with ``num_cpus=2`` and ``{"HPU": 8}``; shut down at the end of the session."""
    os.environ.update(RAY_ENV)
    import ray

    if ray.is_initialized():
        yield  # another session-scoped fixture already started one
        return
    ray.init(
        address="local",  # a new cluster even if a stale `ray start` pointer file exists
        num_cpus=2,
        resources={"HPU": SIMULATED_HPUS},
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=_runtime_env(),
    )
    try:
        yield
    finally:
        ray.shutdown()


def _runtime_env() -> dict[str, Any]:
    # Workers import test modules (subclassed runners) by name, so they need the project root.
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {**RAY_ENV, "PYTHONPATH": pythonpath}}


#: GCS health checks every second, a node dead after 3 failed ones: a removed node is noticed in
#: seconds (Ray's defaults take about half a minute). A live node answers each check at once.
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def multinode_cluster() -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` with a head only (no CPU, no card), the driver connected to it.

    Tests add worker nodes with ``cluster.add_node(num_cpus=1, resources={"HPU": k})`` and remove
    them when done. Shut down at the end of the module.
    """
    os.environ.update(RAY_ENV)
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("multinode_cluster: Ray is already connected in this process; run the test with "
                    "`pytest -m external_cluster` (its own process)")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    try:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=_runtime_env())
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
