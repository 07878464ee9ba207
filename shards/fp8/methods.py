"""What a scale method *is*: frozen specs of the weight and activation sections, INC's 13
predefined methods, and the per-module choice of the dict form.

This is the plan the config emits and the scale math consumes; it holds no arithmetic.
Reference: ``inc-fp8-semantics.md`` §1.4, §1.5, §2.4; ``project-decisions.md`` §1.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping


class Granularity(str, enum.Enum):
    PTS = "PTS"  # per tensor
    PCS = "PCS"  # per channel


class ValueType(str, enum.Enum):
    MAXABS = "MAXABS"
    FIXED_VALUE = "FIXED_VALUE"
    OPT = "OPT"
    DUMMY_SCALES = "DUMMY_SCALES"


class Rounding(str, enum.Enum):
    IDENTITY = "IDENTITY"
    POW2 = "POW2"
    HW_ALIGNED = "HW_ALIGNED"
    HW_ALIGNED_FIXED = "HW_ALIGNED_FIXED"
    SCALE_UNIT = "SCALE_UNIT"


@dataclass(frozen=True)
class SectionSpec:
    """How the scales of one kind of tensor (weight or activation) are computed.

    Attributes:
        granularity: per tensor or per channel.
        value_type: where the value comes from (max-abs, a fixed value, an MSE search).
        rounding: how the raw scale is rounded.
        backoff: fraction of the FP8 full scale that the max-abs maps to.
        candidates: OPT only. PTS: absolute candidate scales in search order. PCS: multipliers of the
            per-channel POW2 reference scale, ascending.
    """

    granularity: Granularity
    value_type: ValueType
    rounding: Rounding
    backoff: float = 1.0
    candidates: tuple[float, ...] | None = None

    def shape_key(self) -> tuple[Granularity, ValueType, Rounding]:
        """The triple that identifies a predefined method (backoff and params do not)."""
        return (self.granularity, self.value_type, self.rounding)


@dataclass(frozen=True)
class MethodSpec:
    """The weight and activation sections of one scale method. Outputs use the activation section."""

    weight: SectionSpec
    activation: SectionSpec
    dynamic_only: bool = False

    def shape_key(self) -> tuple[tuple[Granularity, ValueType, Rounding], ...]:
        return (self.weight.shape_key(), self.activation.shape_key())

    @property
    def uses_stats(self) -> bool:
        """False when both sections are fixed: such a method needs no measurement at all."""
        return not (
            self.weight.value_type is ValueType.FIXED_VALUE
            and self.activation.value_type is ValueType.FIXED_VALUE
        )

    @property
    def needs_measurement(self) -> bool:
        """Whether a module quantized with this method needs its measured statistics: the one rule
        convert, coverage and the global scales apply. Fixed methods need none; dynamic methods
        (per-token activation sections) compute activation scales per call and their weight
        scales from the weight itself."""
        return self.uses_stats and self.activation.granularity is not Granularity.PCS

    @property
    def needs_hw_device(self) -> bool:
        """True when a section rounds to the HW-aligned set (or OPT-searches it): needs a Gaudi."""
        hw = (Rounding.HW_ALIGNED, Rounding.HW_ALIGNED_FIXED)
        return self.weight.rounding in hw or self.activation.rounding in hw

    @property
    def any_pcs(self) -> bool:
        return Granularity.PCS in (self.weight.granularity, self.activation.granularity)


PTS, PCS = Granularity.PTS, Granularity.PCS
MAXABS, FIXED, OPT = ValueType.MAXABS, ValueType.FIXED_VALUE, ValueType.OPT

# OPT candidate lists. The PTS HW list is "the HW set of the device" and is filled in at compute time.
POW2_OPT_CANDIDATES: tuple[float, ...] = tuple(2.0**e for e in range(-10, 10))
PCS_OPT_MULTIPLIERS: tuple[float, ...] = tuple(2.0**e for e in range(-3, 5))


def _s(g: Granularity, v: ValueType, r: Rounding, bo: float, cand: tuple[float, ...] | None = None) -> SectionSpec:
    return SectionSpec(g, v, r, bo, cand)


_R = Rounding
# Keyed by INC's method names (stats_store.inc_names.INC_SCALE_METHODS, one vocabulary), in its order.
PREDEFINED: Mapping[str, MethodSpec] = MappingProxyType(
    {
        "UNIT_SCALE": MethodSpec(_s(PTS, FIXED, _R.SCALE_UNIT, 1.0), _s(PTS, FIXED, _R.SCALE_UNIT, 1.0)),
        "HW_ALIGNED_SINGLE_SCALE": MethodSpec(
            _s(PTS, FIXED, _R.HW_ALIGNED_FIXED, 1.0), _s(PTS, FIXED, _R.HW_ALIGNED_FIXED, 1.0)
        ),
        "MAXABS_HW": MethodSpec(_s(PTS, MAXABS, _R.HW_ALIGNED, 0.5), _s(PTS, MAXABS, _R.HW_ALIGNED, 0.25)),
        "MAXABS_POW2": MethodSpec(_s(PTS, MAXABS, _R.POW2, 0.5), _s(PTS, MAXABS, _R.POW2, 0.25)),
        "MAXABS_ARBITRARY": MethodSpec(_s(PTS, MAXABS, _R.IDENTITY, 0.5), _s(PTS, MAXABS, _R.IDENTITY, 0.25)),
        "MAXABS_HW_OPT_WEIGHT": MethodSpec(
            _s(PTS, OPT, _R.HW_ALIGNED, 0.5), _s(PTS, MAXABS, _R.HW_ALIGNED, 0.25)
        ),
        "MAXABS_POW2_OPT_WEIGHT": MethodSpec(
            _s(PTS, OPT, _R.POW2, 0.5, POW2_OPT_CANDIDATES), _s(PTS, MAXABS, _R.POW2, 0.25)
        ),
        "ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2": MethodSpec(
            _s(PCS, MAXABS, _R.POW2, 0.5), _s(PTS, MAXABS, _R.HW_ALIGNED, 0.25)
        ),
        "ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2": MethodSpec(
            _s(PCS, OPT, _R.POW2, 0.5, PCS_OPT_MULTIPLIERS), _s(PTS, MAXABS, _R.HW_ALIGNED, 0.25)
        ),
        "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2": MethodSpec(
            _s(PCS, MAXABS, _R.POW2, 0.5), _s(PTS, MAXABS, _R.POW2, 0.25)
        ),
        "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2": MethodSpec(
            _s(PCS, OPT, _R.POW2, 0.5, PCS_OPT_MULTIPLIERS), _s(PTS, MAXABS, _R.POW2, 0.25)
        ),
        "ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW": MethodSpec(
            _s(PTS, MAXABS, _R.HW_ALIGNED, 0.5), _s(PCS, MAXABS, _R.POW2, 1.0), dynamic_only=True
        ),
        "MAXABS_PCS_POW2": MethodSpec(
            _s(PCS, MAXABS, _R.POW2, 0.5), _s(PCS, MAXABS, _R.POW2, 1.0), dynamic_only=True
        ),
    }
)

# Our own methods, beyond INC's 13: each says what it adds. Accepted as a ``scale_method`` string
# and matched by the dict form like INC's; INC's files cannot name them (stats files are not used
# by dynamic methods; an INC scale file of one is refused, naming the method).
EXTENSIONS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        # Per-channel max-abs weight scales and per-token activation scales, both max / fullscale
        # with no backoff and no rounding: what compressed-tensors' FP8_DYNAMIC scheme computes (and
        # vLLM serves), so its export computes exactly what the calibrated model computed.
        "MAXABS_PCS_ARBITRARY": MethodSpec(
            _s(PCS, MAXABS, _R.IDENTITY, 1.0), _s(PCS, MAXABS, _R.IDENTITY, 1.0), dynamic_only=True
        ),
        # INC's per-channel power-of-two weight scales (maxabs_pcs_pow2's weights: exact for weights
        # already on a coarse grid, Gaudi-friendly) with the client's per-token rule above, so the
        # export still computes exactly what the calibrated model computed.
        "ACT_MAXABS_PCS_ARBITRARY_WEIGHTS_PCS_MAXABS_POW2": MethodSpec(
            _s(PCS, MAXABS, _R.POW2, 0.5), _s(PCS, MAXABS, _R.IDENTITY, 1.0), dynamic_only=True
        ),
    }
)

# Every method a ``scale_method`` string may name: INC's, then ours.
METHODS: Mapping[str, MethodSpec] = MappingProxyType({**PREDEFINED, **EXTENSIONS})

# The 8 methods the user-facing table promises on every device.
USER_METHODS: tuple[str, ...] = (
    "UNIT_SCALE",
    "HW_ALIGNED_SINGLE_SCALE",
    "MAXABS_HW",
    "MAXABS_POW2",
    "MAXABS_ARBITRARY",
    "MAXABS_HW_OPT_WEIGHT",
    "MAXABS_POW2_OPT_WEIGHT",
    "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2",
)

# INC's dynamic per-token activation scales always use backoff 0.5 and POW2 (reference §2.8),
# whatever the section says; an IDENTITY section (our MAXABS_PCS_ARBITRARY) keeps its own backoff.
DYNAMIC_ACTIVATION_BACKOFF = 0.5


@dataclass(frozen=True)
class DynamicScaling:
    """How a dynamic module computes its activation scales per call: ``s = rounding(amax / (fullscale
    * backoff))``."""

    backoff: float
    rounding: Rounding

    @classmethod
    def of(cls, activation: SectionSpec) -> "DynamicScaling":
        """INC's forcing for its POW2 sections; an IDENTITY section as written."""
        if activation.rounding is Rounding.IDENTITY:
            return cls(activation.backoff, Rounding.IDENTITY)
        return INC_DYNAMIC_SCALING


