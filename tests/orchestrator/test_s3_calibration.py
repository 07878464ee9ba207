"""The distributed calibration with its stats store on S3-protocol object storage, on a real local
Ray cluster and a real S3 server (moto on 127.0.0.1, ``tests.s3_server``).

measure → reduce → scales → quantize → export, a resumed run, and an endpoint that goes away in
the middle of a flush: the run fails with one line naming the URL, the commits stay whole, and
the rerun resumes to the same result. The reference is the one-card API on a local store.

Shard actors take the test server's environment from a named actor: the session's Ray cluster may
have started before the server, and actors inherit the environment Ray started with (a user's
run, started with the AWS variables set, needs none of this).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import ray
import torch

from orchestrator import quantize, scales_of
from orchestrator.driver.calibration import Calibration
from orchestrator.entry.stats_store_cli import main
from shards.card.actor import CalibrationRunner
from shards.plan import RunPlan
from stats_store.errors import StoreUnreachableError
from stats_store.records import Measurement
from stats_store.zarr_store import ZarrStatsStore
from tests.orchestrator.test_calibration import SIM_CARD, _batches, ckpt  # noqa: F401  (ckpt: fixture)
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)
from tests.s3_server import Gate, S3Server, point_env_at, s3_server  # noqa: F401  (fixture)
from tests.shards.tp_fixtures import reference_model

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]

ENV_ACTOR = "s3-test-environment"
CLOSE_GATE = "S3_TEST_CLOSE_GATE"  # "<trigger port>:<flush number>": tp rank 0 closes the gate there
CFG = {"observer": "maxabs", "scale_method": "maxabs_pow2", "device_for_scales": "GAUDI2"}


@ray.remote(num_cpus=0)
class _Environment:
    def __init__(self, env: dict[str, str]) -> None:
        self._env = env

    def get(self) -> dict[str, str]:
        return self._env


class S3EnvRunner(CalibrationRunner):
    """A shard with the test's AWS environment; it may close the endpoint at one flush."""

    _flushes = 0

    def start_measure(self, plan: RunPlan, store_path: str) -> list[str]:
        os.environ.update(ray.get(ray.get_actor(ENV_ACTOR).get.remote()))
        self._flushes = 0
        return super().start_measure(plan, store_path)

    def flush(self) -> list[int]:
        self._flushes += 1
        port, _, at = os.environ.get(CLOSE_GATE, "").partition(":")
        if port and self.topology.tp_rank == 0 and self._flushes == int(at):
            with socket.create_connection(("127.0.0.1", int(port))) as s:
                s.recv(16)  # the gate is shut when the trigger answers
        return super().flush()


@pytest.fixture
def shard_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``set(env)``: the driver (this process) and the shard actors both get ``env``."""
    holder: list[Any] = []

    def set_env(env: dict[str, str]) -> None:
        point_env_at(monkeypatch, env)
        for h in holder:
            ray.kill(h)
        holder[:] = [_Environment.options(name=ENV_ACTOR).remote(env)]

    yield set_env
    for h in holder:
        ray.kill(h)


@pytest.fixture(scope="module")
def single_card(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Measurement, dict[str, Any]]:
    """The one-card API over the same 6 batches, with a local store: statistics and scales."""
    store = tmp_path_factory.mktemp("single") / "stats"
    model = reference_model(ckpt)
    data = [{"input_ids": torch.tensor(b.tokens), "use_cache": False} for b in _batches()]
    quantize(model, {**CFG, "dump_stats_path": str(store)}, data)
    return ZarrStatsStore.open(store).read_reduced(), scales_of(model)


def _calibration(ckpt: Path, url: str) -> Calibration:
    return Calibration({**CFG, "dump_stats_path": url}, ckpt, tp=2, progress=False, flush_every=2,
                       resources=SIM_CARD, runner_cls=S3EnvRunner)


def _assert_same_stats(got: Measurement, want: Measurement) -> None:
    """Exact counts; values to the last bits: the shards run the tp=2 forward, the one-card API the
    plain one, and an activation may differ by an ulp (measured: 2e-7 relative). A batch missed or
    counted twice changes the counts, and the maxima by far more."""
    assert got.modules.keys() == want.modules.keys()
    for name, s in want.modules.items():
        g = got.modules[name]
        assert g.num_samples == s.num_samples, name
        for label, value in s.tensors().items():
            np.testing.assert_allclose(g.tensors()[label], value, rtol=1e-6, atol=0, err_msg=f"{name} {label}")


def test_measure_quantize_export_and_resume_on_s3(ckpt: Path, tmp_path: Path, s3_server: S3Server, shard_env: Any,
                                                  single_card: tuple[Measurement, dict[str, Any]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    shard_env(s3_server.env())
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/runs/stats"
    with _calibration(ckpt, url) as cal:
        cal.measure(_batches()[:4])  # a run stopped after 4 of its 6 batches
    with _calibration(ckpt, url) as cal:
        stats = cal.measure(_batches())
        assert cal.report.skipped == 4 and cal.report.batches == 2  # resumed from the commits
        scales = cal.quantize()
        out = cal.export(tmp_path / "export", inc_world=2)
    want_stats, want_scales = single_card
    _assert_same_stats(stats, want_stats)
    assert scales.nodes == want_scales
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    inc = {p.name for p in (tmp_path / "export" / "inc").iterdir()}  # named after the URL's last part
    assert {"stats_hooks_maxabs_0_2.json", "stats_hooks_maxabs_1_2.json", "stats_hooks_maxabs_MAXABS_POW2.json"} <= inc
    assert all(k.startswith("runs/stats.zarr/") for k in s3_server.keys(bucket))  # nothing local, all on S3
    assert main(["ls", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["store"] == f"{url}.zarr" and [r["run"] for r in listed["runs"]] == [0, 1]
    assert listed["reduced"] == "current" and listed["topology"] == {"dp": 1, "tp": 2}


def test_an_endpoint_gone_in_a_flush_fails_in_one_line_and_the_rerun_resumes(
        ckpt: Path, s3_server: S3Server, shard_env: Any, single_card: tuple[Measurement, dict[str, Any]]) -> None:
    gate = Gate(int(s3_server.endpoint.rsplit(":", 1)[1]))
    gate.open()
    try:
        bucket = s3_server.new_bucket()
        url = f"s3://{bucket}/runs/stats"
        shard_env({**s3_server.env(gate.endpoint), CLOSE_GATE: f"{gate.close_on_connect()}:2"})
        with _calibration(ckpt, url) as cal, pytest.raises(StoreUnreachableError) as err:
            cal.measure(_batches())
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"{url}.zarr: endpoint {gate.endpoint} did not answer")
        assert "rerun the same command: committed shards are kept" in text
        gate.open()
        # Every commit record is whole: each tp rank holds its first flush, rank 0 nothing more.
        store = ZarrStatsStore.open(url)
        commits = store.commits()
        assert set(commits) == {0, 1} and commits[0].batch_ids == (0, 1)
        assert commits[1].batch_ids in ((0, 1), (0, 1, 2, 3))  # rank 1 may have flushed before the gate shut
        shard_env(s3_server.env(gate.endpoint))
        with _calibration(ckpt, url) as cal:
            stats = cal.measure(_batches())
            assert cal.report.skipped == 2
            scales = cal.quantize()
    finally:
        gate.close()
    _assert_same_stats(stats, single_card[0])
    assert scales.nodes == single_card[1]
