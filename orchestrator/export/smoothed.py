"""Write a smoothed copy of a HF checkpoint: activation outliers migrated into the weights
(:mod:`shards.fp8.smoothing`), with the migration factors computed from a stats store.

The recipe: measure the original checkpoint with ``observer: maxabs_per_channel`` (any topology:
the store holds per-channel input max-abs in global coordinates), write the smoothed checkpoint
here, then calibrate and quantize *that* checkpoint like any other (any tp/dp, any method). The
smoothed checkpoint computes the original function in high precision (up to float rounding), so
everything downstream (the tp=k = tp=1 invariant, the stats store, INC files, the
compressed-tensors export) holds as for an unsmoothed model; the FP8 export starts from it.

Tensors are streamed one safetensors file at a time (a group's weights are read lazily to get
their column max-abs first), so memory stays at one file, never the whole model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from orchestrator.errors import Fp8OrchestratorError
from orchestrator.export.compressed_tensors import copy_serving_files
from shards.families import family_for
from shards.fp8.smoothing import column_maxabs, smooth_source, smooth_target, smoothing_factors
from stats_store.records import Measurement, as_maxabs
from stats_store.location import parse_location
from stats_store.zarr_store import ZarrStatsStore

PER_CHANNEL_OBSERVER = "maxabs_per_channel"
PROVENANCE_FILE = "smoothing.json"


class SmoothingError(Fp8OrchestratorError, ValueError):
    """The checkpoint or the stats store cannot give smoothing factors."""


@dataclass(frozen=True)
class SmoothingSummary:
    """What :func:`write_smoothed_checkpoint` did.

    Attributes:
        out: the smoothed checkpoint folder.
        alpha: the migration strength.
        factors: source module (in-model name) → its ``[channels]`` factors.
    """

    out: Path
    alpha: float
    factors: dict[str, torch.Tensor]


def _weight_files(ckpt: Path) -> list[Path]:
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise SmoothingError(f"checkpoint '{ckpt}' has no .safetensors file; smoothing reads safetensors checkpoints")
    return files


def _input_maxabs(m: Measurement, names: list[str], store: str) -> torch.Tensor:
    """Elementwise max of the per-channel input max-abs of ``names`` (they read the same input)."""
    vectors = []
    for name in names:
        stats = m.modules.get(name)
        if stats is None or not stats.inputs or stats.inputs[0] is None:
            raise SmoothingError(f"stats store '{store}' has no input statistics for {name}; measure it (allowlist "
                                 f"types Linear, observer {PER_CHANNEL_OBSERVER}) before smoothing")
        vectors.append(as_maxabs(stats.inputs[0]))
    if len({v.size for v in vectors}) != 1 or vectors[0].size == 1:
        raise SmoothingError(f"stats store '{store}': {names[0]} has {vectors[0].size} input value(s), not one per "
                             f"channel; measure with observer {PER_CHANNEL_OBSERVER}")
    return torch.from_numpy(np.max(np.stack(vectors), axis=0))


Updates = dict[str, list[tuple[str, torch.Tensor]]]


def smoothing_plan(checkpoint: str | Path, store: str | Path, alpha: float) -> tuple[dict[str, torch.Tensor], Updates]:
    """The factors per source module, and per on-disk tensor name its ("source" | "target", factors)
    operations: ``up_proj`` is both a target (its columns, MLP norm group) and a source (its rows,
    for ``down_proj``); the two commute."""
    ckpt = Path(checkpoint)
    config = json.loads((ckpt / "config.json").read_text())
    family = family_for(config)
    if not family.smoothing:
        raise SmoothingError(f"model family {family.name} has no smoothing groups (its experts read routed inputs); "
                             "smooth a dense model (Llama, Mistral, Qwen2, Qwen3) or quantize without smoothing")
    stats_store = ZarrStatsStore.open(store)  # a path or an s3:// URL
    store_dir = stats_store.location
    if stats_store.meta.observer != PER_CHANNEL_OBSERVER:
        raise SmoothingError(f"stats store '{store_dir}' was measured with observer '{stats_store.meta.observer}'; "
                             f"smoothing needs per-channel input statistics: measure with observer {PER_CHANNEL_OBSERVER}")
    measurement = stats_store.read_reduced()
    factors: dict[str, torch.Tensor] = {}
    updates: Updates = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in _weight_files(ckpt)]
        where = {key: h for h in handles for key in h.keys()}

        def tensor(key: str) -> torch.Tensor:
            if key not in where:
                raise SmoothingError(f"checkpoint '{ckpt}' has no tensor {key!r}; is it a {family.name} checkpoint?")
            return where[key].get_tensor(key)

        for layer in range(int(config["num_hidden_layers"])):
            prefix = f"model.layers.{layer}."
            for group in family.smoothing:
                targets = [prefix + t for t in group.targets]
                weights = {family.disk_name(f"{t}.weight"): t for t in targets}
                act = _input_maxabs(measurement, targets, store_dir)
                s = smoothing_factors(act, column_maxabs([tensor(k) for k in weights]), alpha)
                source = prefix + group.source
                factors[source] = s
                for key in weights:
                    updates.setdefault(key, []).append(("target", s))
                updates.setdefault(family.disk_name(f"{source}.weight"), []).append(("source", s))
                if group.kind == "linear" and family.disk_name(f"{source}.bias") in where:
                    updates.setdefault(family.disk_name(f"{source}.bias"), []).append(("source", s))
    return factors, updates


def _store_text(store: str | Path) -> str:
    """The store as ``smoothing.json`` records it: an absolute local path, or the s3:// URL."""
    loc = parse_location(store, store=False)
    return str(Path(loc.path).resolve()) if loc.is_local else loc.url


def write_smoothed_checkpoint(checkpoint: str | Path, store: str | Path, out: str | Path,
                              alpha: float = 0.5) -> SmoothingSummary:
    """Write the smoothed copy of ``checkpoint`` into ``out`` (a new folder; refused if it exists).

    Args:
        checkpoint: HF checkpoint folder (safetensors) of a family with smoothing groups.
        store: stats store measured on that checkpoint with observer ``maxabs_per_channel``.
        out: the folder to create: same file names, smoothed tensors, config and serving files,
            plus ``smoothing.json`` (alpha, store, factor ranges).
        alpha: migration strength in [0, 1].
    """
    ckpt, dest = Path(checkpoint), Path(out)
    if not 0.0 <= alpha <= 1.0:
        raise SmoothingError(f"smoothing alpha {alpha} is outside [0, 1]; 0 leaves the model as it is, 0.5 is "
                             "SmoothQuant's default")
    if dest.exists():
        raise SmoothingError(f"'{dest}' already exists; choose a new folder for the smoothed checkpoint")
    factors, updates = smoothing_plan(ckpt, store, alpha)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for f in _weight_files(ckpt):
            tensors = load_file(str(f))
            for key, operations in updates.items():
                if key in tensors:
                    for role, s in operations:
                        tensors[key] = (smooth_target if role == "target" else smooth_source)(tensors[key], s)
                    tensors[key] = tensors[key].contiguous()
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        for extra in ("config.json", "model.safetensors.index.json"):
            if (ckpt / extra).is_file():
                shutil.copy2(ckpt / extra, tmp / extra)
        copy_serving_files(ckpt, tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps({
            "alpha": alpha, "store": _store_text(store), "source_checkpoint": str(ckpt.resolve()),
            "groups": {name: {"min": float(s.min()), "max": float(s.max())} for name, s in factors.items()},
        }, indent=1))
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return SmoothingSummary(dest, alpha, factors)
