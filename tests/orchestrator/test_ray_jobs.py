"""`ray job submit -- fp8-calibrate run ...` against a local head started by the test.

Marked ``external_cluster``: `ray stop` at the end ends every Ray process on the machine, so
`make test` runs this in its own pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.entry.demo_model import build_demo_checkpoint
from stats_store.zarr_store import ZarrStatsStore

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return env


def _sh(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.external_cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_complete_calibration(tmp_path: Path) -> None:
    env = _env(tmp_path)
    model = build_demo_checkpoint(tmp_path / "model")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"scale_method": "maxabs_pow2", "dump_stats_path": str(tmp_path / "stats" / "job")}))
    head = _sh([str(BIN / "ray"), "start", "--head", "--port=6431", "--num-cpus=2", """--resources={"HPU": 2}""",
                "--dashboard-host=127.0.0.1", "--dashboard-port=8331", "--include-dashboard=true"], env)
    try:
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        job = _sh([str(BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8331", "--working-dir", str(ROOT),
                   "--", "python", "-m", "orchestrator.entry.fp8_calibrate", "run", "--config", str(cfg), "--model", str(model),
                   "--data", str(ROOT / "examples" / "calibration.txt"), "--tp", "2", "--seq-len", "32",
                   "--batch-size", "2", "--max-batches", "4", "--no-progress", "--json"], env)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
    finally:
        _sh([str(BIN / "ray"), "stop", "--force"], env)
    store = ZarrStatsStore.open(tmp_path / "stats" / "job.zarr")
    assert sorted(store.commits()) == [0, 1]
    assert all(sorted(c.batch_ids) == [0, 1, 2, 3] for c in store.commits().values())
    assert store.read_reduced().modules["model.layers.1.mlp.down_proj"].num_samples == 4
