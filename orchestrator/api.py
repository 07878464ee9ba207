"""The Python API INC users know: ``prepare`` → run data → ``finalize_calibration``, then
``convert``; or ``quantize`` in one call. ``scales_of`` shows the scales a converted model uses.

``config`` is always an ``Fp8Config``, a dict of INC keys or the path of an INC JSON file; it is
turned into a ``RunPlan`` here and the shards see only that plan.

Measurements live in the stats store at ``<dump_stats_path>.zarr`` (decisions §3), written as a
one-shard run (dp = tp = 1) whose batches are the model's top-level forward calls: every
``calibration_sample_interval`` forwards and at ``finalize_calibration`` the statistics of the
forwards since the last flush are written and committed, then the store is reduced. ``convert``
reads the reduced statistics back, checking that they belong to this model (its fingerprint).
INC's files are import and export only: ``convert`` imports INC measurement files at
``dump_stats_path`` when no store exists, ``finalize_calibration(inc_files=True)`` writes them,
``convert(inc_scale_file=True)`` writes INC's scale file.

Off an explicit ``hpu_device``, the Gaudi this process runs on (if any) is the default of
``device_for_scales``, as in INC.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from orchestrator.configuration.fp8_config import Fp8Config
from orchestrator.errors import Fp8OrchestratorError
from orchestrator.driver.run_identity import measurement_config_hash
from orchestrator.driver.module_fingerprint import FINGERPRINT_SOURCE, fingerprint_of_module
from shards.quantized.backends import Backend, backend_for_device, detect_gaudi
from shards.quantized.swap import convert_model, scales_of as _scales_of
from shards.families import family_of_model, install_family
from shards.families.inc_names import family_view
from shards.model.hf_attention import install_hf_attention_if_asked
from shards.measuring.observers import declared_merges
from shards.measuring.session import MeasureSession, run_batch
from stats_store.records import Measurement, SentCounts
from shards.fp8.numerics import ScaleDevice
from shards.plan import Mode, RunPlan
from stats_store.errors import IncFileExistsError, IncFileNotFoundError, IncFormatError, StoreLocationError
from stats_store.inc_names import INC_SCALE_METHODS, inc_file_name
from stats_store.inc_unify import discover_measurement_files, read_measurement_set
from stats_store.inc_write import write_measurement, write_scales
from stats_store.location import StoreLocation, parse_location
from stats_store.zarr_store import ZarrStatsStore, store_exists
from stats_store.metadata import RunMeta
from stats_store.shard_map import ShardSpec

logger = logging.getLogger(__name__)

ConfigLike = Fp8Config | dict[str, Any] | str | Path

# The single card is shard 0 of a run with dp = tp = 1.
_ONE_CARD = ShardSpec(0, 1, 1)


class CalibrationStateError(Fp8OrchestratorError, RuntimeError):
    """``finalize_calibration``/``convert`` called on a model in the wrong state."""


class MeasurementExistsError(Fp8OrchestratorError, FileExistsError):
    """A stats store already holds a measurement where a new one would be written."""


class StoreMismatchError(Fp8OrchestratorError, ValueError):
    """The stats store at ``dump_stats_path`` does not fit this conversion (e.g. another observer)."""


@dataclass
class _Calibration:
    """A model being measured: its config, plan, observers and what has reached the store.

    Attributes:
        fingerprint: the model's fingerprint, taken at ``prepare`` (forwards do not change it).
        device_kind: the card measuring (``cpu``, ``cuda``, ``hpu``), for the run metadata.
        overwrite: replace a stats store of another run when the store is opened.
        store: the run's store, opened at the first flush.
        flushed: top-level forwards already written to the store (the next batch id).
        sent: counts already written (the store adds counts, so increments go).
    """

    config: Fp8Config
    plan: RunPlan
    session: MeasureSession
    fingerprint: dict[str, object]
    device_kind: str
    overwrite: bool = False
    store: ZarrStatsStore | None = None
    flushed: int = 0
    sent: SentCounts = field(default_factory=SentCounts)


# Calibration state is kept beside the model, not on it: nothing is hung on user modules.
_CALIBRATING: "weakref.WeakKeyDictionary[nn.Module, _Calibration]" = weakref.WeakKeyDictionary()


def _tensors_dir(plan: RunPlan) -> Path | None:
    """``<dir>/<prefix>_tensors``: where the ``save`` observer writes (a local directory; None on s3)."""
    if plan.observer == "save":
        _local_only(plan, "observer 'save' writes every observed tensor to local files beside it",
                    "measure with a local dump_stats_path")
    if not parse_location(plan.dump_stats_path, store=False).is_local:
        return None  # only the save observer writes there, refused above
    p = _local_prefix(plan)
    return p.parent / f"{p.name}_tensors"


def _local_prefix(plan: RunPlan) -> Path:
    """``dump_stats_path`` as the local file prefix of INC's files (a file:// URL gives its path)."""
    return parse_location(plan.dump_stats_path, store=False).local_path


