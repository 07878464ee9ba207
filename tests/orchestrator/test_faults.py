"""Faults and bad input on a real local Ray cluster with a real store (issue 6, decisions §5).

The promise: a fault never costs measured data (the final statistics equal a clean run's, value
for value, with exact sample counts), and a bad store, NaN/Inf activations or modules without data
give one clear error or report, never a stack trace or a wrong scale.

Faults are injected by subclassing the shard runner: the fault plan is a JSON file beside the
store, and a marker file makes a fault fire once (a restarted process does not die again).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from ray.exceptions import RayTaskError

from orchestrator.driver.calibration import Calibration
from orchestrator.errors import IncompleteStoreError
from orchestrator.entry.fp8_calibrate import main
from orchestrator.driver.coverage import UncoveredModulesError
from orchestrator.driver.data import Batch
from shards.card.actor import CalibrationRunner
from stats_store.records import Measurement
from shards.plan import RunPlan
from orchestrator.driver.grid import WorkerResources
from stats_store.errors import RunMismatchError, StoreFormatError, TornWriteError
from stats_store.zarr_store import ZarrStatsStore
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)
from tests.shards.tp_fixtures import make_tiny_llama

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(300)]

SIM_CARD = WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})
N_BATCHES = 6
FLUSH_EVERY = 2
DOWN = "model.layers.1.mlp.down_proj"


# ---- fault-injecting runners (imported by the actors by module name) --------------------------------
class FaultyRunner(CalibrationRunner):
    """Reads a list of faults from ``<store>.faults.json``; each fires once (marker ``<store>.fault-<i>``).

    A fault is ``{"where": "batch"|"flush", "rank", "at", "how", "after_peer"}``. ``how``:
    ``sigkill`` (a real os.kill of the actor process), ``ray_kill`` (ray.kill of itself; Ray may
    restart it), ``raise`` (an exception: the driver stops). ``at`` is a batch id, or the n-th flush
    of this actor process. ``after_peer``: first wait until tp rank 0 of the group has committed
    that generation, so the group's commits are left half done.
    """

    _faults: list[dict[str, Any]] = []
    _flushes = 0

    def start_measure(self, plan: RunPlan, store_path: str) -> list[str]:
        spec = Path(store_path + ".faults.json")
        self._faults = json.loads(spec.read_text()) if spec.is_file() else []
        self._prefix = store_path
        self._flushes = 0
        return super().start_measure(plan, store_path)

    def _maybe_fire(self, where: str, at: int) -> None:
        for i, f in enumerate(self._faults):
            marker = Path(f"{self._prefix}.fault-{i}")
            if f["where"] != where or f["rank"] != self.topology.tp_rank or f["at"] != at or marker.exists():
                continue
            if f.get("after_peer"):
                self._wait_peer(int(f["after_peer"]))
            marker.write_text("fired")
            if f["how"] == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f["how"] == "ray_kill":
                ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
                time.sleep(60)  # the kill lands while this call is still running
            raise RuntimeError(f"injected fault {i} on shard {self.topology.index}")

    def _wait_peer(self, generation: int) -> None:
        assert self._store is not None
        peer = self.topology.index - self.topology.tp_rank
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rec = self._store.commits().get(peer)
            if rec is not None and rec.generation >= generation:
                return
            time.sleep(0.05)
        raise TimeoutError(f"shard {peer} never committed generation {generation}")

    def measure_batch(self, batch_id: int, tokens: np.ndarray) -> int:
        n = super().measure_batch(batch_id, tokens)  # after the forward: the peers' collectives are done
        self._maybe_fire("batch", batch_id)
        return n

    def flush(self) -> list[int]:
        if self._pending_batches:
            self._flushes += 1
            self._maybe_fire("flush", self._flushes)
        return super().flush()


class PoisonRunner(CalibrationRunner):
    """Puts one ``inf`` (or, for the control run, ``0.0``) into every input of ``DOWN`` while measuring.

    The hooks are registered before the observers, so the observers see the poisoned input; the
    output is cleaned so later modules see finite values.
    """

    poison = float("inf")

    def start_measure(self, plan: RunPlan, store_path: str) -> list[str]:
        module = self.model.get_submodule(DOWN)
        value = self.poison

        def pre(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0].clone()
            x.view(-1)[0] = value
            return (x, *args[1:])

        def post(_m: torch.nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
        return super().start_measure(plan, store_path)


class ZeroPoisonRunner(PoisonRunner):
    poison = 0.0


# ---- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults_llama")
    make_tiny_llama(path)
    return path


def _batches(n: int = N_BATCHES) -> list[Batch]:
    rng = np.random.default_rng(7)
    return [Batch(i, tuple(tuple(int(t) for t in row) for row in rng.integers(0, 256, (2, 16)))) for i in range(n)]


def _config(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(tmp / "stats" / "run"), **extra}


def _measure(ckpt: Path, tmp: Path, *, tp: int = 2, runner: type = CalibrationRunner,
             faults: list[dict[str, Any]] | None = None, flush_every: int = FLUSH_EVERY,
             **cfg: Any) -> tuple[Measurement, Any]:
    config = _config(tmp, **cfg)
    if faults is not None:
        (tmp / "stats").mkdir(parents=True, exist_ok=True)
        Path(str(tmp / "stats" / "run.zarr") + ".faults.json").write_text(json.dumps(faults))
    with Calibration(config, ckpt, tp=tp, progress=False, flush_every=flush_every, resources=SIM_CARD,
                     runner_cls=runner, timeout_s=60) as cal:
        return cal.measure(_batches()), cal.report


def _assert_same_stats(got: Measurement, want: Measurement) -> None:
    assert got.modules.keys() == want.modules.keys()
    for name, s in want.modules.items():
        g = got.modules[name]
        assert g.num_samples == s.num_samples == N_BATCHES, name
        assert g.nonfinite == s.nonfinite, name
        t_got, t_want = g.tensors(), s.tensors()
        assert t_got.keys() == t_want.keys(), name
        for label, v in t_want.items():
            np.testing.assert_array_equal(t_got[label], v, err_msg=f"{name} {label}")
    assert got.num_samples == want.num_samples


def _assert_complete_store(tmp: Path, tp: int = 2) -> None:
    commits = ZarrStatsStore.open(tmp / "stats" / "run.zarr").commits()
    assert sorted(commits) == list(range(tp))
    for rec in commits.values():
        assert sorted(rec.batch_ids) == list(range(N_BATCHES))
        assert rec.num_samples == N_BATCHES  # one count per batch, none twice


@pytest.fixture(scope="module")
def clean(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Measurement]:
    """A clean tp=2 run: its directory (the store is copied by store tests) and its statistics."""
    tmp = tmp_path_factory.mktemp("clean")
    stats, report = _measure(ckpt, tmp)
    assert report.batches == N_BATCHES and report.restarts == 0
    return tmp, stats


# ---- 1. dead workers and a dead driver ---------------------------------------------------------------
# Three faults in one run (each actor start costs seconds): rank 1 killed with SIGKILL after batch 1;
# then, after the group's restart, rank 1 killed in its 2nd flush once rank 0 has committed its own
# (batches 2 and 3 half committed); then rank 0 ray.kill-ed after batch 5.
THREE_FAULTS = [
    {"where": "batch", "rank": 1, "at": 1, "how": "sigkill"},
    {"where": "flush", "rank": 1, "at": 2, "how": "sigkill", "after_peer": 2},
    {"where": "batch", "rank": 0, "at": 5, "how": "ray_kill"},
]


def test_killed_workers_are_replaced_and_the_stats_equal_a_clean_run(ckpt: Path, tmp_path: Path,
                                                                     clean: tuple[Path, Measurement]) -> None:
    stats, report = _measure(ckpt, tmp_path, runner=FaultyRunner, faults=THREE_FAULTS)
    fired = [Path(f"{tmp_path / 'stats' / 'run.zarr'}.fault-{i}").is_file() for i in range(len(THREE_FAULTS))]
    assert fired == [True, True, True]
    assert report.restarts == 3
    assert report.batches == N_BATCHES  # redone batches are not counted twice
    _assert_same_stats(stats, clean[1])
    _assert_complete_store(tmp_path)


def test_rerun_after_a_failed_driver_resumes_and_equals_a_clean_run(ckpt: Path, tmp_path: Path,
                                                                    clean: tuple[Path, Measurement]) -> None:
    # Rank 1 raises in its 2nd flush after rank 0 committed: the driver stops with batches 2, 3 half done.
    faults = [{"where": "flush", "rank": 1, "at": 2, "how": "raise", "after_peer": 2}]
    with pytest.raises(RayTaskError, match="injected fault"):
        _measure(ckpt, tmp_path, runner=FaultyRunner, faults=faults)
    first = ZarrStatsStore.open(tmp_path / "stats" / "run.zarr").commits()
    assert (sorted(first[0].batch_ids), sorted(first[1].batch_ids)) == ([0, 1, 2, 3], [0, 1])
    # The same command again, with another --flush-every: rank 0's first flush then mixes the batches
    # it already holds (2, 3: run uncounted) with a new one (4), which must not count 2 and 3 twice.
    stats, report = _measure(ckpt, tmp_path, flush_every=3)
    assert report.skipped == 2 and report.batches == N_BATCHES - 2 and report.restarts == 0
    _assert_same_stats(stats, clean[1])
    _assert_complete_store(tmp_path)


# ---- 2. bad stores -------------------------------------------------------------------------------
def _copy_store(clean: tuple[Path, Measurement], tmp: Path) -> Path:
    dst = tmp / "stats" / "run.zarr"
    shutil.copytree(clean[0] / "stats" / "run.zarr", dst)
    return dst


def _tear_chunk(store: Path) -> None:
    rec = ZarrStatsStore.open(store).commits()[1]
    chunk_dir = store / ZarrStatsStore.open(store).chunk_path(1, rec.slot)
    data = [p for p in chunk_dir.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert data, f"no chunk file under {chunk_dir}"
    raw = bytearray(data[0].read_bytes())
    raw[:8] = np.array([1e30, -1e30], np.float32).tobytes()
    data[0].write_bytes(bytes(raw))


def _drop_commit(store: Path) -> None:
    (store / "_commits" / "shard-00001.json").unlink()


def _bump_version(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    attrs = meta["attributes"]
    key = next(k for k in attrs if "version" in k)
    attrs[key] = 999
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("damage", "command", "error", "match"), [
    (_tear_chunk, "measure", TornWriteError, r"shard 1 chunk .* does not match its commit record.*re-run shard 1"),
    (_drop_commit, "quantize", IncompleteStoreError, r"shard\(s\) \[1\] of dp group 0 have no commit record.*rerun"),
    (_bump_version, "quantize", StoreFormatError, r"version"),
    (_bump_version, "measure", StoreFormatError, r"version"),
], ids=["torn-chunk", "missing-commit", "format-version-quantize", "format-version-measure"])
def test_a_damaged_store_gives_one_error_naming_its_path(ckpt: Path, tmp_path: Path, clean: tuple[Path, Measurement],
                                                         damage: Any, command: str, error: type, match: str) -> None:
    store = _copy_store(clean, tmp_path)
    damage(store)
    with Calibration(_config(tmp_path), ckpt, tp=2, progress=False, resources=SIM_CARD) as cal:
        with pytest.raises(error, match=match) as info:
            cal.measure(_batches()) if command == "measure" else cal.quantize()
        assert cal._workers is None  # refused before any shard actor started
    assert str(store) in str(info.value)


def test_a_store_of_another_model_is_refused_by_measure_and_quantize(tmp_path: Path, clean: tuple[Path, Measurement],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    store = _copy_store(clean, tmp_path)
    other = tmp_path / "other_model"
    make_tiny_llama(other, seed=1)
    with Calibration(_config(tmp_path), other, tp=2, progress=False, resources=SIM_CARD) as cal:
        with pytest.raises(RunMismatchError, match="another model"):
            cal.measure(_batches())
        with pytest.raises(RunMismatchError, match="another model.*point dump_stats_path"):
            cal.quantize()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(_config(tmp_path)))
    assert main(["quantize", "--config", str(cfg), "--model", str(other), "--tp", "2", "--no-progress"]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("fp8-calibrate quantize:") and str(store) in out and "\n" not in out


# ---- 3. NaN/Inf and modules without data --------------------------------------------------------------
def _quantized(ckpt: Path, tmp: Path, runner: type) -> tuple[Any, Any]:
    with Calibration(_config(tmp), ckpt, tp=1, progress=False, flush_every=FLUSH_EVERY, resources=SIM_CARD,
                     runner_cls=runner) as cal:
        cal.measure(_batches())
        return cal.quantize(), cal.report


def test_inf_activations_are_reported_by_module_and_never_become_scales(ckpt: Path, tmp_path: Path) -> None:
    scales, report = _quantized(ckpt, tmp_path / "inf", PoisonRunner)
    control, control_report = _quantized(ckpt, tmp_path / "zero", ZeroPoisonRunner)
    assert report.nonfinite == {DOWN: {"inputs.0": N_BATCHES}}  # one inf per batch
    assert control_report.nonfinite == {}
    # The inf is left out of the max, as a 0.0 would be: every scale equals the control run's.
    assert scales.nodes == control.nodes
    assert all(np.isfinite(v) for v in _floats(scales.nodes[DOWN]))


def _floats(node: Any) -> list[float]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _floats(v)]
    if isinstance(node, list):
        return [x for v in node for x in _floats(v)]
    return [float(node)] if isinstance(node, (int, float)) else []


@pytest.fixture(scope="module")
def blocked_store(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tp=1 store measured with DOWN blocked: quantizing without the block leaves DOWN uncovered."""
    tmp = tmp_path_factory.mktemp("blocked")
    with Calibration(_config(tmp, blocklist={"names": [DOWN]}), ckpt, tp=1, progress=False, resources=SIM_CARD) as cal:
        assert DOWN not in cal.measure(_batches()).modules
    return tmp


