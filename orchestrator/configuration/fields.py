"""Readers for single values of an INC fp8_quant config, the way INC reads them, and the
``scale_method`` reader that turns a method string or the dict form into a ``ScalePlan``.

Every reader takes the key it reads (for the message) and a raw JSON value, and returns a
normalised Python value or raises one :class:`ConfigError` naming the key, the value and what is
allowed. Reference: ``inc-fp8-semantics.md`` §1.1–§1.2; ``project-decisions.md`` §1.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from orchestrator.configuration.hints import did_you_mean, scale_method_hint, show
from orchestrator.errors import ConfigError
from shards.fp8.numerics import HpDtype, LpDtype
from stats_store.errors import StoreLocationError
from stats_store.location import check_dump_stats_path
from shards.fp8.methods import (
    METHODS,
    Backoffs,
    Granularity,
    MethodSpec,
    Rounding,
    ScalePlan,
    SectionSpec,
    ValueType,
    match_predefined,
    predefined_plan,
)

E = TypeVar("E", bound=enum.Enum)

# Observers INC ships (reference §1.2). Others exist only after INC's register_observer.
OBSERVERS: tuple[str, ...] = ("maxabs", "maxabs_per_channel", "shape", "save")

# Python-API convenience: a torch dtype where INC's JSON has an enum name.
_TORCH_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float8_e4m3fn: LpDtype.E4M3.value,
    torch.float8_e5m2: LpDtype.E5M2.value,
    torch.bfloat16: HpDtype.BF16.value,
    torch.float16: HpDtype.FP16.value,
    torch.float32: HpDtype.FP32.value,
}


def config_error(key: str, value: object, problem: str, allowed: str, hint: str = "") -> ConfigError:
    """The one message shape of a refused value: key, value, problem, allowed values, hint."""
    return ConfigError(f"Fp8Config key '{key}': value {show(value)} {problem}; allowed: {allowed}{hint}")


def enum_names(enum_cls: type[enum.Enum]) -> str:
    return ", ".join(m.name for m in enum_cls)


def parse_enum(key: str, value: object, enum_cls: type[E]) -> E:
    """An enum member from its name in any case (INC: ``str(value).upper()``)."""
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, torch.dtype) and value in _TORCH_DTYPE_NAMES:
        value = _TORCH_DTYPE_NAMES[value]
    if isinstance(value, str) and value.upper() in enum_cls.__members__:
        return enum_cls[value.upper()]
    names = [m.name for m in enum_cls]
    hint = did_you_mean(value, names) if isinstance(value, str) else ""
    raise config_error(key, value, "is not valid", enum_names(enum_cls) + " (any case)", hint)


def parse_bool(key: str, value: object) -> bool:
    """A JSON boolean or the strings true/false in any case (INC matches ``str(v).upper()``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.upper() in ("TRUE", "FALSE"):
        return value.upper() == "TRUE"
    raise config_error(key, value, "is not a boolean", 'true, false, "True", "true", "False", "false"')


def parse_count(key: str, value: object) -> int:
    """A non-negative JSON integer (booleans are refused: ``true`` is not a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise config_error(key, value, "is not a non-negative integer", "0 (off) or a positive integer")


def parse_positive_float(key: str, value: object) -> float:
    """A finite number > 0 (ints allowed: legacy configs write ``"input_backoff": 1``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    raise config_error(key, value, "is not a positive finite number", "a number > 0, e.g. 0.25")


def parse_path(key: str, value: object) -> str:
    """A path prefix as a string. Only its type is checked: loading never looks at the disk."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return value
    raise config_error(key, value, "is not a path", 'a string such as "./hqt_output/measure"')


def parse_store_path(key: str, value: object) -> str:
    """``dump_stats_path``: a local path, ``file://`` or ``s3://bucket/prefix`` URL; only its form is
    checked (no disk, no network: the endpoint and credentials come from the environment later)."""
    path = parse_path(key, value)
    try:
        check_dump_stats_path(path)
    except StoreLocationError as e:
        raise ConfigError(f"Fp8Config key '{key}': {e}") from None
    return path


def parse_observer(key: str, value: object) -> str:
    """One of INC's observer names (stored lower case; INC uses it in every file name)."""
    if isinstance(value, str) and value.lower() in OBSERVERS:
        return value.lower()
    hint = did_you_mean(value, OBSERVERS) if isinstance(value, str) else ""
    raise config_error(key, value, "is not a known observer", ", ".join(OBSERVERS), hint)


def parse_empty_mod_dict(key: str, value: object) -> dict[str, Any]:
    """``mod_dict`` is filled from the op-type table; INC asserts a user value is empty."""
    if isinstance(value, Mapping) and not value:
        return {}
    raise config_error(key, value, "is not supported (custom module mappings)", "{} or leave the key out")


def check_keys(key: str, value: Mapping[Any, Any], allowed: Iterable[str]) -> None:
    """Refuse a non-string or unknown sub-key, suggesting the closest allowed one."""
    allowed = tuple(allowed)
    for sub in value:
        if not isinstance(sub, str) or sub not in allowed:
            hint = did_you_mean(sub, allowed) if isinstance(sub, str) else ""
            raise config_error(key, sub, "is not a known sub-key", ", ".join(allowed), hint)


def parse_float_list(key: str, value: object) -> tuple[float, ...]:
    """A non-empty list of positive numbers (OPT candidate scales or multipliers)."""
    if isinstance(value, (list, tuple)) and value:
        return tuple(parse_positive_float(f"{key}[{i}]", v) for i, v in enumerate(value))
    raise config_error(key, value, "is not a list of numbers", "a non-empty list of numbers > 0")


class ModuleList(BaseModel):
    """An allow- or block-list as written: regex ``names`` and class-name ``types``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    names: tuple[str, ...] = ()
    types: tuple[str, ...] = ()


def _parse_str_list(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise config_error(key, value, "is not a list of strings", 'a JSON list of strings, e.g. ["lm_head"]')


def compile_name_pattern(key: str, pattern: str) -> re.Pattern[str]:
    """Compile one ``names`` entry; INC matches them with ``re.search`` (reference §1.2)."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"Fp8Config key '{key}': pattern {pattern!r} is not a valid regular expression ({exc}); "
            "names are Python re.search patterns: escape literal characters (re.escape) or fix the pattern"
        ) from exc


def parse_module_list(key: str, value: object) -> dict[str, tuple[str, ...]]:
    """The sub-keys a user wrote for ``key`` (partial dicts merge with the defaults later)."""
    if isinstance(value, ModuleList):
        return {"names": value.names, "types": value.types}
    if not isinstance(value, Mapping):
        raise config_error(key, value, "is not an object", '{"names": [regex, ...], "types": [class name, ...]}')
    check_keys(key, value, ("names", "types"))
    parsed = {sub: _parse_str_list(f"{key}.{sub}", v) for sub, v in value.items()}
    for pattern in parsed.get("names", ()):
        compile_name_pattern(f"{key}.names", pattern)
    return parsed


class ScaleParams(BaseModel):
    """``scale_params``: legacy backoffs and OPT candidates, honoured by us (INC ≥ 3.5 ignores them).

    The defaults equal every MAXABS string method's own backoffs; only keys the user wrote
    (``model_fields_set``) override a method's backoffs (see docs/config.md, "Backoffs").
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_backoff: float = 0.25
    weight_backoff: float = 0.5
    output_backoff: float | None = None
    weight_scales: tuple[float, ...] | None = None


_SCALE_PARAM_KEYS = tuple(ScaleParams.model_fields)


def parse_scale_params(key: str, value: object) -> ScaleParams:
    """A ``ScaleParams`` whose ``model_fields_set`` is exactly the keys the user wrote."""
    if isinstance(value, ScaleParams):
        return value
    if not isinstance(value, Mapping):
        raise config_error(key, value, "is not an object", f"an object with keys {', '.join(_SCALE_PARAM_KEYS)}")
    check_keys(key, value, _SCALE_PARAM_KEYS)
    given: dict[str, Any] = {}
    for sub, v in value.items():
        if sub == "weight_scales":
            given[sub] = parse_float_list(f"{key}.{sub}", v)
        elif sub == "output_backoff" and v is None:
            given[sub] = None
        else:
            given[sub] = parse_positive_float(f"{key}.{sub}", v)
    return ScaleParams(**given)


# ---------------------------------------------------------------------------------------------
# scale_method: one of INC's 13 strings, or the dict form (reference §1.4, §2.4)
# ---------------------------------------------------------------------------------------------

SCALE_METHOD_KEY = "scale_method"
_TOP_KEYS = ("default", "nodes", "layers", "layer_types")
_KINDS = ("weight", "activation")
_SECTION_ENUMS: dict[str, type[enum.Enum]] = {
    "granularity": Granularity,
    "scale_value_type": ValueType,
    "rounding_method": Rounding,
}
_SECTION_KEYS = (*_SECTION_ENUMS, "backoff", "params")
# What a field missing from ``default`` falls back to (INC's ScaleMethodConfig defaults).
_BASE_SECTION: dict[str, Any] = {
    "granularity": Granularity.PTS.value,
    "scale_value_type": ValueType.MAXABS.value,
    "rounding_method": Rounding.IDENTITY.value,
}
DICT_FORM_BACKOFF = 1.0


def method_names() -> list[str]:
    """INC's 13 method strings then ours, lower case as INC's docs write them."""
    return [name.lower() for name in METHODS]


def parse_method_name(value: str) -> str:
    """The METHODS key of a method string in any case."""
    if value.upper() in METHODS:
        return value.upper()
    raise config_error(
        SCALE_METHOD_KEY,
        value,
        "is not one of INC's 13 scale methods nor ours",
        ", ".join(method_names()) + " (any case), or the dict form",
        scale_method_hint(value, method_names()),
    )


def parse_scale_method(value: object) -> str | dict[str, Any]:
    """A method string (normalised to its METHODS key) or a normalised dict form."""
    if isinstance(value, str):
        return parse_method_name(value)
    if isinstance(value, Mapping):
        return _normalize_method_dict(value)
    raise config_error(
        SCALE_METHOD_KEY, value, "is neither a method name nor a dict", ", ".join(method_names()) + ", or a dict"
    )


def _lower_keys(key: str, value: object, allowed: tuple[str, ...], shape: str) -> dict[str, Any]:
    """A dict with its keys lower-cased and checked (the dict form is case-insensitive)."""
    if not isinstance(value, Mapping):
        raise config_error(key, value, "is not an object", shape)
    lowered: dict[str, Any] = {}
    for sub, v in value.items():
        name = sub.lower() if isinstance(sub, str) else sub
        check_keys(key, {name: v}, allowed)
        if name in lowered:
            raise config_error(key, sub, "is given twice (keys are case-insensitive)", ", ".join(allowed))
        lowered[name] = v
    return lowered


def _normalize_method_dict(value: Mapping[Any, Any]) -> dict[str, Any]:
    top = _lower_keys(SCALE_METHOD_KEY, value, _TOP_KEYS, '{"default": {"weight": {...}, "activation": {...}}, ...}')
    if "default" not in top:
        raise config_error(
            SCALE_METHOD_KEY, dict(value), "has no 'default' entry", 'a dict with a "default" entry (reference §1.4)'
        )
    out: dict[str, Any] = {"default": _normalize_pair(f"{SCALE_METHOD_KEY}.default", top["default"])}
    for group in _TOP_KEYS[1:]:
        if group not in top:
            continue
        key = f"{SCALE_METHOD_KEY}.{group}"
        entries = top[group]
        if not isinstance(entries, Mapping):
            raise config_error(key, entries, "is not an object", '{"<name>": {"weight": {...}, "activation": {...}}}')
        out[group] = {
            _override_name(key, group, name): _normalize_pair(f"{key}[{name}]", pair) for name, pair in entries.items()
        }
    return out


def _override_name(key: str, group: str, name: object) -> str:
    """Module / class names as given; layer indices as decimal strings (INC matches ``layers.N``)."""
    if group == "layers" and isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return str(name)
    if isinstance(name, str) and name and (group != "layers" or name.isdecimal()):
        return name
    allowed = "a layer index such as \"3\"" if group == "layers" else "a non-empty module or class name"
    raise config_error(key, name, "is not a valid entry name", allowed)


def _normalize_pair(key: str, value: object) -> dict[str, dict[str, Any]]:
    pair = _lower_keys(key, value, _KINDS, '{"weight": {...}, "activation": {...}}')
    return {kind: _normalize_section(f"{key}.{kind}", section) for kind, section in pair.items()}


def _normalize_section(key: str, value: object) -> dict[str, Any]:
    section = _lower_keys(key, value, _SECTION_KEYS, '{"granularity": "PTS", "rounding_method": "POW2", ...}')
    out: dict[str, Any] = {}
    for name, v in section.items():
        if name in _SECTION_ENUMS:
            out[name] = parse_enum(f"{key}.{name}", v, _SECTION_ENUMS[name]).value
        elif name == "backoff":
            out[name] = parse_positive_float(f"{key}.backoff", v)
        else:
            params = _lower_keys(f"{key}.params", v, ("weight_scales",), '{"weight_scales": [numbers]}')
            out[name] = {p: list(parse_float_list(f"{key}.params.{p}", pv)) for p, pv in params.items()}
    return out


def build_scale_plan(method: str | Mapping[str, Any], params: ScaleParams) -> ScalePlan:
    """The ScalePlan of a normalised ``scale_method`` with the user's explicit ``scale_params``.

    Backoff precedence: a dict section's ``backoff`` > a backoff written in ``scale_params`` (MAXABS
    sections only) > the method's own (string: METHODS; dict form: INC's 1.0).
    """
    explicit = params.model_fields_set
    backoffs = Backoffs(
        input=params.input_backoff if "input_backoff" in explicit else None,
        weight=params.weight_backoff if "weight_backoff" in explicit else None,
        output=params.output_backoff if "output_backoff" in explicit else None,
    )
    if isinstance(method, str):
        plan = predefined_plan(method, backoffs)
        weight = plan.default.weight
        if params.weight_scales is not None and weight.value_type is ValueType.OPT:
            plan = replace(plan, default=replace(plan.default, weight=replace(weight, candidates=params.weight_scales)))
        return plan
    default_pair = method["default"]
    default = _method_spec(f"{SCALE_METHOD_KEY}.default", default_pair, {}, backoffs, params)
    specs = {
        group: {
            name: _method_spec(f"{SCALE_METHOD_KEY}.{group}[{name}]", pair, default_pair, backoffs, params)
            for name, pair in method.get(group, {}).items()
        }
        for group in _TOP_KEYS[1:]
    }
    name = match_predefined(default.weight, default.activation)
    assert name is not None  # _method_spec refused every unmatched pair
    return ScalePlan(name, default, specs["nodes"], specs["layers"], specs["layer_types"], backoffs.output)


def _method_spec(
    key: str, pair: Mapping[str, Any], default_pair: Mapping[str, Any], backoffs: Backoffs, params: ScaleParams
) -> MethodSpec:
    """One (weight, activation) pair, fields falling back to ``default`` then to INC's base values."""
    fields = {kind: {**_BASE_SECTION, **default_pair.get(kind, {}), **pair.get(kind, {})} for kind in _KINDS}
    triples = {kind: _triple(fields[kind]) for kind in _KINDS}
    name = match_predefined(triples["weight"], triples["activation"])
    if name is None:
        raise _unmatched(key, triples["weight"], triples["activation"])
    given = {"weight": backoffs.weight, "activation": backoffs.input}
    sections = {}
    for kind in _KINDS:
        base, f = triples[kind], fields[kind]
        backoff = f.get("backoff")
        if backoff is None:
            explicit = given[kind] if base.value_type is ValueType.MAXABS else None
            backoff = explicit if explicit is not None else DICT_FORM_BACKOFF
        own = pair.get(kind, {}).get("params", {}).get("weight_scales")
        inherited = f.get("params", {}).get("weight_scales")
        candidates = _candidates(f"{key}.{kind}", base, own, inherited, name, kind, params)
        sections[kind] = replace(base, backoff=backoff, candidates=candidates)
    return MethodSpec(sections["weight"], sections["activation"], dynamic_only=METHODS[name].dynamic_only)