def _local_only(plan: RunPlan, what: str, fix: str) -> None:
    """Refuse, before anything is measured or converted, a local-file feature on an s3:// store."""
    loc = parse_location(plan.dump_stats_path)
    if not loc.is_local:
        raise StoreLocationError(f"dump_stats_path {loc.prefix_url} is on object storage, but {what}; {fix}")


def _model_device(model: nn.Module) -> torch.device:
    # The first tensor met: a generator, not a tuple of every parameter and buffer of the model.
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if t is None else t.device


def _refuse_existing_store(where: StoreLocation) -> None:
    # Earlier measurements are never replaced silently (decisions §3; INC moves them to backup_*).
    if store_exists(where):
        raise MeasurementExistsError(
            f"{where} already holds a measurement; convert from it, choose another dump_stats_path, "
            "or pass overwrite=True to replace it"
        )


# ---- MEASURE: writing the store ----------------------------------------------------------------


def _increment(cal: _Calibration) -> Measurement:
    """The statistics of the forwards since the last flush: values are running maxima (re-sending
    them is harmless), call and NaN/Inf counts are increments (the store adds them)."""
    # num_samples None: the store counts the batch ids.
    return replace(cal.sent.increment(cal.session.collect()), num_samples=None)


def _open_store(cal: _Calibration) -> ZarrStatsStore:
    if cal.store is None:
        path = parse_location(cal.plan.dump_stats_path)
        if not cal.overwrite:
            _refuse_existing_store(path)  # also when it appeared after prepare
        meta = RunMeta(measurement_config_hash(cal.config), cal.fingerprint, dp=1, tp=1,
                       device_kind=cal.device_kind, observer=cal.plan.observer)
        cal.store = ZarrStatsStore.open_run(path, meta, overwrite=cal.overwrite)
        cal.store.record_selected(list(cal.session.modules))  # called or not (idle MoE experts)
        cal.overwrite = False  # later flushes of this run must never wipe what it wrote
    return cal.store


def _flush(cal: _Calibration) -> None:
    """Write and commit the forwards since the last flush (one batch id per forward)."""
    store = _open_store(cal)
    batch_ids = list(range(cal.flushed, cal.session.num_samples))
    if not batch_ids and store.commits():
        return  # nothing new since the last flush
    m = _increment(cal)
    store.commit(store.write_shard(_ONE_CARD, m, batch_ids, declared_merges(cal.plan.observer, m)))
    cal.flushed = cal.session.num_samples


def _export_inc(cal: _Calibration, m: Measurement) -> list[Path]:
    # INC writes NumSamples only when it dumps at an interval; the files match INC's otherwise.
    num_samples = m.num_samples if cal.plan.calibration_sample_interval > 0 else None
    return write_measurement(replace(m, num_samples=num_samples), _local_prefix(cal.plan),
                             mod_list=list(cal.session.modules))


def prepare(model: nn.Module, config: ConfigLike, *, hpu_device: ScaleDevice | None = None,
            overwrite: bool = False) -> nn.Module:
    """Attach observers to the modules the config selects (MEASURE). Run data through the model
    next, then call :func:`finalize_calibration` (or :func:`convert` directly).

    HF models get measurable attention ops (q·kᵀ, softmax, attn·v, KV cache) first.

    Args:
        hpu_device: the Gaudi the model runs on; default: detected (None off Gaudi).
        overwrite: replace a stats store already at ``<dump_stats_path>.zarr`` (default: refuse).
    """
    cfg = Fp8Config.load(config)
    if model in _CALIBRATING:
        raise CalibrationStateError("prepare: this model is already being measured; call finalize_calibration(model) first")
    plan = cfg.to_plan(Mode.MEASURE, hpu_device=hpu_device if hpu_device is not None else detect_gaudi())
    if not overwrite:
        _refuse_existing_store(parse_location(plan.dump_stats_path))
    tensors_dir = _tensors_dir(plan)  # refuses the save observer on an s3:// store, before the model changes
    # Fused MoE experts become per-expert Linears (views, no copy) before anything else, so the
    # fingerprint, observers and convert all see the same module tree; an unsupported model stops here.
    install_family(model)
    fingerprint = fingerprint_of_module(model)  # before any module is added to the model
    install_hf_attention_if_asked(model, plan.selection)
    cal: _Calibration

    def dump(_session: MeasureSession) -> None:
        _flush(cal)

    session = MeasureSession(model, plan, tensors_dir=tensors_dir, on_interval=dump)
    cal = _Calibration(cfg, plan, session, fingerprint, _model_device(model).type, overwrite)
    _CALIBRATING[model] = cal
    return model


