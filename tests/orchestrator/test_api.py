"""The INC-style API end to end on one card: the stats store, INC files, scales, selection, accuracy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import orchestrator
from orchestrator import api
from orchestrator.errors import ConfigError
from shards.quantized.swap import MissingMeasurementError
from shards.fp8.numerics import ScaleDevice
from shards.quantized.modules import QuantLinear
from shards.fp8.methods import PREDEFINED
from shards.fp8.scale_math import ScaleContext, activation_scale
from shards.fp8.weight_scales import weight_scale
from stats_store.errors import IncFileExistsError, RunMismatchError
from stats_store.zarr_store import ZarrStatsStore
from tests.models import llama_tokens, sequential_batches, tiny_llama, tiny_sequential
from tests.s3_server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)

INC_FILES = ["measure_hooks_maxabs.json", "measure_hooks_maxabs.npz", "measure_hooks_maxabs_mod_list.json"]


def cfg(root: Path | str, **extra: object) -> dict[str, object]:
    """``root`` is a local directory or an ``s3://bucket`` URL."""
    return {"mode": "AUTO", "scale_method": "maxabs_pow2", "dump_stats_path": f"{root}/out/measure", **extra}


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The root of ``dump_stats_path``: a local directory, or a fresh bucket on the S3 test server."""
    return str(tmp_path) if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"


def store_of(tmp_path: Path) -> Path:
    return tmp_path / "out" / "measure.zarr"


def calibrate(model: nn.Module, config: dict[str, object], batches: list[torch.Tensor], **kwargs: bool):  # type: ignore[no-untyped-def]
    """prepare → forwards → finalize_calibration, as a user script does."""
    orchestrator.prepare(model, config)
    with torch.no_grad():
        for x in batches:
            model(x)
    return orchestrator.finalize_calibration(model, **kwargs)


def captured_amax(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, float]:
    """torch.amax over the inputs each module receives, captured with plain hooks on a copy."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach()))
               for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {n: float(torch.stack([x.abs().amax() for x in xs]).amax()) for n, xs in seen.items()}


@pytest.mark.parametrize("method", ["maxabs_pow2", "maxabs_arbitrary", "act_maxabs_pow2_weights_pcs_maxabs_pow2"])
def test_scales_match_the_numeric_core_on_independent_stats(tmp_path: Path, method: str) -> None:
    batches = sequential_batches(0, 3)
    expected_amax = captured_amax(tiny_sequential(), ["0", "2", "4"], batches)
    model = orchestrator.quantize(tiny_sequential(), cfg(tmp_path, scale_method=method), batches)
    nodes = orchestrator.scales_of(model)
    spec, ctx, ref = PREDEFINED[method.upper()], ScaleContext(), tiny_sequential()
    for name in ["0", "2", "4"]:
        s_in = activation_scale(expected_amax[name], spec.activation, ctx)
        s_w = weight_scale(ref.get_submodule(name).weight, spec.weight, ctx)
        node = nodes[name]
        assert node["inputs"] == [float(s_in)]
        if s_w.numel() == 1:
            assert node["params"] == {"weight": float(s_w)} and node["outputs"] == [float(s_w * s_in)]
        else:
            assert node["params"]["weight"]["0"] == s_w.float().tolist()
            assert node["outputs"] == [(s_w * s_in).float().tolist()]
    # The store is the one place the measurement lives: no INC file unless asked for.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["measure.zarr"]


