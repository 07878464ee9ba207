"""Every INC measurement file and per-rank set of the corpus through the `stats-store` CLI (issues 9.2, 9.3).

Corpus: ``../shared/oracle/inc_stats/`` and ``inc_gold/`` (never copied here; skipped where absent).
Each file or complete rank set is imported once (``import-inc``; a rank file whose siblings are
absent with ``--single-file``), then ``ls``, ``show``, ``coverage``, ``diff`` and ``plot`` run on the
store. Expected values come from the files with plain ``json`` and a few lines of Python here:
module count = ``Nodes`` count, NaN/Inf per module and tensor, the values ``show`` prints.
A set of tp ranks is one tp group: values merge by NaN-ignoring max, NaN/Inf counts by max.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.entry.stats_store_cli import main

ORACLE = Path(__file__).resolve().parents[2].parent / "shared" / "oracle"
GOLD = "inc_gold/deepseek-r1-distill-llama-70b-g2"
_NAME = re.compile(r"(?P<base>.*_hooks_[a-z]+)(?:_(?P<rank>-?\d+)_(?P<world>\d+))?\.json")
_NO_CORPUS = pytest.mark.skip(reason=f"INC corpus not found at {ORACLE} (it lives beside the project, in shared/oracle)")

from tests.stats_store.inc_json import node_values


def _corpus_sets() -> list[Any]:
    """One parameter per complete rank set or lone file: (relative paths, import with --single-file)."""
    groups: dict[tuple[Path, str, str | None], list[tuple[int, Path]]] = {}
    for folder in (ORACLE / "inc_stats", ORACLE / GOLD):
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            m = _NAME.fullmatch(p.name)
            if m is None or "_MAXABS_" in p.name:  # module lists, scale files
                continue
            groups.setdefault((folder, m["base"], m["world"]), []).append((int(m["rank"] or 0), p))
    params = []
    for (_, _, world), members in sorted(groups.items()):
        ranks = sorted(r for r, _ in members)
        rels = [str(p.relative_to(ORACLE)) for _, p in sorted(members)]
        if world is None or ranks == list(range(int(world))) or ranks == [-1]:
            ident = members[0][1].name if len(members) == 1 else re.sub(r"_0_(\d+)\.json$", r"_{0..%d}_\1.json" % (len(members) - 1), sorted(members)[0][1].name)
            params.append(pytest.param((rels, False), id=ident))
        else:  # only some ranks of the set are in the corpus: each alone
            params += [pytest.param(([rel], True), id=Path(rel).name) for rel in rels]
    return params or [pytest.param(([], False), marks=_NO_CORPUS, id="no-corpus")]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _tensors(node: dict[str, Any]) -> dict[str, np.ndarray]:
    return {label: np.array(v, dtype=np.float32) for label, v in node_values(node).items()}


def _expected(docs: list[dict[str, Any]]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, int]]]:
    """Per module the merged tensors (fmax over ranks) and the NaN/Inf counts (max over ranks)."""
    values: dict[str, dict[str, np.ndarray]] = {}
    nonfinite: dict[str, dict[str, int]] = {}
    for doc in docs:
        for name, node in doc["Nodes"].items():
            for label, v in _tensors(node).items():
                have = values.setdefault(name, {})
                have[label] = v if label not in have else np.fmax(have[label], v)
                bad = int((~np.isfinite(v)).sum())
                if bad:
                    counts = nonfinite.setdefault(name, {})
                    counts[label] = max(counts.get(label, 0), bad)
    return values, nonfinite


def _decode(values: list[Any]) -> np.ndarray:
    """The CLI's strict JSON: null = NaN, "Infinity" / "-Infinity"."""
    table = {None: math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    return np.array([table[v] if v is None or isinstance(v, str) else v for v in values], dtype=np.float32)


@pytest.fixture(scope="module", params=_corpus_sets())
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Import one corpus file or set once; the tests below share it."""
    rels, single = request.param
    if not ORACLE.is_dir():
        pytest.skip(f"INC corpus not found at {ORACLE}")
    paths = [ORACLE / rel for rel in rels]
    store = tmp_path_factory.mktemp("corpus") / "imported"
    argv = ["import-inc", str(paths[0]), str(store), "--json"] + (["--single-file"] if single else [])
    assert main(argv) == 0
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    return {"store": str(store), "paths": paths, "docs": docs, "single": single}


def test_import_counts_modules_and_names_nonfinite_values(imported: dict[str, Any], capsys, tmp_path: Path) -> None:
    docs = imported["docs"]
    values, nonfinite = _expected(docs)
    store = str(tmp_path / "again")
    argv = ["import-inc", str(imported["paths"][0]), store] + (["--single-file"] if imported["single"] else [])
    out = run_json(capsys, *argv)
    assert out["modules"] == len(docs[0]["Nodes"]) == len(values)
    assert out["nonfinite"] == nonfinite
    assert out["nonfinite_values"] == sum(sum(c.values()) for c in nonfinite.values())
    assert sorted(out["files"]) == sorted(map(str, imported["paths"]))


def test_ls_show_coverage_diff_plot_work_on_the_store(imported: dict[str, Any], capsys, tmp_path: Path) -> None:
    store, docs = imported["store"], imported["docs"]
    values, nonfinite = _expected(docs)
    ls = run_json(capsys, "ls", store)
    assert ls["reduced"] == "current" and [m["name"] for m in ls["modules"]] == list(docs[0]["Nodes"])
    assert {m["name"]: m["nonfinite"] for m in ls["modules"] if m["nonfinite"]} == {
        n: sum(c.values()) for n, c in nonfinite.items()}
    # show: a module with NaN/Inf when there is one, and the first and last modules.
    names = list(values)
    for name in dict.fromkeys([*list(nonfinite)[:1], names[0], names[-1]]):
        shown = run_json(capsys, "show", store, name)
        assert sorted(shown["tensors"]) == sorted(values[name])
        for label, want in values[name].items():
            np.testing.assert_array_equal(_decode(shown["tensors"][label]["values"]), want, err_msg=f"{name} {label}")
        assert shown["nonfinite"] == nonfinite.get(name, {})
    coverage = run_json(capsys, "coverage", store)
    assert coverage["modules"] == len(names)
    diff = run_json(capsys, "diff", store, store)
    assert diff["compared"] == sum(len(t) for t in values.values())
    assert diff["only_in_a"] == diff["only_in_b"] == [] and all(c["change"] == 0.0 for c in diff["top"])
    plots = run_json(capsys, "plot", store, "--out", str(tmp_path / "plots"))
    assert plots["written"] and all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots["written"])


# ---- issue 9.3: INC's own Gaudi2 scale files through the CLI ------------------------------------------
RANKS = [(0, 2), (1, 2), (0, 4), (1, 4), (2, 4), (3, 4)]
SCALES_PER_FILE = 1361 + 80  # from input measurements + fused-SDPA amax scales from outputs[1]


@pytest.mark.parametrize(("rank", "world"), RANKS, ids=[f"inc_output_hooks_maxabs_MAXABS_HW_{r}_{w}.json" for r, w in RANKS])
def test_cli_scales_reproduce_every_input_scale_of_incs_file(oracle_dir: Path, tmp_path: Path, capsys,
                                                              rank: int, world: int) -> None:
    folder = oracle_dir / GOLD
    measurement = folder / f"inc_output_hooks_maxabs_{rank}_{world}.json"
    gold = json.loads((folder / f"inc_output_hooks_maxabs_MAXABS_HW_{rank}_{world}.json").read_text())["Nodes"]
    run_json(capsys, "import-inc", str(measurement), str(tmp_path / "rank"), "--single-file")
    out = run_json(capsys, "scales", str(tmp_path / "rank"), "--method", "maxabs_hw", "--device", "GAUDI2")
    assert out["errors"] == [] and list(out["nodes"]) == list(gold)
    mismatches = [f"{n}: ours {out['nodes'][n]['inputs']}, INC {g['inputs']}" for n, g in gold.items()
                  if out["nodes"][n]["inputs"] != g["inputs"]]
    assert not mismatches, f"{len(mismatches)} modules differ:\n" + "\n".join(mismatches[:10])
    assert sum(len(g["inputs"]) for g in gold.values()) == SCALES_PER_FILE
