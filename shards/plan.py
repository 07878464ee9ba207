"""The frozen run plan that ``orchestrator.configuration.fp8_config.Fp8Config`` emits for the shards.

Shards and the coordinator read only this; they never see raw JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shards.fp8.numerics import Fp8Format, HpDtype, LpDtype, ScaleDevice, fp8_format
from shards.fp8.methods import ScalePlan
from shards.model.selection import SelectionRules


class Mode(str, enum.Enum):
    NONE = "NONE"
    QUANTIZE = "QUANTIZE"
    MEASURE = "MEASURE"
    SHAPE = "SHAPE"
    LOAD = "LOAD"
    AUTO = "AUTO"  # MEASURE in prepare(), QUANTIZE in convert(), both in a full run


class MeasureExclude(str, enum.Enum):
    NONE = "NONE"
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"
    PARAMS = "PARAMS"
    ALL = "ALL"


class ScaleFormat(str, enum.Enum):
    CONST = "CONST"  # tensors (nn.Parameter / buffers) in state_dict
    SCALAR = "SCALAR"  # Python floats


@dataclass(frozen=True)
class RunPlan:
    """Everything a shard needs to measure or quantize, already validated.

    Attributes:
        mode: what this run does.
        observer: observer name (``maxabs``, ``maxabs_per_channel``, ...).
        dump_stats_path: ``<dir>/<prefix>``; the store is ``<dir>/<prefix>.zarr``.
        lp: FP8 encoding.
        hp: high-precision dtype for scale arithmetic and dequantized outputs.
        scale_plan: per-module scale methods.
        selection: allow/block rules.
        measure_exclude: which observers are skipped.
        scale_format: how scales are held by quantized modules.
        device_for_scales: Gaudi whose FP8 range and scale set the scales target (None: 448 / no HW set).
        dynamic: dynamic per-token activation quantization.
        ignore_modules_wo_measures: leave a module with no measurement in high precision.
        recalc_scales: ignore cached scales.
        calibration_sample_interval: flush stats every N top-level forwards (0 = never).
    """

    mode: Mode
    observer: str
    dump_stats_path: str
    lp: LpDtype
    hp: HpDtype
    scale_plan: ScalePlan
    selection: SelectionRules
    measure_exclude: MeasureExclude = MeasureExclude.OUTPUT
    scale_format: ScaleFormat = ScaleFormat.SCALAR
    device_for_scales: ScaleDevice | None = None
    dynamic: bool = False
    ignore_modules_wo_measures: bool = False
    recalc_scales: bool = False
    calibration_sample_interval: int = 0

    @property
    def fp8(self) -> Fp8Format:
        return fp8_format(self.lp, self.device_for_scales)

    def measures_outputs(self, outputs_required: bool) -> bool:
        """Output observers run unless excluded (OUTPUT/ALL) for an op that does not require them."""
        return outputs_required or self.measure_exclude not in (MeasureExclude.OUTPUT, MeasureExclude.ALL)