def test_store_holds_the_exact_amax_of_the_inputs(tmp_path: Path) -> None:
    batches = sequential_batches(4, 3)
    expected = captured_amax(tiny_sequential(), ["0", "2", "4"], batches)
    returned = calibrate(tiny_sequential(), cfg(tmp_path), batches)
    store = ZarrStatsStore.open(store_of(tmp_path))
    stored = store.read_reduced()
    ref = tiny_sequential()
    for name in ["0", "2", "4"]:
        st = stored.modules[name]
        assert st.inputs[0].tolist() == [np.float32(expected[name])]
        # Weights are measured per output channel.
        assert st.params["weight"].tolist() == ref.get_submodule(name).weight.detach().abs().amax(dim=1).tolist()
        assert st.num_samples == 3 and returned.modules[name].inputs[0].tolist() == st.inputs[0].tolist()
    assert (store.meta.dp, store.meta.tp, store.meta.device_kind, store.meta.observer) == (1, 1, "cpu", "maxabs")
    assert store.commits()[0].batch_ids == (0, 1, 2)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_inc_files_on_request(tmp_path: Path, scheme: str) -> None:
    calibrate(tiny_sequential(), cfg(f"{scheme}{tmp_path}"), sequential_batches(5, 2), inc_files=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*INC_FILES, "measure.zarr"])
    doc = json.loads((tmp_path / "out" / "measure_hooks_maxabs.json").read_text())
    assert doc["Mode"] == "DynamicRange" and sorted(doc["Nodes"]) == ["0", "2", "4"]
    assert "NumSamples" not in doc  # INC writes it only when dumping at an interval
    stored = ZarrStatsStore.open(store_of(tmp_path)).read_reduced()
    assert doc["Nodes"]["2"]["inputs"] == [[[float(stored.modules["2"].inputs[0][0])]]]


def test_two_step_flow_reads_the_store_back(tmp_path: Path) -> None:
    batches = sequential_batches(1, 2)
    one_step = orchestrator.quantize(tiny_sequential(), cfg(tmp_path / "a"), batches)
    model = orchestrator.prepare(tiny_sequential(), cfg(tmp_path / "b"))
    with torch.no_grad():
        for x in batches:
            model(x)
    m = orchestrator.finalize_calibration(model)
    assert sorted(m.modules) == ["0", "2", "4"]
    assert sorted(p.name for p in (tmp_path / "b" / "out").iterdir()) == ["measure.zarr"]
    # A fresh model, converted from the store alone (config given as a JSON path).
    path = tmp_path / "quant.json"
    path.write_text(json.dumps(cfg(tmp_path / "b")))
    fresh = orchestrator.convert(tiny_sequential(), path)
    assert orchestrator.scales_of(fresh) == orchestrator.scales_of(one_step)
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), one_step(x))


def test_blocked_module_stays_high_precision(tmp_path: Path) -> None:
    model = orchestrator.quantize(tiny_sequential(), cfg(tmp_path, blocklist={"names": ["^2$"]}), sequential_batches(2, 2))
    assert type(model[2]) is nn.Linear and isinstance(model[0], QuantLinear) and isinstance(model[4], QuantLinear)
    assert sorted(orchestrator.scales_of(model)) == ["0", "4"]


def test_missing_measurement_is_named_or_ignored(tmp_path: Path) -> None:
    model = orchestrator.prepare(tiny_sequential(), cfg(tmp_path, blocklist={"names": ["^2$"]}))
    with torch.no_grad():
        model(torch.randn(2, 32))
    orchestrator.finalize_calibration(model)
    with pytest.raises(MissingMeasurementError, match=rf"module\(s\) '2' in the stats store '{store_of(tmp_path)}'"):
        orchestrator.convert(tiny_sequential(), cfg(tmp_path))
    kept = orchestrator.convert(tiny_sequential(), cfg(tmp_path, ignore_modules_wo_measures=True))
    assert type(kept[2]) is nn.Linear and isinstance(kept[0], QuantLinear)


def test_no_measurement_files_at_all(tmp_path: Path) -> None:
    with pytest.raises(MissingMeasurementError, match="'0', '2', '4' in .*measure_hooks_maxabs.json"):
        orchestrator.convert(tiny_sequential(), cfg(tmp_path))
    with pytest.raises(MissingMeasurementError, match=f"in the stats store '{store_of(tmp_path)}' \\(none there\\)"):
        orchestrator.convert(tiny_sequential(), cfg(tmp_path))


