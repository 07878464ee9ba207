"""An error raised inside a shard actor reaches the user as one line naming its type, rank and log file.

Ray's own message for such an error is the remote traceback (many lines, ANSI colour codes,
``ray::CalibrationRunner.load() (pid=…, actor_id=…)``). The runners below raise in ``load`` or in
``measure_batch`` on a real local Ray cluster; the first tests check ``shards.card.actor_errors`` on
hand-made Ray errors, without actors. Starting actors costs seconds, so few tests do; the command
line tests check the start-up path (``orchestrator.driver.grid._get``) and the log file's contents.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.entry import fp8_calibrate as cli
from orchestrator.driver.calibration import Calibration
from orchestrator.driver.data import Batch
from orchestrator.entry.demo_model import build_demo_checkpoint
from orchestrator.driver.measure_loop import actor_failure
from shards.card.actor import CalibrationRunner
from shards.card.actor_errors import (LOG_DIR_ENV, ShardActorDiedError, ShardActorError, ShardTaskError, actor_error,
                                 forget_actor, register_actor)
from shards.card.runner import ShardStateError
from orchestrator.driver.grid import WorkerResources, WorkerStartError
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "calibration.txt"
SIM_CARD = WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})
RAY = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(300)]
ANSI_MESSAGE = "\x1b[31mcannot map the weights\x1b[0m onto this card\nsecond line of detail"
LOAD_MESSAGE = "cannot map the weights onto this card"


def ray_test(fn: Any) -> Any:
    for mark in RAY:
        fn = mark(fn)
    return fn


# ---- fault-injecting runners (imported by the actors by module name) --------------------------------
class LoadFailsOnRank1(CalibrationRunner):
    """tp rank 1 raises a RuntimeError (with ANSI codes and a second line) in ``load``."""

    def load(self, rendezvous: Any = None) -> Any:
        if self.topology.tp_rank == 1:
            raise RuntimeError(ANSI_MESSAGE)
        return super().load(rendezvous)


class DiesInLoadOnRank1(CalibrationRunner):
    """tp rank 1's process is killed (SIGKILL) in ``load``."""

    def load(self, rendezvous: Any = None) -> Any:
        if self.topology.tp_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(rendezvous)


class BatchFailsOnRank1(CalibrationRunner):
    """tp rank 1 raises a KeyError after the forward of batch 1 (its peer's collectives are done)."""

    def measure_batch(self, batch_id: int, tokens: np.ndarray) -> int:
        n = super().measure_batch(batch_id, tokens)
        if self.topology.tp_rank == 1 and batch_id == 1:
            raise KeyError("model.layers.9.mlp")
        return n


class OwnErrorInBatch(CalibrationRunner):
    """Raises one of our own errors in ``measure_batch``: it must come back as itself."""

    def measure_batch(self, batch_id: int, tokens: np.ndarray) -> int:
        raise ShardStateError(f"shard {self.topology.index}: injected own error")


# ---- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "logs"
    monkeypatch.setenv(LOG_DIR_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("actor_errors_model"))  # 4 heads, 2 kv heads


def _batches(n: int = 3) -> list[Batch]:
    rng = np.random.default_rng(3)
    return [Batch(i, tuple(tuple(int(t) for t in row) for row in rng.integers(0, 256, (2, 8)))) for i in range(n)]


