"""Every ``stats-store`` command against real zarr stores built from known statistics, in a local
directory and on a real S3-protocol server (moto on 127.0.0.1, ``tests.s3_server``)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stats_store.records import Measurement, ModuleStats
from orchestrator.entry.stats_store_cli import build_parser, main
from stats_store.inc_unify import discover_measurement_files, read_measurement_set
from stats_store.zarr_store import ZarrStatsStore
from stats_store.metadata import RunMeta
from stats_store.shard_map import ShardSpec
from tests.s3_server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from tests.stats_store.test_store import LINEARS, MATMUL, PROJECT_ROOT, assert_same_stats, reference, write_all

BATCHES = [0, 1, 2, 3]
COMMANDS = ["ls", "show", "diff", "coverage", "reduce", "scales", "export-inc", "import-inc", "plot"]


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the stores go: a local directory, or a prefix in a fresh bucket of the S3 test server."""
    return str(tmp_path / "runs") if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/runs"


@pytest.fixture
def tp2_store(root: str) -> str:
    """A reduced dp=1 x tp=2 store of the reference statistics (seed 0)."""
    store = ZarrStatsStore.open_run(f"{root}/a", RunMeta("cfg", "fp", tp=2))
    write_all(store, 0, BATCHES, 1, 2)
    store.reduce()
    return f"{root}/a.zarr"


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: stats-store {command}" in capsys.readouterr().out


def test_the_parser_knows_exactly_these_commands() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)  # type: ignore[union-attr]