INC_DYNAMIC_SCALING = DynamicScaling(DYNAMIC_ACTIVATION_BACKOFF, Rounding.POW2)


def match_predefined(weight: SectionSpec, activation: SectionSpec) -> str | None:
    """The named method (INC's or ours) whose (granularity, value type, rounding) triples equal
    these, if any."""
    key = (weight.shape_key(), activation.shape_key())
    for name, spec in METHODS.items():
        if spec.shape_key() == key:
            return name
    return None


@dataclass(frozen=True)
class Backoffs:
    """Backoffs the user gave explicitly in ``scale_params``; None = the method's own default."""

    input: float | None = None
    weight: float | None = None
    output: float | None = None


def apply_backoffs(method: MethodSpec, backoffs: Backoffs) -> MethodSpec:
    """A string method with the user's ``scale_params`` backoffs applied to its MAXABS sections."""
    weight, act = method.weight, method.activation
    if backoffs.weight is not None and weight.value_type is ValueType.MAXABS:
        weight = replace(weight, backoff=backoffs.weight)
    if backoffs.input is not None and act.value_type is ValueType.MAXABS:
        act = replace(act, backoff=backoffs.input)
    return replace(method, weight=weight, activation=act)


_LAYER_INDEX = re.compile(r"layers[./](\d+)")


