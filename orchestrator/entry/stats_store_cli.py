"""``stats-store``: look into, compare, reduce, convert and plot measurement stores.

Every command takes the store first after its name (``stats-store ls PATH``); PATH is the store
(``<prefix>.zarr``) or its ``dump_stats_path`` (``<prefix>``), a local path or an
``s3://bucket/dir/prefix`` URL (endpoint and credentials from the environment: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``). ``--json`` prints the data instead
of tables. Errors print one line naming the file/module and what to do, and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console

from shards.errors import ShardError
from shards.measuring.expert_coverage import expert_token_counts, infer_expert_names, layer_text, parse_expert, tokens_recorded
from stats_store.records import Measurement
from orchestrator.entry import stats_store_tables as cli_tables
from stats_store.errors import StatsStoreError
from stats_store.gc_pause import paused_gc
from stats_store.zarr_store import ZarrStatsStore, stores_in
from stats_store.metadata import RunMeta, canonical_json
from stats_store.reshard import split_rules_from_commits
from stats_store.shard_map import ShardSpec, channel_slice

Command = Callable[[argparse.Namespace], dict[str, Any]]


def _num(v: np.ndarray) -> float | None:
    finite = v[np.isfinite(v)]
    return float(finite.max()) if finite.size else None


def _current(store: ZarrStatsStore) -> tuple[Measurement, bool]:
    """The global statistics of the latest commits, and whether the written reduced arrays hold them."""
    return store.current()


# ---- ls ----------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> dict[str, Any]:
    found = stores_in(args.path)
    if found is not None:  # a directory (or s3 prefix) holding stores
        runs = []
        for sp in found:
            store = ZarrStatsStore.open(sp)
            m = store.meta
            runs.append({"store": store.location, "config_hash": m.config_hash, "topology": f"dp={m.dp} tp={m.tp}",
                         "device_kind": m.device_kind, "modules": len(store.module_names()),
                         "reduced": "current" if store.reduced_is_current() else "stale"})
        return {"directory": str(args.path), "runs_in_directory": runs}
    store = ZarrStatsStore.open(args.path)
    stats, current = _current(store)
    meta = store.meta.to_json()
    return {
        "store": store.location, "format_version": meta["format_version"], "config_hash": meta["config_hash"],
        "model_fingerprint": meta["model_fingerprint"], "topology": meta["topology"], "device_kind": meta["device_kind"],
        "observer": meta["observer"], "reduced": "current" if current else "stale", "runs": store.runs(),
        "num_samples": stats.num_samples,
        "shards": [{"shard": k, "generation": r.generation, "num_samples": r.num_samples, "batches_done": len(r.batch_ids)}
                   for k, r in sorted(store.commits().items())],
        "modules": [{"name": n, "op_type": s.op_type, "num_samples": s.num_samples, "num_tokens": s.num_tokens,
                     "tensors": len(s.tensors()),
                     "max": max((x for x in (_num(v) for v in s.tensors().values()) if x is not None), default=None),
                     "nonfinite": sum(s.nonfinite.values())} for n, s in stats.modules.items()],
    }


# ---- show ----------------------------------------------------------------------------------------
def _values(v: np.ndarray) -> list[float]:
    return [float(x) for x in np.asarray(v).reshape(-1)]


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    store = ZarrStatsStore.open(args.path)
    stats, _ = _current(store)
    if args.module not in stats.modules:
        close = [n for n in stats.modules if args.module in n][:5]
        raise _UsageError(f"{store.location}: no committed module {args.module!r}" + (f"; did you mean {close}?" if close else ""))
    s = stats.modules[args.module]
    shards = []
    for k, rec in sorted(store.commits().items()):
        if args.module not in rec.modules:
            continue
        local = store.read_shard(k).modules[args.module].tensors()
        for label, t in rec.modules[args.module].tensors.items():
            shards.append({"shard": k, "tensor": label, "slice": t.slice.to_json() if t.slice else None,
                           "max": _num(local[label]), "values": _values(local[label])})
    return {"module": args.module, "op_type": s.op_type, "num_samples": s.num_samples, "num_tokens": s.num_tokens,
            "nonfinite": dict(s.nonfinite),
            "tensors": {lb: {"max": _num(v), "values": _values(v)} for lb, v in s.tensors().items()}, "shards": shards}


# ---- diff ----------------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace) -> dict[str, Any]:
    a, _ = _current(ZarrStatsStore.open(args.a))
    b, _ = _current(ZarrStatsStore.open(args.b))
    changes = []
    for name in (n for n in a.modules if n in b.modules):
        ta, tb = a.modules[name].tensors(), b.modules[name].tensors()
        for label in (lb for lb in ta if lb in tb):
            va, vb = ta[label].astype(np.float64), tb[label].astype(np.float64)
            if va.shape != vb.shape:
                changes.append({"module": name, "tensor": label, "max_a": _num(ta[label]), "max_b": _num(tb[label]),
                                "min_ratio": None, "max_ratio": None, "change": float("inf"), "note": "shape differs"})
                continue
            ok = np.isfinite(va) & np.isfinite(vb) & (va > 0)
            ratio = vb[ok] / va[ok]
            lo, hi = (float(ratio.min()), float(ratio.max())) if ratio.size else (None, None)
            change = max(abs(np.log2(lo)), abs(np.log2(hi))) if lo and hi else 0.0
            changes.append({"module": name, "tensor": label, "max_a": _num(ta[label]), "max_b": _num(tb[label]),
                            "min_ratio": lo, "max_ratio": hi, "change": change})
    changes.sort(key=lambda c: -c["change"])
    return {"a": str(args.a), "b": str(args.b), "top": changes[: args.top], "compared": len(changes),
            "only_in_a": [n for n in a.modules if n not in b.modules], "only_in_b": [n for n in b.modules if n not in a.modules]}


# ---- coverage ------------------------------------------------------------------------------------
def cmd_coverage(args: argparse.Namespace) -> dict[str, Any]:
    """Selected modules with no measurement, modules with no values, and per MoE layer the routed
    experts that saw no token with every expert's token count.

    The selected modules are the store's recorded inventory (``record_selected``) plus ``--expect``;
    without an inventory the experts of a layer are inferred from the measured expert names.
    """
    store = ZarrStatsStore.open(args.path)
    stats, _ = _current(store)
    recorded = store.selected_modules()
    expected = json.loads(Path(args.expect).read_text(encoding="utf-8")) if args.expect else []
    selected = list(dict.fromkeys([*(recorded or []), *expected]))
    inventory = selected if recorded is not None else [*selected, *infer_expert_names(stats.modules)]
    unmeasured = [n for n in selected if n not in stats.modules and parse_expert(n) is None]
    problems: list[dict[str, Any]] = [{"module": n, "problem": "not measured"} for n in unmeasured]
    for name, s in stats.modules.items():
        if s.num_samples == 0:
            problems.append({"module": name, "problem": "0 samples"})
        for label, v in s.tensors().items():
            if np.isnan(v).all():
                problems.append({"module": name, "problem": f"{label}: no value"})
        if s.op_type == "dynamic_moe" and s.outputs:
            idle = [i - 1 for i, v in enumerate(s.outputs) if i > 0 and v is not None and not np.nanmax(np.abs(v), initial=0) > 0]
            if idle:
                problems.append({"module": name, "problem": f"experts with no observations: {idle}"})
    experts = []
    for layer, counts in expert_token_counts(inventory, stats).items():
        idle_ = [e for e, n in counts.items() if n == 0]
        experts.append({"layer": layer, "experts": len(counts), "idle": idle_,
                        "tokens": {str(e): n for e, n in counts.items()}, "summary": layer_text(counts)})
        if idle_:
            problems.append({"module": layer, "problem": f"experts with no token: {idle_} (of {len(counts)})"})
    return {"store": store.location, "modules": len(stats.modules), "uncovered": problems,
            "selected": len(selected) if recorded is not None or expected else None,
            "inventory": "recorded" if recorded is not None else ("--expect" if expected else "none"),
            "experts_inferred": recorded is None, "tokens_recorded": tokens_recorded(stats),
            "unmeasured": unmeasured, "experts": experts}


# ---- reduce --------------------------------------------------------------------------------------
def cmd_reduce(args: argparse.Namespace) -> dict[str, Any]:
    store = ZarrStatsStore.open(args.path)
    stats = store.reduce()
    return {"store": store.location, "modules": len(stats.modules), "num_samples": stats.num_samples,
            "generations": (store.summary() or {}).get("generations")}


# ---- scales --------------------------------------------------------------------------------------
def cmd_scales(args: argparse.Namespace) -> dict[str, Any]:
    # torch: loaded only by this command
    from shards.fp8.module_scales import modules_scales, planned_request, planned_scales
    from shards.fp8.numerics import HpDtype, LpDtype, ScaleDevice
    from shards.fp8.methods import predefined_plan
    from shards.fp8.scale_math import ScaleContext

    store = ZarrStatsStore.open(args.path)
    stats, _ = _current(store)
    plan = predefined_plan(args.method)
    device = ScaleDevice(args.device.upper()) if args.device else None
    ctx = ScaleContext(LpDtype(args.lp.upper()), HpDtype(args.hp.upper()), device)
    nodes, errors = {}, []
    try:  # every module in one batch of formulas (thousands of modules on MoE models)
        requests = [planned_request(name, s.op_type, "", plan, s) for name, s in stats.modules.items()]
        nodes = {r.module: ms.to_inc_node() for r, ms in zip(requests, modules_scales(requests, ctx))}
    except (ShardError, KeyError, ValueError):
        # Some module has no scale: redo them one by one so that every failing module is reported
        # (below, exit status 1), not only the first.
        for name, s in stats.modules.items():
            try:
                nodes[name] = planned_scales(name, s.op_type, "", plan, ctx, s).to_inc_node()
            except (ShardError, KeyError, ValueError) as e:
                errors.append({"module": name, "error": str(e)})
    out: dict[str, Any] = {"method": plan.name, "device": device.value if device else None, "lp": ctx.lp.value,
                           "hp": ctx.hp.value, "nodes": nodes, "errors": errors}
    if args.out:
        from stats_store.inc_write import write_scales

        out["written"] = [str(p) for p in write_scales(nodes, args.out, store.meta.observer, plan.name, overwrite=args.overwrite)]
    return out


# ---- INC export / import ---------------------------------------------------------------------------
def cmd_export_inc(args: argparse.Namespace) -> dict[str, Any]:
    from stats_store.inc_write import export_measurement

    store = ZarrStatsStore.open(args.path)
    stats, _ = _current(store)
    slicer = None
    if args.split_channels:
        rules = split_rules_from_commits(store.commits())

        def slicer(name: str, label: str, vec: np.ndarray, rank: int, world: int) -> np.ndarray:
            rule = rules.get((name, label))
            if rule is None:
                return vec
            sl = channel_slice(vec.size, rank, world, rule.granule, what=f"{name} {label}")
            return vec[sl.start : sl.stop]
    else:
        def slicer(name: str, label: str, vec: np.ndarray, rank: int, world: int) -> np.ndarray:
            return vec  # every rank file holds the global values (INC's expand script does the same)

    paths = export_measurement(stats, args.out, args.world, slicer=slicer, overwrite=args.overwrite)
    return {"store": store.location, "world": args.world, "written": [str(p) for p in paths]}


def cmd_import_inc(args: argparse.Namespace) -> dict[str, Any]:
    from stats_store.inc_read import read_measurement_json
    from stats_store.inc_unify import discover_measurement_files
    from stats_store.inc_names import parse_rank_suffix

    files = [Path(args.source)] if args.single_file else discover_measurement_files(args.source)
    parts = [read_measurement_json(f) for f in files]
    world = len(files)
    fingerprint = args.fingerprint or {"inc_import": hashlib.sha256(canonical_json(
        sorted((n, s.op_type, sorted((lb, int(v.size)) for lb, v in s.tensors().items()))
               for n, s in parts[0].modules.items())).encode()).hexdigest()}
    # INC's ranks are tensor-parallel ranks that saw the same batches: import them as one tp group.
    meta = RunMeta(args.config_hash, fingerprint, dp=1, tp=world, device_kind="inc-import", observer=parts[0].observer)
    store = ZarrStatsStore.open_run(args.store, meta, overwrite=args.overwrite)
    for i, (f, m) in enumerate(zip(files, parts)):
        rank = parse_rank_suffix(f.name)
        index = rank[0] if rank is not None and rank[0] >= 0 and world > 1 else i
        store.commit(store.write_shard(ShardSpec(index, world, world), m, [0]))
    stats = store.reduce()
    report = stats.nonfinite_report()
    return {"store": store.location, "files": [str(f) for f in files], "modules": len(stats.modules),
            "nonfinite_modules": len(report), "nonfinite_values": sum(sum(c.values()) for c in report.values()),
            "nonfinite": report}


# ---- plot ----------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> dict[str, Any]:
    from stats_store.plot import plot_channel_profile, plot_layer_maxabs

    store = ZarrStatsStore.open(args.path)
    stats, _ = _current(store)
    out = Path(args.out)
    written = [plot_layer_maxabs(stats, out / "layer_maxabs.png", title=f"max-abs per module: {store.location}")]
    wanted = args.module or [next((n for n, s in stats.modules.items() if any(v.size > 1 for v in s.tensors().values())), None)]
    for name in (n for n in wanted if n is not None):
        if name not in stats.modules:
            raise _UsageError(f"{store.location}: no committed module {name!r} to plot")
        for label, v in stats.modules[name].tensors().items():
            if v.size > 1:
                written.append(plot_channel_profile(v, out / f"{name}__{label}.png", f"{name} {label}"))
    return {"store": store.location, "written": [str(p) for p in written]}


# ---- parser --------------------------------------------------------------------------------------
class _UsageError(StatsStoreError, ValueError):
    """A command-line value that names nothing in the store."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stats-store", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, render: Callable[..., None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        p.set_defaults(func=func, render=render)
        return p

    p = add("ls", cmd_ls, cli_tables.render_ls, "list a store's runs, shards and modules with sample counts "
            "(or every store in a directory)")
    p.add_argument("path", help="store (<prefix>.zarr), its dump_stats_path, or a directory of stores")
    p = add("show", cmd_show, cli_tables.render_show, "show one module's global values and each shard's values")
    p.add_argument("path", help="store or dump_stats_path")
    p.add_argument("module", help="qualified module name")
    p = add("diff", cmd_diff, cli_tables.render_diff, "compare two stores: per-module ratios, top changes, missing modules")
    p.add_argument("a", help="first store")
    p.add_argument("b", help="second store")
    p.add_argument("--top", type=int, default=20, help="how many of the largest changes to list (default 20)")
    p = add("coverage", cmd_coverage, cli_tables.render_coverage, "list modules and MoE experts with no observations")
    p.add_argument("path", help="store or dump_stats_path")
    p.add_argument("--expect", help="JSON list of module names that should be measured (e.g. INC's _mod_list.json)")
    p.add_argument("--fail", action="store_true", help="exit with status 1 when anything is uncovered")
    p = add("reduce", cmd_reduce, cli_tables.render_paths, "merge the committed shards into the global arrays")
    p.add_argument("path", help="store or dump_stats_path")
    p = add("scales", cmd_scales, cli_tables.render_scales, "compute the scales the coordinator would, from the stored "
            "max-abs alone (no model)")
    p.add_argument("path", help="store or dump_stats_path")
    p.add_argument("--method", required=True, help="INC scale_method, e.g. maxabs_pow2 (any case)")
    p.add_argument("--device", help="device_for_scales: GAUDI2 or GAUDI3 (needed for HW-aligned methods)")
    p.add_argument("--lp", default="E4M3", help="fp8_config: E4M3 (default) or E5M2")
    p.add_argument("--hp", default="BF16", help="hp_dtype: BF16 (default), FP16, FP32")
    p.add_argument("--out", help="also write INC scale files with this dump_stats_path prefix")
    p.add_argument("--overwrite", action="store_true", help="replace existing scale files")
    p = add("export-inc", cmd_export_inc, cli_tables.render_paths, "write INC measurement files for a target world size")
    p.add_argument("path", help="store or dump_stats_path")
    p.add_argument("--out", required=True, help="INC dump_stats_path prefix of the files to write")
    p.add_argument("--world", type=int, default=None,
                   help="target world size N: files _<rank>_<N> for every rank (default: one file without suffix)")
    p.add_argument("--split-channels", action="store_true",
                   help="cut per-channel values of split tensors (the store's shard map) per rank instead of copying them")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p = add("import-inc", cmd_import_inc, cli_tables.render_import, "import INC measurement JSON (one file or a per-rank set)")
    p.add_argument("source", help="an INC measurement JSON, its folder, or its dump_stats_path prefix")
    p.add_argument("store", help="store (or dump_stats_path) to create")
    p.add_argument("--fingerprint", help="model fingerprint to record (default: a hash of the imported module layout)")
    p.add_argument("--config-hash", default="inc-import", help="config hash to record")
    p.add_argument("--single-file", action="store_true",
                   help="import only SOURCE (one rank file whose other ranks are absent) as a one-card store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store of another run")
    p = add("plot", cmd_plot, cli_tables.render_paths, "write PNG plots: per-layer max-abs, per-channel profiles")
    p.add_argument("path", help="store or dump_stats_path")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--module", action="append", help="module whose per-channel profiles to plot (repeatable; "
                   "default: the first module with a per-channel tensor)")
    return parser


def _plain_json(value: Any) -> Any:
    """Strict JSON for scripts: NaN (no value) → null, ±Inf → the strings "Infinity" / "-Infinity"."""
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stats-store``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with paused_gc():  # see stats_store.gc_pause: big models build many small objects
            data = args.func(args)
    except (StatsStoreError, ShardError) as e:
        print(f"stats-store {args.command}: {e}", file=sys.stderr)
        return 2
    if args.json:
        # No indent: json's C encoder only runs without one (scale JSON of 4,500 modules).
        print(json.dumps(_plain_json(data), default=str, allow_nan=False))
    else:
        args.render(data, Console(width=160))
    if args.command == "scales" and data["errors"]:
        return 1
    if args.command == "coverage" and args.fail and data["uncovered"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
