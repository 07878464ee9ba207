"""Reading INC measurement JSON into a ``Measurement`` and the file's layout.

Reference ``inc-fp8-semantics.md`` §4 (files), §3.1 (op table); ``project-decisions.md`` §3.

Import reads the JSON only (INC's NPZ holds a pickled dict, and we never unpickle). One
``json.loads`` parses the file; each value becomes a float32 vector with one numpy call.
``Infinity`` / ``NaN`` stay in the vectors as data and are counted per tensor label in
``ModuleStats.nonfinite``; the scale code refuses to turn them into scales. The layout captured
alongside (``stats_store.inc_layout``) lets ``stats_store.inc_write`` re-export the file exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from stats_store.errors import IncFileNotFoundError, IncFormatError
from stats_store.inc_layout import (
    DEFAULT_INDENT,
    KEY_ALIASES,
    MEASUREMENT_MODE,
    SCALE_MODE,
    IncLayout,
    IncMeasurementFile,
    NodeLayout,
    Shape,
)
from stats_store.inc_names import parse_inc_file_name
from stats_store.inc_ops import infer_op_type
from stats_store.records import Measurement, ModuleStats

__all__ = [
    "measurement_from_inc_dict",
    "read_inc_measurement",
    "read_measurement_json",
]


# Python's json already maps these tokens to floats; naming them keeps the intent explicit.
_NONFINITE_TOKENS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
_NODE_KEYS = frozenset(k for names in KEY_ALIASES.values() for k in names)


# --------------------------------------------------------------------------------------------
# Op type inference (INC files do not store it).
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def _detect_indent(text: str) -> int | None:
    """The indent of a ``json.dumps(..., indent=n)`` text; None for compact JSON."""
    if not text.startswith("{\n"):
        return None
    line = text[2 : text.find("\n", 2)]
    return len(line) - len(line.lstrip(" "))


def _read_value(value: Any, label: str, where: str, nonfinite: dict[str, int]) -> tuple[np.ndarray, Shape]:
    """A nested list of numbers → (float32 1-D vector, the nesting shape); counts NaN/Inf."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise IncFormatError(
            f"{where} {label}: expected a number or nested lists of numbers of one shape, got "
            f"{str(value)[:80]!r} ({exc}); fix or regenerate the file"
        ) from None
    if arr.size == 0:
        raise IncFormatError(f"{where} {label}: empty value {value!r}; every measured tensor needs a max-abs")
    flat = arr.reshape(-1)
    bad = flat.size - int(np.count_nonzero(np.isfinite(flat)))
    if bad:
        nonfinite[label] = bad
    return flat, arr.shape


def _node_key(node: Mapping[str, Any], canonical: str, where: str) -> str | None:
    found = [k for k in KEY_ALIASES[canonical] if k in node]
    if len(found) > 1:
        raise IncFormatError(f"{where}: both {found[0]!r} and {found[1]!r} keys; keep only {canonical!r}")
    return found[0] if found else None


def _read_list(node: Mapping[str, Any], key: str | None, kind: str, where: str,
               nonfinite: dict[str, int]) -> tuple[list[np.ndarray], tuple[Shape, ...]] | None:
    if key is None:
        return None
    raw = node[key]
    if not isinstance(raw, list):
        raise IncFormatError(f"{where}: {key!r} must be a list (one entry per {kind[:-1]}), got {type(raw).__name__}")
    pairs = [_read_value(v, f"{kind}.{i}", where, nonfinite) for i, v in enumerate(raw)]
    return [p[0] for p in pairs], tuple(p[1] for p in pairs)


