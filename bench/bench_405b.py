"""Issue 19.4: Llama-3.1-405B measured by 64 shards (8 nodes x 8 Gaudi3: tp=8, dp=8), by simulation.

Synthetic statistics (``bench.sim_shapes``: what each tp=8 rank of a ``maxabs`` run holds, from a
seeded generator), the real store code: 64 concurrent writers each ``write_shard`` + ``commit``
their flush (``bench.sim_writers``), then the coordinator, in a process of its own, reduces,
computes the global scales for ``maxabs_hw`` and ``act_maxabs_hw_weights_pcs_maxabs_pow2`` on
GAUDI3 and exports INC measurement and scale files for world 8 (``bench.sim_coordinator``), and
checks every reduced value against the known answer. Reported: wall and CPU seconds of each phase,
store bytes, peak RSS of the writer processes and of the coordinator, on local disk and (``--s3``)
on an S3-protocol server (moto, ``tests.s3_server``, when the store supports ``s3://``) side by side.

Goals: write + reduce + scales < 10 s on local disk, store < 1 GB, S3 within 3x of local disk.
The baseline of the time rows is the I/O floor on the same disk: files of the store's chunk sizes
written by one thread, read back and merged with ``np.fmax`` into one vector.

A full run writes ~0.3 GB and takes a few minutes on the 2-core development machine, so ``make bench``
leaves it out: ``make bench-405b`` (or ``python -m bench.run_all --sim405``) runs it.

    python -m bench.bench_405b [--layers N] [--procs P] [--flushes F] [--dir DIR] [--s3 auto|yes|no] [--results PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.sim_coordinator import CoordinatorFigures, coordinate
from bench.sim_report import BEGIN, END, rows_for, section
from bench.sim_shapes import LLAMA_405B, TINY, SimShape
from bench.sim_writers import WriteFigures, run_writers
from stats_store.metadata import RunMeta
from stats_store.zarr_store import ZarrStatsStore

SIZES = {"full": LLAMA_405B, "quick": LLAMA_405B.with_layers(8), "toy": TINY}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class StoreFigures:
    """What one run measured on one kind of store."""

    where: str  # "local disk" or "S3 (moto)"
    write: WriteFigures
    coordinator: CoordinatorFigures
    store_bytes: dict[str, int]  # by top-level entry of the store (shards, reduced, _commits, ...)
    chunk_bytes: tuple[int, ...]  # each shard's committed chunk (float32 bytes)
    server_cpu_s: float | None = None  # CPU seconds of the S3 server process over the run (S3 only)


@dataclass(frozen=True)
class IoFloor:
    """The plain-file baseline: write the chunk bytes, read them back, fmax them into one vector."""

    wall_s: float
    cpu_s: float


def store_bytes(location: str) -> dict[str, int]:
    """Bytes under each top-level entry of the store at ``location`` (local directory or URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    out: dict[str, int] = {}
    for path, info in fs.find(root, detail=True).items():
        top = path[len(root.rstrip("/")) + 1 :].split("/", 1)[0]
        out[top] = out.get(top, 0) + int(info["size"])
    return out


def simulate(root: str, shape: SimShape, where: str, *, flushes: int = 1, procs: int | None = None,
             seed: int = 0) -> StoreFigures:
    """Create the run's store under ``root`` (a directory or URL), write it from every shard, coordinate."""
    meta = RunMeta("bench-405b", {"model": "Llama-3.1-405B (simulated)", "layers": shape.layers}, shape.dp, shape.tp,
                   "gaudi3", "maxabs")
    store = ZarrStatsStore.open_run(f"{root.rstrip('/')}/llama405b", meta)
    write = run_writers(store.location, shape, flushes, seed, procs or shape.dp)
    with tempfile.TemporaryDirectory(prefix="bench405b-inc-") as inc_dir, \
            ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        coordinator = pool.submit(coordinate, store.location, shape, flushes, seed, inc_dir).result()
    chunks = tuple(4 * rec.size for _, rec in sorted(store.commits().items()))
    return StoreFigures(where, write, coordinator, store_bytes(store.location), chunks)


def io_floor(directory: str, chunk_bytes: Sequence[int]) -> IoFloor:
    """Write files of the store's chunk sizes with one thread, read them back, fmax each into one vector."""
    data = np.full(max(chunk_bytes) // 4, 1.5, dtype=np.float32)
    merged = np.full(data.size, np.nan, dtype=np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    paths = [Path(directory) / f"chunk-{k}" for k in range(len(chunk_bytes))]
    for p, n in zip(paths, chunk_bytes):
        data[: n // 4].tofile(p)
    for p in paths:
        part = np.fromfile(p, dtype=np.float32)
        np.fmax(merged[: part.size], part, out=merged[: part.size])
    return IoFloor(time.perf_counter() - wall, time.process_time() - cpu)


def s3_unavailable() -> str | None:
    """Why the S3 column cannot run here (None when it can)."""
    try:
        import tests.s3_server  # noqa: F401  (the moto starter of the S3 branch)
        import stats_store.location  # noqa: F401  (s3:// support in the store)
    except ImportError as e:
        return (f"{e.name} is missing: the S3 column needs the store's s3:// support and tests/s3_server.py "
                "(branch s19-s3)")
    return None


def run_sides(shape: SimShape, *, s3: bool, flushes: int = 1, procs: int | None = None, directory: str | None = None,
              seed: int = 0) -> tuple[list[StoreFigures], IoFloor]:
    """The local-disk run (and the S3 run when ``s3``), and the I/O floor on the local disk."""
    sides = []
    with tempfile.TemporaryDirectory(prefix="bench405b-", dir=directory) as tmp:
        sides.append(simulate(tmp, shape, "local disk", flushes=flushes, procs=procs, seed=seed))
        floor_dir = Path(tmp) / "floor"
        floor_dir.mkdir()
        floor = io_floor(str(floor_dir), sides[0].chunk_bytes)
    if s3:
        reason = s3_unavailable()
        if reason:
            raise RuntimeError(f"--s3: {reason}; run without --s3 for the local-disk column")
        sides.append(_simulate_s3(shape, flushes=flushes, procs=procs, seed=seed))
    return sides, floor


def _simulate_s3(shape: SimShape, *, flushes: int, procs: int | None, seed: int) -> StoreFigures:
    from tests.s3_server import AWS_KEYS, S3Server

    saved = {k: os.environ.pop(k, None) for k in AWS_KEYS}  # never the machine's own AWS setup
    try:
        with S3Server.start() as server:
            os.environ.update(server.env())  # the writer and coordinator processes inherit it
            bucket, cpu = server.new_bucket("bench405b"), _process_cpu_s(server.proc.pid)
            side = simulate(f"s3://{bucket}", shape, "S3 (moto)", flushes=flushes, procs=procs, seed=seed)
            # The server shares the cores with the writers and the coordinator: its CPU is part of the story.
            return replace(side, server_cpu_s=_process_cpu_s(server.proc.pid) - cpu)
    finally:
        for k in AWS_KEYS:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(size: str = "full", s3: bool | None = None) -> list[dict[str, Any]]:
    """Rows for bench/run_all.py. ``s3`` None: the S3 column when the store supports s3:// here."""
    shape = SIZES[size]
    want_s3 = s3 if s3 is not None else s3_unavailable() is None
    sides, floor = run_sides(shape, s3=want_s3)
    return rows_for(sides, floor, shape, s3_reason=None if want_s3 else s3_unavailable())


def write_section(target: Path, text: str) -> None:
    """Put the 405B section into ``target`` (replacing an earlier one), keeping the rest of the file."""
    from bench.bench_peers import replace_section

    old = target.read_text() if target.exists() else ""
    target.write_text(replace_section(old, text, BEGIN, END))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_405b", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LLAMA_405B.layers, help="decoder layers (126: all of 405B)")
    parser.add_argument("--procs", type=int, help="writer processes (default: one per node, i.e. dp)")
    parser.add_argument("--flushes", type=int, default=1, help="flushes (generations) per shard")
    parser.add_argument("--dir", help="where the local store goes (default: the system temp dir)")
    parser.add_argument("--s3", choices=("auto", "yes", "no"), default="auto",
                        help="also run on a moto S3 server; auto: when the store supports s3:// here")
    parser.add_argument("--results", type=Path, help=f"write the section into this markdown file (e.g. {RESULTS})")
    parser.add_argument("--toy", action="store_true", help="the smoke-test shapes (seconds)")
    args = parser.parse_args(argv)
    shape = TINY if args.toy else LLAMA_405B.with_layers(args.layers)
    reason = "not asked (--s3 no)" if args.s3 == "no" else s3_unavailable() if args.s3 == "auto" else None
    sides, floor = run_sides(shape, s3=reason is None, flushes=args.flushes, procs=args.procs, directory=args.dir)
    from bench.run_all import print_rows

    print_rows(rows_for(sides, floor, shape, s3_reason=reason))
    text = section(sides, floor, shape, args.flushes, list(argv if argv is not None else sys.argv[1:]), s3_reason=reason)
    print(text)
    if args.results:
        write_section(args.results, text)
        print(f"wrote the section into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