def test_existing_measurement_is_not_overwritten(where: str) -> None:
    orchestrator.quantize(tiny_sequential(), cfg(where), sequential_batches(3, 1))
    model = tiny_sequential()
    # Refused at prepare, before any data runs; the model is left unobserved.
    with pytest.raises(FileExistsError, match=f"{where}/out/measure.zarr already holds a measurement.*overwrite=True"):
        orchestrator.quantize(model, cfg(where), sequential_batches(3, 1))
    assert model not in api._CALIBRATING and not model._forward_pre_hooks
    big = [x * 1000 for x in sequential_batches(3, 1)]
    orchestrator.quantize(tiny_sequential(), cfg(where), big, overwrite=True)
    stored = ZarrStatsStore.open(f"{where}/out/measure").read_reduced()
    assert stored.modules["0"].inputs[0].tolist() == [np.float32(captured_amax(tiny_sequential(), ["0"], big)["0"])]


def test_inc_files_are_never_overwritten(tmp_path: Path) -> None:
    calibrate(tiny_sequential(), cfg(tmp_path / "a"), sequential_batches(3, 1), inc_files=True)
    shutil.copytree(tmp_path / "a" / "out", tmp_path / "out", ignore=shutil.ignore_patterns("*.zarr"))
    with pytest.raises(FileExistsError, match="measure_hooks_maxabs"):
        calibrate(tiny_sequential(), cfg(tmp_path), sequential_batches(3, 1), inc_files=True)


def test_unit_scale_needs_no_data(tmp_path: Path) -> None:
    model = orchestrator.quantize(tiny_sequential(), cfg(tmp_path, scale_method="unit_scale"))
    assert orchestrator.scales_of(model)["0"] == {"inputs": [1.0], "outputs": [1.0], "params": {"weight": 1.0}}
    assert not (tmp_path / "out").exists()


def test_finalize_without_prepare() -> None:
    with pytest.raises(orchestrator.CalibrationStateError, match="prepare"):
        orchestrator.finalize_calibration(tiny_sequential())


def test_llama_maxabs_pow2_keeps_top1_agreement(tmp_path: Path) -> None:
    reference, model = tiny_llama(0), tiny_llama(0)
    calib = [llama_tokens(i, 2, 32) for i in range(4)]
    orchestrator.quantize(model, cfg(tmp_path, allowlist={"types": ["Linear", "Matmul", "Softmax", "KVCache"]}), calib)
    nodes = orchestrator.scales_of(model)
    # every Linear, both attention matmuls, softmax, KV caches; not the lm_head tied to the embedding
    assert len(nodes) == 2 * (7 + 5) and "lm_head" not in nodes
    assert "model.layers.1.self_attn.matmul_qk" in nodes
    tokens = llama_tokens(100, 4, 64)  # 256 positions
    with torch.no_grad():
        ref_logits, q_logits = reference(tokens).logits, model(tokens).logits
    assert not torch.equal(ref_logits, q_logits)
    agreement = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.95


def test_dynamic_per_token_needs_no_measurement(tmp_path: Path) -> None:
    model = orchestrator.quantize(tiny_sequential(), cfg(tmp_path, scale_method="maxabs_pcs_pow2", dynamic_quantization=True))
    node = orchestrator.scales_of(model)["0"]
    ref = weight_scale(tiny_sequential()[0].weight, PREDEFINED["MAXABS_PCS_POW2"].weight, ScaleContext())
    assert node["inputs"] == [] and node["params"]["weight"]["0"] == ref.float().tolist()
    assert model[0].qctx.dynamic and not (tmp_path / "out").exists()