def _read_node(name: str, node: Any, source: str) -> tuple[ModuleStats, NodeLayout]:
    where = f"{source}: module {name!r}"
    if not isinstance(node, dict):
        raise IncFormatError(f"{where}: a node must be an object with 'inputs'/'outputs'/'params', got {node!r:.80}")
    extra = set(node) - _NODE_KEYS
    if extra:
        raise IncFormatError(f"{where}: unexpected keys {sorted(extra)}; INC nodes have inputs, outputs, params")
    nonfinite: dict[str, int] = {}
    inputs = _read_list(node, _node_key(node, "inputs", where), "inputs", where, nonfinite) or ([], ())
    outputs = _read_list(node, _node_key(node, "outputs", where), "outputs", where, nonfinite)
    raw_params = node.get("params")
    params: dict[str, np.ndarray] = {}
    param_shapes: tuple[tuple[str, Shape], ...] | None = None
    if "params" in node:
        if not isinstance(raw_params, dict):
            raise IncFormatError(f"{where}: 'params' must be an object like {{\"weight\": [[v]]}}, got {raw_params!r:.80}")
        shapes = []
        for pname, value in raw_params.items():
            params[pname], shape = _read_value(value, f"params.{pname}", where, nonfinite)
            shapes.append((pname, shape))
        param_shapes = tuple(shapes)
    op = infer_op_type(name, len(inputs[0]), raw_params if param_shapes is not None else None,
                       None if outputs is None else len(outputs[0]))
    stats = ModuleStats(
        name=name,
        op_type=op,
        inputs=list(inputs[0]),
        outputs=None if outputs is None else list(outputs[0]),
        params=params,
        nonfinite=nonfinite,
    )
    layout = NodeLayout(tuple(node), inputs[1], None if outputs is None else outputs[1], param_shapes)
    return stats, layout


def _check_header(doc: Mapping[str, Any], source: str) -> None:
    mode = doc.get("Mode", MEASUREMENT_MODE)
    if mode == SCALE_MODE:
        raise IncFormatError(
            f"{source} is an INC scale file (Mode 'Scale'); import the measurement file "
            "<prefix>_hooks_<observer>[_<rank>_<world>].json instead"
        )
    if mode != MEASUREMENT_MODE:
        raise IncFormatError(f"{source}: Mode is {mode!r}; an INC measurement file has Mode {MEASUREMENT_MODE!r}")
    for key in ("NumSamples", "LocalRank"):
        value = doc.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise IncFormatError(f"{source}: {key} must be an integer or null, got {value!r}")


def measurement_from_inc_dict(
    doc: Any, source: str = "<dict>", observer: str = "maxabs", indent: int | None = DEFAULT_INDENT
) -> IncMeasurementFile:
    """Convert a parsed INC measurement document into a Measurement and its layout."""
    if not isinstance(doc, dict) or not isinstance(doc.get("Nodes"), dict):
        raise IncFormatError(f"{source}: not an INC measurement file (expected an object with a 'Nodes' object)")
    _check_header(doc, source)
    modules: dict[str, ModuleStats] = {}
    node_layouts: dict[str, NodeLayout] = {}
    for name, node in doc["Nodes"].items():
        modules[name], node_layouts[name] = _read_node(name, node, source)
    header = MappingProxyType({k: v for k, v in doc.items() if k not in ("Nodes", "NumSamples")})
    layout = IncLayout(tuple(doc), header, MappingProxyType(node_layouts), indent)
    m = Measurement(observer=observer, modules=modules, num_samples=doc.get("NumSamples"))
    return IncMeasurementFile(Path(source), m, layout)


def read_inc_measurement(path: str | Path, observer: str | None = None) -> IncMeasurementFile:
    """Import one INC measurement JSON with its layout (for an exact re-export).

    Args:
        path: the ``.json`` file (any rank suffix, or none).
        observer: the observer name; by default taken from the file name (``maxabs`` if the name is
            not an INC name).

    Raises:
        IncFileNotFoundError: the file does not exist.
        IncFormatError: invalid JSON, a scale file, or a node that is not INC's structure.
    """
    path = Path(path)
    if path.suffix == ".npz":
        raise IncFormatError(
            f"{path}: INC's NPZ holds a pickled dict and is never read here; pass the .json beside it"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IncFileNotFoundError(f"INC measurement file {path} does not exist; check dump_stats_path and rank suffix") from None
    try:
        doc = json.loads(text, parse_constant=_NONFINITE_TOKENS.__getitem__)
    except json.JSONDecodeError as exc:
        raise IncFormatError(f"{path}: not valid JSON ({exc}); the file may be truncated") from None
    if observer is None:
        parsed = parse_inc_file_name(path)
        observer = parsed.observer if parsed is not None else "maxabs"
    return measurement_from_inc_dict(doc, str(path), observer, _detect_indent(text))


def read_measurement_json(path: str | Path) -> Measurement:
    """Import one INC measurement JSON (see :func:`read_inc_measurement`)."""
    return read_inc_measurement(path).measurement
