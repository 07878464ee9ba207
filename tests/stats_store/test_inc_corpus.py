"""Every real INC measurement file of the corpus imports, round-trips and unifies (issue 9.2, 9.4, 9.5).

The corpus lives in ``../shared/oracle/`` (``inc_stats/`` and ``inc_gold/``); it is never copied
here, and the tests skip where it is absent. Expected values are read from the files with plain
``json`` and flattened by a few lines of Python below, independently of the importer.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stats_store.errors import IncFileNotFoundError
from stats_store.inc_read import read_inc_measurement, read_measurement_json
from stats_store.inc_unify import discover_measurement_files, read_measurement_set
from stats_store.inc_write import export_measurement, write_measurement
from stats_store.inc_names import parse_inc_file_name

ORACLE = Path(__file__).resolve().parents[2].parent / "shared" / "oracle"
GOLD = "inc_gold/deepseek-r1-distill-llama-70b-g2"
_NO_CORPUS = pytest.mark.skip(reason=f"INC corpus not found at {ORACLE} (it lives beside the project, in shared/oracle)")

from tests.stats_store.inc_json import node_values


def _corpus(pattern: str) -> list[Any]:
    """Relative paths of corpus files as test parameters, ids = file names."""
    files = sorted(p for p in ORACLE.glob(pattern) if not p.name.endswith("_mod_list.json")) if ORACLE.is_dir() else []
    if not files:
        return [pytest.param(None, marks=_NO_CORPUS, id="no-corpus")]
    return [pytest.param(str(p.relative_to(ORACLE)), id=p.name) for p in files]


MEASUREMENT_FILES = _corpus("inc_stats/*.json") + _corpus(f"{GOLD}/*_hooks_maxabs_[0-9]_[0-9].json")


def _expected_tensors(node: dict[str, Any]) -> dict[str, list[float]]:
    """label → flattened values, straight from the JSON node."""
    return node_values(node)


def _expected_op(name: str, node: dict[str, Any]) -> str:
    """The op type from the module name (vLLM / optimum-habana / diffusers naming) and INC's table."""
    leaf = name.rsplit(".", 1)[-1]
    if "params" in node:
        row_parallel = leaf in ("o_proj", "down_proj") and len(node.get("outputs", [])) == 2
        return "row_parallel_linear" if row_parallel else "linear"
    if leaf == "fused_scaled_dot_product_attention":
        return "fused_sdpa"
    if leaf == "moe_op":
        return "dynamic_moe"
    if leaf == "softmax":
        return "softmax"
    if "cache" in leaf:
        return "kv_cache"
    if leaf in ("batch2block_matmul", "block2batch_matmul"):
        return "b2b_matmul" if "outputs" in node else "matmul"  # older vLLM wrapped them as plain Matmul
    if "matmul" in leaf or re.fullmatch(r"bmm\d", leaf):
        return "matmul"
    return "unknown"


@pytest.mark.parametrize("rel", MEASUREMENT_FILES)
def test_import_matches_the_file(oracle_dir: Path, rel: str) -> None:
    path = oracle_dir / rel
    doc = json.loads(path.read_text())
    m = read_measurement_json(path)
    assert len(m.modules) == len(doc["Nodes"])
    assert list(m.modules) == list(doc["Nodes"])
    assert m.num_samples == doc.get("NumSamples")
    for name, node in doc["Nodes"].items():
        st = m.modules[name]
        expected = _expected_tensors(node)
        got = st.tensors()
        assert sorted(got) == sorted(expected), name
        for label, values in expected.items():
            np.testing.assert_array_equal(got[label], np.array(values, np.float32), err_msg=f"{name} {label}")
        bad = {label: sum(not math.isfinite(v) for v in values) for label, values in expected.items()}
        assert st.nonfinite == {k: n for k, n in bad.items() if n}, name
        assert st.op_type == _expected_op(name, node), name
        assert (st.outputs is None) == ("outputs" not in node), name


@pytest.mark.parametrize("rel", MEASUREMENT_FILES)
def test_export_for_the_same_rank_gives_back_the_file(oracle_dir: Path, tmp_path: Path, rel: str) -> None:
    path = oracle_dir / rel
    imported = read_inc_measurement(path)
    parsed = parse_inc_file_name(path)
    assert parsed is not None
    written = write_measurement(imported.measurement, tmp_path / parsed.prefix, parsed.rank, parsed.world,
                                layout=imported.layout)[0]
    assert written.name == path.name
    assert written.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("rel", MEASUREMENT_FILES)