@dataclass(frozen=True)
class ScalePlan:
    """The per-module choice of scale method (reference §1.4).

    Order: ``nodes[name]``, then ``layers[index]`` (first ``layers.N`` / ``layers/N`` in the name),
    then ``layer_types[class name]``, then ``default``.

    Attributes:
        name: the predefined method ``default`` matches (used in INC file names).
        default: the method of every module without an override.
        output_backoff: backoff for measured outputs (softmax, sdpa...); None = the activation's.
    """

    name: str
    default: MethodSpec
    nodes: Mapping[str, MethodSpec] = field(default_factory=dict)
    layers: Mapping[str, MethodSpec] = field(default_factory=dict)
    layer_types: Mapping[str, MethodSpec] = field(default_factory=dict)
    output_backoff: float | None = None

    def for_module(self, name: str, class_name: str | tuple[str, ...]) -> MethodSpec:
        """``class_name`` may list a class and its bases, most specific first."""
        if name in self.nodes:
            return self.nodes[name]
        m = _LAYER_INDEX.search(name)
        if m and m.group(1) in self.layers:
            return self.layers[m.group(1)]
        for cls in (class_name,) if isinstance(class_name, str) else class_name:
            if cls in self.layer_types:
                return self.layer_types[cls]
        return self.default

    def all_methods(self) -> list[MethodSpec]:
        return [self.default, *self.nodes.values(), *self.layers.values(), *self.layer_types.values()]

    @property
    def uses_stats(self) -> bool:
        return any(m.uses_stats for m in self.all_methods())

    @property
    def needs_hw_device(self) -> bool:
        return any(m.needs_hw_device for m in self.all_methods())

    @property
    def any_pcs(self) -> bool:
        return any(m.any_pcs for m in self.all_methods())


def predefined_plan(name: str, backoffs: Backoffs = Backoffs()) -> ScalePlan:
    """The plan of a named method string (any case), with explicit ``scale_params`` backoffs."""
    key = name.upper()
    if key not in METHODS:
        allowed = ", ".join(m.lower() for m in METHODS)
        raise ValueError(f"scale_method: unknown method {name!r}; allowed: {allowed}")
    return ScalePlan(key, apply_backoffs(METHODS[key], backoffs), output_backoff=backoffs.output)
