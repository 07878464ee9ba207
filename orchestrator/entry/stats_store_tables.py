"""Rich tables for the ``stats-store`` commands; each takes the same dict that ``--json`` prints."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        shown = ", ".join(_fmt(x) for x in v[:8])
        return f"[{shown}{', …' if len(v) > 8 else ''}] ({len(v)})" if len(v) > 1 else shown
    return "" if v is None else str(v)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_fmt(x) for x in r))
    return t


def render_ls(d: dict[str, Any], console: Console) -> None:
    if "runs_in_directory" in d:
        rows = [[r["store"], r["config_hash"], r["topology"], r["device_kind"], r["modules"], r["reduced"]]
                for r in d["runs_in_directory"]]
        console.print(table(f"stats stores in {d['directory']}", ["store", "config", "topology", "device", "modules", "reduced"], rows))
        return
    console.print(f"store {d['store']}  format {d['format_version']}  config {d['config_hash']}  "
                  f"topology dp={d['topology']['dp']} tp={d['topology']['tp']}  device {d['device_kind']}  "
                  f"reduced: {d['reduced']}")
    console.print(table("runs", ["run", "started", "config", "device"],
                        [[r["run"], r.get("started"), r["config_hash"], r["device_kind"]] for r in d["runs"]]))
    console.print(table("shards", ["shard", "generation", "samples", "batches done"],
                        [[s["shard"], s["generation"], s["num_samples"], s["batches_done"]] for s in d["shards"]]))
    console.print(table("modules", ["module", "op type", "samples", "tokens", "tensors", "max |x|", "NaN/Inf"],
                        [[m["name"], m["op_type"], m["num_samples"], m["num_tokens"], m["tensors"], m["max"], m["nonfinite"]]
                         for m in d["modules"]]))


def render_show(d: dict[str, Any], console: Console) -> None:
    console.print(f"{d['module']} ({d['op_type']}), {d['num_samples']} samples, {d['num_tokens']} tokens, "
                  f"NaN/Inf {d['nonfinite']}")
    console.print(table("global values", ["tensor", "channels", "max", "values"],
                        [[lb, len(v), t["max"], v] for lb, t in d["tensors"].items() for v in [t["values"]]]))
    console.print(table("per shard", ["shard", "tensor", "slice", "max", "values"],
                        [[s["shard"], s["tensor"], s["slice"], s["max"], s["values"]] for s in d["shards"]]))


def render_diff(d: dict[str, Any], console: Console) -> None:
    console.print(f"A = {d['a']}\nB = {d['b']}")
    console.print(table(f"top {len(d['top'])} changes (ratio B/A)", ["module", "tensor", "max A", "max B", "min ratio", "max ratio"],
                        [[c["module"], c["tensor"], c["max_a"], c["max_b"], c["min_ratio"], c["max_ratio"]] for c in d["top"]]))
    console.print(table("missing modules", ["only in A", "only in B"],
                        [[a, b] for a, b in _zip_long(d["only_in_a"], d["only_in_b"])]))


def _zip_long(a: list[str], b: list[str]) -> list[tuple[str, str]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else "", b[i] if i < len(b) else "") for i in range(n)]


def render_coverage(d: dict[str, Any], console: Console) -> None:
    selected = "no selected-module inventory" if d["selected"] is None else f"{d['selected']} selected ({d['inventory']})"
    console.print(f"{d['store']}: {d['modules']} module(s) measured, {selected}")
    console.print(table(f"coverage of {d['store']}: {len(d['uncovered'])} problem(s)", ["module", "what"],
                        [[u["module"], u["problem"]] for u in d["uncovered"]]))
    if d["experts"]:
        how = "experts inferred from measured names" if d["experts_inferred"] else "experts from the recorded inventory"
        counts = "" if d["tokens_recorded"] else "; no token counts in this store"
        rows = [[e["layer"], e["experts"], ", ".join(map(str, e["idle"])) or "none", e["summary"],
                 " ".join(f"{k}:{'?' if v is None else v}" for k, v in e["tokens"].items())] for e in d["experts"]]
        console.print(table(f"MoE experts ({how}{counts})", ["layer", "experts", "idle (0 tokens)", "summary",
                                                             "tokens per expert"], rows))


def render_scales(d: dict[str, Any], console: Console) -> None:
    rows = [[n, node.get("inputs"), node.get("outputs"), node.get("params", {}).get("weight")] for n, node in d["nodes"].items()]
    console.print(table(f"{d['method']} scales (device {d['device']}, {d['lp']}, {d['hp']})", ["module", "inputs", "outputs", "weight"], rows))
    for e in d["errors"]:
        console.print(f"[red]{e['module']}: {e['error']}[/red]")
    for p in d.get("written", []):
        console.print(f"wrote {p}")


def render_paths(d: dict[str, Any], console: Console) -> None:
    for k, v in d.items():
        if k != "written":
            console.print(f"{k}: {v}")
    for p in d.get("written", []):
        console.print(p)


def render_import(d: dict[str, Any], console: Console) -> None:
    console.print(f"store: {d['store']}\nfiles: {', '.join(d['files'])}\nmodules: {d['modules']}")
    console.print(f"NaN/Inf values: {d['nonfinite_values']} in {d['nonfinite_modules']} module(s)")
    rows = [[name, label, count] for name, counts in d["nonfinite"].items() for label, count in counts.items()]
    if rows:
        shown = rows[:20]
        console.print(table(f"NaN/Inf per module (first {len(shown)} of {len(rows)})" if len(rows) > 20 else "NaN/Inf per module",
                            ["module", "tensor", "count"], shown))