def finalize_calibration(model: nn.Module, *, inc_files: bool = False) -> Measurement:
    """Detach the observers, write the measurement to the stats store and reduce it.

    Args:
        inc_files: also write INC's measurement files (``<P>_hooks_<observer>.json/.npz``,
            ``_mod_list.json``) under ``dump_stats_path``; existing files are never replaced.

    Returns:
        the measurement as the store holds it (per-module exact fp32 max-abs statistics).
    """
    cal = _CALIBRATING.get(model)
    if cal is None:
        raise CalibrationStateError("finalize_calibration: this model is not being measured; call prepare(model, config) first")
    if inc_files:  # refused while the model is still being measured: nothing is lost
        _local_only(cal.plan, "inc_files=True writes INC's measurement files beside it",
                    f"call finalize_calibration(model) without it, then `stats-store export-inc "
                    f"{parse_location(cal.plan.dump_stats_path)} --out DIR/prefix`")
    del _CALIBRATING[model]
    try:
        _flush(cal)
    finally:
        cal.session.close()
    assert cal.store is not None
    m = cal.store.reduce()
    if inc_files:
        _export_inc(cal, m)
    return m


# ---- QUANTIZE: reading the store ---------------------------------------------------------------


def _read_store(path: StoreLocation, plan: RunPlan, model: nn.Module) -> Measurement:
    """The reduced statistics at ``path``, refused when measured on another model or observer."""
    store = ZarrStatsStore.open(path)
    stored = store.meta.model_fingerprint
    if isinstance(stored, dict) and stored.get("source") == FINGERPRINT_SOURCE:
        store.check_fingerprint(fingerprint_of_module(model, like=stored))
    else:
        # Measured from checkpoint files (fp8-calibrate): their fingerprint hashes file bytes,
        # which an in-memory model does not have.
        logger.warning("%s was measured from checkpoint files; this model cannot be checked against its "
                       "fingerprint, make sure it was loaded from the same checkpoint", path)
    if store.meta.observer != plan.observer:
        raise StoreMismatchError(
            f"{path} was measured with observer {store.meta.observer!r}, the config has {plan.observer!r}; "
            f"set observer to {store.meta.observer!r} or measure again into another dump_stats_path"
        )
    return store.read_reduced()


def _read_inc(plan: RunPlan) -> tuple[Measurement | None, str]:
    """INC measurement files at ``dump_stats_path`` (users coming from INC), and where they were looked for."""
    exact = inc_file_name(_local_prefix(plan), plan.observer)
    target = exact if exact.is_file() else Path(str(exact.with_suffix("")))
    try:
        paths = discover_measurement_files(target)
    except IncFileNotFoundError as exc:
        return None, f"INC measurement files '{exact}' ({exc})"
    logger.warning("no stats store at %s; importing INC measurement files %s",
                   parse_location(plan.dump_stats_path), ", ".join(map(str, paths)))
    return read_measurement_set(paths), "INC measurement files " + ", ".join(f"'{p}'" for p in paths)


def _read_stats(plan: RunPlan, model: nn.Module) -> tuple[Measurement | None, str]:
    """The measurement for ``plan``: from the stats store, else from INC files; and where it came from.

    Either may hold vLLM-Gaudi's names for a MoE layer (a fused ``moe_op`` and per-expert lists,
    e.g. imported with ``stats-store import-inc``): our per-expert Linears read them through the
    model's family (``shards.families.inc_names``).
    """
    path = parse_location(plan.dump_stats_path)
    if store_exists(path):
        measurement, source = _read_store(path, plan, model), f"the stats store '{path}'"
    elif not path.is_local:  # INC's files are local files: nothing to import beside an s3:// store
        return None, f"the stats store '{path}' (none there)"
    else:
        measurement, source = _read_inc(plan)
        if measurement is None:
            return None, f"the stats store '{path}' (none there) or {source}"
    family = family_of_model(model)
    return (family_view(measurement, family) if family is not None else measurement), source


def _scale_file_paths(plan: RunPlan) -> list[Path]:
    if plan.scale_plan.name not in INC_SCALE_METHODS:
        raise IncFormatError(f"convert(inc_scale_file=True): scale_method {plan.scale_plan.name.lower()} is ours, not "
                             "INC's, and INC's scale files cannot name it; leave inc_scale_file off (the compressed-"
                             "tensors export and scales_of give its scales)")
    return [inc_file_name(_local_prefix(plan), plan.observer, plan.scale_plan.name, suffix=s) for s in (".json", ".npz")]