def test_uncovered_modules_fail_by_default_with_one_error_listing_them(ckpt: Path, blocked_store: Path) -> None:
    with Calibration(_config(blocked_store), ckpt, tp=1, progress=False, resources=SIM_CARD) as cal:
        with pytest.raises(UncoveredModulesError, match=rf"1 selected module\(s\) saw no calibration data in "
                                                        rf".*run\.zarr: {DOWN};.*--uncovered warn"):
            cal.quantize()


@pytest.mark.parametrize("policy", ["warn", "unit_scale"])
def test_uncovered_policy_warn_keeps_high_precision_and_unit_scale_uses_one(ckpt: Path, blocked_store: Path,
                                                                           policy: str) -> None:
    with Calibration(_config(blocked_store), ckpt, tp=1, progress=False, resources=SIM_CARD, uncovered=policy) as cal:
        scales = cal.quantize()
        state = cal.quantized_state_by_rank()[0]
        assert cal.report.uncovered == [DOWN]
    assert "model.layers.0.mlp.down_proj" in scales.nodes  # the measured modules are quantized as usual
    if policy == "warn":
        assert DOWN not in scales.nodes and DOWN not in state
        return
    assert scales.nodes[DOWN]["inputs"] == [1.0] and scales.nodes[DOWN]["params"]["weight"] == 1.0
    assert float(state[DOWN]["weight_scale"]) == 1.0 and float(state[DOWN]["input_scale"]) == 1.0
