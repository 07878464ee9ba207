"""fp8-orchestrator: FP8 calibration and quantization of PyTorch LLMs, INC fp8_quant compatible.

The Python API mirrors INC's: ``prepare`` → run data → ``finalize_calibration``, ``convert``,
``quantize`` in one call, and ``scales_of`` to compare a converted model's scales with INC's.
The distributed driver is ``orchestrator.driver.calibration.Calibration`` (imported on demand: it loads Ray).

Rooms: ``configuration`` (the INC-style config), ``driver`` (the distributed run: Ray grid,
restarts, global scales, coverage), ``export`` (the FP8 checkpoint), ``entry`` (the CLIs and the
demo); ``api`` is the single-card API re-exported here.
"""

from orchestrator.api import (
    CalibrationStateError,
    MeasurementExistsError,
    StoreMismatchError,
    convert,
    finalize_calibration,
    prepare,
    quantize,
    scales_of,
)
from orchestrator.configuration.fp8_config import Fp8Config
from orchestrator.errors import ConfigError, Fp8OrchestratorError

__all__ = [
    "Fp8Config",
    "prepare",
    "finalize_calibration",
    "convert",
    "quantize",
    "scales_of",
    "Fp8OrchestratorError",
    "ConfigError",
    "CalibrationStateError",
    "MeasurementExistsError",
    "StoreMismatchError",
]
