"""The Python API INC users know: ``prepare`` → run data → ``finalize_calibration``, then
``convert``; or ``quantize`` in one call. ``scales_of`` shows the scales a converted model uses.

``config`` is always an ``Fp8Config``, a dict of INC keys or the path of an INC JSON file; it is
turned into a ``RunPlan`` here and the shards see only that plan. Measurements are written to and
read from INC's measurement files under ``dump_stats_path`` (the stats store will replace these
two calls, :func:`_write_stats` and :func:`_read_stats`, behind the same API).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from orchestrator.config import Fp8Config
from orchestrator.errors import Fp8OrchestratorError
from shards.backends import Backend, backend_for_device
from shards.convert import convert_model, scales_of as _scales_of
from shards.hf_attention import install_hf_attention
from shards.measure import MeasureSession, run_batch
from shards.measurement import Measurement
from shards.numerics import ScaleDevice
from shards.plan import Mode, RunPlan
from stats_store.errors import IncFileNotFoundError
from stats_store.inc_format import discover_measurement_files, inc_file_name, read_measurement_set, write_measurement

ConfigLike = Fp8Config | dict[str, Any] | str | Path


class CalibrationStateError(Fp8OrchestratorError, RuntimeError):
    """``finalize_calibration``/``convert`` called on a model in the wrong state."""


@dataclass
class _Calibration:
    """A model being measured: its config, plan and observers."""

    config: Fp8Config
    plan: RunPlan
    session: MeasureSession
    written: list[Path] = field(default_factory=list)


# Calibration state is kept beside the model, not on it: nothing is hung on user modules.
_CALIBRATING: "weakref.WeakKeyDictionary[nn.Module, _Calibration]" = weakref.WeakKeyDictionary()


def _tensors_dir(dump_stats_path: str) -> Path:
    """``<dir>/<prefix>_tensors``: where the ``save`` observer writes."""
    p = Path(dump_stats_path)
    return p.parent / f"{p.name}_tensors"


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _write_stats(cal: _Calibration, m: Measurement) -> list[Path]:
    # The first dump of a run refuses to replace older files (they are never moved away silently);
    # later dumps of the same run (calibration_sample_interval) update its own files.
    cal.written = write_measurement(m, cal.plan.dump_stats_path, mod_list=list(cal.session.modules),
                                    overwrite=bool(cal.written))
    return cal.written


def _read_stats(plan: RunPlan) -> tuple[Measurement | None, str]:
    """The measurement for ``plan`` from INC files, and a description of where it was looked for."""
    exact = inc_file_name(plan.dump_stats_path, plan.observer)
    target = exact if exact.is_file() else Path(str(exact.with_suffix("")))
    try:
        paths = discover_measurement_files(target)
    except IncFileNotFoundError as exc:
        return None, f"'{exact}' (no measurement files there: {exc})"
    return read_measurement_set(paths), ", ".join(f"'{p}'" for p in paths)


def prepare(model: nn.Module, config: ConfigLike, *, hpu_device: ScaleDevice | None = None) -> nn.Module:
    """Attach observers to the modules the config selects (MEASURE). Run data through the model
    next, then call :func:`finalize_calibration` (or :func:`convert` directly).

    HF models get measurable attention ops (q·kᵀ, softmax, attn·v, KV cache) first.
    """
    cfg = Fp8Config.load(config)
    if model in _CALIBRATING:
        raise CalibrationStateError("prepare: this model is already being measured; call finalize_calibration(model) first")
    plan = cfg.to_plan(Mode.MEASURE, hpu_device=hpu_device)
    install_hf_attention(model)
    cal: _Calibration

    def dump(session: MeasureSession) -> None:
        _write_stats(cal, session.collect())

    session = MeasureSession(model, plan, tensors_dir=_tensors_dir(plan.dump_stats_path), on_interval=dump)
    cal = _Calibration(cfg, plan, session)
    _CALIBRATING[model] = cal
    return model


def finalize_calibration(model: nn.Module) -> Measurement:
    """Detach the observers and write the measurement under ``dump_stats_path`` (INC's files).

    Returns:
        the measurement (per-module exact fp32 max-abs statistics).
    """
    cal = _CALIBRATING.pop(model, None)
    if cal is None:
        raise CalibrationStateError("finalize_calibration: this model is not being measured; call prepare(model, config) first")
    try:
        m = cal.session.collect()
    finally:
        cal.session.close()
    _write_stats(cal, m)
    return m


def convert(model: nn.Module, config: ConfigLike | None = None, *, backend: Backend | None = None,
            hpu_device: ScaleDevice | None = None) -> nn.Module:
    """Quantize the model in place (QUANTIZE) and return it.

    A model still being measured is finalized first (its measurement is written, then used);
    otherwise the measurement is read from ``dump_stats_path``. ``config`` defaults to the one
    given to :func:`prepare`. ``backend`` defaults to the one of the device the model is on.
    """
    cal = _CALIBRATING.get(model)
    if config is None and cal is None:
        raise CalibrationStateError("convert: pass a config (this model was not prepared in this process)")
    cfg = Fp8Config.load(config) if config is not None else cal.config  # type: ignore[union-attr]
    plan = cfg.to_plan(Mode.QUANTIZE, hpu_device=hpu_device)
    measurement: Measurement | None = None
    source = "no measurement (the scale method needs none)"
    if cal is not None:
        measurement = finalize_calibration(model)
        source = f"the measurement just collected (written to {', '.join(map(str, cal.written))})"
    elif plan.scale_plan.uses_stats and not plan.dynamic:
        measurement, source = _read_stats(plan)
    install_hf_attention(model)
    convert_model(model, plan, measurement, backend or backend_for_device(_model_device(model)), source=source)
    return model


def quantize(model: nn.Module, config: ConfigLike, calib_data: Iterable[Any] | Callable[[nn.Module], Any] | None = None,
             *, backend: Backend | None = None, hpu_device: ScaleDevice | None = None) -> nn.Module:
    """Measure with ``calib_data`` (batches: a tensor, a tuple of positional or a dict of keyword
    arguments; or a function that runs the model) and quantize, in one call."""
    cfg = Fp8Config.load(config)
    needs_stats = cfg.scale_plan().uses_stats and not cfg.dynamic_quantization
    if needs_stats:
        if calib_data is None:
            raise CalibrationStateError("quantize: the scale method needs a measurement; pass calib_data")
        prepare(model, cfg, hpu_device=hpu_device)
        try:
            with torch.no_grad():
                if callable(calib_data):
                    calib_data(model)
                else:
                    for batch in calib_data:
                        run_batch(model, batch)
        except BaseException:
            _abandon(model)
            raise
    return convert(model, cfg, backend=backend, hpu_device=hpu_device)


def _abandon(model: nn.Module) -> None:
    """Detach the observers of a calibration that failed, writing nothing."""
    cal = _CALIBRATING.pop(model, None)
    if cal is not None:
        cal.session.close()


def scales_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The scales a converted model computes with, shaped like the ``Nodes`` of INC's scale JSON:
    ``{name: {"inputs": [...], "outputs": [...], "params": {"weight": ...}}}``."""
    return _scales_of(model)


__all__ = ["prepare", "finalize_calibration", "convert", "quantize", "scales_of", "CalibrationStateError"]
