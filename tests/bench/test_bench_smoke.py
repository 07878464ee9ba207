"""Every bench module's ``run()`` works at a toy size and returns well-formed rows (no timing goals
are checked here: the figures of a toy run mean nothing)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from bench import run_all
from bench.timing import time_pair

MINE = ["bench_observers", "bench_scales", "bench_weight_quant", "bench_qdq_forward", "bench_accuracy"]
KEYS = {"name", "measured", "baseline", "ratio", "goal", "met", "note"}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the benches set one thread; leave pytest's setting as it was
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", MINE)
def test_bench_module_runs_at_toy_size(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    rows = module.run(size="toy", repeats=1)
    assert rows
    for r in rows:
        assert set(r) == KEYS, r
        assert r["met"] in (True, False, None)
        assert isinstance(r["ratio"], float)
        if r["met"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0


def test_scales_bench_fast_and_loop_pick_the_same_scales() -> None:
    rows = importlib.import_module("bench.bench_scales").run(size="toy", repeats=1)
    opt = [r for r in rows if "OPT search" in r["name"]]
    assert len(opt) == 3 and all("same picks: True" in r["note"] for r in opt)


def test_accuracy_compare_on_known_logits() -> None:
    from bench.bench_accuracy import compare

    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    other = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])  # first position agrees, second does not
    agree, rel = compare(ref, other)
    assert agree == 0.5
    assert rel == pytest.approx(math.sqrt(1 + 1 + 1) / math.sqrt(2))


def test_normalize_maps_foreign_rows_and_time_pair_alternates() -> None:
    foreign = {"case": "reduce", "min_s": 0.5, "median_s": 0.6, "baseline": "numpy", "baseline_min_s": 0.1,
               "ratio": 5.0, "goal_s": 1.0, "ok": True, "note": "x"}
    r = run_all.normalize(foreign)
    assert set(r) == KEYS and r["met"] is True and r["goal"] == "< 1 s" and r["measured"] == "0.500 s"
    calls: list[str] = []
    time_pair(lambda: calls.append("a"), lambda: calls.append("b"), repeats=2, warmup=0)
    assert calls == ["a", "b", "a", "b"]


def test_results_markdown_lists_missed_goals() -> None:
    rows = [run_all.row("x", "1", "2", 0.5, ">= 1", False, "why"), run_all.row("y", "1", "1", 1.0, "-", None)]
    text = run_all.results_markdown(rows, ["--quick"])
    assert "| x | 1 | 2 | 0.5 | >= 1 | NO | why |" in text
    assert "- **x** (ratio 0.5, goal >= 1): not analysed yet" in text and "## Machine" in text
    assert "`python -m bench.run_all --quick`" in text
