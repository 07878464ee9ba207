"""Writing measurements and scales as INC's files, in INC's exact format.

Reference ``inc-fp8-semantics.md`` §4 (files), §5 (ranks); ``project-decisions.md`` §3.

Export writes what INC writes: JSON with ``indent=4`` (header keys ``[NumSamples,] GlobalRank,
LocalRank, Mode, Nodes``), an NPZ made by ``np.savez(file, the_dict)`` and, for measurements,
``_mod_list.json``. Given the :class:`~stats_store.inc_layout.IncLayout` captured at import
(nesting of each value, key order, header), export gives back the original file byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stats_store.atomic import atomic_write, atomic_write_json
from stats_store.errors import IncFileExistsError, IncFormatError
from stats_store.inc_experts import has_expert_lists, localize_experts
from stats_store.inc_layout import (
    DEFAULT_INDENT,
    KEY_ALIASES,
    MEASUREMENT_MODE,
    SCALE_MODE,
    IncLayout,
    NodeLayout,
    Shape,
)
from stats_store.inc_names import MOD_LIST_SUFFIX, inc_file_name
from stats_store.records import Measurement, ModuleStats, as_maxabs

__all__ = [
    "ChannelSlicer",
    "export_measurement",
    "measurement_for_rank",
    "measurement_to_inc_dict",
    "write_measurement",
    "write_scales",
]


# --------------------------------------------------------------------------------------------
# Export: measurements
# --------------------------------------------------------------------------------------------

Converter = Callable[[np.ndarray, Shape], Any]


def _default_layout(m: Measurement, mode: str = MEASUREMENT_MODE) -> IncLayout:
    top = ("NumSamples",) if m.num_samples is not None else ()
    top += ("GlobalRank", "LocalRank", "Mode", "Nodes")
    return IncLayout(top, MappingProxyType({"GlobalRank": None, "Mode": mode}))


def _as_json(vec: np.ndarray, shape: Shape) -> Any:
    # float32 → Python float is exact, and json writes the shortest repr, as INC's .tolist() does.
    return vec.reshape(shape).tolist()


def _as_npz(vec: np.ndarray, shape: Shape) -> np.ndarray:
    return np.array(vec, dtype=np.float32).reshape(shape)


def _nesting(size: int, shape: Shape | None) -> Shape:
    """The recorded nesting when it still fits, else INC's observer-state shape (C, 1)."""
    if shape is not None and math.prod(shape) == size:
        return shape
    return (size, 1)


def _values(values: list[np.ndarray | None], shapes: tuple[Shape, ...], kind: str, name: str,
            convert: Converter) -> list[Any]:
    out = []
    for i, v in enumerate(values):
        if v is None:
            raise IncFormatError(
                f"module {name!r} {kind}.{i} was not observed; INC files need a value for every "
                f"{kind[:-1]}: measure it or drop the module before export"
            )
        out.append(convert(v, _nesting(v.size, shapes[i] if i < len(shapes) else None)))
    return out


def _node_keys(st: ModuleStats, nl: NodeLayout | None) -> list[str]:
    """Node keys to write, in the recorded order: present exactly where the data is."""
    wanted = ["inputs"]
    if st.outputs is not None:
        wanted.append("outputs")
    if st.params or (nl is not None and nl.params is not None):
        wanted.append("params")
    if nl is None:
        return wanted
    canonical = {alias: c for c, aliases in KEY_ALIASES.items() for alias in aliases}
    ordered = [k for k in nl.keys if canonical[k] in wanted]
    return ordered + [k for k in wanted if k not in {canonical[o] for o in ordered}]


def _node(st: ModuleStats, nl: NodeLayout | None, convert: Converter) -> dict[str, Any]:
    node: dict[str, Any] = {}
    param_shapes = dict(nl.params or ()) if nl is not None else {}
    for key in _node_keys(st, nl):
        if key.startswith("input"):
            node[key] = _values(list(st.inputs), nl.inputs if nl else (), "inputs", st.name, convert)
        elif key.startswith("output"):
            node[key] = _values(list(st.outputs or []), (nl.outputs or ()) if nl else (), "outputs", st.name, convert)
        else:
            node[key] = {p: convert(v, _nesting(v.size, param_shapes.get(p))) for p, v in st.params.items()}
    return node


def _document(m: Measurement, local_rank: int | None, layout: IncLayout | None, convert: Converter) -> dict[str, Any]:
    lay = layout if layout is not None else _default_layout(m)
    nodes = {name: _node(st, lay.nodes.get(name), convert) for name, st in m.modules.items()}
    doc: dict[str, Any] = {}
    for key in lay.top_keys:
        if key == "Nodes":
            doc[key] = nodes
        elif key == "LocalRank":
            doc[key] = local_rank
        elif key == "NumSamples":
            doc[key] = m.num_samples
        else:
            doc[key] = lay.header[key]
    return doc