def test_export_without_layout_keeps_values_and_keys(oracle_dir: Path, tmp_path: Path, rel: str) -> None:
    """INC's default nesting ([[v]] / [[v0],[v1]...]) may differ from a tool-written file's, but every
    value per module and index, Infinity included, and every node key come back."""
    path = oracle_dir / rel
    original = json.loads(path.read_text())
    m = read_measurement_json(path)
    parsed = parse_inc_file_name(path)
    assert parsed is not None
    written = write_measurement(m, tmp_path / parsed.prefix, parsed.rank, parsed.world)[0]
    back = json.loads(written.read_text())
    assert list(back) == list(original)
    assert list(back["Nodes"]) == list(original["Nodes"])
    for name, node in original["Nodes"].items():
        assert list(back["Nodes"][name]) == list(node), name
        exp, got = _expected_tensors(node), _expected_tensors(back["Nodes"][name])
        assert sorted(exp) == sorted(got)
        for label in exp:
            np.testing.assert_array_equal(np.array(got[label]), np.array(exp[label]), err_msg=f"{name} {label}")


def test_mod_list_round_trip(oracle_dir: Path, tmp_path: Path) -> None:
    mod_lists = sorted(oracle_dir.glob("inc_stats/*_mod_list.json"))
    assert mod_lists, "the corpus has one _mod_list.json in inc_stats"
    mod_list_path = mod_lists[0]
    measurement_path = mod_list_path.with_name(mod_list_path.name.replace("_mod_list.json", ".json"))
    imported = read_inc_measurement(measurement_path)
    names = json.loads(mod_list_path.read_text())
    assert len(names) > len(imported.measurement.modules)  # INC lists patched modules never measured too
    parsed = parse_inc_file_name(measurement_path)
    assert parsed is not None
    paths = write_measurement(imported.measurement, tmp_path / parsed.prefix, parsed.rank, parsed.world,
                              layout=imported.layout, mod_list=names)
    assert paths[2].name == mod_list_path.name
    assert paths[2].read_bytes() == mod_list_path.read_bytes()


# ------------------------------------------------------------------------------ per-rank sets

# Dense tp sets: every node is the same tensor on every rank. (The Mixtral set is expert-parallel:
# see test_expert_parallel_set_keeps_every_expert.)
RANK_SETS = _corpus(f"{GOLD}/*_hooks_maxabs_0_2.json") + _corpus(f"{GOLD}/*_hooks_maxabs_0_4.json")
MIXTRAL_EP = _corpus("inc_stats/*mixtral*_0_2.json")


@pytest.mark.parametrize("rel", RANK_SETS)
def test_rank_set_unifies_by_elementwise_max(oracle_dir: Path, rel: str) -> None:
    first = oracle_dir / rel
    files = discover_measurement_files(first)
    world = int(first.stem.rsplit("_", 1)[1])
    assert len(files) == world and files[0] == first
    assert [int(f.stem.rsplit("_", 2)[1]) for f in files] == list(range(world))
    docs = [json.loads(f.read_text())["Nodes"] for f in files]
    m = read_measurement_set(files)
    names = list(dict.fromkeys(n for d in docs for n in d))
    assert list(m.modules) == names
    for name in names:
        per_rank = [_expected_tensors(d[name]) for d in docs if name in d]
        got = m.modules[name].tensors()
        assert sorted(got) == sorted(per_rank[0])
        for label in per_rank[0]:
            expected = [max(vals) for vals in zip(*(t[label] for t in per_rank))]
            np.testing.assert_array_equal(got[label], np.array(expected, np.float32), err_msg=f"{name} {label}")