def _config(tmp: Path) -> dict[str, Any]:
    return {"observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(tmp / "stats" / "run")}


def _measure(model_dir: Path, tmp: Path, runner: type, tp: int = 2) -> None:
    with Calibration(_config(tmp), model_dir, tp=tp, progress=False, resources=SIM_CARD, runner_cls=runner,
                     timeout_s=60) as cal:
        cal.measure(_batches())


def _check_one_line(err: BaseException, exc_type: str, method: str, original: str, log_dir: Path,
                    rank: str = "dp_rank=0, tp_rank=1") -> Path:
    """``err`` is one line naming type, rank, method and message; returns its log file (checked)."""
    msg = str(err)
    assert "\n" not in msg and "\x1b" not in msg, msg
    assert msg.startswith(f"{exc_type} in shard actor {rank} ({method}): {original}; full "), msg
    assert "ray::" not in msg and "pid=" not in msg, msg
    m = re.search(r"; full (?:traceback|error) in (\S+\.log)$", msg)
    assert m, msg
    log = Path(m[1])
    assert log.parent == log_dir and log.is_file()
    text = log.read_text()
    assert "\x1b" not in text
    assert text.startswith(msg[: msg.rindex("; full ")] + "\n")  # the log starts with the same line
    assert exc_type in text and original in text and method in text
    return log


# ---- the helper, on hand-made Ray errors (no actors) --------------------------------------------------
ACTOR_ID = "ab" * 16


def _task_error(cause: BaseException, method: str = "run_batch") -> RayTaskError:
    """What ``ray.get`` raises for an exception in an actor method: Ray's dual class of the cause."""
    tb = (f"Traceback (most recent call last):\n  File \"/x/runner.py\", line 3, in {method}\n    raise X\n"
          f"{type(cause).__name__}: {cause}")
    e = RayTaskError(method, tb, cause, proctitle=f"ray::CalibrationRunner.{method}", pid=4242, ip="10.0.0.7",
                     actor_repr="<CalibrationRunner>", actor_id=ACTOR_ID)
    return e.as_instanceof_cause()


def _raised(e: BaseException) -> BaseException:
    try:
        raise e
    except BaseException as caught:  # gives it a traceback, as ray.get would
        return caught


def test_a_foreign_exception_becomes_one_line_naming_the_registered_rank(log_dir: Path) -> None:
    handle = SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: ACTOR_ID))
    register_actor(handle, 1, 2)
    try:
        ray_error = _raised(_task_error(AssertionError("\x1b[1mshapes differ\x1b[0m: (4, 8) vs (4, 9)\nmore")))
        err = actor_error(ray_error)
    finally:
        forget_actor(handle)
    assert isinstance(err, ShardTaskError) and isinstance(err, ShardActorError) and isinstance(err, RayTaskError)
    assert err.__cause__ is ray_error and isinstance(err.cause, AssertionError)
    log = _check_one_line(err, "AssertionError", "run_batch", "shapes differ: (4, 8) vs (4, 9)", log_dir,
                          rank="dp_rank=1, tp_rank=2")
    assert "more" in log.read_text() and "Traceback" in log.read_text()
    assert (err.dp_rank, err.tp_rank, err.method, err.exc_type, err.log_path) == (1, 2, "run_batch",
                                                                                 "AssertionError", log)
    # Rebuilt through its __reduce_ex__ (what Ray's serializer calls), without importing pickle here.
    again = copy.deepcopy(err)
    assert type(again) is ShardTaskError and str(again) == str(err) and again.log_path == log


def test_an_unknown_actor_is_named_by_its_id_and_our_own_errors_come_back_as_themselves(log_dir: Path) -> None:
    err = actor_error(_raised(_task_error(KeyError("lm_head"), "load")))
    assert str(err).startswith(f"KeyError in shard actor {ACTOR_ID[:16]} (load): 'lm_head'; full traceback in ")
    own = ShardStateError("shard 3: call load() first")
    ray_error = _raised(_task_error(own))
    back = actor_failure(ray_error)
    assert back is own and str(back) == "shard 3: call load() first" and back.__cause__ is ray_error
    note = back.__notes__[-1]
    assert note.startswith(f"shard actor {ACTOR_ID[:16]} (run_batch): full traceback in ")
    assert Path(note.rsplit(" ", 1)[-1]).is_file()


def test_a_dead_actor_is_one_line_too(log_dir: Path) -> None:
    report = ("The actor died unexpectedly before finishing this task.\n\tclass_name: CalibrationRunner\n"
              f"\tactor_id: {ACTOR_ID}\n\tpid: 977\nThe actor is dead because its worker process has died. "
              "Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits (OOM killer?)")
    died = _raised(RayActorError(ACTOR_ID, report))
    err = actor_error(died, rank=(0, 1), method="flush")
    assert isinstance(err, ShardActorDiedError) and isinstance(err, RayActorError) and err.__cause__ is died
    log = _check_one_line(err, "RayActorError", "flush",
                          "The actor died unexpectedly before finishing this task (pid 977, worker exit type "
                          "SYSTEM_ERROR)", log_dir)
    assert "OOM killer" in log.read_text()