def test_inc_files_are_imported_when_there_is_no_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    batches = sequential_batches(6, 2)
    one_step = orchestrator.quantize(tiny_sequential(), cfg(tmp_path / "a"), batches)
    calibrate(tiny_sequential(), cfg(tmp_path), batches, inc_files=True)
    shutil.rmtree(store_of(tmp_path))  # what a user coming from INC has: its files only
    with caplog.at_level(logging.WARNING, logger="orchestrator.api"):
        fresh = orchestrator.convert(tiny_sequential(), cfg(tmp_path))
    assert f"no stats store at {store_of(tmp_path)}; importing INC measurement files" in caplog.text
    assert "measure_hooks_maxabs.json" in caplog.text
    assert orchestrator.scales_of(fresh) == orchestrator.scales_of(one_step)
    assert not store_of(tmp_path).exists()  # importing reads the files, it writes nothing


@pytest.mark.parametrize(
    "other",
    [pytest.param(lambda: tiny_sequential(1), id="other-weights"),
     pytest.param(lambda: tiny_sequential(0, dtype=torch.bfloat16), id="other-dtype"),
     pytest.param(lambda: tiny_sequential(0, width=48), id="other-shapes")],
)
def test_store_of_another_model_is_refused(tmp_path: Path, other) -> None:  # type: ignore[no-untyped-def]
    calibrate(tiny_sequential(0), cfg(tmp_path), sequential_batches(7, 1))
    model = other()
    with pytest.raises(RunMismatchError, match=f"{store_of(tmp_path)} holds statistics of another model"):
        orchestrator.convert(model, cfg(tmp_path))
    assert type(model[0]) is nn.Linear  # refused before anything was converted


def test_interval_dumps_stream_into_the_store(tmp_path: Path) -> None:
    batches = sequential_batches(8, 5)
    config = cfg(tmp_path, calibration_sample_interval=2)
    model = orchestrator.prepare(tiny_sequential(), config)
    with torch.no_grad():
        for x in batches[:4]:
            model(x)
    # Two flushes so far, each with the ids of its own forwards; readable before finalize.
    store = ZarrStatsStore.open(store_of(tmp_path))
    assert store.commits()[0].batch_ids == (0, 1, 2, 3) and store.commits()[0].generation == 2
    first4 = captured_amax(tiny_sequential(), ["0", "4"], batches[:4])
    assert store.read_shard(0).modules["4"].inputs[0].tolist() == [np.float32(first4["4"])]
    with torch.no_grad():
        model(batches[4])
    m = orchestrator.finalize_calibration(model, inc_files=True)
    all5 = captured_amax(tiny_sequential(), ["0", "4"], batches)
    stored = ZarrStatsStore.open(store_of(tmp_path)).read_reduced()
    assert stored.modules["0"].inputs[0].tolist() == [np.float32(all5["0"])]
    # Counts are added per flush, never re-counted: 5 forwards in all.
    assert stored.modules["0"].num_samples == 5 and stored.num_samples == 5 and m.num_samples == 5
    assert ZarrStatsStore.open(store_of(tmp_path)).commits()[0].batch_ids == (0, 1, 2, 3, 4)
    assert json.loads((tmp_path / "out" / "measure_hooks_maxabs.json").read_text())["NumSamples"] == 5


def test_scale_file_only_on_request_and_never_overwritten(tmp_path: Path) -> None:
    batches = sequential_batches(9, 2)
    amax = captured_amax(tiny_sequential(), ["0"], batches)
    orchestrator.quantize(tiny_sequential(), cfg(tmp_path), batches)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["measure.zarr"]
    model = orchestrator.convert(tiny_sequential(), cfg(tmp_path), inc_scale_file=True)
    scale_json = tmp_path / "out" / "measure_hooks_maxabs_MAXABS_POW2.json"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "measure.zarr", "measure_hooks_maxabs_MAXABS_POW2.json", "measure_hooks_maxabs_MAXABS_POW2.npz"]
    doc = json.loads(scale_json.read_text())
    spec, ref = PREDEFINED["MAXABS_POW2"], tiny_sequential()
    assert doc["Nodes"]["0"]["inputs"] == [float(activation_scale(amax["0"], spec.activation, ScaleContext()))]
    assert doc["Nodes"]["0"]["params"] == {"weight": float(weight_scale(ref[0].weight, spec.weight, ScaleContext()))}
    assert doc["Nodes"] == orchestrator.scales_of(model)
    before = scale_json.read_bytes()
    again = tiny_sequential()
    with pytest.raises(IncFileExistsError, match="measure_hooks_maxabs_MAXABS_POW2.json"):
        orchestrator.convert(again, cfg(tmp_path), inc_scale_file=True)
    assert scale_json.read_bytes() == before and type(again[0]) is nn.Linear  # refused before converting


