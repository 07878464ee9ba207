"""Unit tests of INC file import/export on small hand-written files (reference §4, §5).

Expected values are written out by hand (JSON texts, nesting, maxima), never produced by the
code under test.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stats_store.records import Measurement, ModuleStats
from shards.model.op_types import OP_TYPES
from stats_store.errors import IncFileExistsError, IncFileNotFoundError, IncFormatError, StatsStoreError
from stats_store.inc_ops import UNKNOWN_OP, infer_op_type
from stats_store.inc_read import read_inc_measurement, read_measurement_json
from stats_store.inc_unify import (
    discover_measurement_files,
    read_measurement,
    read_measurement_set,
    unify_measurements,
)
from stats_store.inc_write import export_measurement, measurement_to_inc_dict, write_measurement, write_scales
from stats_store.inc_names import inc_file_name, parse_inc_file_name, parse_rank_suffix


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# Placeholders that _doc turns into the bare NaN / Infinity tokens INC files contain.
NAN, Infinity = "__NAN__", "__INF__"


def _doc(nodes: dict, local_rank: int | None = 0, **extra: object) -> str:
    text = json.dumps({**extra, "GlobalRank": None, "LocalRank": local_rank, "Mode": "DynamicRange", "Nodes": nodes})
    return text.replace(f'"{NAN}"', "NaN").replace(f'"{Infinity}"', "Infinity")


def _stats(name: str, op: str, inputs: list[list[float]], outputs: list[list[float]] | None = None,
           weight: list[float] | None = None) -> ModuleStats:
    return ModuleStats(
        name=name,
        op_type=op,
        inputs=[np.array(v, np.float32) for v in inputs],
        outputs=None if outputs is None else [np.array(v, np.float32) for v in outputs],
        params={} if weight is None else {"weight": np.array(weight, np.float32)},
    )


# ------------------------------------------------------------------------------------ file names


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("./hqt_output/measure", "maxabs"), "hqt_output/measure_hooks_maxabs.json"),
        (("inc_output", "maxabs", None, 0, 2), "inc_output_hooks_maxabs_0_2.json"),
        (("inc_output", "maxabs", None, 0, 2, "_mod_list.json"), "inc_output_hooks_maxabs_0_2_mod_list.json"),
        (("inc_output", "maxabs", "maxabs_hw", 1, 4, ".npz"), "inc_output_hooks_maxabs_MAXABS_HW_1_4.npz"),
        (("measure", "maxabs", "MAXABS_POW2", 1, 2), "measure_hooks_maxabs_MAXABS_POW2_1_2.json"),
        (("fp8", "maxabs", None, -1, 1), "fp8_hooks_maxabs_-1_1.json"),
    ],
)
def test_inc_file_name_matches_the_reference_examples(args: tuple, expected: str) -> None:
    assert inc_file_name(*args) == Path(expected)


@pytest.mark.parametrize(
    ("rank", "world", "method", "match"),
    [(2, 2, None, "rank 2"), (0, None, None, "together"), (None, 2, None, "together"), (-1, 2, None, "rank -1"),
     (0, 1, "maxabs_fast", "maxabs_fast")],
)
def test_inc_file_name_rejects_bad_rank_or_method(rank: int | None, world: int | None, method: str | None,
                                                  match: str) -> None:
    with pytest.raises(IncFormatError, match=match):
        inc_file_name("p", "maxabs", method, rank, world)


@pytest.mark.parametrize(
    ("name", "prefix", "observer", "method", "rank", "world", "is_measurement"),
    [
        ("a_b_hooks_maxabs_0_8.json", "a_b", "maxabs", None, 0, 8, True),
        ("p_hooks_maxabs_per_channel.json", "p", "maxabs_per_channel", None, None, None, True),
        ("p_hooks_maxabs_MAXABS_HW_OPT_WEIGHT_3_4.npz", "p", "maxabs", "MAXABS_HW_OPT_WEIGHT", 3, 4, False),
        ("p_hooks_maxabs_ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2.json", "p", "maxabs",
         "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2", None, None, False),
        ("x_hooks_y_hooks_maxabs_-1_1.json", "x_hooks_y", "maxabs", None, -1, 1, True),
        ("p_hooks_maxabs_1_2_mod_list.json", "p", "maxabs", None, 1, 2, False),
    ],
)
def test_parse_inc_file_name(name: str, prefix: str, observer: str, method: str | None, rank: int | None,
                             world: int | None, is_measurement: bool) -> None:
    parsed = parse_inc_file_name(name)
    assert parsed is not None
    assert (parsed.prefix, parsed.observer, parsed.method, parsed.rank, parsed.world) == (
        prefix, observer, method, rank, world)
    assert parsed.is_measurement is is_measurement


@pytest.mark.parametrize("name", ["measure.json", "p_hooks_.json", "p_hooks_maxabs.txt"])
def test_parse_inc_file_name_returns_none_for_other_files(name: str) -> None:
    assert parse_inc_file_name(name) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [("p_hooks_maxabs_0_2.json", (0, 2)), ("p_hooks_maxabs_-1_1.json", (-1, 1)), ("p_hooks_maxabs_3_4_mod_list.json", (3, 4)),
     ("dir/p_hooks_maxabs_MAXABS_HW_1_2.npz", (1, 2)), ("p_hooks_maxabs.json", None), ("p_hooks_maxabs_0_2", (0, 2))],
)
def test_parse_rank_suffix(name: str, expected: tuple[int, int] | None) -> None:
    assert parse_rank_suffix(name) == expected


# ------------------------------------------------------------------------------------ import


@pytest.mark.parametrize(
    ("raw", "vector", "shape"),
    [
        ([[4.5]], [4.5], (1, 1)),
        ([[1.0], [2.5], [0.25]], [1.0, 2.5, 0.25], (3, 1)),
        ([[[0.75]]], [0.75], (1, 1, 1)),
        ([3.0], [3.0], (1,)),
        (2.0, [2.0], ()),
        ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0, 3.0, 4.0], (2, 2)),
    ],
    ids=["pts", "per-channel", "depth3", "depth1", "bare", "2x2"],
)
def test_import_flattens_any_nesting_and_records_it(tmp_path: Path, raw: object, vector: list[float],
                                                    shape: tuple[int, ...]) -> None:
    f = _write(tmp_path / "p_hooks_maxabs.json", _doc({"m": {"inputs": [raw]}}))
    imported = read_inc_measurement(f)
    got = imported.measurement.modules["m"].inputs[0]
    assert got is not None and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(vector, np.float32))
    assert imported.layout.nodes["m"].inputs == (shape,)


def test_import_keeps_infinity_and_nan_as_data_and_counts_them_by_label(tmp_path: Path) -> None:
    text = (
        '{"GlobalRank": null, "LocalRank": null, "Mode": "DynamicRange", "Nodes": {'
        '"a.softmax": {"inputs": [[[Infinity]]], "outputs": [[[2.0]]]},'
        '"a.moe": {"inputs": [[[1.0]]], "outputs": [[[NaN]], [[1.0]], [[-Infinity]]]},'
        '"a.fc": {"inputs": [[[1.0], [Infinity], [NaN]]], "params": {"weight": [[Infinity]]}},'
        '"a.ok": {"inputs": [[[1.0]]]}}}'
    )
    m = read_measurement_json(_write(tmp_path / "x_hooks_maxabs.json", text))
    assert len(m.modules) == 4
    assert m.nonfinite_report() == {
        "a.softmax": {"inputs.0": 1},
        "a.moe": {"outputs.0": 1, "outputs.2": 1},
        "a.fc": {"inputs.0": 2, "params.weight": 1},
    }
    fc = m.modules["a.fc"].inputs[0]
    assert fc is not None and fc[0] == 1.0 and math.isinf(fc[1]) and math.isnan(fc[2])
    moe_out = m.modules["a.moe"].outputs
    assert moe_out is not None and math.isnan(moe_out[0][0]) and moe_out[2][0] == -math.inf  # type: ignore[index]


@pytest.mark.parametrize("local_rank", [None, -1, 3])
@pytest.mark.parametrize("num_samples", [None, 7, "absent"])
def test_import_accepts_null_or_minus_one_ranks_and_optional_num_samples(
    tmp_path: Path, local_rank: int | None, num_samples: object
) -> None:
    extra = {} if num_samples == "absent" else {"NumSamples": num_samples}
    m = read_measurement_json(_write(tmp_path / "p_hooks_maxabs.json", _doc({"m": {"inputs": [[[1.0]]]}}, local_rank, **extra)))
    assert m.num_samples == (None if num_samples == "absent" else num_samples)
    assert m.observer == "maxabs"


def test_observer_comes_from_the_file_name(tmp_path: Path) -> None:
    m = read_measurement_json(_write(tmp_path / "p_hooks_maxabs_per_channel_0_1.json", _doc({"m": {"inputs": [[[1.0]]]}})))
    assert m.observer == "maxabs_per_channel"


def test_key_presence_and_op_type_are_recorded(tmp_path: Path) -> None:
    nodes = {
        "l.0.q_proj": {"inputs": [[[1.0]]], "params": {"weight": [[2.0]]}},
        "l.0.o_proj": {"inputs": [[[1.0]]], "outputs": [[[1.0]], [[2.0]]], "params": {"weight": [[2.0]]}},
        "l.0.attn.k_cache": {"inputs": [[[1.0]]]},
    }
    m = read_measurement_json(_write(tmp_path / "p_hooks_maxabs.json", _doc(nodes)))
    q, o, k = (m.modules[n] for n in nodes)
    assert (q.op_type, o.op_type, k.op_type) == ("linear", "row_parallel_linear", "kv_cache")
    assert q.outputs is None and k.outputs is None and k.params == {}
    assert o.outputs is not None and len(o.outputs) == 2
    np.testing.assert_array_equal(q.params["weight"], [2.0])


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("{not json", IncFormatError, "not valid JSON"),
        ('{"Mode": "Scale", "Nodes": {}}', IncFormatError, "scale file"),
        ('{"Mode": "Shape", "Nodes": {}}', IncFormatError, "Mode"),
        ('{"GlobalRank": null}', IncFormatError, "Nodes"),
        ('{"Nodes": {"m": {"inputs": [[[1.0]], [[1.0], [2.0, 3.0]]]}}}', IncFormatError, "'m' inputs.1"),
        ('{"Nodes": {"m": {"inputs": [[]]}}}', IncFormatError, "empty"),
        ('{"Nodes": {"m": {"inputs": [[["x"]]]}}}', IncFormatError, "'m' inputs.0"),
        ('{"Nodes": {"m": {"inputs": [[[1.0]]], "weights": 1}}}', IncFormatError, "weights"),
        ('{"Nodes": {"m": {"inputs": 1.0}}}', IncFormatError, "must be a list"),
        ('{"NumSamples": "4", "Nodes": {}}', IncFormatError, "NumSamples"),
    ],
)
def test_import_errors_name_file_and_module(tmp_path: Path, text: str, error: type, match: str) -> None:
    f = _write(tmp_path / "bad_hooks_maxabs.json", text)
    with pytest.raises(error, match=match) as info:
        read_measurement_json(f)
    assert "bad_hooks_maxabs.json" in str(info.value)


def test_missing_file_and_npz_are_refused(tmp_path: Path) -> None:
    with pytest.raises(IncFileNotFoundError, match="nope_hooks_maxabs.json"):
        read_measurement_json(tmp_path / "nope_hooks_maxabs.json")
    with pytest.raises(FileNotFoundError):
        read_measurement_json(tmp_path / "nope_hooks_maxabs.json")
    with pytest.raises(IncFormatError, match="pickled"):
        read_measurement_json(tmp_path / "p_hooks_maxabs.npz")


def test_errors_derive_from_package_base_and_builtin() -> None:
    assert issubclass(IncFormatError, StatsStoreError) and issubclass(IncFormatError, ValueError)
    assert issubclass(IncFileNotFoundError, FileNotFoundError)
    assert issubclass(IncFileExistsError, FileExistsError) and issubclass(IncFileExistsError, StatsStoreError)


# ------------------------------------------------------------------------------------ op types


@pytest.mark.parametrize(
    ("name", "n_in", "params", "n_out", "expected"),
    [
        ("m.layers.0.self_attn.qkv_proj", 1, ["weight"], None, "linear"),
        ("unet.conv_in", 1, ["weight"], 1, "linear"),
        ("m.layers.0.self_attn.o_proj", 1, ["weight"], 2, "row_parallel_linear"),
        ("m.layers.0.attn.impl.matmul_qk", 2, None, None, "matmul"),
        ("unet.attn1.attention_module.bmm1", 2, None, 1, "matmul"),
        ("m.attn.impl.batch2block_matmul", 2, None, 1, "b2b_matmul"),
        ("m.attn.impl.block2batch_matmul", 2, None, None, "matmul"),
        ("m.attn.impl.k_cache", 1, None, None, "kv_cache"),
        ("m.attn.impl.latent_cache_k", 1, None, 1, "kv_cache"),
        ("m.attn.impl.softmax", 1, None, 1, "softmax"),
        ("m.attn.impl.fused_scaled_dot_product_attention", 3, None, 2, "fused_sdpa"),
        ("m.mlp.experts.moe_op", 1, None, 33, "dynamic_moe"),
        ("m.mlp.experts.moe_op", 1, None, 5, "dynamic_moe"),
        ("m.something", 1, None, 1, UNKNOWN_OP),
        ("m.weird", 2, ["weight"], None, UNKNOWN_OP),
        ("m.weird", 1, ["weight"], 3, UNKNOWN_OP),
        ("m.weird", 4, None, None, UNKNOWN_OP),
        ("m.weird", 2, None, 2, UNKNOWN_OP),
    ],
)
def test_infer_op_type(name: str, n_in: int, params: list[str] | None, n_out: int | None, expected: str) -> None:
    got = infer_op_type(name, n_in, params, n_out)
    assert got == expected
    assert got == UNKNOWN_OP or got in OP_TYPES


# ------------------------------------------------------------------------------------ export


def _small_measurement(num_samples: int | None = None) -> Measurement:
    return Measurement(
        observer="maxabs",
        modules={
            "fc": _stats("fc", "linear", [[0.5]], weight=[2.0]),
            "mm": _stats("mm", "matmul", [[1.0], [3.0]]),
            "pc": _stats("pc", "linear", [[1.0, 2.0]], outputs=[[math.inf]], weight=[4.0, 0.25]),
        },
        num_samples=num_samples,
    )


def test_measurement_to_inc_dict_default_layout_is_incs() -> None:
    doc = measurement_to_inc_dict(_small_measurement(num_samples=5), local_rank=1)
    assert list(doc) == ["NumSamples", "GlobalRank", "LocalRank", "Mode", "Nodes"]
    assert doc["NumSamples"] == 5 and doc["GlobalRank"] is None and doc["LocalRank"] == 1 and doc["Mode"] == "DynamicRange"
    assert doc["Nodes"] == {
        "fc": {"inputs": [[[0.5]]], "params": {"weight": [[2.0]]}},
        "mm": {"inputs": [[[1.0]], [[3.0]]]},
        "pc": {"inputs": [[[1.0], [2.0]]], "outputs": [[[math.inf]]], "params": {"weight": [[4.0], [0.25]]}},
    }
    assert list(doc["Nodes"]["pc"]) == ["inputs", "outputs", "params"]


def test_write_measurement_writes_incs_exact_text(tmp_path: Path) -> None:
    m = Measurement(observer="maxabs", modules={"fc": _stats("fc", "linear", [[0.1]], outputs=[[math.inf]], weight=[2.0])})
    paths = write_measurement(m, tmp_path / "out" / "measure", rank=1, world=2)
    assert [p.name for p in paths] == [
        "measure_hooks_maxabs_1_2.json", "measure_hooks_maxabs_1_2.npz", "measure_hooks_maxabs_1_2_mod_list.json"]
    # float32(0.1) printed as the double it is, as INC's .tolist() gives it; Infinity as a token.
    expected = """{
    "GlobalRank": null,
    "LocalRank": 1,
    "Mode": "DynamicRange",
    "Nodes": {
        "fc": {
            "inputs": [
                [
                    [
                        0.10000000149011612
                    ]
                ]
            ],
            "outputs": [
                [
                    [
                        Infinity
                    ]
                ]
            ],
            "params": {
                "weight": [
                    [
                        2.0
                    ]
                ]
            }
        }
    }
}"""
    assert paths[0].read_text() == expected
    assert paths[2].read_text() == '[\n    "fc"\n]'


def test_write_measurement_npz_is_incs_single_object_entry_and_never_read_back(tmp_path: Path) -> None:
    npz = write_measurement(_small_measurement(), tmp_path / "p")[1]
    assert npz.name == "p_hooks_maxabs.npz"
    with zipfile.ZipFile(npz) as z:
        assert z.namelist() == ["arr_0.npy"]
        with z.open("arr_0.npy") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)  # the header only: nothing is unpickled
    assert shape == () and dtype == np.dtype(object)
    with pytest.raises(ValueError, match="allow_pickle"):
        np.load(npz, allow_pickle=False)["arr_0"]


def test_write_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    m = _small_measurement()
    write_measurement(m, tmp_path / "p", 0, 1)
    with pytest.raises(IncFileExistsError, match="p_hooks_maxabs_0_1.json"):
        write_measurement(m, tmp_path / "p", 0, 1)
    write_measurement(m, tmp_path / "p", 0, 1, overwrite=True)


def test_write_refuses_unobserved_tensor(tmp_path: Path) -> None:
    st = _stats("mm", "matmul", [[1.0], [1.0]])
    st.inputs[1] = None
    with pytest.raises(IncFormatError, match="'mm' inputs.1 was not observed"):
        write_measurement(Measurement(modules={"mm": st}), tmp_path / "p")


def test_write_then_read_gives_the_same_values(tmp_path: Path) -> None:
    m = _small_measurement(num_samples=3)
    back = read_measurement_json(write_measurement(m, tmp_path / "p", 0, 2)[0])
    assert list(back.modules) == list(m.modules) and back.num_samples == 3
    for name, st in m.modules.items():
        for label, arr in st.tensors().items():
            np.testing.assert_array_equal(back.modules[name].tensors()[label], arr)
    assert back.modules["pc"].nonfinite == {"outputs.0": 1}


def test_export_for_a_world_size_replicates_per_tensor_values(tmp_path: Path) -> None:
    m = Measurement(modules={"fc": _stats("fc", "linear", [[0.5]], weight=[2.0])})
    paths = export_measurement(m, tmp_path / "p", world=3)
    jsons = [p for p in paths if p.suffix == ".json" and "mod_list" not in p.name]
    assert [p.name for p in jsons] == [f"p_hooks_maxabs_{r}_3.json" for r in range(3)]
    for r, p in enumerate(jsons):
        doc = json.loads(p.read_text())
        assert doc["LocalRank"] == r
        assert doc["Nodes"] == {"fc": {"inputs": [[[0.5]]], "params": {"weight": [[2.0]]}}}
    assert [p.name for p in export_measurement(m, tmp_path / "q", world=None)][0] == "q_hooks_maxabs.json"


def test_export_of_per_channel_values_needs_a_slicer(tmp_path: Path) -> None:
    m = Measurement(modules={"fc": _stats("fc", "linear", [[0.5]], weight=[1.0, 2.0, 3.0, 4.0])})
    with pytest.raises(IncFormatError, match="'fc' params.weight.*slicer"):
        export_measurement(m, tmp_path / "p", world=2)
    assert not list(tmp_path.iterdir())  # nothing half-written

    def halves(name: str, label: str, vec: np.ndarray, rank: int, world: int) -> np.ndarray:
        n = vec.size // world
        return vec[rank * n : (rank + 1) * n]

    paths = export_measurement(m, tmp_path / "p", world=2, slicer=halves)
    weights = [json.loads(p.read_text())["Nodes"]["fc"]["params"]["weight"] for p in paths if p.name.endswith(("0_2.json", "1_2.json"))]
    assert weights == [[[1.0], [2.0]], [[3.0], [4.0]]]


# ------------------------------------------------------------------------------------ scales


def test_write_scales_writes_incs_scale_json(tmp_path: Path) -> None:
    nodes = {
        "fc": {"inputs": [0.0625], "outputs": [0.0625], "params": {"weight": 1.0}},
        "pc": {"inputs": [0.5], "outputs": [[0.25, 0.5]], "params": {"weight": {"0": [0.5, 1.0], "1": [1.0, 1.0, 1.0]}}},
        "mm": {"inputs": [1.0, 16.0], "outputs": [16.0], "params": {}},
    }
    paths = write_scales(nodes, tmp_path / "inc_output", "maxabs", "maxabs_hw", rank=1, world=4)
    assert [p.name for p in paths] == ["inc_output_hooks_maxabs_MAXABS_HW_1_4.json", "inc_output_hooks_maxabs_MAXABS_HW_1_4.npz"]
    text = paths[0].read_text()
    assert text.startswith('{\n    "GlobalRank": null,\n    "LocalRank": 1,\n    "Mode": "Scale",\n    "Nodes": {\n')
    assert json.loads(text)["Nodes"] == nodes
    assert '"mm": {\n            "inputs": [\n                1.0,\n                16.0\n            ],' in text
    with zipfile.ZipFile(paths[1]) as z:
        assert z.namelist() == ["arr_0.npy"]


@pytest.mark.parametrize(
    ("node", "match"),
    [({"inputs": [1.0], "outputs": [1.0]}, "params"), ({"inputs": ["x"], "outputs": [], "params": {}}, "inputs.0"),
     ({"inputs": [], "outputs": [], "params": []}, "params must be an object")],
)
def test_write_scales_rejects_malformed_nodes(tmp_path: Path, node: dict, match: str) -> None:
    with pytest.raises(IncFormatError, match=match):
        write_scales({"n": node}, tmp_path / "p", "maxabs", "MAXABS_POW2")


def test_write_scales_accepts_module_scales_nodes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from shards.fp8.module_scales import ModuleScales

    ms = ModuleScales(inputs=(torch.tensor(0.5, dtype=torch.bfloat16),), outputs=(torch.tensor([0.25, 0.5]),),
                      weight=torch.tensor([0.5, 1.0]), weight_in_channel=torch.ones(3))
    path = write_scales({"pc": ms.to_inc_node()}, tmp_path / "p", "maxabs", "act_maxabs_pow2_weights_pcs_maxabs_pow2")[0]
    assert json.loads(path.read_text())["Nodes"]["pc"] == {
        "inputs": [0.5], "outputs": [[0.25, 0.5]], "params": {"weight": {"0": [0.5, 1.0], "1": [1.0, 1.0, 1.0]}}}


# ------------------------------------------------------------------------------------ rank sets


def _rank_file(folder: Path, prefix: str, rank: int | None, world: int | None, nodes: dict) -> Path:
    suffix = "" if rank is None else f"_{rank}_{world}"
    return _write(folder / f"{prefix}_hooks_maxabs{suffix}.json", _doc(nodes, rank))


def test_unify_takes_the_elementwise_max_per_channel_ignoring_nan(tmp_path: Path) -> None:
    a = _rank_file(tmp_path, "p", 0, 2, {
        "fc": {"inputs": [[[1.0], [NAN], [5.0]]], "params": {"weight": [[2.0]]}},
        "only0": {"inputs": [[[1.0]]]},
        "sm": {"inputs": [[[NAN]]], "outputs": [[[Infinity]]]},
    })
    b = _rank_file(tmp_path, "p", 1, 2, {
        "fc": {"inputs": [[[4.0], [2.0], [NAN]]], "params": {"weight": [[3.0]]}},
        "sm": {"inputs": [[[NAN]]], "outputs": [[[1.0]]]},
        "only1": {"inputs": [[[7.0]]]},
    })
    m = read_measurement_set([a, b])
    assert list(m.modules) == ["fc", "only0", "sm", "only1"]
    np.testing.assert_array_equal(m.modules["fc"].inputs[0], np.array([4.0, 2.0, 5.0], np.float32))
    np.testing.assert_array_equal(m.modules["fc"].params["weight"], [3.0])
    sm = m.modules["sm"]
    assert sm.inputs[0] is not None and math.isnan(sm.inputs[0][0])  # NaN on every rank stays NaN
    assert sm.outputs is not None and sm.outputs[0] is not None and math.isinf(sm.outputs[0][0])
    assert m.nonfinite_report() == {"fc": {"inputs.0": 2}, "sm": {"inputs.0": 2, "outputs.0": 1}}


@pytest.mark.parametrize(
    ("nodes_b", "match"),
    [
        ({"fc": {"inputs": [[[1.0], [2.0]]]}}, r"shapes \[\(1,\), \(2,\)\]"),
        ({"fc": {"inputs": [[[1.0]], [[1.0]]]}}, r"inputs counts \[1, 2\]"),
        ({"fc": {"inputs": [[[1.0]]], "outputs": [[[1.0]]]}}, "outputs counts"),
    ],
)
def test_unify_refuses_layouts_that_differ(tmp_path: Path, nodes_b: dict, match: str) -> None:
    a = _rank_file(tmp_path, "p", 0, 2, {"fc": {"inputs": [[[1.0]]]}})
    b = _rank_file(tmp_path, "p", 1, 2, nodes_b)
    with pytest.raises(IncFormatError, match=match):
        read_measurement_set([a, b])


def test_unify_refuses_different_observers_and_empty_input() -> None:
    with pytest.raises(IncFormatError, match="observers"):
        unify_measurements([Measurement(observer="maxabs"), Measurement(observer="shape")])
    with pytest.raises(IncFormatError, match="no measurements"):
        unify_measurements([])


def _set_folder(tmp_path: Path, world: int, ranks: list[int], prefix: str = "p") -> Path:
    for r in ranks:
        _rank_file(tmp_path, prefix, r, world, {"m": {"inputs": [[[float(r + 1)]]]}})
        _write(tmp_path / f"{prefix}_hooks_maxabs_{r}_{world}_mod_list.json", '["m"]')
        _write(tmp_path / f"{prefix}_hooks_maxabs_MAXABS_HW_{r}_{world}.json", "{}")
    return tmp_path


@pytest.mark.parametrize("how", ["file", "dir", "prefix", "prefix_with_observer", "stem"])
def test_discover_finds_the_whole_rank_set(tmp_path: Path, how: str) -> None:
    folder = _set_folder(tmp_path, 3, [2, 0, 1])
    arg = {
        "file": folder / "p_hooks_maxabs_1_3.json",
        "dir": folder,
        "prefix": folder / "p",
        "prefix_with_observer": folder / "p_hooks_maxabs",
        "stem": folder / "p_hooks_maxabs_2_3",
    }[how]
    assert [f.name for f in discover_measurement_files(arg)] == [f"p_hooks_maxabs_{r}_3.json" for r in range(3)]
    np.testing.assert_array_equal(read_measurement(arg).modules["m"].inputs[0], [3.0])


def test_discover_names_missing_rank_files(tmp_path: Path) -> None:
    folder = _set_folder(tmp_path, 4, [0, 2])
    with pytest.raises(IncFileNotFoundError, match=r"p_hooks_maxabs_1_4.json, p_hooks_maxabs_3_4.json"):
        discover_measurement_files(folder / "p_hooks_maxabs_0_4.json")


@pytest.mark.parametrize("rank", [None, -1, 0])
def test_discover_single_file_sets(tmp_path: Path, rank: int | None) -> None:
    f = _rank_file(tmp_path, "p", rank, None if rank is None else 1, {"m": {"inputs": [[[1.0]]]}})
    assert discover_measurement_files(tmp_path) == [f]


def test_discover_refuses_ambiguity_and_non_measurements(tmp_path: Path) -> None:
    _set_folder(tmp_path, 2, [0, 1])
    _set_folder(tmp_path, 4, [0, 1, 2, 3])
    with pytest.raises(IncFormatError, match=r"several measurement sets.*world 2.*world 4"):
        discover_measurement_files(tmp_path)
    with pytest.raises(IncFormatError, match="not an INC measurement"):
        discover_measurement_files(tmp_path / "p_hooks_maxabs_MAXABS_HW_0_2.json")
    with pytest.raises(IncFileNotFoundError, match="no INC measurement files"):
        discover_measurement_files(tmp_path / "other")
    _rank_file(tmp_path / "s", "q", -1, 1, {"m": {"inputs": [[[1.0]]]}})
    _rank_file(tmp_path / "s", "q", 0, 1, {"m": {"inputs": [[[1.0]]]}})
    with pytest.raises(IncFormatError, match="ambiguous"):
        discover_measurement_files(tmp_path / "s")
