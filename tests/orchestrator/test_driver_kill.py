"""A driver process killed with SIGKILL mid-measure: rerunning the same command resumes from the
store and ends with a clean run's statistics and sample counts.

Marked ``external_cluster``: the killed driver leaves its local Ray processes behind, and the test
ends them with `ray stop` (which ends every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.entry.demo_model import build_demo_checkpoint
from stats_store.zarr_store import ZarrStatsStore

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "calibration.txt"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _measure(config: Path, model: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.entry.fp8_calibrate", "measure", "--config", str(config), "--model",
                           str(model), "--data", str(DATA), "--tp", "2", "--seq-len", "32", "--batch-size", "2",
                           "--flush-every", "2", "--no-progress", "--json"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"scale_method": "maxabs_pow2", "dump_stats_path": str(tmp / name / "stats")}))
    return path


@pytest.mark.external_cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_driver_rerun_resumes_and_equals_a_clean_run(tmp_path: Path) -> None:
    model = build_demo_checkpoint(tmp_path / "model")
    killed_cfg = _config(tmp_path, "killed")
    store_dir = tmp_path / "killed" / "stats.zarr"
    driver = subprocess.Popen([sys.executable, "-m", "tests.orchestrator.slow_driver", str(killed_cfg), str(model),
                               str(DATA)], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until some batches are committed, then kill
            commits = ZarrStatsStore.open(store_dir).commits() if (store_dir / "_commits").is_dir() else {}
            if len(commits) == 2 and min(len(c.batch_ids) for c in commits.values()) >= 2:
                break
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:] if driver.stderr else ""
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        done_before = {k: len(c.batch_ids) for k, c in ZarrStatsStore.open(store_dir).commits().items()}
        resumed = _measure(killed_cfg, model)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        report = json.loads(resumed.stdout.strip().splitlines()[-1])
        assert report["skipped"] >= min(done_before.values()) > 0
        clean = _measure(_config(tmp_path, "clean"), model)
        assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-2000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=_env(), capture_output=True)
    got = ZarrStatsStore.open(store_dir).read_reduced()
    want = ZarrStatsStore.open(tmp_path / "clean" / "stats.zarr").read_reduced()
    assert got.modules.keys() == want.modules.keys()
    for name, stats in want.modules.items():
        assert got.modules[name].num_samples == stats.num_samples, name
        for label, value in stats.tensors().items():
            np.testing.assert_array_equal(got.modules[name].tensors()[label], value, err_msg=f"{name} {label}")
