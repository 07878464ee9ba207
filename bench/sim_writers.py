"""The concurrent shard writers of the dp x tp simulation: a few processes, each running one writer
thread per shard it holds.

Each writer does what a shard actor's flush does (``shards.card.actor.CalibrationRunner.flush``):
``store.commit(store.write_shard(spec, stats, batch_ids))`` through its own store handle, opened
before the clock starts (a real shard opens it in ``start_measure``). The statistics of every
flush are generated before the clock starts too (in a real run the observers hold them); then all
processes report ready, and the parent starts them all at once.

Why processes x threads and not 64 processes: real shards are separate processes, so writers must
be in several processes (separate handles, interleaved commits on one store). But each process
pays ~50 MB for Python, numpy and zarr on top of its shards' data, and the development machine has
2 cores shared with other jobs: 64 processes would add ~3 GB for nothing the cores could run at
once. One process per node (8) with one thread per card (8) keeps 64 concurrent writers; threads
overlap wherever the store releases the GIL (file and network I/O, hashing, large copies).
``procs`` can be raised to the shard count where memory allows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.rss import peak_rss_mb
from bench.sim_shapes import SimShape, shard_flush
from stats_store.zarr_store import ZarrStatsStore

START_TIMEOUT_S = 900.0  # generating 8 shards' statistics takes a few seconds per process here
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WriterTimes:
    """One shard's flushes: wall interval (``perf_counter``, one clock for all processes on Linux) and
    the CPU seconds of its thread."""

    shard: int
    start: float
    end: float
    cpu_s: float


@dataclass(frozen=True)
class NodeResult:
    """One writer process: its writers, its CPU seconds while writing and its peak RSS."""

    writers: tuple[WriterTimes, ...]
    cpu_s: float
    max_rss_mb: float


@dataclass(frozen=True)
class WriteFigures:
    """All writers: wall seconds from the first write to the last commit, CPU seconds of every writer
    process while writing, the largest writer-process peak RSS."""

    wall_s: float
    cpu_s: float
    max_rss_mb: float
    procs: int
    writers: int


def _write(store: ZarrStatsStore, flushes: list[Any], shard: int, out: list[WriterTimes]) -> None:
    start, cpu = time.perf_counter(), time.thread_time()
    for spec, stats, batch_ids in flushes:
        store.commit(store.write_shard(spec, stats, batch_ids))
    out.append(WriterTimes(shard, start, time.perf_counter(), time.thread_time() - cpu))


def _node(location: str, shape: SimShape, shards: list[int], flushes: int, seed: int) -> NodeResult:
    """One writer process (a node): prepare its shards, say ``ready``, wait for ``go``, write them concurrently."""
    work = {k: [shard_flush(shape, k, f, seed) for f in range(flushes)] for k in shards}
    handles = {k: ZarrStatsStore.open(location) for k in shards}
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("sim_writers: the parent went away before the start signal")
    done: list[WriterTimes] = []
    errors: list[str] = []

    def writer(k: int) -> None:
        try:
            _write(handles[k], work[k], k, done)
        except BaseException:
            errors.append(traceback.format_exc())

    cpu = time.process_time()
    threads = [threading.Thread(target=writer, args=(k,), name=f"shard-{k}") for k in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"writer of {location} failed:\n{errors[0]}")
    return NodeResult(tuple(done), time.process_time() - cpu, peak_rss_mb())


def _start(location: str, shape: SimShape, shards: list[int], flushes: int, seed: int) -> subprocess.Popen[str]:
    job = {"location": location, "shape": asdict(shape), "shards": shards, "flushes": flushes, "seed": seed}
    # A fresh interpreter that imports only this module (numpy, zarr, the store): its RSS is its own,
    # as a shard's would be, and not the parent's (multiprocessing's spawn re-imports the parent's
    # __main__, e.g. bench.run_all with torch).
    return subprocess.Popen([sys.executable, "-m", "bench.sim_writers", json.dumps(job)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _failure(location: str, proc: subprocess.Popen[str]) -> RuntimeError:
    proc.kill()
    _, err = proc.communicate()
    last = err.strip().splitlines()[-1] if err.strip() else f"exit status {proc.returncode}"
    return RuntimeError(f"a writer process for {location} failed: {last}\n{err}")


def run_writers(location: str, shape: SimShape, flushes: int, seed: int, procs: int) -> WriteFigures:
    """Write every shard of ``shape`` into the (opened) store at ``location`` from ``procs`` processes."""
    groups = [g.tolist() for g in np.array_split(np.arange(shape.num_shards), procs)]
    nodes = [_start(location, shape, g, flushes, seed) for g in groups]
    try:
        for p in nodes:  # every node has generated its statistics and opened its handles
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise _failure(location, p)
        for p in nodes:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        got = []
        for p in nodes:
            out, err = p.communicate(timeout=START_TIMEOUT_S)
            if p.returncode != 0:
                raise RuntimeError(f"a writer process for {location} failed:\n{err}")
            got.append(_node_result(json.loads(out)))
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    writers = [w for g in got for w in g.writers]
    return WriteFigures(wall_s=max(w.end for w in writers) - min(w.start for w in writers),
                        cpu_s=sum(g.cpu_s for g in got), max_rss_mb=max(g.max_rss_mb for g in got),
                        procs=procs, writers=len(writers))


def _node_result(d: dict[str, Any]) -> NodeResult:
    return NodeResult(tuple(WriterTimes(**w) for w in d["writers"]), d["cpu_s"], d["max_rss_mb"])


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    result = _node(job["location"], SimShape(**job["shape"]), job["shards"], job["flushes"], job["seed"])
    print(json.dumps(asdict(result)))
