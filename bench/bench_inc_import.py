"""Issue 9.5: `stats-store import-inc` and `stats-store scales` on the two biggest INC files (goal < 2 s each).

Files (from ``../shared/oracle/inc_stats/``): the 4,502-module DeepSeek-R1 file and the 961-module
Llama-2-70B 8-card file (rank 0 of 8; imported alone with ``--single-file``, since the corpus holds
only that rank). Each command runs through ``orchestrator.entry.stats_store_cli.main`` in this process, as the
installed ``stats-store`` script would (its ``--json`` output goes to a buffer), with
``torch.set_num_threads(1)``. Baseline, in the same process: plain ``json.load`` of the same file.
``scales`` uses ``maxabs_hw`` for GAUDI2.

Run: ``.venv/bin/python -m bench.bench_inc_import``; ``run()`` returns the rows for bench/run_all.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from orchestrator.entry.stats_store_cli import main

INC_STATS = Path(__file__).resolve().parents[1].parent / "shared" / "oracle" / "inc_stats"
# (case name, file name, Nodes count the file must have)
FILES = (
    ("deepseek-r1-4502", "HabanaAI__vllm-fork__examples__offline_inference__deepseek__ds_r1__inc_output_hooks_maxabs_0_8.json", 4502),
    ("llama2-70b-8x-961", "HabanaAI__Model-References__MLPERF4.0__Inference__llama__hqt__llama2-70b-8x__measure_hooks_maxabs_0_8.json", 961),
)
REPEATS, GOAL_S = 3, 2.0


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _cli(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(list(argv))
    if status != 0:
        raise RuntimeError(f"stats-store {' '.join(argv)} exited with status {status}")


def _row(case: str, command: str, times: list[float], base: list[float], nodes: int) -> dict[str, Any]:
    return {"bench": "inc_import", "case": f"{case} {command}", "min_s": min(times), "median_s": statistics.median(times),
            "repeats": len(times), "baseline": "json.load of the file", "baseline_min_s": min(base),
            "ratio": min(times) / min(base), "goal_s": GOAL_S, "ok": max(times) < GOAL_S, "modules": nodes}


def run(repeats: int = REPEATS) -> list[dict[str, Any]]:
    """Time import-inc and scales on each file; rows with min/median seconds and the ratio to json.load."""
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for case, name, nodes in FILES:
        path = INC_STATS / name
        if not path.is_file():
            rows.append({"bench": "inc_import", "case": case, "skipped": f"{path} not found (the corpus lives in ../shared/oracle)"})
            continue

        def load() -> dict[str, Any]:
            with path.open(encoding="utf-8") as f:
                return json.load(f)

        found = len(load()["Nodes"])
        if found != nodes:
            raise RuntimeError(f"{path} has {found} modules, this benchmark expects {nodes}; check the corpus file")
        base = _times(load, repeats)
        with tempfile.TemporaryDirectory() as tmp:
            store = str(Path(tmp) / case)
            imported = _times(lambda: _cli("import-inc", str(path), store, "--single-file", "--overwrite", "--json"), repeats)
            scales = _times(lambda: _cli("scales", store, "--method", "maxabs_hw", "--device", "GAUDI2", "--json"), repeats)
        rows += [_row(case, "import-inc", imported, base, nodes), _row(case, "scales", scales, base, nodes)]
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':32s} {'min s':>8s} {'median s':>9s} {'json.load s':>12s} {'ratio':>7s} {'goal s':>7s}  ok")
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:32s} skipped: {r['skipped']}")
            continue
        print(f"{r['case']:32s} {r['min_s']:8.3f} {r['median_s']:9.3f} {r['baseline_min_s']:12.4f} "
              f"{r['ratio']:7.1f} {r['goal_s']:7.1f}  {r['ok']}")


if __name__ == "__main__":
    print_table(run())
