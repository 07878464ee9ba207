"""ShardRunner in-process, and ShardWorker actors on a real local Ray cluster (tp=2 over gloo)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from shards.tp.dist import DeviceKind, Rendezvous
from shards.card.runner import ShardRunner, ShardStateError, Topology
from orchestrator.driver.grid import WorkerResources, WorkerStartError, make_workers, worker_resources
from tests.ray_fixtures import ray_cluster
from tests.shards.tp_fixtures import reference_model, sample_ids, tiny_llama_dir

__all__ = ["ray_cluster", "tiny_llama_dir"]  # fixtures used by name below

SIMULATED_CARD = WorkerResources(num_cpus=1, resources={"HPU": 1.0})


def _eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    """Ray frees resources asynchronously after kill/remove: poll until ``check`` holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _reference_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference_model(path)(torch.as_tensor(ids)).logits.numpy()


def test_runner_in_process_tp1(tiny_llama_dir: Path) -> None:
    runner = ShardRunner(tiny_llama_dir, Topology(), num_threads=None)  # keep pytest's thread count
    info = runner.load()
    ids = sample_ids().numpy()
    logits = runner.forward(ids)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, _reference_logits(tiny_llama_dir, ids), rtol=0, atol=1e-5)
    assert info.device == "cpu" and info.parameter_shapes["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    runner.shutdown()
    with pytest.raises(ShardStateError, match="call load"):
        runner.forward(ids)


def test_runner_before_load(tiny_llama_dir: Path) -> None:
    with pytest.raises(ShardStateError, match="shard 3: call load"):
        runner = ShardRunner(tiny_llama_dir, Topology(dp=2, tp=2, dp_rank=1, tp_rank=1), num_threads=None)
        runner.forward(np.zeros((1, 2)))


@pytest.mark.parametrize("kwargs", [dict(tp=0), dict(tp=2, tp_rank=2), dict(dp=2, dp_rank=-1)])
def test_topology_refuses_bad_ranks(kwargs: dict[str, int]) -> None:
    with pytest.raises(ShardStateError, match="ranks within"):
        Topology(**kwargs)


def test_topology_index() -> None:
    assert [Topology(dp=2, tp=3, dp_rank=d, tp_rank=t).index for d in range(2) for t in range(3)] == list(range(6))


@pytest.mark.parametrize(
    "kind, bundle",
    [(DeviceKind.CPU, {"CPU": 1}), (DeviceKind.CUDA, {"CPU": 1, "GPU": 1}), (DeviceKind.HPU, {"CPU": 1, "HPU": 1})],
)
def test_worker_resources_per_device_kind(kind: DeviceKind, bundle: dict[str, float]) -> None:
    assert worker_resources(kind).bundle() == bundle


@pytest.mark.parametrize("kind, backend", [("cpu", "gloo"), ("cuda", "nccl"), ("hpu", "hccl")])
def test_backend_per_device_kind(kind: str, backend: str) -> None:
    assert DeviceKind(kind).backend == backend


class DiesOnRank1(ShardRunner):
    """A runner whose tp rank 1 process dies while loading (fault injection by subclassing)."""

    def load(self, rendezvous: Rendezvous | None = None):  # type: ignore[no-untyped-def]
        if self.topology.tp_rank == 1:
            os._exit(1)
        return super().load(rendezvous)


@pytest.mark.ray
@pytest.mark.timeout(180)  # a hung collective fails here, not after the global 600 s
def test_tp2_workers_match_unsharded_model(ray_cluster: None, tiny_llama_dir: Path) -> None:
    import ray

    workers = make_workers(tiny_llama_dir, dp=1, tp=2, resources=SIMULATED_CARD, timeout_s=60)
    try:
        ids = sample_ids().numpy()
        outs = ray.get([a.forward.remote(ids) for a in workers.actors])
        infos = ray.get([a.info.remote() for a in workers.actors])
    finally:
        workers.shutdown()
    expected = _reference_logits(tiny_llama_dir, ids)
    for logits in outs:
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert [i.topology.tp_rank for i in infos] == [0, 1]
    assert {i.parameter_shapes["model.layers.1.mlp.down_proj.weight"] for i in infos} == {(64, 64)}  # 128 / 2 in
    assert _eventually(lambda: ray.available_resources().get("HPU") == 8)  # the simulated cards are back


@pytest.mark.ray
@pytest.mark.timeout(180)  # a hung collective fails here, not after the global 600 s
def test_dead_worker_at_start_is_named(ray_cluster: None, tiny_llama_dir: Path) -> None:
    with pytest.raises(WorkerStartError, match="dp_rank=0, tp_rank=1 died while starting"):
        make_workers(tiny_llama_dir, dp=1, tp=2, resources=SIMULATED_CARD, runner_cls=DiesOnRank1, timeout_s=60)


@pytest.mark.ray
@pytest.mark.timeout(180)  # a hung collective fails here, not after the global 600 s
def test_unplaceable_group_is_named(ray_cluster: None, tiny_llama_dir: Path) -> None:
    with pytest.raises(WorkerStartError, match=r"could not reserve 3 x \{'CPU': 1"):
        make_workers(tiny_llama_dir, dp=1, tp=3, timeout_s=1)  # 3 CPUs on a 2-CPU cluster
