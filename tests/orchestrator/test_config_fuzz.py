"""Config fuzzing (issue 6.4): malformed configs only ever raise ``ConfigError`` naming a key.

Generated configs mix several problems at once: wrong types, unknown and misspelt keys, bad enum
values and contradictory options (dynamic with MEASURE, per-channel scales with a scalar format,
dynamic with a static-only method, a fixed-only method with a measuring mode...). Whatever comes
out, from parsing or from building the run plan in every mode, must be a ``ConfigError`` (a
``ValueError``) on one line that names one of the keys given; nothing else may escape.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.configuration.fp8_config import Fp8Config
from orchestrator.errors import ConfigError
from shards.fp8.numerics import ScaleDevice
from shards.plan import Mode

GOOD: dict[str, list[Any]] = {
    "mode": ["MEASURE", "QUANTIZE", "AUTO", "LOAD", "NONE"],
    "observer": ["maxabs", "maxabs_per_channel", "shape", "save"],
    "scale_method": ["unit_scale", "maxabs_hw", "maxabs_pow2", "maxabs_hw_opt_weight", "maxabs_pcs_pow2",
                     "act_maxabs_pow2_weights_pcs_opt_pow2", "act_maxabs_hw_weights_pcs_maxabs_pow2",
                     "hw_aligned_single_scale"],
    "scale_format": ["SCALAR", "CONST"],
    "dynamic_quantization": [True, False],
    "device_for_scales": ["GAUDI2", "GAUDI3"],
    "fp8_config": ["E4M3", "E5M2"],
    "hp_dtype": ["BF16", "FP16", "FP32"],
    "measure_exclude": ["NONE", "OUTPUT", "INPUT", "ALL"],
    "fake_quant": [True, False],
    "use_qdq": [True, False],
    "calibration_sample_interval": [0, 4],
    "row_parallel_linear_allreduce_quantization": [True, False],
    "ignore_modules_wo_measures": [True, False],
    "allowlist": [{"names": ["fc"], "types": ["Linear"]}, {"types": []}],
    "blocklist": [{"names": ["lm_head"]}, {}],
    "scale_params": [{"input_backoff": 0.5}, {"weight_backoff": 2.0}],
    "dump_stats_path": ["stats/run", "./x"],
}
BAD_VALUES = [None, 3, -1, 0.5, float("nan"), "", "yes", "E4M4", "maxabs_hw_dynamic", "MAXABS", [1], ["a", 2],
              {"names": 5}, {"default": {"weight": {"granularity": "PCS"}}}, {"bogus": 1}, {"names": ["("]}, True]
UNKNOWN_KEYS = ["scale_metod", "modes", "observr", "world_size", "separate_measure_files", "ALLOWLIST", "x", "mode "]

_entry = st.one_of(
    st.sampled_from(sorted(GOOD)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(GOOD[k]))),
    st.tuples(st.sampled_from(sorted(GOOD)), st.sampled_from(BAD_VALUES)),
    st.tuples(st.sampled_from(UNKNOWN_KEYS), st.sampled_from(BAD_VALUES + ["maxabs"])),
)
CONFIGS = st.lists(_entry, min_size=1, max_size=6).map(dict)


KEY_NAMED = re.compile(r"key '([^'.\[]+)")


def _check(cfg: dict[str, Any], exc: ConfigError, keys: set[str] | None = None) -> None:
    """One line, a ValueError, naming one of ``keys`` (default: the keys given) as ``key '<name>...'``."""
    text = str(exc)
    assert isinstance(exc, ValueError)
    assert "\n" not in text, text
    assert KEY_NAMED.search(text), text  # "key '<name>'": the key at fault
    # ...and the message ties it to something given (a contradiction may name the defaulted partner).
    assert any(k in text for k in (keys if keys is not None else set(cfg))), text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=CONFIGS)
def test_malformed_configs_raise_only_config_errors_naming_a_key(cfg: dict[str, Any]) -> None:
    logging.getLogger("orchestrator.configuration.fp8_config").disabled = True  # foreign-key warnings are not under test
    try:
        try:
            parsed = Fp8Config.from_dict(cfg)
        except ConfigError as exc:
            _check(cfg, exc)
            return
        for mode in (None, Mode.MEASURE, Mode.QUANTIZE):
            for device in (None, ScaleDevice.GAUDI2):
                try:
                    parsed.to_plan(mode, hpu_device=device)
                except ConfigError as exc:
                    # A mode override can contradict the config's own keys or its defaults ('mode').
                    _check(cfg, exc, set(cfg) | {"mode", "scale_method", "device_for_scales"})
    finally:
        logging.getLogger("orchestrator.configuration.fp8_config").disabled = False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=CONFIGS)
def test_malformed_config_files_raise_only_config_errors(tmp_path: Path, cfg: dict[str, Any]) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg, allow_nan=True))
    logging.getLogger("orchestrator.configuration.fp8_config").disabled = True
    try:
        Fp8Config.from_json(path)
    except ConfigError as exc:
        assert str(path) in str(exc) or "key" in str(exc)
        assert "\n" not in str(exc)
    finally:
        logging.getLogger("orchestrator.configuration.fp8_config").disabled = False
