"""INC measurement and scale files: import into ``Measurement``, export in INC's exact format.

Reference ``inc-fp8-semantics.md`` §4 (files), §5 (ranks); ``project-decisions.md`` §3.

Import reads the JSON only (INC's NPZ holds a pickled dict, and we never unpickle). One
``json.loads`` parses the file; each value becomes a float32 vector with one numpy call.
``Infinity`` / ``NaN`` stay in the vectors as data and are counted per tensor label in
``ModuleStats.nonfinite``; the scale code refuses to turn them into scales.

Export writes what INC writes: JSON with ``indent=4`` (header keys ``[NumSamples,] GlobalRank,
LocalRank, Mode, Nodes``), an NPZ made by ``np.savez(file, the_dict)`` and, for measurements,
``_mod_list.json``. An :class:`IncLayout` captured at import (nesting of each value, key order,
header) makes import → export give back the original file byte for byte.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from stats_store.records import Measurement, ModuleStats, as_maxabs

from stats_store.errors import IncFileExistsError, IncFileNotFoundError, IncFormatError
from stats_store.inc_experts import globalize_rank_set, has_expert_lists, localize_experts
from stats_store.inc_names import (
    MOD_LIST_SUFFIX,
    IncFileName,
    inc_file_name,
    parse_inc_file_name,
    parse_rank_suffix,
)

__all__ = [
    "UNKNOWN_OP",
    "ChannelSlicer",
    "IncLayout",
    "IncMeasurementFile",
    "NodeLayout",
    "discover_measurement_files",
    "export_measurement",
    "inc_file_name",
    "infer_op_type",
    "measurement_for_rank",
    "measurement_from_inc_dict",
    "measurement_to_inc_dict",
    "parse_rank_suffix",
    "read_inc_measurement",
    "read_measurement",
    "read_measurement_json",
    "read_measurement_set",
    "unify_measurements",
    "write_measurement",
    "write_scales",
]

Shape = tuple[int, ...]
UNKNOWN_OP = "unknown"
MEASUREMENT_MODE = "DynamicRange"
SCALE_MODE = "Scale"
DEFAULT_INDENT = 4

# Python's json already maps these tokens to floats; naming them keeps the intent explicit.
_NONFINITE_TOKENS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
# INC's loader still accepts the old singular keys; the layout remembers which one a file used.
_KEY_ALIASES = {"inputs": ("inputs", "input"), "outputs": ("outputs", "output"), "params": ("params",)}
_NODE_KEYS = frozenset(k for names in _KEY_ALIASES.values() for k in names)


# --------------------------------------------------------------------------------------------
# Layout: what a file looked like beyond the values, so export can reproduce it.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLayout:
    """How one node was written.

    Attributes:
        keys: the node's keys in file order (``"inputs"``, ``"outputs"``, ``"params"``; or the old
            singular spellings).
        inputs: the nesting shape of each input value: ``(1, 1)`` for ``[[v]]``, ``(C, 1)`` for a
            per-channel state, ``(1, 1, 1)``, ``(1,)``... as found.
        outputs: the same for outputs; None when the node had no outputs key.
        params: ``(name, shape)`` of each parameter; None when the node had no params key.
    """

    keys: tuple[str, ...]
    inputs: tuple[Shape, ...]
    outputs: tuple[Shape, ...] | None
    params: tuple[tuple[str, Shape], ...] | None


@dataclass(frozen=True)
class IncLayout:
    """Everything about an INC measurement file except the values.

    Attributes:
        top_keys: top-level keys in file order (``"Nodes"`` included).
        header: values of the top-level keys other than ``Nodes`` and ``NumSamples`` (those come
            from the Measurement).
        nodes: layout of each node, by module name.
        indent: JSON indent the file used (INC writes 4; tools such as the unify script write
            compact JSON, None).
    """

    top_keys: tuple[str, ...]
    header: Mapping[str, Any]
    nodes: Mapping[str, NodeLayout] = field(default_factory=dict)
    indent: int | None = DEFAULT_INDENT

    @property
    def local_rank(self) -> int | None:
        """The file's ``LocalRank`` (null, -1 or a rank)."""
        value = self.header.get("LocalRank")
        return value if isinstance(value, int) else None


