"""The cluster YAMLs: the local one really comes up with `ray up`, runs a calibration through
`ray submit`, and goes down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.entry.demo_model import build_demo_checkpoint
from stats_store.zarr_store import ZarrStatsStore

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster_configs"
RAY = Path(sys.executable).parent / "ray"


@pytest.mark.parametrize("name", ["gaudi2-8card", "gaudi3-8card"])
def test_gaudi_configs_ask_for_eight_hpus_per_node(name: str) -> None:
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    (node_type,) = cfg["available_node_types"].values()
    assert node_type["resources"] == {"HPU": 8}
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert start.count("""--resources='{"HPU": 8}'""") == 2
    assert cfg["provider"]["type"] == "local"


def _ray(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RAY), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.external_cluster
@pytest.mark.slow
def test_local_cluster_up_submit_down(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        HOME=str(tmp_path),  # the launcher writes ~/ray_bootstrap_config.yaml
        PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
    )
    env.pop("RAY_ADDRESS", None)
    config = str(CONFIGS / "local.yaml")
    model = build_demo_checkpoint(tmp_path / "model")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"scale_method": "maxabs_pow2", "dump_stats_path": str(tmp_path / "stats" / "up")}))
    up = _ray(["up", "-y", config], env, tmp_path)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        sub = _ray(["submit", config, str(ROOT / "examples" / "submit_calibration.py"), "--", "run", "--config", str(cfg),
                    "--model", str(model), "--data", str(ROOT / "examples" / "calibration.txt"), "--tp", "2",
                    "--seq-len", "32", "--batch-size", "2", "--max-batches", "3", "--no-progress", "--json"], env, tmp_path)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert '"batches": 3' in sub.stdout
    finally:
        down = _ray(["down", "-y", config], env, tmp_path)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    store = ZarrStatsStore.open(tmp_path / "stats" / "up.zarr")
    assert sorted(store.commits()) == [0, 1]