@pytest.mark.parametrize("rel", MIXTRAL_EP)
def test_expert_parallel_set_keeps_every_expert(oracle_dir: Path, rel: str) -> None:
    """vLLM-Gaudi's Mixtral at tp=2 is expert-parallel: rank g's ``w13_list.<k>`` is expert 4g + k.
    Merging by name would fold experts 0 and 4 into one made-up expert; each must keep its own."""
    files = discover_measurement_files(oracle_dir / rel)
    docs = [json.loads(f.read_text())["Nodes"] for f in files]
    m = read_measurement_set(files)
    layer = "model.layers.0.block_sparse_moe.experts.moe_op"
    for g, doc in enumerate(docs):
        for lst in ("w13_list", "w2_list"):
            local = sorted(int(n.rsplit(".", 1)[1]) for n in doc if n.startswith(f"{layer}.{lst}."))
            assert local == [0, 1, 2, 3]
            for k in local:
                want = _expected_tensors(doc[f"{layer}.{lst}.{k}"])
                got = m.modules[f"{layer}.{lst}.{4 * g + k}"].tensors()
                for label, values in want.items():
                    np.testing.assert_array_equal(got[label], np.array(values, np.float32), err_msg=f"{lst} {k} {label}")
    # The fused node: output 0 is the max over ranks, then the 8 experts' amax in global order.
    outs = [_expected_tensors(doc[layer]) for doc in docs]
    got = m.modules[layer].tensors()
    assert got["outputs.0"].tolist() == [max(o["outputs.0"][0] for o in outs)]
    experts = [o[f"outputs.{i}"][0] for o in outs for i in range(1, 5)]
    assert [got[f"outputs.{i}"][0] for i in range(1, 9)] == pytest.approx(experts, rel=0)
    # Replicated nodes (the router) still merge by elementwise max.
    gate = "model.layers.0.block_sparse_moe.gate"
    for label in ("inputs.0", "params.weight"):
        want = [max(v) for v in zip(*(_expected_tensors(d[gate])[label] for d in docs))]
        assert m.modules[gate].tensors()[label].tolist() == pytest.approx(want, rel=0)


def test_unified_differs_from_single_rank(oracle_dir: Path) -> None:
    """A check that the max really merges: the tp=4 ranks disagree on some activation."""
    files = discover_measurement_files(oracle_dir / GOLD / "inc_output_hooks_maxabs_0_4.json")
    rank0 = read_measurement_json(files[0]).modules
    unified = read_measurement_set(files).modules
    differ = [n for n in unified if unified[n].tensors()["inputs.0"][0] != rank0[n].tensors()["inputs.0"][0]]
    assert differ


@pytest.mark.parametrize("rel", _corpus("inc_stats/*_0_8.json") + _corpus("inc_stats/*distill*_0_4.json"))
def test_incomplete_rank_set_names_the_missing_files(oracle_dir: Path, rel: str) -> None:
    path = oracle_dir / rel
    world = int(path.stem.rsplit("_", 1)[1])
    base = path.name[: -len(f"_0_{world}.json")]
    with pytest.raises(IncFileNotFoundError) as info:
        discover_measurement_files(path)
    for r in range(1, world):
        assert f"{base}_{r}_{world}.json" in str(info.value)


# ------------------------------------------------------------------------------ speed (issue 9.5)


@pytest.mark.parametrize(
    ("pattern", "modules"),
    [("inc_stats/*deepseek__ds_r1__*_0_8.json", 4502), ("inc_stats/*llama2-70b-8x*_0_8.json", 961)],
    ids=["deepseek-r1-4502", "llama2-70b-8x-961"],
)
def test_import_is_fast(oracle_dir: Path, pattern: str, modules: int) -> None:
    (path,) = oracle_dir.glob(pattern)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m = read_measurement_json(path)
        times.append(time.perf_counter() - t0)
    assert len(m.modules) == modules
    # The target is "well under 2 s"; the machine is shared, so the best of three is compared.
    assert min(times) < 1.0, f"import of {path.name} took {min(times):.2f} s (best of 3)"


@pytest.mark.parametrize("rel", MIXTRAL_EP)
def test_expert_parallel_set_round_trips_through_export(oracle_dir: Path, tmp_path: Path, rel: str) -> None:
    """Exported for world 2, each rank holds its own 4 experts under local names, as vLLM-Gaudi
    wrote them; re-imported, the global measurement is the same."""
    files = discover_measurement_files(oracle_dir / rel)
    m = read_measurement_set(files)
    written = export_measurement(m, tmp_path / "inc" / "measure", 2)
    rank_files = sorted(p for p in written if p.suffix == ".json" and not p.name.endswith("_mod_list.json"))
    originals = [json.loads(f.read_text())["Nodes"] for f in files]
    for orig, f in zip(originals, rank_files):
        ours = json.loads(f.read_text())["Nodes"]
        experts = sorted(n for n in ours if "_list." in n)
        assert experts == sorted(n for n in orig if "_list." in n)
        for n in experts:
            assert _expected_tensors(ours[n]) == _expected_tensors(orig[n]), n
    again = read_measurement_set(rank_files)
    assert again.modules.keys() == m.modules.keys()
    for name, st in m.modules.items():
        for label, v in st.tensors().items():
            np.testing.assert_array_equal(again.modules[name].tensors()[label], v, err_msg=f"{name} {label}")
