"""``Fp8Config``: an INC fp8_quant JSON config, read the way INC reads it, checked once at load.

This is the only place that reads raw config JSON. It accepts INC files unchanged (same keys, enum
values in any case, string booleans, ``whitelist``/``blacklist``, the dict form of
``scale_method``), refuses what INC would refuse with one message naming the key, and emits the
frozen :class:`shards.plan.RunPlan` that shards and the coordinator read.

Loading never touches the disk beyond reading the config file itself: ``dump_stats_path`` is
not created, checked or moved until a measurement starts.

Reference: ``inc-fp8-semantics.md`` §1; where we differ: ``project-decisions.md`` §1.
Every key, default and adjustment is tabled in ``docs/config.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from orchestrator.configuration import fields
from orchestrator.configuration.hints import config_error, did_you_mean, show
from orchestrator.errors import ConfigError, ConfigFileNotFoundError
from shards.fp8.numerics import HpDtype, LpDtype, ScaleDevice
from shards.plan import MeasureExclude, Mode, RunPlan, ScaleFormat
from shards.fp8.methods import METHODS, PREDEFINED, Rounding, ScalePlan, ValueType
from shards.model.selection import ModuleFilter, SelectionRules, bare_type

logger = logging.getLogger(__name__)

# Keys real INC configs carry and INC itself ignores: accepted, ignored, one warning each
# (project-decisions §1). Never "corrected" to a known key.
FOREIGN_KEYS: tuple[str, ...] = ("method", "quantize_weight", "dump_stats_xlsx_path", "int4_weights", "_json_file")
# Legacy names, resolved key by key into the current ones.
LIST_ALIASES: Mapping[str, str] = {"whitelist": "allowlist", "blacklist": "blocklist"}

_ENUM_FIELDS: Mapping[str, type] = {
    "mode": Mode,
    "fp8_config": LpDtype,
    "hp_dtype": HpDtype,
    "measure_exclude": MeasureExclude,
    "scale_format": ScaleFormat,
    "device_for_scales": ScaleDevice,
}
_BOOL_FIELDS = (
    "use_qdq",
    "fake_quant",
    "dynamic_quantization",
    "recalc_scales",
    "ignore_modules_wo_measures",
    "measure_on_hpu",
    "seperate_measure_files",
    "row_parallel_linear_allreduce_quantization",
)
# Modes in which a run computes scales from stats, hence needs the scale device settled.
_SCALE_MODES = (Mode.QUANTIZE, Mode.AUTO)
_DYNAMIC_MODES = (Mode.QUANTIZE, Mode.LOAD, Mode.AUTO)
_DYNAMIC_METHODS = ", ".join(n.lower() for n, m in METHODS.items() if m.dynamic_only)


class Fp8Config(BaseModel):
    """An INC fp8_quant config. Field names are INC's keys; see docs/config.md for each one."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)

    mode: Mode = Mode.QUANTIZE
    observer: str = "maxabs"
    dump_stats_path: str = "stats"
    fp8_config: LpDtype = LpDtype.E4M3
    hp_dtype: HpDtype = HpDtype.BF16
    scale_method: str | dict[str, Any] = "UNIT_SCALE"
    scale_params: fields.ScaleParams = fields.ScaleParams()
    allowlist: fields.ModuleList = fields.ModuleList()
    blocklist: fields.ModuleList = fields.ModuleList()
    mod_dict: dict[str, Any] = {}
    measure_exclude: MeasureExclude = MeasureExclude.OUTPUT
    scale_format: ScaleFormat = ScaleFormat.SCALAR
    device_for_scales: ScaleDevice | None = None
    use_qdq: bool = False
    fake_quant: bool = False
    dynamic_quantization: bool = False
    recalc_scales: bool = False
    ignore_modules_wo_measures: bool = False
    measure_on_hpu: bool = True
    seperate_measure_files: bool = True
    row_parallel_linear_allreduce_quantization: bool = False
    calibration_sample_interval: int = 0

    _scale_plan: ScalePlan = PrivateAttr()
    _scale_format: ScaleFormat = PrivateAttr()

    KNOWN_KEYS: ClassVar[tuple[str, ...]]

    def __init__(self, /, **data: Any) -> None:
        """Build from INC keys; every refusal is a :class:`ConfigError` (a ValueError)."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc) from exc

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fp8Config:
        """A config from a parsed INC JSON object. The caller's dict is never modified."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"Fp8Config: a config must be a JSON object, got {type(data).__name__} {show(data)}")
        for key in data:
            if not isinstance(key, str):
                known = ", ".join(cls.KNOWN_KEYS)
                raise ConfigError(f"Fp8Config key {show(key)}: keys must be strings; allowed: {known}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, path: str | Path) -> Fp8Config:
        """A config from an INC JSON file. Invalid JSON is a ConfigError naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigFileNotFoundError(
                f"FP8 config file '{path}' does not exist; pass the path of an INC-style JSON config"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"FP8 config file '{path}' is not UTF-8 text ({exc.reason}); save it as UTF-8 JSON"
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"FP8 config file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
                "fix the file (JSON allows no trailing commas and exactly one top-level object)"
            ) from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in config file '{path}')") from exc

    @classmethod
    def load(cls, cfg: Fp8Config | Mapping[str, Any] | str | Path) -> Fp8Config:
        """Accept a config, a dict of INC keys, or the path of a JSON file."""
        if isinstance(cfg, Fp8Config):
            return cfg
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        if isinstance(cfg, (str, Path)):
            return cls.from_json(cfg)
        raise ConfigError(
            f"Fp8Config.load: cannot read a config from {type(cfg).__name__} {show(cfg)}; "
            "pass an Fp8Config, a dict of INC keys or a JSON file path"
        )

    # -------------------------------------------------------------------------------- validators

    @model_validator(mode="before")
    @classmethod
    def _resolve_keys(cls, data: Any) -> Any:
        """Drop foreign keys (one warning each), merge legacy list names, refuse unknown keys."""
        if not isinstance(data, Mapping):
            return data  # pydantic reports the type error
        out: dict[str, Any] = {}
        lists: dict[str, dict[str, tuple[str, ...]]] = {}
        origin: dict[tuple[str, str], str] = {}
        for key, value in data.items():
            if key in FOREIGN_KEYS:
                logger.warning("Fp8Config: ignoring key %r (%s): INC itself ignores it", key, show(value))
            elif key in ("allowlist", "blocklist") or key in LIST_ALIASES:
                _merge_list(key, fields.parse_module_list(key, value), lists, origin)
            elif key in cls.model_fields:
                out[key] = value
            else:
                known = [*cls.model_fields, *LIST_ALIASES]
                raise ConfigError(
                    f"Fp8Config: unknown key {show(key)}{did_you_mean(str(key), known)}; known keys: {', '.join(known)}"
                )
        for key, parts in lists.items():
            out[key] = fields.ModuleList(**parts)
        return out

    @field_validator(*_ENUM_FIELDS, mode="before")
    @classmethod
    def _read_enum(cls, value: Any, info: Any) -> Any:
        if info.field_name == "device_for_scales" and value is None:
            return None
        return fields.parse_enum(info.field_name, value, _ENUM_FIELDS[info.field_name])

    @field_validator(*_BOOL_FIELDS, mode="before")
    @classmethod
    def _read_bool(cls, value: Any, info: Any) -> bool:
        return fields.parse_bool(info.field_name, value)

    @field_validator("observer", mode="before")
    @classmethod
    def _read_observer(cls, value: Any) -> str:
        return fields.parse_observer("observer", value)

    @field_validator("dump_stats_path", mode="before")
    @classmethod
    def _read_path(cls, value: Any) -> str:
        return fields.parse_store_path("dump_stats_path", value)

    @field_validator("calibration_sample_interval", mode="before")
    @classmethod
    def _read_interval(cls, value: Any) -> int:
        return fields.parse_count("calibration_sample_interval", value)

    @field_validator("mod_dict", mode="before")
    @classmethod
    def _read_mod_dict(cls, value: Any) -> dict[str, Any]:
        return fields.parse_empty_mod_dict("mod_dict", value)

    @field_validator("scale_params", mode="before")
    @classmethod
    def _read_scale_params(cls, value: Any) -> fields.ScaleParams:
        return fields.parse_scale_params("scale_params", value)

    @field_validator("scale_method", mode="before")
    @classmethod
    def _read_scale_method(cls, value: Any) -> str | dict[str, Any]:
        return fields.parse_scale_method(value)

    @model_validator(mode="after")
    def _check(self) -> Fp8Config:
        """Cross-key rules and auto-adjustments of reference §1.3, in its order."""
        self._scale_plan = fields.build_scale_plan(self.scale_method, self.scale_params)
        self._check_dynamic()
        self._scale_format = self._adjusted_scale_format()
        return self

    def _check_dynamic(self) -> None:
        plan = self._scale_plan
        methods = plan.all_methods()
        if not self.dynamic_quantization:
            if any(m.dynamic_only for m in methods):
                raise ConfigError(
                    f"Fp8Config key 'scale_method': value {self._method_label()} computes activation scales per "
                    f"token at run time and is supported only with dynamic quantization; "
                    f'allowed: set "dynamic_quantization": true, or a static method such as maxabs_pow2'
                )
            return
        if self.mode not in _DYNAMIC_MODES:
            allowed = ", ".join(m.value for m in _DYNAMIC_MODES)
            raise ConfigError(
                f"Fp8Config key 'mode': value '{self.mode.value}' cannot be used with dynamic_quantization "
                f"(dynamic scales need no measurement); allowed: {allowed}"
            )
        static_only = [m for m in methods if m.activation.rounding in (Rounding.HW_ALIGNED, Rounding.HW_ALIGNED_FIXED)]
        if static_only or any(ValueType.FIXED_VALUE in (m.weight.value_type, m.activation.value_type) for m in methods):
            raise ConfigError(
                f"Fp8Config key 'scale_method': value {self._method_label()} cannot be used with "
                "dynamic_quantization (HW-aligned activation scales and fixed scales are static); "
                f"allowed: {_DYNAMIC_METHODS} (per token), or maxabs_pow2 / maxabs_arbitrary (per tensor)"
            )
        for key in ("fake_quant", "row_parallel_linear_allreduce_quantization"):
            if getattr(self, key):
                raise ConfigError(
                    f"Fp8Config key '{key}': value true cannot be combined with dynamic_quantization; "
                    f"allowed: false, or set dynamic_quantization to false"
                )

    def _adjusted_scale_format(self) -> ScaleFormat:
        """SCALAR becomes CONST (with a warning) for per-channel scales, fake_quant and dynamic."""
        if self.scale_format is ScaleFormat.CONST:
            return ScaleFormat.CONST
        reasons = [
            reason
            for reason, applies in (
                ("per-channel scales (PCS)", self._scale_plan.any_pcs),
                ("fake_quant", self.fake_quant),
                ("dynamic_quantization", self.dynamic_quantization),
            )
            if applies
        ]
        if not reasons:
            return ScaleFormat.SCALAR
        logger.warning("Fp8Config: scale_format SCALAR changed to CONST because of %s", ", ".join(reasons))
        return ScaleFormat.CONST

    def _method_label(self) -> str:
        if isinstance(self.scale_method, str):
            return f"'{self.scale_method.lower()}'"
        return f"(dict form matching '{self._scale_plan.name.lower()}')"

    # ----------------------------------------------------------------------------------- outputs

    @property
    def effective_scale_format(self) -> ScaleFormat:
        """``scale_format`` after the auto-adjustments of reference §1.3 step 5–6."""
        return self._scale_format

    @property
    def uses_dict_scale_method(self) -> bool:
        return not isinstance(self.scale_method, str)

    def scale_plan(self) -> ScalePlan:
        """The per-module scale methods with backoffs resolved (see docs/config.md, "Backoffs")."""
        return self._scale_plan

    def to_dict(self) -> dict[str, Any]:
        """The normalised config as INC keys and JSON values; ``from_dict`` of it is an equal config.

        ``scale_params`` holds only the keys the user wrote (their presence changes the backoffs),
        and ``device_for_scales`` is left out when unset (INC refuses a null).
        """
        out: dict[str, Any] = {}
        for key in type(self).model_fields:
            value = getattr(self, key)
            if key == "device_for_scales" and value is None:
                continue
            out[key] = _jsonable(key, value)
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as indented JSON; also written to ``path`` when one is given."""
        text = json.dumps(self.to_dict(), indent=4) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def config_hash(self) -> str:
        """SHA-256 (hex) of the normalised config: equal for configs that mean the same thing."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_plan(self, mode: Mode | None = None, hpu_device: ScaleDevice | None = None) -> RunPlan:
        """The frozen plan for a run.

        Args:
            mode: overrides ``mode`` (e.g. MEASURE in ``prepare`` for an AUTO config).
            hpu_device: the Gaudi the shards run on, or None off Gaudi.

        Raises:
            ConfigError: dynamic quantization in a measuring mode; a method that needs HW-aligned
                scales with neither ``device_for_scales`` nor a Gaudi; a ``device_for_scales``
                the hardware cannot serve.
        """
        run_mode = self._run_mode(mode)
        return RunPlan(
            mode=run_mode,
            observer=self.observer,
            dump_stats_path=self.dump_stats_path,
            lp=self.fp8_config,
            hp=self.hp_dtype,
            scale_plan=self._scale_plan,
            selection=self.selection(),
            measure_exclude=self.measure_exclude,
            scale_format=self._scale_format,
            device_for_scales=self._scale_device(run_mode, hpu_device),
            dynamic=self.dynamic_quantization,
            ignore_modules_wo_measures=self.ignore_modules_wo_measures,
            # INC: the dict form always recomputes scales (its cache key ignores backoffs).
            recalc_scales=self.recalc_scales or self.uses_dict_scale_method,
            calibration_sample_interval=self.calibration_sample_interval,
        )

    def selection(self) -> SelectionRules:
        """Allow/block rules with compiled name patterns and bare class names."""
        return SelectionRules(
            allow=_module_filter("allowlist", self.allowlist),
            block=_module_filter("blocklist", self.blocklist),
            dynamic=self.dynamic_quantization,
        )

    def _run_mode(self, mode: Mode | None) -> Mode:
        run_mode = self.mode if mode is None else fields.parse_enum("mode", mode, Mode)
        if not self.dynamic_quantization:
            return run_mode
        if run_mode is Mode.AUTO:
            return Mode.QUANTIZE  # dynamic scales need no measurement: a full run only quantizes
        if run_mode not in _DYNAMIC_MODES:
            raise ConfigError(
                f"Fp8Config key 'mode': value '{run_mode.value}' cannot be used with dynamic_quantization "
                f"(dynamic scales need no measurement); allowed: {', '.join(m.value for m in _DYNAMIC_MODES)}"
            )
        return run_mode

    def _scale_device(self, run_mode: Mode, hpu_device: ScaleDevice | None) -> ScaleDevice | None:
        """``device_for_scales``, defaulting to the Gaudi the run is on (reference §1.3 step 4)."""
        wanted = self.device_for_scales
        device = wanted if wanted is not None else hpu_device
        if run_mode not in _SCALE_MODES:
            return device  # measuring or loading computes no scale: nothing to check
        if hpu_device is not None and wanted is not None and wanted is not hpu_device:
            self._check_cross_device(wanted, hpu_device)
        if device is None and self._scale_plan.needs_hw_device:
            raise ConfigError(
                f"Fp8Config key 'device_for_scales': value None cannot serve scale_method {self._method_label()}, "
                "which needs HW-aligned scales, and this run is not on a Gaudi; "
                'allowed: set "device_for_scales" to "GAUDI2" or "GAUDI3" (the card the model will run on)'
            )
        return device

    def _check_cross_device(self, wanted: ScaleDevice, hpu_device: ScaleDevice) -> None:
        if not (wanted is ScaleDevice.GAUDI2 and hpu_device is ScaleDevice.GAUDI3):
            raise ConfigError(
                f"Fp8Config key 'device_for_scales': value '{wanted.value}' cannot be served on {hpu_device.value}; "
                f"allowed: {hpu_device.value}, or GAUDI2 scales on GAUDI3 hardware"
            )
        maxabs_hw = PREDEFINED["MAXABS_HW"].shape_key()
        if any(m.shape_key() != maxabs_hw for m in self._scale_plan.all_methods()):
            raise ConfigError(
                f"Fp8Config key 'scale_method': value {self._method_label()} cannot compute GAUDI2 scales on "
                "GAUDI3 hardware; allowed: maxabs_hw (in every section), or device_for_scales GAUDI3"
            )


Fp8Config.KNOWN_KEYS = (*Fp8Config.model_fields, *LIST_ALIASES)


def _merge_list(
    key: str,
    parts: dict[str, tuple[str, ...]],
    lists: dict[str, dict[str, tuple[str, ...]]],
    origin: dict[tuple[str, str], str],
) -> None:
    """Resolve ``whitelist``/``blacklist`` into ``allowlist``/``blocklist`` sub-key by sub-key."""
    target = LIST_ALIASES.get(key, key)
    merged = lists.setdefault(target, {})
    for sub, value in parts.items():
        first = origin.get((target, sub))
        if first is not None and merged[sub] != value:
            raise ConfigError(
                f"Fp8Config key '{key}.{sub}': value {show(list(value))} conflicts with '{first}.{sub}' "
                f"{show(list(merged[sub]))}; allowed: one of the two keys, or equal values"
            )
        merged[sub] = value
        origin[(target, sub)] = key


def _module_filter(key: str, modules: fields.ModuleList) -> ModuleFilter:
    names = tuple(fields.compile_name_pattern(f"{key}.names", p) for p in modules.names)
    return ModuleFilter(names=names, types=tuple(bare_type(t) for t in modules.types))


def _jsonable(key: str, value: Any) -> Any:
    """One field as INC writes it in JSON."""
    if key == "scale_method" and isinstance(value, str):
        return value.lower()
    if key == "scale_params":
        dumped = value.model_dump(exclude_unset=True)
        if dumped.get("weight_scales") is not None:
            dumped["weight_scales"] = list(dumped["weight_scales"])
        return dumped
    if isinstance(value, fields.ModuleList):
        return {"names": list(value.names), "types": list(value.types)}
    if isinstance(value, (Mode, LpDtype, HpDtype, MeasureExclude, ScaleFormat, ScaleDevice)):
        return value.value
    return value


__all__ = ["FOREIGN_KEYS", "LIST_ALIASES", "Fp8Config"]