def test_no_writable_log_folder_still_gives_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(LOG_DIR_ENV, str(blocker / "logs"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    ray_error = _raised(_task_error(RuntimeError("boom")))
    err = actor_error(ray_error, rank=(0, 0))
    assert isinstance(err, ShardTaskError) and err.__cause__ is ray_error and err.log_path is None
    assert re.fullmatch(r"RuntimeError in shard actor dp_rank=0, tp_rank=0 \(run_batch\): boom; "
                        r"full traceback not saved \(.*a_file/logs: .*\)", str(err)), str(err)
    assert "\n" not in str(err)


def test_anything_but_a_ray_error_is_returned_unchanged() -> None:
    e = ValueError("not from an actor")
    assert actor_error(e) is e


# ---- real actors ---------------------------------------------------------------------------------
@ray_test
def test_an_exception_in_a_batch_is_one_line_with_rank_and_log(model_dir: Path, tmp_path: Path,
                                                               log_dir: Path) -> None:
    with pytest.raises(ShardTaskError) as info:
        _measure(model_dir, tmp_path, BatchFailsOnRank1)
    _check_one_line(info.value, "KeyError", "measure_batch", "'model.layers.9.mlp'", log_dir)
    assert isinstance(info.value, RayTaskError)  # callers that caught Ray's error still catch it


@ray_test
def test_our_own_error_in_an_actor_keeps_its_message(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardStateError) as info:
        _measure(model_dir, tmp_path, OwnErrorInBatch, tp=1)
    assert str(info.value) == "shard 0: injected own error"
    assert isinstance(info.value.__cause__, RayTaskError)
    assert "full traceback in" in info.value.__notes__[-1]


@ray_test
def test_an_actor_that_dies_while_starting_is_one_line(model_dir: Path, tmp_path: Path, log_dir: Path) -> None:
    with pytest.raises(WorkerStartError) as info:
        _measure(model_dir, tmp_path, DiesInLoadOnRank1)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "\t" not in msg, msg
    assert msg.startswith("shard actor dp_rank=0, tp_rank=1 died while starting (load): "), msg
    m = re.search(r"; full error in (\S+\.log)$", msg)
    assert m and Path(m[1]).parent == log_dir and "died" in Path(m[1]).read_text()


# ---- the command line ------------------------------------------------------------------------------
def _cli(monkeypatch: pytest.MonkeyPatch, tmp: Path, model_dir: Path, runner: type, tp: int) -> int:
    class Patched(Calibration):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, resources=SIM_CARD, runner_cls=runner, timeout_s=60, **kwargs)

    monkeypatch.setattr(cli, "Calibration", Patched)
    config = tmp / "config.json"
    config.write_text(json.dumps(_config(tmp)))
    return cli.main(["run", "--config", str(config), "--model", str(model_dir), "--data", str(DATA), "--tp", str(tp),
                     "--seq-len", "16", "--batch-size", "2", "--max-batches", "2", "--no-progress"])


@ray_test
def test_cli_prints_an_exception_in_an_actor_as_one_line(model_dir: Path, tmp_path: Path, log_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(monkeypatch, tmp_path, model_dir, LoadFailsOnRank1, tp=2) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.endswith("\n") and "Traceback" not in err, (out, err)
    line = out.strip()
    assert line.startswith("fp8-calibrate run: RuntimeError in shard actor dp_rank=0, tp_rank=1 (load): "
                           f"{LOAD_MESSAGE}; full traceback in "), line
    assert "\x1b" not in line and "ray::" not in line
    log = Path(line.rsplit(" ", 1)[-1])
    assert log.parent == log_dir and log.is_file()
    text = log.read_text()
    assert text.startswith(f"RuntimeError in shard actor dp_rank=0, tp_rank=1 (load): {LOAD_MESSAGE}\n")
    assert "\x1b" not in text and "Traceback" in text and "second line of detail" in text
    assert "ray::LoadFailsOnRank1.load()" in text  # Ray's header, with pid and actor id


@ray_test
def test_cli_tp_that_does_not_divide_the_heads_is_one_line(model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The example: --tp 3 on a model with 4 heads. Raised by every rank's load(), or before any
    # actor starts where the driver checks the checkpoint first: one line either way.
    assert _cli(monkeypatch, tmp_path, model_dir, CalibrationRunner, tp=3) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "Traceback" not in err, (out, err)
    line = out.strip()
    assert re.fullmatch(r"fp8-calibrate run: cannot shard the 'q' axis: .*tp=3.*", line), line
    assert "\x1b" not in line and "ray::" not in line
