"""One real local Ray cluster per test session (2 CPUs, 8 simulated ``HPU`` cards).

Import the fixture into a test module (``from tests.ray_fixtures import ray_cluster``). Starting Ray
costs seconds, so every Ray test shares this cluster; tests must leave no actors behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
    # Workers import test modules (subclassed runners) by name, so they need the project root.
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address="local",  # a new cluster even if a stale `ray start` pointer file exists
        num_cpus=2,
        resources={"HPU": SIMULATED_HPUS},
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {**RAY_ENV, "PYTHONPATH": pythonpath}},
    )
    try:
        yield
    finally:
        ray.shutdown()