def _refuse_existing_scale_file(plan: RunPlan) -> None:
    # Checked before the model is touched: a refused export must not leave a half-done conversion.
    _local_only(plan, "inc_scale_file=True writes INC's scale file beside it", "leave inc_scale_file off "
                "(scales_of(model) and the compressed-tensors export give the scales) or use a local dump_stats_path")
    existing = [str(p) for p in _scale_file_paths(plan) if p.exists()]
    if existing:
        raise IncFileExistsError(
            f"convert(inc_scale_file=True) would replace {', '.join(existing)}; move it away or choose another dump_stats_path"
        )


def convert(model: nn.Module, config: ConfigLike | None = None, *, backend: Backend | None = None,
            hpu_device: ScaleDevice | None = None, inc_files: bool = False, inc_scale_file: bool = False) -> nn.Module:
    """Quantize the model in place (QUANTIZE) and return it.

    A model still being measured is finalized first (its measurement is written to the store,
    then used); otherwise the measurement is read from the stats store at
    ``<dump_stats_path>.zarr`` (it must have been measured on a model with the same parameters), or
    imported from INC measurement files at ``dump_stats_path`` when there is no store.

    Args:
        config: defaults to the one given to :func:`prepare`.
        backend: defaults to the one of the device the model is on.
        hpu_device: the Gaudi the model runs on; default: detected (None off Gaudi).
        inc_files: when this call finalizes a calibration, also write INC's measurement files.
        inc_scale_file: write INC's scale file ``<P>_hooks_<observer>_<METHOD>.json/.npz`` of the
            converted model; an existing one is never replaced (refused before converting).
    """
    cal = _CALIBRATING.get(model)
    if config is None and cal is None:
        raise CalibrationStateError("convert: pass a config (this model was not prepared in this process)")
    cfg = Fp8Config.load(config) if config is not None else cal.config  # type: ignore[union-attr]
    plan = cfg.to_plan(Mode.QUANTIZE, hpu_device=hpu_device if hpu_device is not None else detect_gaudi())
    install_family(model)  # before the fingerprint check: prepare fingerprinted the model with its experts unfused
    if inc_scale_file:
        _refuse_existing_scale_file(plan)
    measurement: Measurement | None = None
    source = "no measurement (the scale method needs none)"
    if cal is not None:
        measurement = finalize_calibration(model, inc_files=inc_files)
        source = f"the measurement just collected (written to the stats store '{parse_location(cal.plan.dump_stats_path)}')"
    elif plan.scale_plan.uses_stats and not plan.dynamic:
        measurement, source = _read_stats(plan, model)
    install_hf_attention_if_asked(model, plan.selection)
    result = convert_model(model, plan, measurement, backend or backend_for_device(_model_device(model)),
                           source=source)
    if result.left_high_precision:
        # Never silent: an idle MoE expert or an unreached module is named, with where we looked.
        logger.warning("%d selected module(s) have no measurement in %s and stay in high precision "
                       "(ignore_modules_wo_measures): %s", len(result.left_high_precision), source,
                       ", ".join(result.left_high_precision))
    if inc_scale_file:
        write_scales(scales_of(model), _local_prefix(plan), plan.observer, plan.scale_plan.name)
    return model


def quantize(model: nn.Module, config: ConfigLike, calib_data: Iterable[Any] | Callable[[nn.Module], Any] | None = None,
             *, backend: Backend | None = None, hpu_device: ScaleDevice | None = None, overwrite: bool = False,
             inc_files: bool = False, inc_scale_file: bool = False) -> nn.Module:
    """Measure with ``calib_data`` (batches: a tensor, a tuple of positional or a dict of keyword
    arguments; or a function that runs the model) and quantize, in one call.

    ``overwrite`` is :func:`prepare`'s, ``inc_files`` and ``inc_scale_file`` are :func:`convert`'s.
    """
    cfg = Fp8Config.load(config)
    needs_stats = cfg.scale_plan().uses_stats and not cfg.dynamic_quantization
    if needs_stats:
        if calib_data is None:
            raise CalibrationStateError("quantize: the scale method needs a measurement; pass calib_data")
        prepare(model, cfg, hpu_device=hpu_device, overwrite=overwrite)
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
    return convert(model, cfg, backend=backend, hpu_device=hpu_device, inc_files=inc_files,
                   inc_scale_file=inc_scale_file)


def _abandon(model: nn.Module) -> None:
    """Detach the observers of a calibration that failed; what earlier interval flushes committed
    stays in the store (a partial run is never deleted silently)."""
    cal = _CALIBRATING.pop(model, None)
    if cal is not None:
        cal.session.close()


def scales_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The scales a converted model computes with, shaped like the ``Nodes`` of INC's scale JSON:
    ``{name: {"inputs": [...], "outputs": [...], "params": {"weight": ...}}}``."""
    return _scales_of(model)


__all__ = ["prepare", "finalize_calibration", "convert", "quantize", "scales_of", "CalibrationStateError",
           "MeasurementExistsError", "StoreMismatchError"]
