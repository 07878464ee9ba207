"""Fp8Config: INC keys, values and defaults; refusals; dict-form scale_method; backoffs; RunPlan.

Expected values are written out from the reference (inc-fp8-semantics.md §1, §2.4) and
project-decisions.md §1, never taken from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.configuration.fp8_config import FOREIGN_KEYS, Fp8Config
from orchestrator.errors import ConfigError, ConfigFileNotFoundError, Fp8OrchestratorError
from shards.fp8.numerics import HpDtype, LpDtype, ScaleDevice
from shards.plan import MeasureExclude, Mode, ScaleFormat
from shards.fp8.methods import Granularity, Rounding, ValueType

LOGGER = "orchestrator.configuration.fp8_config"

# project-decisions §1 defaults, as INC JSON. A hand-written literal: to_dict() must equal it.
DEFAULT_DICT: dict[str, Any] = {
    "mode": "QUANTIZE",
    "observer": "maxabs",
    "dump_stats_path": "stats",
    "fp8_config": "E4M3",
    "hp_dtype": "BF16",
    "scale_method": "unit_scale",
    "scale_params": {},
    "allowlist": {"names": [], "types": []},
    "blocklist": {"names": [], "types": []},
    "mod_dict": {},
    "measure_exclude": "OUTPUT",
    "scale_format": "SCALAR",
    "use_qdq": False,
    "fake_quant": False,
    "dynamic_quantization": False,
    "recalc_scales": False,
    "ignore_modules_wo_measures": False,
    "measure_on_hpu": True,
    "seperate_measure_files": True,
    "row_parallel_linear_allreduce_quantization": False,
    "calibration_sample_interval": 0,
}

# Shapes of INC's sample configs (optimum-habana quantization_config/), written by hand.
MAXABS_MEASURE = {
    "method": "HOOKS",
    "mode": "MEASURE",
    "observer": "maxabs",
    "allowlist": {"types": [], "names": []},
    "blocklist": {"types": [], "names": []},
    "dump_stats_path": "./hqt_output/measure",
    "dump_stats_xlsx_path": "./hqt_output/measure/fp8stats.xlsx",
}
MAXABS_QUANT = {
    "method": "HOOKS",
    "mode": "QUANTIZE",
    "observer": "maxabs",
    "scale_method": "maxabs_hw",
    "allowlist": {"types": [], "names": []},
    "blocklist": {"types": [], "names": []},
    "dump_stats_path": "./hqt_output/measure",
}
PCS_OPT_QUANT = {
    "method": "HOOKS",
    "mode": "QUANTIZE",
    "observer": "maxabs",
    "scale_method": "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2",
    "allowlist": {"types": [], "names": []},
    "blocklist": {"types": [], "names": ["lm_head"]},
    "dump_stats_path": "./hqt_output/measure",
}
POW2_DICT = {"default": {"weight": {"rounding_method": "POW2"}, "activation": {"rounding_method": "POW2"}}}


def _write(tmp_path: Path, data: Any, name: str = "cfg.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- defaults


def test_defaults_are_the_decisions_page_defaults() -> None:
    cfg = Fp8Config()
    assert cfg.to_dict() == DEFAULT_DICT
    assert cfg.scale_params.input_backoff == 0.25 and cfg.scale_params.weight_backoff == 0.5
    assert cfg.scale_plan().name == "UNIT_SCALE"


def test_config_hash_is_sha256_of_the_canonical_json() -> None:
    canonical = json.dumps(DEFAULT_DICT, sort_keys=True, separators=(",", ":"))
    assert Fp8Config().config_hash() == hashlib.sha256(canonical.encode()).hexdigest()


# ------------------------------------------------------------------------ INC's sample configs


def test_sample_maxabs_measure(tmp_path: Path) -> None:
    cfg = Fp8Config.from_json(_write(tmp_path, MAXABS_MEASURE))
    assert cfg.mode is Mode.MEASURE and cfg.observer == "maxabs"
    assert cfg.dump_stats_path == "./hqt_output/measure"
    plan = cfg.to_plan()
    assert plan.mode is Mode.MEASURE and plan.selection.allow.is_empty and plan.selection.block.is_empty


def test_sample_maxabs_quant(tmp_path: Path) -> None:
    cfg = Fp8Config.from_json(_write(tmp_path, MAXABS_QUANT))
    method = cfg.scale_plan().default
    assert cfg.scale_plan().name == "MAXABS_HW"
    assert (method.weight.rounding, method.weight.backoff) == (Rounding.HW_ALIGNED, 0.5)
    assert (method.activation.rounding, method.activation.backoff) == (Rounding.HW_ALIGNED, 0.25)
    assert cfg.to_plan(hpu_device=ScaleDevice.GAUDI2).device_for_scales is ScaleDevice.GAUDI2


def test_sample_pcs_opt_quant(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = Fp8Config.from_json(_write(tmp_path, PCS_OPT_QUANT))
    weight = cfg.scale_plan().default.weight
    assert (weight.granularity, weight.value_type, weight.rounding) == (Granularity.PCS, ValueType.OPT, Rounding.POW2)
    assert weight.candidates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # 2^-3 .. 2^4
    assert cfg.effective_scale_format is ScaleFormat.CONST  # PCS forces CONST
    assert any("CONST" in r.getMessage() for r in caplog.records)
    plan = cfg.to_plan()  # POW2 everywhere: no Gaudi needed
    assert plan.scale_format is ScaleFormat.CONST and plan.device_for_scales is None
    assert plan.selection.block.matches_name("model.lm_head")


# ----------------------------------------------------------------------- values as INC reads them


@pytest.mark.parametrize(("raw", "expected"), [(True, True), ("True", True), ("true", True), ("TRUE", True),
                                               (False, False), ("False", False), ("false", False)])
@pytest.mark.parametrize("key", ["use_qdq", "dynamic_quantization", "measure_on_hpu", "ignore_modules_wo_measures"])
def test_string_booleans(key: str, raw: object, expected: bool) -> None:
    extra = {"scale_method": "maxabs_pcs_pow2"} if key == "dynamic_quantization" and expected else {}
    assert getattr(Fp8Config.from_dict({key: raw, **extra}), key) is expected


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("mode", "measure", Mode.MEASURE),
        ("mode", "Auto", Mode.AUTO),
        ("mode", "load", Mode.LOAD),
        ("fp8_config", "e4m3", LpDtype.E4M3),
        ("fp8_config", "E5m2", LpDtype.E5M2),
        ("hp_dtype", "bf16", HpDtype.BF16),
        ("hp_dtype", "Fp32", HpDtype.FP32),
        ("scale_format", "const", ScaleFormat.CONST),
        ("measure_exclude", "none", MeasureExclude.NONE),
        ("device_for_scales", "Gaudi2", ScaleDevice.GAUDI2),
        ("device_for_scales", "gaudi3", ScaleDevice.GAUDI3),
        ("observer", "maxabs_per_channel", "maxabs_per_channel"),
        ("observer", "shape", "shape"),
        ("observer", "save", "save"),
    ],
)
def test_enums_in_any_case(key: str, raw: str, expected: object) -> None:
    assert getattr(Fp8Config.from_dict({key: raw}), key) == expected


@pytest.mark.parametrize("name", ["maxabs_hw", "MAXABS_HW", "Maxabs_Hw"])
def test_scale_method_any_case(name: str) -> None:
    assert Fp8Config.from_dict({"scale_method": name}).scale_plan().name == "MAXABS_HW"


def test_bare_dump_prefix_and_empty_path_load() -> None:
    assert Fp8Config.from_dict({"dump_stats_path": "stats"}).dump_stats_path == "stats"
    assert Fp8Config.from_dict({"dump_stats_path": ""}).dump_stats_path == ""


def test_foreign_keys_are_ignored_with_one_warning_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    foreign = {"method": "HOOKS", "quantize_weight": False, "dump_stats_xlsx_path": "x.xlsx",
               "int4_weights": "True", "_json_file": None}
    cfg = Fp8Config.from_dict({**foreign, "mode": "MEASURE"})
    assert cfg == Fp8Config.from_dict({"mode": "MEASURE"})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in foreign:
        assert sum(f"'{key}'" in m for m in warned) == 1, key
    assert set(foreign) == set(FOREIGN_KEYS)


def test_caller_dict_is_not_modified() -> None:
    raw = {"whitelist": {"types": ["Linear"]}, "method": "HOOKS", "scale_method": POW2_DICT}
    snapshot = json.loads(json.dumps(raw))
    Fp8Config.from_dict(raw)
    assert raw == snapshot


# ------------------------------------------------------------------------------ allow/block lists


def test_legacy_lists_merge_key_by_key_with_the_new_names() -> None:
    cfg = Fp8Config.from_dict({"whitelist": {"types": ["Linear"]}, "allowlist": {"names": ["mlp"]},
                               "blacklist": {"names": ["lm_head"]}})
    assert cfg.allowlist.types == ("Linear",) and cfg.allowlist.names == ("mlp",)
    assert cfg.blocklist.names == ("lm_head",) and cfg.blocklist.types == ()


def test_partial_list_keeps_the_default_other_half() -> None:
    cfg = Fp8Config.from_dict({"blocklist": {"names": ["lm_head"]}})
    assert cfg.blocklist.types == () and cfg.allowlist.names == ()


def test_selection_uses_regex_search_and_bare_types() -> None:
    rules = Fp8Config.from_dict(
        {"allowlist": {"types": ["torch.nn.Linear"], "names": []}, "blocklist": {"names": [r"layers\.1\.", "lm_head"]}}
    ).selection()
    assert rules.allow.types == ("Linear",)
    assert rules.block.matches_name("model.layers.1.mlp.up_proj")
    assert not rules.block.matches_name("model.layers.11.mlp.up_proj")
    assert rules.block.matches_name("lm_head")


# ---------------------------------------------------------------------------------- JSON files


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "trailing.json"
    path.write_text('{"mode": "MEASURE",}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"trailing\.json.*not valid JSON.*line 1"):
        Fp8Config.from_json(path)


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Fp8Config.from_json(tmp_path / "nope.json")
    assert issubclass(ConfigFileNotFoundError, Fp8OrchestratorError)


def test_errors_in_a_file_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'scale_method'.*uint_scale.*bad\.json"):
        Fp8Config.from_json(_write(tmp_path, {"scale_method": "uint_scale"}, "bad.json"))


def test_load_accepts_every_form(tmp_path: Path) -> None:
    path = _write(tmp_path, MAXABS_QUANT)
    from_path = Fp8Config.load(path)
    assert Fp8Config.load(str(path)) == from_path == Fp8Config.load(MAXABS_QUANT)
    assert Fp8Config.load(from_path) is from_path
    with pytest.raises(ConfigError, match="Fp8Config.load"):
        Fp8Config.load(42)  # type: ignore[arg-type]


def test_loading_touches_nothing_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = tmp_path / "measure"
    (tmp_path / "measure_hooks_maxabs.json").write_text("{}", encoding="utf-8")  # INC would back it up
    raw = {"mode": "MEASURE", "dump_stats_path": str(tmp_path / "new_dir" / "measure")}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"config loading touched the disk: {args}")

    for module, name in [(os, "makedirs"), (os, "mkdir"), (os, "rename"), (os, "replace"), (os, "remove"),
                         (os, "access"), (os, "listdir"), (os, "scandir"), (os.path, "exists"),
                         (os.path, "isdir"), (shutil, "move"), (Path, "mkdir"), (Path, "exists")]:
        monkeypatch.setattr(module, name, refuse)
    cfg = Fp8Config.from_dict(raw)
    cfg.to_plan()
    Fp8Config.from_dict({**raw, "dump_stats_path": str(prefix)}).to_plan()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measure_hooks_maxabs.json"]


# ----------------------------------------------------------------------------------- backoffs


@pytest.mark.parametrize(
    ("raw", "weight_backoff", "input_backoff"),
    [
        ({"scale_method": "maxabs_pow2"}, 0.5, 0.25),  # the method's own
        ({"scale_method": "maxabs_pow2", "scale_params": {}}, 0.5, 0.25),
        ({"scale_method": "maxabs_pow2", "scale_params": {"input_backoff": 1, "weight_backoff": 1}}, 1.0, 1.0),
        ({"scale_method": "maxabs_pow2", "scale_params": {"input_backoff": 0.5}}, 0.5, 0.5),
        ({"scale_method": "maxabs_arbitrary", "scale_params": {"weight_backoff": 0.75}}, 0.75, 0.25),
        # OPT weights take no backoff from scale_params; the MAXABS activation does.
        ({"scale_method": "maxabs_hw_opt_weight", "scale_params": {"weight_backoff": 0.125, "input_backoff": 0.5}},
         0.5, 0.5),
        # dynamic-only method: activation default 1.0 (reference §2.4)
        ({"scale_method": "maxabs_pcs_pow2", "dynamic_quantization": True}, 0.5, 1.0),
        # dict form: INC's 1.0 ...
        ({"scale_method": POW2_DICT}, 1.0, 1.0),
        # ... < explicit scale_params ...
        ({"scale_method": POW2_DICT, "scale_params": {"input_backoff": 0.25, "weight_backoff": 0.5}}, 0.5, 0.25),
        # ... < the section's own backoff
        ({"scale_method": {"default": {"weight": {"rounding_method": "POW2", "backoff": 0.375},
                                       "activation": {"rounding_method": "POW2", "backoff": 0.75}}},
          "scale_params": {"input_backoff": 0.25, "weight_backoff": 0.5}}, 0.375, 0.75),
    ],
)
def test_backoff_precedence(raw: dict[str, Any], weight_backoff: float, input_backoff: float) -> None:
    method = Fp8Config.from_dict(raw).scale_plan().default
    assert (method.weight.backoff, method.activation.backoff) == (weight_backoff, input_backoff)


@pytest.mark.parametrize(("params", "expected"), [({}, None), ({"output_backoff": 0.5}, 0.5)])
def test_output_backoff_only_when_given(params: dict[str, float], expected: float | None) -> None:
    cfg = Fp8Config.from_dict({"scale_method": "maxabs_pow2", "scale_params": params})
    assert cfg.scale_plan().output_backoff == expected


def test_scale_params_weight_scales_give_opt_candidates() -> None:
    cfg = Fp8Config.from_dict({"scale_method": "maxabs_pow2_opt_weight", "scale_params": {"weight_scales": [1, 0.5]}})
    assert cfg.scale_plan().default.weight.candidates == (1.0, 0.5)


# ------------------------------------------------------------------------ dict form (ref. §1.4)


def test_dict_form_falls_back_to_pts_maxabs_identity() -> None:
    plan = Fp8Config.from_dict({"scale_method": {"default": {}}}).scale_plan()
    assert plan.name == "MAXABS_ARBITRARY"
    weight = plan.default.weight
    assert (weight.granularity, weight.value_type, weight.rounding, weight.backoff) == (
        Granularity.PTS, ValueType.MAXABS, Rounding.IDENTITY, 1.0)


def test_dict_form_is_case_insensitive() -> None:
    raw = {"Default": {"Weight": {"Granularity": "pts", "Rounding_Method": "Pow2"},
                       "ACTIVATION": {"rounding_method": "pow2", "Scale_Value_Type": "maxabs"}}}
    assert Fp8Config.from_dict({"scale_method": raw}).scale_plan().name == "MAXABS_POW2"


def test_dict_form_overrides_fall_back_field_by_field_to_default() -> None:
    raw = {
        "default": {"weight": {"rounding_method": "POW2", "backoff": 0.5},
                    "activation": {"rounding_method": "POW2", "backoff": 0.25}},
        "nodes": {"model.layers.0.mlp.down_proj": {"weight": {"granularity": "PCS"}}},
        "layers": {"3": {"activation": {"backoff": 0.125}}},
        "layer_types": {"Conv2d": {"weight": {"granularity": "PCS", "scale_value_type": "OPT"}}},
    }
    plan = Fp8Config.from_dict({"scale_method": raw}).scale_plan()
    assert plan.name == "MAXABS_POW2"
    node = plan.for_module("model.layers.0.mlp.down_proj", "Linear")
    assert (node.weight.granularity, node.weight.rounding, node.weight.backoff) == (Granularity.PCS, Rounding.POW2, 0.5)
    layer3 = plan.for_module("model.layers.3.self_attn.q_proj", "Linear")
    assert (layer3.activation.backoff, layer3.weight.backoff) == (0.125, 0.5)
    conv = plan.for_module("unet.conv_in", "Conv2d")
    assert conv.weight.value_type is ValueType.OPT
    assert conv.weight.candidates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    assert plan.for_module("model.layers.4.mlp.up_proj", "Linear") == plan.default


def test_dict_form_params_give_candidates_and_int_layer_keys_work() -> None:
    raw = {"default": {"weight": {"granularity": "PCS", "scale_value_type": "OPT", "rounding_method": "POW2",
                                  "params": {"weight_scales": [0.5, 1, 2]}},
                       "activation": {"rounding_method": "POW2"}},
           "layers": {7: {"activation": {"backoff": 0.5}}}}
    plan = Fp8Config.from_dict({"scale_method": raw}).scale_plan()
    assert plan.name == "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2"
    assert plan.default.weight.candidates == (0.5, 1.0, 2.0)
    assert set(plan.layers) == {"7"}


def test_dict_form_forces_recalc_scales() -> None:
    assert Fp8Config.from_dict({"scale_method": POW2_DICT}).to_plan().recalc_scales is True
    assert Fp8Config.from_dict({"scale_method": "maxabs_pow2"}).to_plan().recalc_scales is False


# ----------------------------------------------------------------- validation and adjustments


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"scale_method": "maxabs_pow2"}, ScaleFormat.SCALAR),
        ({"scale_method": "act_maxabs_pow2_weights_pcs_maxabs_pow2"}, ScaleFormat.CONST),
        ({"scale_method": "maxabs_pow2", "fake_quant": "True"}, ScaleFormat.CONST),
        ({"scale_method": "maxabs_pcs_pow2", "dynamic_quantization": "True"}, ScaleFormat.CONST),
        ({"scale_method": "maxabs_pow2", "scale_format": "const"}, ScaleFormat.CONST),
    ],
)
def test_scale_format_adjustment(raw: dict[str, Any], expected: ScaleFormat, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cfg = Fp8Config.from_dict(raw)
    assert cfg.effective_scale_format is expected and cfg.to_plan().scale_format is expected
    changed = cfg.scale_format is not expected
    assert any("changed to CONST" in r.getMessage() for r in caplog.records) is changed


@pytest.mark.parametrize("method", ["maxabs_pow2", "maxabs_arbitrary", "maxabs_pcs_pow2",
                                    "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw"])
def test_dynamic_accepts_non_hw_maxabs_activations(method: str) -> None:
    # INC refuses only HW-aligned activations and fixed scales with dynamic (reference §1.3 step 6);
    # real configs use maxabs_pow2 per tensor.
    assert Fp8Config.from_dict({"scale_method": method, "dynamic_quantization": True}).dynamic_quantization


def test_use_qdq_is_not_required() -> None:
    assert Fp8Config.from_dict({"scale_method": "maxabs_pow2"}).to_plan().scale_plan.name == "MAXABS_POW2"


# ------------------------------------------------------------------------------------ to_plan


def test_to_plan_mode_override_and_auto() -> None:
    cfg = Fp8Config.from_dict({"mode": "AUTO", "scale_method": "maxabs_pow2"})
    assert cfg.to_plan().mode is Mode.AUTO
    assert cfg.to_plan(Mode.MEASURE).mode is Mode.MEASURE
    assert cfg.to_plan("quantize").mode is Mode.QUANTIZE  # type: ignore[arg-type]


def test_dynamic_auto_runs_as_quantize_and_refuses_measure() -> None:
    cfg = Fp8Config.from_dict({"mode": "AUTO", "scale_method": "maxabs_pcs_pow2", "dynamic_quantization": True})
    assert cfg.to_plan().mode is Mode.QUANTIZE
    with pytest.raises(ConfigError, match=r"'mode'.*MEASURE.*dynamic_quantization"):
        cfg.to_plan(Mode.MEASURE)


@pytest.mark.parametrize("method", ["maxabs_hw", "hw_aligned_single_scale", "maxabs_hw_opt_weight",
                                    "act_maxabs_hw_weights_pcs_maxabs_pow2", "act_maxabs_hw_weights_pcs_opt_pow2"])
def test_hw_methods_need_a_gaudi_or_device_for_scales(method: str) -> None:
    cfg = Fp8Config.from_dict({"scale_method": method})
    with pytest.raises(ConfigError, match=r"'device_for_scales'.*GAUDI2.*GAUDI3"):
        cfg.to_plan()
    assert cfg.to_plan(Mode.MEASURE).device_for_scales is None  # measuring computes no scales
    assert cfg.to_plan(hpu_device=ScaleDevice.GAUDI3).device_for_scales is ScaleDevice.GAUDI3
    pinned = Fp8Config.from_dict({"scale_method": method, "device_for_scales": "gaudi2"})
    assert pinned.to_plan().device_for_scales is ScaleDevice.GAUDI2
    assert pinned.to_plan().fp8.fullscale == 240.0


@pytest.mark.parametrize("method", ["unit_scale", "maxabs_pow2", "maxabs_arbitrary",
                                    "maxabs_pow2_opt_weight", "act_maxabs_pow2_weights_pcs_opt_pow2"])
def test_non_hw_methods_run_anywhere(method: str) -> None:
    assert Fp8Config.from_dict({"scale_method": method}).to_plan().device_for_scales is None


def test_cross_device_scales() -> None:
    hw = Fp8Config.from_dict({"scale_method": "maxabs_hw", "device_for_scales": "GAUDI2"})
    assert hw.to_plan(hpu_device=ScaleDevice.GAUDI3).device_for_scales is ScaleDevice.GAUDI2
    pow2 = Fp8Config.from_dict({"scale_method": "maxabs_pow2", "device_for_scales": "GAUDI2"})
    with pytest.raises(ConfigError, match=r"'scale_method'.*maxabs_pow2.*GAUDI3"):
        pow2.to_plan(hpu_device=ScaleDevice.GAUDI3)
    g3 = Fp8Config.from_dict({"scale_method": "maxabs_hw", "device_for_scales": "GAUDI3"})
    with pytest.raises(ConfigError, match=r"'device_for_scales'.*GAUDI3.*GAUDI2"):
        g3.to_plan(hpu_device=ScaleDevice.GAUDI2)


def test_plan_carries_the_run_settings() -> None:
    plan = Fp8Config.from_dict({"mode": "MEASURE", "observer": "shape", "dump_stats_path": "out/pre",
                                "fp8_config": "E5M2", "hp_dtype": "FP16", "measure_exclude": "ALL",
                                "ignore_modules_wo_measures": "true", "recalc_scales": True,
                                "calibration_sample_interval": 3}).to_plan()
    assert (plan.mode, plan.observer, plan.dump_stats_path) == (Mode.MEASURE, "shape", "out/pre")
    assert (plan.lp, plan.hp, plan.measure_exclude) == (LpDtype.E5M2, HpDtype.FP16, MeasureExclude.ALL)
    assert plan.ignore_modules_wo_measures and plan.recalc_scales and plan.calibration_sample_interval == 3


# ------------------------------------------------------------------------- round trip and hash

ROUND_TRIP = [
    {},
    MAXABS_MEASURE,
    MAXABS_QUANT,
    PCS_OPT_QUANT,
    {"whitelist": {"types": ["torch.nn.Linear"]}, "blacklist": {"names": ["lm_head"]}, "scale_format": "const"},
    {"scale_method": "maxabs_pow2", "scale_params": {"input_backoff": 1, "output_backoff": 0.5}},
    {"scale_method": {"default": {"weight": {"rounding_method": "POW2", "backoff": 0.5},
                                  "activation": {"rounding_method": "pow2"}},
                      "nodes": {"lm_head": {"weight": {"granularity": "pcs"}}}}},
    {"scale_method": "maxabs_pcs_pow2", "dynamic_quantization": "True", "device_for_scales": "Gaudi3"},
]


@pytest.mark.parametrize("raw", ROUND_TRIP)
def test_json_round_trip(raw: dict[str, Any], tmp_path: Path) -> None:
    cfg = Fp8Config.from_dict(raw)
    text = cfg.to_json(tmp_path / "out.json")
    again = Fp8Config.from_json(tmp_path / "out.json")
    assert json.loads(text) == again.to_dict() == cfg.to_dict()
    assert again.scale_plan() == cfg.scale_plan()
    device = cfg.device_for_scales or ScaleDevice.GAUDI2  # the Gaudi the shards would run on
    assert again.to_plan(hpu_device=device) == cfg.to_plan(hpu_device=device)
    assert again.config_hash() == cfg.config_hash()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"scale_method": "MAXABS_HW"}, {"scale_method": "maxabs_hw"}),
        ({"whitelist": {"names": ["mlp"]}}, {"allowlist": {"names": ["mlp"], "types": []}}),
        ({"use_qdq": "True"}, {"use_qdq": True}),
        ({"method": "HOOKS"}, {}),
    ],
)
def test_hash_equal_for_equal_meaning(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert Fp8Config.from_dict(a).config_hash() == Fp8Config.from_dict(b).config_hash()


@pytest.mark.parametrize(
    "raw",
    [
        {"scale_method": "maxabs_pow2"},
        {"scale_params": {"input_backoff": 0.25}},  # explicit, so it may change a dict form's backoff
        {"blocklist": {"names": ["lm_head"]}},
        {"hp_dtype": "fp32"},
    ],
)
def test_hash_differs_for_different_configs(raw: dict[str, Any]) -> None:
    assert Fp8Config.from_dict(raw).config_hash() != Fp8Config().config_hash()


# --------------------------------------------------------------------------- malformed configs

_DYN = {"dynamic_quantization": True, "scale_method": "maxabs_pcs_pow2"}
MALFORMED = [
    ({"mode": "CALIBRATE"}, r"key 'mode': value 'CALIBRATE'.*allowed: NONE, QUANTIZE, MEASURE, SHAPE, LOAD, AUTO"),
    ({"mode": 3}, r"key 'mode': value 3 .*allowed: NONE, QUANTIZE"),
    ({"observer": "minmax"}, r"key 'observer': value 'minmax'.*allowed: maxabs, maxabs_per_channel, shape, save"),
    ({"observer": "maxab"}, r"key 'observer'.*did you mean 'maxabs'"),
    ({"dump_stats_path": 5}, r"key 'dump_stats_path': value 5 is not a path"),
    ({"fp8_config": "E3M4"}, r"key 'fp8_config': value 'E3M4'.*allowed: E4M3, E5M2"),
    ({"hp_dtype": "fp64"}, r"key 'hp_dtype': value 'fp64'.*allowed: BF16, FP16, FP32"),
    ({"scale_method": "uint_scale"},
     r"key 'scale_method': value 'uint_scale'.*allowed: unit_scale.*did you mean 'unit_scale'"),
    ({"scale_method": "MAX"}, r"key 'scale_method': value 'MAX'.*legacy HQT method.*maxabs_pow2"),
    ({"scale_method": "without_scale"}, r"key 'scale_method': value 'without_scale'.*legacy.*'unit_scale'"),
    ({"scale_method": "MAXABS_POW2_DYNAMIC"},
     r"key 'scale_method'.*MAXABS_POW2_DYNAMIC.*act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw.*dynamic_quantization"),
    ({"scale_method": 7}, r"key 'scale_method': value 7 is neither.*allowed: unit_scale"),
    ({"scale_method": {"nodes": {}}}, r"key 'scale_method'.*no 'default' entry"),
    ({"scale_method": {"default": {"wieght": {}}}},
     r"key 'scale_method.default': value 'wieght'.*did you mean 'weight'"),
    ({"scale_method": {"default": {"weight": {"rounding_method": "ceil"}}}},
     r"key 'scale_method.default.weight.rounding_method': value 'ceil'.*allowed: IDENTITY, POW2, HW_ALIGNED"),
    ({"scale_method": {"default": {"weight": {"backoff": -1}}}},
     r"key 'scale_method.default.weight.backoff': value -1 is not a positive"),
    ({"scale_method": {"default": {"weight": {"granularity": "PCS"}}}},
     r"key 'scale_method.default': weight PCS/MAXABS/IDENTITY with activation PTS/MAXABS/IDENTITY.*"
     r"same activation section: maxabs_arbitrary"),
    ({"scale_method": {"default": POW2_DICT["default"], "nodes": {"fc1": {"activation": {"granularity": "PCS"}}}}},
     r"key 'scale_method.nodes\[fc1\]': weight PTS/MAXABS/POW2 with activation PCS/MAXABS/POW2"),
    ({"scale_method": {"default": {}, "layers": {"first": {}}}},
     r"key 'scale_method.layers': value 'first'.*layer index"),
    ({"scale_method": {"default": {"weight": {"params": {"weight_scales": [1.0]}}}}},
     r"key 'scale_method.default.weight.params.weight_scales'.*only to OPT"),
    ({"scale_params": {"input_backof": 0.5}},
     r"key 'scale_params': value 'input_backof'.*did you mean 'input_backoff'"),
    ({"scale_params": {"input_backoff": 0}}, r"key 'scale_params.input_backoff': value 0 is not a positive"),
    ({"scale_params": {"weight_backoff": "half"}}, r"key 'scale_params.weight_backoff': value 'half'"),
    ({"scale_params": {"weight_scales": []}}, r"key 'scale_params.weight_scales': value \[\] is not a list"),
    ({"scale_params": [0.25]}, r"key 'scale_params': value \[0.25\] is not an object"),
    ({"allowlist": {"names": "lm_head"}}, r"key 'allowlist.names': value 'lm_head' is not a list of strings"),
    ({"allowlist": {"type": ["Linear"]}}, r"key 'allowlist': value 'type'.*did you mean 'types'"),
    ({"blocklist": {"names": ["("]}}, r"key 'blocklist.names': pattern '\(' is not a valid regular expression"),
    ({"blacklist": {"names": ["model.layers.[29-31].w2"]}}, r"key 'blacklist.names'.*\[29-31\].*bad character range"),
    ({"whitelist": ["Linear"]}, r"key 'whitelist': value \['Linear'\] is not an object"),
    ({"allowlist": {"types": ["Linear"]}, "whitelist": {"types": ["Conv2d"]}},
     r"key 'whitelist.types'.*conflicts with 'allowlist.types'"),
    ({"mod_dict": {"Linear": "PatchedLinear"}}, r"key 'mod_dict'.*not supported.*allowed: \{\}"),
    ({"measure_exclude": "OUTPUTS"}, r"key 'measure_exclude': value 'OUTPUTS'.*did you mean 'OUTPUT'"),
    ({"measure_exclude": ["INPUT", "OUTPUT"]}, r"key 'measure_exclude': value \['INPUT', 'OUTPUT'\].*allowed: NONE"),
    ({"scale_format": "tensor"}, r"key 'scale_format': value 'tensor'.*allowed: CONST, SCALAR"),
    ({"device_for_scales": "GAUDI4"}, r"key 'device_for_scales': value 'GAUDI4'.*allowed: GAUDI2, GAUDI3"),
    ({"use_qdq": "yes"}, r"key 'use_qdq': value 'yes' is not a boolean.*allowed: true, false"),
    ({"dynamic_quantization": 1}, r"key 'dynamic_quantization': value 1 is not a boolean"),
    ({"calibration_sample_interval": -1}, r"key 'calibration_sample_interval': value -1 is not a non-negative"),
    ({"calibration_sample_interval": "2"}, r"key 'calibration_sample_interval': value '2'"),
    ({"calibration_sample_interval": True}, r"key 'calibration_sample_interval': value True"),
    ({"scale_metod": "maxabs_hw"}, r"unknown key 'scale_metod' \(did you mean 'scale_method'\?\)"),
    ({"separate_measure_files": False}, r"unknown key 'separate_measure_files'.*did you mean 'seperate_measure_files'"),
    ({"world_size": 8}, r"unknown key 'world_size'; known keys: mode"),
    ({"scale_method": "maxabs_pcs_pow2"}, r"key 'scale_method': value 'maxabs_pcs_pow2'.*only with dynamic.*"
                                          r"allowed: set \"dynamic_quantization\": true"),
    ({"dynamic_quantization": True, "scale_method": "maxabs_hw"},
     r"key 'scale_method': value 'maxabs_hw' cannot be used with dynamic_quantization.*allowed:.*maxabs_pcs_pow2"),
    ({"dynamic_quantization": True}, r"key 'scale_method': value 'unit_scale' cannot be used with dynamic"),
    ({**_DYN, "mode": "MEASURE"}, r"key 'mode': value 'MEASURE' cannot be used with dynamic.*allowed: QUANTIZE, LOAD"),
    ({**_DYN, "fake_quant": True}, r"key 'fake_quant': value true cannot be combined with dynamic"),
    ({**_DYN, "row_parallel_linear_allreduce_quantization": "true"},
     r"key 'row_parallel_linear_allreduce_quantization': value true cannot be combined"),
]


@pytest.mark.parametrize(("raw", "pattern"), MALFORMED, ids=[f"{i:02d}-{next(iter(r[0]))}" for i, r in
                                                             enumerate(MALFORMED)])
def test_malformed_config_gives_one_line_error(raw: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        Fp8Config.from_dict(raw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, Fp8OrchestratorError)
    assert "\n" not in str(info.value)


def test_direct_construction_raises_config_error_too() -> None:
    with pytest.raises(ConfigError, match=r"key 'mode'"):
        Fp8Config(mode="CALIBRATE")


def test_non_object_and_non_string_keys() -> None:
    with pytest.raises(ConfigError, match=r"must be a JSON object, got list"):
        Fp8Config.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"key 1: keys must be strings"):
        Fp8Config.from_dict({1: "x"})  # type: ignore[dict-item]


def test_several_problems_are_reported_on_one_line() -> None:
    with pytest.raises(ConfigError, match=r"key 'mode'.*and 1 more problem\(s\) in: use_qdq") as info:
        Fp8Config.from_dict({"mode": "x", "use_qdq": "x"})
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- junk property

_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=8,
)
_KEYS = [*Fp8Config.KNOWN_KEYS, *FOREIGN_KEYS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_KEYS), value=_JUNK)
def test_junk_values_give_only_config_errors_naming_the_key(key: str, value: Any) -> None:
    logging.getLogger(LOGGER).disabled = True  # foreign-key warnings are tested above
    try:
        try:
            Fp8Config.from_dict({key: value})
        except ConfigError as exc:
            assert key in str(exc), str(exc)
            assert key not in FOREIGN_KEYS
            assert "\n" not in str(exc)
    finally:
        logging.getLogger(LOGGER).disabled = False


@settings(max_examples=150, deadline=None)
@given(
    section=st.dictionaries(
        st.sampled_from(["granularity", "scale_value_type", "rounding_method", "backoff", "params", "bogus"]),
        st.sampled_from(["PTS", "PCS", "MAXABS", "OPT", "FIXED_VALUE", "POW2", "HW_ALIGNED", "IDENTITY", 0.5, -1,
                         {"weight_scales": [1.0]}, {}, None]),
        max_size=4,
    ),
    kind=st.sampled_from(["weight", "activation"]),
)
def test_dict_form_junk_gives_only_scale_method_errors(section: dict[str, Any], kind: str) -> None:
    try:
        cfg = Fp8Config.from_dict({"scale_method": {"default": {kind: section}}, "dynamic_quantization": False})
    except ConfigError as exc:
        assert "scale_method" in str(exc)
    else:
        assert cfg.scale_plan().name in {"MAXABS_ARBITRARY", "MAXABS_POW2", "MAXABS_HW", "UNIT_SCALE",
                                         "HW_ALIGNED_SINGLE_SCALE", "MAXABS_POW2_OPT_WEIGHT", "MAXABS_HW_OPT_WEIGHT",
                                         "ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2", "ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2",
                                         "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2",
                                         "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2"}