def _triple(fields: Mapping[str, Any]) -> SectionSpec:
    return SectionSpec(
        Granularity(fields["granularity"]), ValueType(fields["scale_value_type"]), Rounding(fields["rounding_method"])
    )


def _candidates(
    key: str,
    base: SectionSpec,
    own: list[float] | None,
    inherited: list[float] | None,
    name: str,
    kind: str,
    params: ScaleParams,
) -> tuple[float, ...] | None:
    """OPT candidates: section ``params.weight_scales`` > ``scale_params.weight_scales`` > the method's.

    ``own`` is what this very section wrote; ``inherited`` may come from ``default``.
    """
    if base.value_type is not ValueType.OPT:
        if own is not None:
            raise config_error(
                f"{key}.params.weight_scales",
                own,
                "applies only to OPT sections",
                'leave it out, or set "scale_value_type": "OPT"',
            )
        return None
    if inherited is not None:
        return tuple(inherited)
    if params.weight_scales is not None:
        return params.weight_scales
    predefined: SectionSpec = getattr(METHODS[name], kind)
    return predefined.candidates


def _describe(section: SectionSpec) -> str:
    return "/".join(part.value for part in section.shape_key())


def _unmatched(key: str, weight: SectionSpec, activation: SectionSpec) -> ConfigError:
    """Name the pair and the predefined methods that share its weight or its activation section."""
    same_w = [n.lower() for n, m in METHODS.items() if m.weight.shape_key() == weight.shape_key()]
    same_a = [n.lower() for n, m in METHODS.items() if m.activation.shape_key() == activation.shape_key()]
    pairs = "; ".join(f"{n.lower()} = {_describe(m.weight)} + {_describe(m.activation)}" for n, m in METHODS.items())
    return ConfigError(
        f"Fp8Config key '{key}': weight {_describe(weight)} with activation {_describe(activation)} "
        f"is not one of the named methods' (weight, activation) pairs (INC's and ours); "
        f"same weight section: {', '.join(same_w) or 'none'}; same activation section: {', '.join(same_a) or 'none'}; "
        f"allowed (granularity/value type/rounding): {pairs}"
    )