def test_installed_entry_point_runs() -> None:
    done = subprocess.run([str(PROJECT_ROOT / ".venv" / "bin" / "stats-store"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "export-inc" in done.stdout and "coverage" in done.stdout


def test_ls_lists_run_shards_and_modules(tp2_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "ls", str(tp2_store))
    ref = reference(0, BATCHES)
    assert d["topology"] == {"dp": 1, "tp": 2} and d["reduced"] == "current" and d["num_samples"] == 4
    assert [s["shard"] for s in d["shards"]] == [0, 1] and all(s["batches_done"] == 4 for s in d["shards"])
    assert {m["name"]: m["num_samples"] for m in d["modules"]} == {n: 4 for n in ref.modules}
    want_max = {n: max(float(v.max()) for v in s.tensors().values()) for n, s in ref.modules.items()}
    assert {m["name"]: m["max"] for m in d["modules"]} == pytest.approx(want_max, rel=0, abs=0)
    assert main(["ls", str(tp2_store)[: -len(".zarr")]]) == 0  # the dump_stats_path works too
    out = capsys.readouterr().out
    assert MATMUL in out and "dp=1 tp=2" in out


def test_ls_of_a_directory_lists_every_store(root: str, tp2_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    other = ZarrStatsStore.open_run(f"{root}/b", RunMeta("cfg-b", "fp"))
    write_all(other, 1, [0], 1, 1)  # committed, not reduced
    d = run_json(capsys, "ls", root)
    assert [(Path(r["store"]).name, r["reduced"]) for r in d["runs_in_directory"]] == [("a.zarr", "current"), ("b.zarr", "stale")]


def test_show_gives_global_and_per_shard_values(tp2_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    name = LINEARS[0][0]
    d = run_json(capsys, "show", str(tp2_store), name)
    ref = reference(0, BATCHES).modules[name]
    assert d["tensors"]["params.weight"]["values"] == ref.params["weight"].tolist()
    weights = [s for s in d["shards"] if s["tensor"] == "params.weight"]
    assert [s["slice"] for s in weights] == [[0, 3, 6], [3, 6, 6]]
    assert weights[1]["values"] == ref.params["weight"][3:].tolist()
    assert main(["show", str(tp2_store), "mlp.up"]) == 2
    assert "no committed module 'mlp.up'; did you mean" in capsys.readouterr().err


def test_diff_reports_ratios_top_changes_and_missing_modules(root: str, tp2_store: str, capsys) -> None:
    ref = reference(0, BATCHES)
    b = ZarrStatsStore.open_run(f"{root}/b", RunMeta("cfg", "fp"))
    changed = Measurement(modules={
        name: ModuleStats(name, s.op_type, [v * 2 if i == 0 else v for i, v in enumerate(s.inputs)], s.outputs, s.params, s.num_samples)
        for name, s in ref.modules.items() if name != MATMUL
    })
    changed.modules["extra.module"] = ModuleStats("extra.module", "linear", [np.array([1.0], np.float32)], None, {}, 1)
    b.commit(b.write_shard(ShardSpec(0, 1), changed, [0]))
    d = run_json(capsys, "diff", str(tp2_store), f"{root}/b", "--top", "2")
    assert d["only_in_a"] == [MATMUL] and d["only_in_b"] == ["extra.module"]
    assert [(c["tensor"], c["min_ratio"], c["max_ratio"]) for c in d["top"]] == [("inputs.0", 2.0, 2.0)] * 2
    assert {c["module"] for c in d["top"]} == {n for n, _, _ in LINEARS}
    assert d["compared"] == 6  # 2 linears x 3 tensors


def test_coverage_lists_unobserved_modules_and_experts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ZarrStatsStore.open_run(tmp_path / "moe", RunMeta("cfg", "fp"))
    one = np.array([1.0], np.float32)
    m = Measurement(modules={
        "moe": ModuleStats("moe", "dynamic_moe", [one], [one, one, np.zeros(1, np.float32), one, np.zeros(1, np.float32)], {}, 3),
        "idle": ModuleStats("idle", "linear", [np.array([np.nan], np.float32)], None, {"weight": one}, 0),
        "fine": ModuleStats("fine", "linear", [one], None, {"weight": one}, 3),
    })
    store.commit(store.write_shard(ShardSpec(0, 1), m, [0]))
    expect = tmp_path / "mods.json"
    expect.write_text(json.dumps(["moe", "idle", "fine", "never.called"]))
    d = run_json(capsys, "coverage", str(tmp_path / "moe"), "--expect", str(expect))
    assert d["uncovered"] == [
        {"module": "never.called", "problem": "not measured"},
        {"module": "moe", "problem": "experts with no observations: [1, 3]"},
        {"module": "idle", "problem": "0 samples"},
        {"module": "idle", "problem": "inputs.0: no value"},
    ]
    assert main(["coverage", str(tmp_path / "moe"), "--fail"]) == 1
    capsys.readouterr()


def _expert_measurement(tokens: dict[str, dict[int, int]], projs: tuple[str, ...]) -> Measurement:
    """Each listed expert of each layer measured with its token count on every projection."""
    m = Measurement()
    for layer, experts in tokens.items():
        for e, n in experts.items():
            for proj in projs:
                name = f"{layer}.experts.{e}.{proj}"
                m.modules[name] = ModuleStats(name, "linear", [np.array([float(n)], np.float32)], None,
                                              {"weight": np.ones(1, np.float32)}, 2, num_tokens=n)
    return m


def test_coverage_lists_idle_experts_per_layer_with_every_experts_tokens(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    qwen, mixtral = "model.layers.3.mlp", "model.layers.5.block_sparse_moe"
    m = _expert_measurement({qwen: {0: 120, 1: 4, 2: 340}}, ("gate_proj", "up_proj", "down_proj"))
    m.modules.update(_expert_measurement({mixtral: {1: 9}}, ("w1", "w3", "w2")).modules)
    shared = f"{qwen}.shared_experts.gate_proj"  # a shared expert is not routed: a plain module
    m.modules["model.layers.3.self_attn.q_proj"] = ModuleStats("model.layers.3.self_attn.q_proj", "linear",
                                                               [np.ones(1, np.float32)], None, {}, 2, num_tokens=64)
    store = ZarrStatsStore.open_run(tmp_path / "moe", RunMeta("cfg", "fp"))
    store.commit(store.write_shard(ShardSpec(0, 1), m, [0]))
    store.reduce()
    # Qwen layer: 6 experts selected, 3 and 5 never called; Mixtral layer: 3 experts, 0 and 2 idle.
    selected = ["model.layers.3.self_attn.q_proj", shared, "lm_head"]
    selected += [f"{qwen}.experts.{e}.{p}" for e in range(6) for p in ("gate_proj", "up_proj", "down_proj")]
    selected += [f"{mixtral}.experts.{e}.{p}" for e in range(3) for p in ("w1", "w3", "w2")]
    store.record_selected(selected)
    d = run_json(capsys, "coverage", str(tmp_path / "moe"))
    assert d["selected"] == len(selected) and d["inventory"] == "recorded" and d["tokens_recorded"]
    assert d["unmeasured"] == [shared, "lm_head"]
    assert d["experts"] == [
        {"layer": qwen, "experts": 6, "idle": [3, 4, 5],
         "tokens": {"0": 120, "1": 4, "2": 340, "3": 0, "4": 0, "5": 0},
         "summary": "experts 3, 4, 5 (0 tokens); busiest 2 (340 tokens)"},
        {"layer": mixtral, "experts": 3, "idle": [0, 2], "tokens": {"0": 0, "1": 9, "2": 0},
         "summary": "experts 0, 2 (0 tokens); busiest 1 (9 tokens)"},
    ]
    assert d["uncovered"] == [
        {"module": shared, "problem": "not measured"},
        {"module": "lm_head", "problem": "not measured"},
        {"module": qwen, "problem": "experts with no token: [3, 4, 5] (of 6)"},
        {"module": mixtral, "problem": "experts with no token: [0, 2] (of 3)"},
    ]
    assert main(["coverage", str(tmp_path / "moe"), "--fail"]) == 1
    out = capsys.readouterr().out
    assert "experts 3, 4, 5 (0 tokens); busiest 2 (340 tokens)" in out and "5:0" in out


def test_coverage_without_an_inventory_infers_the_experts_of_each_layer(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    layers = {f"model.layers.{i}.mlp": {0: 5, 1: 0, 3: 8} for i in (1, 2)}
    layers["model.layers.1.mlp"][2] = 1
    store = ZarrStatsStore.open_run(tmp_path / "inf", RunMeta("cfg", "fp"))
    store.commit(store.write_shard(ShardSpec(0, 1), _expert_measurement(layers, ("gate_proj",)), [0]))
    d = run_json(capsys, "coverage", str(tmp_path / "inf"))
    assert d["selected"] is None and d["experts_inferred"]
    # Expert 1 was called on empty inputs only (0 tokens): idle too. Layer 2 never called expert 2.
    assert [(e["layer"], e["idle"], e["tokens"]) for e in d["experts"]] == [
        ("model.layers.1.mlp", [1], {"0": 5, "1": 0, "2": 1, "3": 8}),
        ("model.layers.2.mlp", [1, 2], {"0": 5, "1": 0, "2": 0, "3": 8}),
    ]


def test_reduce_makes_the_reduced_arrays_current(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = ZarrStatsStore.open_run(f"{root}/r", RunMeta("cfg", "fp", dp=2))
    write_all(store, 2, BATCHES, 2, 1)
    assert not store.reduced_is_current()
    d = run_json(capsys, "reduce", f"{root}/r")
    assert d["generations"] == {"0": 1, "1": 1} and d["num_samples"] == 4
    assert_same_stats(ZarrStatsStore.open(f"{root}/r").read_reduced(), reference(2, BATCHES))


def test_missing_store_is_one_clear_line(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", f"{root}/nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stats-store ls: no stats store at") and err.count("\n") == 1


def _pow2_ok(scale: float, maxabs: float, fullscale_backoff: float) -> bool:
    """A POW2 scale is a power of two with maxabs/scale in (fsb/2, fsb] (bf16 rounding allowed)."""
    exponent = math.log2(scale)
    ratio = maxabs / scale
    return exponent == int(exponent) and fullscale_backoff / 2 * (1 - 2**-7) < ratio <= fullscale_backoff * (1 + 2**-7)


def test_scales_from_stored_maxabs(tp2_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "scales", str(tp2_store), "--method", "maxabs_pow2", "--out", str(tmp_path / "inc" / "m"))
    ref = reference(0, BATCHES)
    assert d["method"] == "MAXABS_POW2" and d["errors"] == []
    for name, node in d["nodes"].items():
        s = ref.modules[name]
        for i, v in enumerate(s.inputs):
            assert _pow2_ok(node["inputs"][i], float(v.max()), 448 * 0.25), (name, i)
        if "weight" in s.params:
            assert _pow2_ok(node["params"]["weight"], float(s.params["weight"].max()), 448 * 0.5), name
            assert node["outputs"][0] == pytest.approx(node["params"]["weight"] * node["inputs"][0], rel=0)
    written = [Path(p).name for p in d["written"]]
    assert written == ["m_hooks_maxabs_MAXABS_POW2.json", "m_hooks_maxabs_MAXABS_POW2.npz"]


def test_scales_that_need_a_gaudi_report_each_module(tp2_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scales", str(tp2_store), "--method", "maxabs_hw", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert {e["module"] for e in d["errors"]} == set(reference(0, BATCHES).modules)
    assert main(["scales", str(tp2_store), "--method", "maxabs_hw", "--device", "gaudi2", "--json"]) == 0
    hw = json.loads(capsys.readouterr().out)
    assert all(node["inputs"][0] in {16.0**k for k in range(-2, 2)} for node in hw["nodes"].values())


@pytest.mark.parametrize("world", [1, 2, 4])
def test_export_inc_then_import_gives_back_the_global_stats(
    root: str, tp2_store: str, tmp_path: Path, world: int, capsys: pytest.CaptureFixture[str]
) -> None:
    d = run_json(capsys, "export-inc", str(tp2_store), "--out", str(tmp_path / "inc" / "m"), "--world", str(world))
    files = discover_measurement_files(tmp_path / "inc" / "m_hooks_maxabs")
    assert [f.name for f in files] == [f"m_hooks_maxabs_{r}_{world}.json" for r in range(world)]
    assert len(d["written"]) == 3 * world
    ref = reference(0, BATCHES)
    back = read_measurement_set(files)
    for name, s in ref.modules.items():
        for label, value in s.tensors().items():
            np.testing.assert_array_equal(back.modules[name].tensors()[label], value, err_msg=f"{name} {label}")
    # import-inc keeps each rank file as a shard and reduces them.
    d = run_json(capsys, "import-inc", str(files[0]), f"{root}/imported")
    assert d["files"] == [str(f) for f in files] and d["store"] == f"{root}/imported.zarr"
    imported = ZarrStatsStore.open(f"{root}/imported")
    assert imported.meta.tp == world and set(imported.commits()) == set(range(world))
    got = imported.read_reduced()
    for name, s in ref.modules.items():
        for label, value in s.tensors().items():
            np.testing.assert_array_equal(got.modules[name].tensors()[label], value, err_msg=f"{name} {label}")


def test_export_inc_can_cut_split_channels_per_rank(tp2_store: str, tmp_path: Path, capsys) -> None:
    run_json(capsys, "export-inc", str(tp2_store), "--out", str(tmp_path / "m"), "--world", "2", "--split-channels")
    ref = reference(0, BATCHES).modules[LINEARS[0][0]].params["weight"]
    rank1 = json.loads((tmp_path / "m_hooks_maxabs_1_2.json").read_text())["Nodes"][LINEARS[0][0]]["params"]["weight"]
    np.testing.assert_array_equal(np.asarray(rank1, np.float32).reshape(-1), ref[3:])


def test_plot_writes_png_files(tp2_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "plot", str(tp2_store), "--out", str(tmp_path / "png"), "--module", LINEARS[1][0])
    names = [Path(p).name for p in d["written"]]
    assert names == ["layer_maxabs.png"] + [f"{LINEARS[1][0]}__{lb}.png" for lb in ("inputs.0", "outputs.0", "params.weight")]
    for p in d["written"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