def test_scalar_scales_survive_state_dict_load(tmp_path: Path) -> None:
    source = orchestrator.quantize(tiny_sequential(), cfg(tmp_path / "a"), sequential_batches(10, 2))
    # Same architecture, other calibration data: other input scales before the load.
    target = orchestrator.quantize(tiny_sequential(), cfg(tmp_path / "b"), [x * 100 for x in sequential_batches(10, 2)])
    assert isinstance(target[0].scale_input_0, float)
    assert orchestrator.scales_of(target) != orchestrator.scales_of(source)
    target.load_state_dict(source.state_dict())
    assert orchestrator.scales_of(target) == orchestrator.scales_of(source)
    x = torch.randn(4, 32) * 3
    assert torch.equal(target(x), source(x))


def test_device_for_scales_defaults_to_the_detected_gaudi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = cfg(tmp_path, scale_method="maxabs_hw")
    batches = sequential_batches(11, 2)
    amax = captured_amax(tiny_sequential(), ["0"], batches)
    if api.detect_gaudi() is None:  # off Gaudi: HW-aligned scales need device_for_scales
        with pytest.raises(ConfigError, match="device_for_scales"):
            orchestrator.quantize(tiny_sequential(), config, batches)
    monkeypatch.setattr(api, "detect_gaudi", lambda: ScaleDevice.GAUDI2)
    model = orchestrator.quantize(tiny_sequential(), cfg(tmp_path / "g", scale_method="maxabs_hw"), batches)
    ctx = ScaleContext(device=ScaleDevice.GAUDI2)
    assert model[0].qctx.scale_ctx.device is ScaleDevice.GAUDI2 and model[0].qctx.fmt.fullscale == 240.0
    expected = activation_scale(amax["0"], PREDEFINED["MAXABS_HW"].activation, ctx)
    assert orchestrator.scales_of(model)["0"]["inputs"] == [float(expected)]


def test_hf_model_two_step_flow_reads_the_store_back(tmp_path: Path) -> None:
    calib = [llama_tokens(i, 2, 16) for i in range(2)]
    one_step = orchestrator.quantize(tiny_llama(0), cfg(tmp_path / "a"), calib)
    calibrate(tiny_llama(0), cfg(tmp_path / "b"), calib)  # fresh model objects on both sides
    fresh = orchestrator.convert(tiny_llama(0), cfg(tmp_path / "b"))
    assert orchestrator.scales_of(fresh) == orchestrator.scales_of(one_step)
    tokens = llama_tokens(50, 2, 16)
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, one_step(tokens).logits)


def test_default_selection_on_a_hf_model_is_incs(tmp_path: Path) -> None:
    """Decisions §6: with an empty allowlist a plain HF model gets what INC selects there, its Linear
    layers (attention is functions in HF, not modules); the attention ops only when asked for. The one
    documented difference: an lm_head tied to the embedding stays high precision."""
    model = tiny_llama(0)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    orchestrator.quantize(model, cfg(tmp_path), [llama_tokens(1, 2, 16)])
    assert set(orchestrator.scales_of(model)) == linears
    assert not any(n.endswith(("matmul_qk", "k_cache", "softmax")) for n, _ in model.named_modules())
    asked = orchestrator.quantize(tiny_llama(0), cfg(tmp_path / "kv", allowlist={"types": ["KVCache"]}),
                                  [llama_tokens(1, 2, 16)])
    assert set(orchestrator.scales_of(asked)) == {f"model.layers.{i}.self_attn.{c}" for i in range(2)
                                                  for c in ("k_cache", "v_cache")}
