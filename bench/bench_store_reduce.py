"""Issue 7.5: reduce of a Llama-70B-like tp=8 measurement in the zarr stats store (goal < 1 s).

80 layers x 7 linears x 8 shards (dp=1, tp=8), hidden 8192, intermediate 28672, kv 1024.
Per-channel weight and output max-abs, per-tensor inputs. q/k/v/gate/up are column-parallel
(weight and output channels split over the 8 shards); o/down are row-parallel (every shard holds
all output channels: partial maxima that the reducer merges). The store is written once (setup);
``store.reduce()`` is timed (it is idempotent). Baseline, in the same process: ``np.fmax`` of the
same in-memory per-shard arrays into the global vectors, i.e. the numpy lower bound of the work.

Run: ``.venv/bin/python -m bench.bench_store_reduce``; ``run()`` returns the rows for bench/run_all.py.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stats_store.records import Measurement, ModuleStats
from stats_store.zarr_store import ZarrStatsStore
from stats_store.metadata import RunMeta
from stats_store.shard_map import ShardSpec, channel_slice

LAYERS, TP, REPEATS, GOAL_S = 80, 8, 3, 1.0
HIDDEN, INTERMEDIATE, KV = 8192, 28672, 1024
# (leaf name, output channels, column-parallel?)
LINEARS = (("self_attn.q_proj", HIDDEN, True), ("self_attn.k_proj", KV, True), ("self_attn.v_proj", KV, True),
           ("self_attn.o_proj", HIDDEN, False), ("mlp.gate_proj", INTERMEDIATE, True),
           ("mlp.up_proj", INTERMEDIATE, True), ("mlp.down_proj", HIDDEN, False))


def shard_measurements(seed: int = 0) -> list[tuple[ShardSpec, Measurement]]:
    """What each of the 8 shards measured (random max-abs values, local coordinates)."""
    rng = np.random.default_rng(seed)
    out = []
    for rank in range(TP):
        slices, m = {}, Measurement(num_samples=4)
        for layer in range(LAYERS):
            for leaf, channels, column in LINEARS:
                name = f"model.layers.{layer}.{leaf}"
                n = channels
                if column:
                    sl = channel_slice(channels, rank, TP)
                    slices[(name, "outputs.0")] = slices[(name, "params.weight")] = sl
                    n = sl.size
                vals = rng.random((3, n), dtype=np.float32) * 8
                m.modules[name] = ModuleStats(name, "linear", [vals[2, :1].copy()], [vals[0]], {"weight": vals[1]}, 4)
        out.append((ShardSpec(rank, TP, TP, slices), m))
    return out


def numpy_baseline(shards: list[tuple[ShardSpec, Measurement]]) -> dict[tuple[str, str], np.ndarray]:
    """The global vectors by np.fmax of the in-memory shard arrays (no store)."""
    result: dict[tuple[str, str], np.ndarray] = {}
    for spec, m in shards:
        for name, stats in m.modules.items():
            for label, value in stats.tensors().items():
                sl = spec.slice_of(name, label)
                length = sl.global_len if sl else value.size
                dst = result.setdefault((name, label), np.full(length, np.nan, dtype=np.float32))
                part = dst[sl.start : sl.stop] if sl else dst
                np.fmax(part, value, out=part)
    return result


def _times(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return times, value


def run(repeats: int = REPEATS) -> list[dict[str, Any]]:
    """Time store.reduce() against the numpy baseline; one row."""
    torch.set_num_threads(1)
    shards = shard_measurements()
    base_times, want = _times(lambda: numpy_baseline(shards), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        store = ZarrStatsStore.open_run(Path(tmp) / "reduce_bench", RunMeta("bench", "llama-70b-like", dp=1, tp=TP))
        t0 = time.perf_counter()
        for spec, m in shards:
            store.commit(store.write_shard(spec, m, [0]))
        write_s = time.perf_counter() - t0
        times, got = _times(store.reduce, repeats)
    for (name, label), value in want.items():  # the timed reduce must also be right
        np.testing.assert_array_equal(got.modules[name].tensors()[label], value, err_msg=f"{name} {label}")
    return [{
        "bench": "store_reduce", "case": f"reduce {LAYERS}x{len(LINEARS)} linears x {TP} shards, per-channel",
        "min_s": min(times), "median_s": statistics.median(times), "repeats": repeats,
        "baseline": "numpy fmax of the same arrays", "baseline_min_s": min(base_times),
        "ratio": min(times) / min(base_times), "goal_s": GOAL_S, "ok": min(times) < GOAL_S,
        "note": f"setup: 8 shard writes+commits took {write_s:.2f} s",
    }]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':58s} {'min s':>8s} {'median s':>9s} {'baseline s':>11s} {'ratio':>7s} {'goal s':>7s}  ok")
    for r in rows:
        print(f"{r['case']:58s} {r['min_s']:8.3f} {r['median_s']:9.3f} {r['baseline_min_s']:11.4f} "
              f"{r['ratio']:7.1f} {r['goal_s']:7.1f}  {r['ok']}")
        if r.get("note"):
            print(f"  {r['note']}")


if __name__ == "__main__":
    print_table(run())
