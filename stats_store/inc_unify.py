"""Finding the per-rank INC measurement files of one run and unifying them into one Measurement.

Reference ``inc-fp8-semantics.md`` §5 (ranks). A set is complete when it holds ranks ``0..W-1``
of one world size (or one single-rank file); its files are merged by elementwise max.
"""

from __future__ import annotations

from functools import reduce
from pathlib import Path
from typing import Sequence

import numpy as np

from stats_store.errors import IncFileNotFoundError, IncFormatError
from stats_store.inc_experts import globalize_rank_set, has_expert_lists
from stats_store.inc_names import IncFileName, parse_inc_file_name, parse_rank_suffix
from stats_store.inc_read import read_inc_measurement
from stats_store.records import Measurement, ModuleStats

__all__ = [
    "discover_measurement_files",
    "read_measurement",
    "read_measurement_set",
    "unify_measurements",
]


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
