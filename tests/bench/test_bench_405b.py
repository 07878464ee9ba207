"""bench.bench_405b at the smoke-test shapes (2 layers, dp=2 x tp=8, seconds): 16 writers in real
processes through the real store, the coordinator in its own process (it checks every reduced value
against the independently computed global statistics and raises otherwise), the rows and the
RESULTS.md section. No figure is checked: a toy run's times mean nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bench_405b, run_all, sim_report
from bench.sim_shapes import TINY, expected_global, shard_flush
from stats_store.shard_reduce import reduce_shards
from stats_store.commit import build_flush


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the coordinator sets one thread in its own process; keep pytest's
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return bench_405b.run_sides(TINY, s3=False, procs=2, directory=str(tmp_path_factory.mktemp("sim")))


def test_the_generators_global_values_are_the_max_over_every_shard() -> None:
    """What the coordinator checks the store against, checked here against a plain reduce."""
    commits, chunks = {}, {}
    for k in range(TINY.num_shards):
        spec, m, batches = shard_flush(TINY, k, 0, seed=3)
        chunks[k], pending = build_flush(None, spec, m, batches, lambda: np.zeros(0, np.float32))
        commits[k] = pending.record
    got = reduce_shards(commits, chunks, TINY.tp, "test").to_measurement("maxabs", None)
    for (name, label), want in expected_global(TINY, 1, seed=3).items():
        np.testing.assert_array_equal(got.modules[name].tensors()[label], want, err_msg=f"{name} {label}")


def test_toy_run_rows_and_section(toy_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sides, floor = toy_run
    [local] = sides
    assert local.write.writers == TINY.num_shards and local.write.procs == 2
    assert set(local.coordinator.nodes.values()) == {len(TINY.modules)}  # every Linear has scales, both methods
    # dp group 0 stores the weights' max-abs; the other group only its per-tensor values
    assert all(n == 4 * 2 * len(TINY.modules) for n in local.chunk_bytes[TINY.tp:])
    assert all(n > 4 * 2 * len(TINY.modules) for n in local.chunk_bytes[: TINY.tp])
    assert local.coordinator.export_files == 3 * TINY.tp + 2  # json, npz, mod list per rank + scale pair
    rows = sim_report.rows_for(sides, floor, TINY, s3_reason="not asked")
    for r in rows:
        assert set(r) == {"name", "measured", "baseline", "ratio", "goal", "met", "note"}
        if r["met"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert rows[-1]["met"] is None and "not asked" in rows[-1]["note"]  # the S3 row, skipped

    text = sim_report.section(sides, floor, TINY, 1, ["--toy"], date="today", s3_reason="not asked")
    assert text.startswith(sim_report.BEGIN) and text.rstrip().endswith(sim_report.END)
    target = tmp_path / "RESULTS.md"
    target.write_text("# Results\n\nbody\n")
    bench_405b.write_section(target, text)
    run_all.write_results(target, "# New results\n")  # `make bench` keeps the section
    assert target.read_text() == "# New results\n\n" + text