def measurement_to_inc_dict(m: Measurement, local_rank: int | None, layout: IncLayout | None = None) -> dict[str, Any]:
    """The INC JSON document of a measurement (nested lists, as ``json.dump`` writes them).

    Without a layout, values nest as INC's observer states (``[[v]]``, ``[[v0],[v1],...]``), the
    header is ``[NumSamples,] GlobalRank null, LocalRank, Mode "DynamicRange"``, a node has
    ``outputs`` only when they were measured and ``params`` only when it has any.
    """
    return _document(m, local_rank, layout, _as_json)


def _write_json(path: Path, doc: Any, indent: int | None) -> None:
    # separators=None: json's default separators, as INC (and tools re-writing its files) use.
    atomic_write_json(path, doc, indent=indent, separators=None)


def _write_npz(path: Path, doc: dict[str, Any]) -> None:
    # INC's layout: np.savez(file, the_dict) → one entry arr_0, a 0-d object array holding the dict.
    # Writing it needs pickle; reading it back is never done here.
    atomic_write(path, lambda f: np.savez(f, np.array(doc, dtype=object)))


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise IncFileExistsError(
            f"INC export would replace {', '.join(existing)}; choose another dump_stats_path or pass overwrite=True"
        )


def write_measurement(
    m: Measurement,
    dump_stats_path: str | Path,
    rank: int | None = None,
    world: int | None = None,
    *,
    layout: IncLayout | None = None,
    mod_list: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write exactly ``m`` as INC's measurement files for one rank.

    Files: ``<P>_hooks_<observer>[_<rank>_<world>]`` ``.json``, ``.npz`` and ``_mod_list.json``.

    Args:
        m: the measurement, written as given (no slicing, no merging).
        dump_stats_path: INC's ``dump_stats_path`` (``<dir>/<prefix>``); the folder is created.
        rank, world: the rank suffix; both None for INC's single-process name without suffix.
        layout: an imported file's layout: its nesting, key order, header and indent are reproduced
            (``LocalRank`` included); without it, INC's defaults and ``LocalRank = rank``.
        mod_list: names for ``_mod_list.json`` (INC lists every patched module); default: the
            measured modules.
        overwrite: replace existing files (default: refuse).

    Returns:
        The paths written: JSON, NPZ, module list.
    """
    paths = [inc_file_name(dump_stats_path, m.observer, None, rank, world, s) for s in (".json", ".npz", MOD_LIST_SUFFIX)]
    _refuse_existing(paths, overwrite)
    paths[0].parent.mkdir(parents=True, exist_ok=True)  # the dump_stats_path folder may be new
    local_rank = layout.local_rank if layout is not None else rank
    _write_json(paths[0], _document(m, local_rank, layout, _as_json), layout.indent if layout else DEFAULT_INDENT)
    _write_npz(paths[1], _document(m, local_rank, layout, _as_npz))
    _write_json(paths[2], list(mod_list) if mod_list is not None else list(m.modules), DEFAULT_INDENT)
    return paths


# A slicer returns a rank's part of a per-channel vector in global coordinates:
# slicer(module_name, tensor_label, global_vector, rank, world) -> rank_vector.
ChannelSlicer = Callable[[str, str, np.ndarray, int, int], np.ndarray]


def _rank_value(name: str, label: str, vec: np.ndarray, rank: int, world: int, slicer: ChannelSlicer | None) -> np.ndarray:
    if vec.size == 1 or world == 1:
        return vec  # per-tensor maxima hold for every rank
    if slicer is None:
        raise IncFormatError(
            f"module {name!r} {label}: a per-channel value of {vec.size} channels cannot be written for rank "
            f"{rank} of {world} without knowing its sharding; pass slicer= (the stats store's re-sharding)"
        )
    return as_maxabs(slicer(name, label, vec, rank, world))


def measurement_for_rank(m: Measurement, rank: int, world: int, slicer: ChannelSlicer | None = None) -> Measurement:
    """The measurement a rank of ``world`` would have written: per-tensor values replicated,
    per-channel vectors cut by ``slicer``."""

    def cut(st: ModuleStats, kind: str, values: list[np.ndarray | None]) -> list[np.ndarray | None]:
        return [None if v is None else _rank_value(st.name, f"{kind}.{i}", v, rank, world, slicer) for i, v in enumerate(values)]

    modules = {
        name: replace(
            st,
            inputs=cut(st, "inputs", st.inputs),
            outputs=None if st.outputs is None else cut(st, "outputs", st.outputs),
            params={k: _rank_value(name, f"params.{k}", v, rank, world, slicer) for k, v in st.params.items()},
        )
        for name, st in m.modules.items()
    }
    out = Measurement(observer=m.observer, modules=modules, num_samples=m.num_samples)
    # Expert-parallel MoE nodes: each rank writes its own experts under local indices.
    return localize_experts(out, rank, world) if world > 1 and has_expert_lists(out) else out


def export_measurement(
    m: Measurement,
    dump_stats_path: str | Path,
    world: int | None,
    *,
    slicer: ChannelSlicer | None = None,
    mod_list: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write INC measurement files for every rank of a target world size.

    ``world=None`` writes INC's single-process files without suffix; ``world=W`` writes ranks
    ``0..W-1`` with suffix ``_<rank>_<W>`` (``_0_1`` for W=1).
    """
    if world is None:
        return write_measurement(m, dump_stats_path, mod_list=mod_list, overwrite=overwrite)
    per_rank = [measurement_for_rank(m, r, world, slicer) for r in range(world)]  # fail before writing
    paths: list[Path] = []
    for r, rank_m in enumerate(per_rank):
        paths += write_measurement(rank_m, dump_stats_path, r, world, mod_list=mod_list, overwrite=overwrite)
    return paths


# --------------------------------------------------------------------------------------------
# Export: scales
# --------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """A scale value as JSON numbers: float or (nested) list; numpy/torch values are converted."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise IncFormatError(f"{where}: a scale must be a number or a list of numbers, got {type(value).__name__}")


def _scale_node_json(name: str, node: Mapping[str, Any]) -> dict[str, Any]:
    where = f"scale node {name!r}"
    missing = {"inputs", "outputs", "params"} - set(node)
    if missing:
        raise IncFormatError(f"{where}: missing keys {sorted(missing)}; use ModuleScales.to_inc_node()")
    params = node["params"]
    if not isinstance(params, Mapping):
        raise IncFormatError(f"{where}: params must be an object, got {type(params).__name__}")
    out_params: dict[str, Any] = {}
    for pname, value in params.items():
        if isinstance(value, Mapping):  # PCS: {"0": per-out-channel, "1": ones per in-channel}
            out_params[pname] = {str(k): _plain(v, f"{where} params.{pname}.{k}") for k, v in value.items()}
        else:
            out_params[pname] = _plain(value, f"{where} params.{pname}")
    return {
        "inputs": [_plain(v, f"{where} inputs.{i}") for i, v in enumerate(node["inputs"])],
        "outputs": [_plain(v, f"{where} outputs.{i}") for i, v in enumerate(node["outputs"])],
        "params": out_params,
    }


def _scale_node_npz(node: Mapping[str, Any]) -> dict[str, Any]:
    """INC's NPZ form: 0-d float32 arrays (vectors for PCS), ``outputs`` a tuple, PCS keys ints."""

    def arr(v: Any) -> np.ndarray:
        return np.asarray(v, dtype=np.float32)

    params: dict[str, Any] = {}
    for pname, value in node["params"].items():
        params[pname] = {int(k): arr(v) for k, v in value.items()} if isinstance(value, dict) else arr(value)
    return {
        "inputs": [arr(v) for v in node["inputs"]],
        "outputs": tuple(arr(v) for v in node["outputs"]),
        "params": params,
    }


def write_scales(
    nodes: Mapping[str, Mapping[str, Any]],
    dump_stats_path: str | Path,
    observer: str,
    method_name: str,
    rank: int | None = None,
    world: int | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write an INC scale file pair ``<P>_hooks_<O>_<METHOD>[_<rank>_<world>].json`` / ``.npz``.

    Args:
        nodes: module name → ``ModuleScales.to_inc_node()`` (``inputs``, ``outputs``, ``params``).
        method_name: the predefined method (any case; written upper case).

    Returns:
        The JSON and NPZ paths.
    """
    paths = [inc_file_name(dump_stats_path, observer, method_name, rank, world, s) for s in (".json", ".npz")]
    _refuse_existing(paths, overwrite)
    paths[0].parent.mkdir(parents=True, exist_ok=True)  # the dump_stats_path folder may be new
    json_nodes = {name: _scale_node_json(name, node) for name, node in nodes.items()}
    header = {"GlobalRank": None, "LocalRank": rank, "Mode": SCALE_MODE}
    _write_json(paths[0], {**header, "Nodes": json_nodes}, DEFAULT_INDENT)
    _write_npz(paths[1], {**header, "Nodes": {n: _scale_node_npz(v) for n, v in json_nodes.items()}})
    return paths