@dataclass(frozen=True)
class IncMeasurementFile:
    """One imported INC measurement file: its statistics and its layout."""

    path: Path
    measurement: Measurement
    layout: IncLayout


def _default_layout(m: Measurement, mode: str = MEASUREMENT_MODE) -> IncLayout:
    top = ("NumSamples",) if m.num_samples is not None else ()
    top += ("GlobalRank", "LocalRank", "Mode", "Nodes")
    return IncLayout(top, MappingProxyType({"GlobalRank": None, "Mode": mode}))


# --------------------------------------------------------------------------------------------
# Op type inference (INC files do not store it).
# --------------------------------------------------------------------------------------------


def infer_op_type(name: str, num_inputs: int, params: Iterable[str] | None, num_outputs: int | None) -> str:
    """The op type of a measured node from its counts and name, or ``"unknown"``.

    INC's op table (reference §3.1) fixes each op's inputs, params and which outputs are always
    measured, so the counts decide every case but two, where the module name does:
    a 1-input node with 1 output is a softmax (or a kv cache measured with outputs), and a
    2-input node with 1 output is a ``b2b_matmul`` only for vLLM's batch2block/block2batch
    matmuls (a plain matmul measured with ``measure_exclude: NONE`` looks the same).
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    has_weight = params is not None and "weight" in set(params)
    if has_weight:
        if num_inputs != 1:
            return UNKNOWN_OP
        if num_outputs == 2:
            return "row_parallel_linear"  # the only weighted op that measures two outputs
        return "linear" if num_outputs in (None, 1) else UNKNOWN_OP
    if num_inputs == 3:
        return "fused_sdpa" if num_outputs in (None, 2) else UNKNOWN_OP
    if num_inputs == 2:
        if num_outputs is None:
            return "matmul"  # b2b_matmul always measures its output
        if num_outputs == 1:
            return "b2b_matmul" if ("batch2block" in leaf or "block2batch" in leaf) else "matmul"
        return UNKNOWN_OP
    if num_inputs == 1:
        if num_outputs is None:
            return "kv_cache"  # softmax and MoE always measure outputs
        if num_outputs == 1:
            if "softmax" in leaf:
                return "softmax"
            return "kv_cache" if "cache" in leaf else UNKNOWN_OP
        return "dynamic_moe"  # 1 input, no params, 1 + E outputs
    return UNKNOWN_OP


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
    found = [k for k in _KEY_ALIASES[canonical] if k in node]
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


# --------------------------------------------------------------------------------------------
# Per-rank sets: discovery and unification
# --------------------------------------------------------------------------------------------


def _measurement_names(folder: Path, startswith: str = "") -> list[tuple[Path, IncFileName]]:
    found = []
    for f in sorted(folder.iterdir()):
        parsed = parse_inc_file_name(f.name) if f.name.startswith(startswith) else None
        if parsed is not None and parsed.is_measurement and parsed.ext == "json" and f.is_file():
            found.append((f, parsed))
    return found


def _complete_set(base: str, world: int | None, members: list[tuple[Path, IncFileName]]) -> list[Path]:
    """Check a (base, world) group holds every rank once; the files sorted by rank."""
    by_rank: dict[int | None, Path] = {p.rank: f for f, p in members}
    if world is None or world == 1:
        if len(by_rank) > 1:
            names = ", ".join(f.name for f in by_rank.values())
            raise IncFormatError(f"ambiguous single-rank measurement {base}: {names}; pass one file")
        return list(by_rank.values())
    bad = sorted(r for r in by_rank if r is None or not 0 <= r < world)
    if bad:
        raise IncFormatError(f"measurement set {base} (world {world}) has files for ranks {bad} outside 0..{world - 1}")
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        folder = next(iter(by_rank.values())).parent
        names = ", ".join(f"{base}_{r}_{world}.json" for r in missing)
        raise IncFileNotFoundError(
            f"incomplete per-rank measurement set in {folder}: missing {names} "
            f"(ranks {missing} of world {world}); copy them beside the others or import one rank file alone"
        )
    return [by_rank[r] for r in range(world)]


def discover_measurement_files(path_or_prefix: str | Path) -> list[Path]:
    """The JSON files of one measurement set, sorted by rank.

    Accepts a measurement file (its whole rank set is returned), a directory, or a
    ``dump_stats_path``-style prefix. Module lists, NPZ and scale files are ignored. The set
    must be complete: ranks ``0..W-1`` of one world size, or a single ``_0_1`` / ``_-1_1`` /
    suffix-less file.

    Raises:
        IncFileNotFoundError: nothing matches, or some rank files are missing (they are named).
        IncFormatError: several sets match (they are listed), or a file is not a measurement.
    """
    p = Path(path_or_prefix)
    if not p.is_file() and not p.is_dir() and Path(f"{p}.json").is_file():
        p = Path(f"{p}.json")
    if p.is_file():
        parsed = parse_inc_file_name(p.name)
        if parsed is None or not parsed.is_measurement or parsed.ext != "json":
            raise IncFormatError(
                f"{p} is not an INC measurement JSON (<prefix>_hooks_<observer>[_<rank>_<world>].json; "
                "module lists, scale files and NPZ are not measurements)"
            )
        candidates = [(f, q) for f, q in _measurement_names(p.parent) if (q.base, q.world) == (parsed.base, parsed.world)]
    elif p.is_dir():
        candidates = _measurement_names(p)
    else:
        folder = p.parent
        if not folder.is_dir():
            raise IncFileNotFoundError(f"no INC measurement files at {p}: folder {folder} does not exist")
        candidates = _measurement_names(folder, p.name)
    groups: dict[tuple[str, int | None], list[tuple[Path, IncFileName]]] = {}
    for f, q in candidates:
        groups.setdefault((q.base, q.world), []).append((f, q))
    if not groups:
        raise IncFileNotFoundError(f"no INC measurement files (<prefix>_hooks_<observer>[_R].json) match {p}")
    if len(groups) > 1:
        listed = "; ".join(f"{b} (world {w})" for b, w in groups)
        raise IncFormatError(f"several measurement sets match {p}: {listed}; pass one file of the set you mean")
    (base, world), members = next(iter(groups.items()))
    return _complete_set(base, world, members)


def _fmax_all(arrays: list[np.ndarray], where: str, label: str, sources: Sequence[str]) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise IncFormatError(
            f"{where} {label}: shapes {sorted(shapes)} differ between {', '.join(sources)}; "
            "per-rank files can only be unified when each tensor has the same channels on every rank"
        )
    # fmax ignores NaN unless every rank has NaN there; an Infinity wins, as any max would.
    return reduce(np.fmax, arrays)


def _unify_list(parts: list[list[np.ndarray | None] | None], kind: str, where: str,
                sources: Sequence[str]) -> list[np.ndarray | None] | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) != len(parts) or len({len(p) for p in present}) > 1:
        counts = ["none" if p is None else len(p) for p in parts]
        raise IncFormatError(f"{where}: {kind} counts {counts} differ between {', '.join(sources)}")
    out: list[np.ndarray | None] = []
    for i in range(len(present[0])):
        values = [v for v in (p[i] for p in present) if v is not None]
        out.append(_fmax_all(values, where, f"{kind}.{i}", sources) if values else None)
    return out


def _unify_module(name: str, parts: list[ModuleStats], sources: Sequence[str]) -> ModuleStats:
    where = f"module {name!r}"
    param_names = {tuple(s.params) for s in parts}
    if len(param_names) > 1:
        raise IncFormatError(f"{where}: params {sorted(param_names)} differ between {', '.join(sources)}")
    nonfinite: dict[str, int] = {}
    for s in parts:
        for label, count in s.nonfinite.items():
            nonfinite[label] = nonfinite.get(label, 0) + count
    inputs = _unify_list([s.inputs for s in parts], "inputs", where, sources)
    outputs = _unify_list([s.outputs for s in parts], "outputs", where, sources)
    ops = {s.op_type for s in parts}  # checked after the layout, whose message says more
    if len(ops) > 1:
        raise IncFormatError(f"{where}: op types {sorted(ops)} differ between {', '.join(sources)}")
    return ModuleStats(
        name=name,
        op_type=parts[0].op_type,
        inputs=inputs or [],
        outputs=outputs,
        params={k: _fmax_all([s.params[k] for s in parts], where, f"params.{k}", sources) for k in parts[0].params},
        num_samples=max(s.num_samples for s in parts),
        nonfinite=nonfinite,
    )


def unify_measurements(parts: Sequence[Measurement], sources: Sequence[str] | None = None) -> Measurement:
    """Merge per-rank measurements by elementwise max (``np.fmax``), channel by channel.

    A module present on some ranks only is taken from those. ``NaN`` on one rank yields the
    others' value (NaN only where every rank has NaN); ``Infinity`` on any rank stays Infinity.
    ``nonfinite`` counts add up (what the files contained), and ``num_samples`` is the largest.

    Raises:
        IncFormatError: observers, op types, counts or shapes of a tensor differ between ranks.
    """
    if not parts:
        raise IncFormatError("unify_measurements: no measurements given; pass at least one")
    sources = list(sources) if sources is not None else [f"rank file {i}" for i in range(len(parts))]
    observers = {m.observer for m in parts}
    if len(observers) > 1:
        raise IncFormatError(f"measurements from different observers {sorted(observers)} cannot be unified: {sources}")
    names: dict[str, None] = {}
    for m in parts:
        names.update(dict.fromkeys(m.modules))
    modules = {}
    for name in names:
        having = [(m.modules[name], src) for m, src in zip(parts, sources) if name in m.modules]
        modules[name] = _unify_module(name, [h[0] for h in having], [h[1] for h in having])
    counts = [m.num_samples for m in parts if m.num_samples is not None]
    return Measurement(observer=parts[0].observer, modules=modules, num_samples=max(counts) if counts else None)


def read_measurement_set(paths: Sequence[str | Path]) -> Measurement:
    """Import per-rank INC measurement files and unify them by elementwise max.

    In a set of several ranks, vLLM-Gaudi's expert-parallel MoE nodes (``…w13_list.<k>``, local
    expert ``k``) are first renamed to their global expert index (``stats_store.inc_experts``), so
    that different experts are never merged into one.
    """
    files = [read_inc_measurement(p) for p in paths]
    parts, sources = [f.measurement for f in files], [str(f.path) for f in files]
    ranks = [parse_rank_suffix(f.path) for f in files]
    if len(files) > 1 and any(has_expert_lists(m) for m in parts):
        if any(r is None for r in ranks):
            raise IncFormatError(f"expert-parallel MoE nodes in {sources}: every file needs its _<rank>_<world> "
                                 "suffix to place its experts; rename the files as INC wrote them")
        parts = globalize_rank_set(parts, [r[0] for r in ranks if r is not None], sources)
    return unify_measurements(parts, sources)


def read_measurement(path_or_prefix: str | Path) -> Measurement:
    """Discover the rank set at a file, directory or prefix and import it unified."""
    return read_measurement_set(discover_measurement_files(path_or_prefix))


# --------------------------------------------------------------------------------------------
# Export: measurements
# --------------------------------------------------------------------------------------------

Converter = Callable[[np.ndarray, Shape], Any]


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
    canonical = {alias: c for c, aliases in _KEY_ALIASES.items() for alias in aliases}
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


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, doc: Any, indent: int | None) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(doc, indent=indent).encode("utf-8")))


def _write_npz(path: Path, doc: dict[str, Any]) -> None:
    # INC's layout: np.savez(file, the_dict) → one entry arr_0, a 0-d object array holding the dict.
    # Writing it needs pickle; reading it back is never done here.
    _write_atomic(path, lambda f: np.savez(f, np.array(doc, dtype=object)))


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
    json_nodes = {name: _scale_node_json(name, node) for name, node in nodes.items()}
    header = {"GlobalRank": None, "LocalRank": rank, "Mode": SCALE_MODE}
    _write_json(paths[0], {**header, "Nodes": json_nodes}, DEFAULT_INDENT)
    _write_npz(paths[1], {**header, "Nodes": {n: _scale_node_npz(v) for n, v in json_nodes.items()}})
    return paths
