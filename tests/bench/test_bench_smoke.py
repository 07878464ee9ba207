"""Every bench module's ``run()`` works at a toy size and returns well-formed rows (no timing goals
are checked here: the figures of a toy run mean nothing). bench_e2e's ``fp8-calibrate run``
subprocess (a Ray start, tens of seconds here) is replaced by a stub that checks its command line
parses; ``python -m bench.run_all --quick --only bench_e2e`` runs it for real."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from bench import run_all
from bench.timing import time_pair

MINE = ["bench_observers", "bench_scales", "bench_weight_quant", "bench_qdq_forward", "bench_accuracy", "bench_moe"]
KEYS = {"name", "measured", "baseline", "ratio", "goal", "met", "note"}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the benches set one thread; leave pytest's setting as it was
    yield
    torch.set_num_threads(n)


def _well_formed(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert set(r) == KEYS, r
        assert r["met"] in (True, False, None)
        assert isinstance(r["ratio"], float)
        if r["met"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0


@pytest.mark.parametrize("name", MINE)
def test_bench_module_runs_at_toy_size(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    _well_formed(module.run(size="toy", repeats=1))


def test_moe_bench_measures_every_expert() -> None:
    from bench.bench_moe import expert_coverage

    [r] = importlib.import_module("bench.bench_moe").run(size="toy", repeats=1)
    assert r["met"] is True and "experts measured 16/16" in r["note"], r
    names = ["model.layers.0.mlp.experts.3.w1", "model.layers.0.mlp.experts.3.w2", "model.layers.1.mlp.experts.0.w3",
             "model.layers.1.mlp.gate"]
    assert expert_coverage(names) == {"model.layers.0.mlp": {3}, "model.layers.1.mlp": {0}}


def test_e2e_bench_rows_with_the_run_stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import bench_e2e
    from orchestrator.entry.fp8_calibrate import _parser

    commands: list[list[str]] = []

    def fake_run(command: list[str]) -> "bench_e2e.RunResult":
        args = _parser().parse_args(command[3:])  # a command line the CLI accepts
        assert command[1:3] == ["-m", "orchestrator.entry.fp8_calibrate"] and args.command == "run" and args.json and args.export
        cfg = json.loads(Path(args.config).read_text())
        assert Path(cfg["dump_stats_path"]).is_relative_to(Path(args.export).parent)  # never into demo_output/
        commands.append(command)
        return bench_e2e.RunResult(2.0, {"seconds": {"start shards": 0.5, "measure": 0.1}})

    monkeypatch.setattr(bench_e2e, "run_cli", fake_run)
    rows = bench_e2e.run(size="toy", repeats=1)
    _well_formed(rows)
    assert len(commands) == 1 and "--tp" in commands[0]
    names = [r["name"] for r in rows]
    assert any("tp=1 dp=1 (incl. Ray start)" in n for n in names)
    assert any("bf16 weights / fp32" in n for n in names)
    recipes = bench_e2e.offered_recipes()
    assert recipes and any(r.name == "maxabs_pow2 static" for r in recipes)
    for recipe in recipes:
        assert any(f"FP8 {recipe.name} / bf16" in n for n in names)
        assert any(f"FP8 {recipe.name} with bf16" in n for n in names)
    top1 = [r for r in rows if "top-1 agreement" in r["name"]]
    assert all(0.0 <= r["ratio"] <= 1.0 for r in top1)


def test_scales_bench_fast_and_loop_pick_the_same_scales() -> None:
    rows = importlib.import_module("bench.bench_scales").run(size="toy", repeats=1)
    opt = [r for r in rows if "OPT search" in r["name"]]
    assert len(opt) == 3 and all("same picks: True" in r["note"] for r in opt)
    # The speed of the tables against the brute force is reported here (no test times it).
    tables = [r for r in rows if r["name"].startswith("OPT tables")]
    assert [r["name"].split(":")[0] for r in tables] == ["OPT tables PTS", "OPT tables PCS"]
    assert all("same errors: True" in r["note"] for r in tables)


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
