"""Rows and the RESULTS.md section of the 405B simulation (``bench.bench_405b``)."""

from __future__ import annotations

import datetime as _dt
import math
import os
from typing import TYPE_CHECKING, Sequence

from bench.sim_coordinator import METHODS
from bench.sim_shapes import SimShape, shard_bytes
from bench.timing import Row, row, skipped

if TYPE_CHECKING:
    from bench.bench_405b import IoFloor, StoreFigures

GOAL_S, GOAL_BYTES, GOAL_S3_RATIO = 10.0, 1e9, 3.0
BEGIN = "<!-- bench_405b: begin (written by python -m bench.bench_405b --results; replaced on rerun) -->"
END = "<!-- bench_405b: end -->"
NAME = "405B sim"


def total_s(side: "StoreFigures", method: str) -> float:
    """Write + reduce + one method's scales: what the time goal bounds (a run computes one method)."""
    ph = side.coordinator.phases
    return side.write.wall_s + ph["reduce"].wall_s + ph[f"scales {method}"].wall_s


def total_cpu_s(side: "StoreFigures", method: str) -> float:
    ph = side.coordinator.phases
    return side.write.cpu_s + ph["reduce"].cpu_s + ph[f"scales {method}"].cpu_s


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def _breakdown(side: "StoreFigures") -> str:
    parts = sorted(side.store_bytes.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in parts)


def rows_for(sides: Sequence["StoreFigures"], floor: "IoFloor", shape: SimShape, s3_reason: str | None) -> list[Row]:
    """Table rows: the time goal, the size goal, the export, S3 against local disk."""
    local = sides[0]
    ph = local.coordinator.phases
    grid = f"{shape.layers} layers, dp={shape.dp} x tp={shape.tp}"
    common = (f"{grid}; write {local.write.wall_s:.2f} s ({local.write.writers} writers in {local.write.procs} "
              f"processes), reduce {ph['reduce'].wall_s:.2f} s; peak RSS per writer process "
              f"{local.write.max_rss_mb:.0f} MB, coordinator {local.coordinator.max_rss_mb:.0f} MB")
    out = []
    for m in METHODS:
        t = total_s(local, m)
        out.append(row(f"{NAME}: write+reduce+scales {m}, local disk", f"{t:.2f} s", f"I/O floor {floor.wall_s:.2f} s",
                       t / floor.wall_s, f"< {GOAL_S:g} s", t < GOAL_S,
                       f"scales {ph[f'scales {m}'].wall_s:.2f} s, CPU {total_cpu_s(local, m):.1f} s in all; {common}"))
    size = sum(local.store_bytes.values())
    raw = shape.num_shards * shard_bytes(shape)
    out.append(row(f"{NAME}: store bytes, local disk", _gb(size), f"shards' own float32 values {_gb(raw)}", size / raw,
                   f"< {GOAL_BYTES / 1e9:g} GB", size < GOAL_BYTES, _breakdown(local)))
    ex = ph["export"]
    out.append(row(f"{NAME}: INC export, world {shape.tp}", f"{ex.wall_s:.2f} s", "-", math.nan, "-", None,
                   f"{local.coordinator.export_files} files, {local.coordinator.export_bytes / 1e6:.1f} MB, "
                   f"CPU {ex.cpu_s:.1f} s; {METHODS[0]} scale file"))
    name = f"{NAME}: S3 (moto) / local disk, write+reduce+scales {METHODS[0]}"
    if len(sides) < 2:
        out.append(skipped(name, f"<= {GOAL_S3_RATIO:g}", s3_reason or "not run"))
    else:
        s3, t = sides[1], total_s(local, METHODS[0])
        r = total_s(s3, METHODS[0]) / t
        out.append(row(name, f"{total_s(s3, METHODS[0]):.2f} s", f"local {t:.2f} s", r, f"<= {GOAL_S3_RATIO:g}",
                       r <= GOAL_S3_RATIO, f"store {_gb(sum(s3.store_bytes.values()))}; S3 server CPU "
                       f"{s3.server_cpu_s:.1f} s on the same cores; peak RSS per writer "
                       f"process {s3.write.max_rss_mb:.0f} MB, coordinator {s3.coordinator.max_rss_mb:.0f} MB"))
    return out


def _cell(wall: float, cpu: float) -> str:
    return f"{wall:.2f} s (CPU {cpu:.1f} s)"


def section(sides: Sequence["StoreFigures"], floor: "IoFloor", shape: SimShape, flushes: int,
            args: Sequence[str], date: str | None = None, s3_reason: str | None = None) -> str:
    """The markdown section (markers included): one column per kind of store."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m bench.bench_405b", *args])
    head = "| | " + " | ".join(s.where for s in sides) + " |"
    lines = [head, "|---" * (len(sides) + 1) + "|"]

    def add(label: str, cells: Sequence[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    add(f"write: {sides[0].write.writers} writers, {flushes} flush(es) each",
        [_cell(s.write.wall_s, s.write.cpu_s) for s in sides])
    for phase in ("reduce", *(f"scales {m}" for m in METHODS)):
        add(phase, [_cell(s.coordinator.phases[phase].wall_s, s.coordinator.phases[phase].cpu_s) for s in sides])
    for m in METHODS:
        add(f"**write + reduce + scales {m}** (goal < {GOAL_S:g} s)",
            [f"**{_cell(total_s(s, m), total_cpu_s(s, m))}**" for s in sides])
    add(f"INC export, world {shape.tp} (measurement + {METHODS[0]} scale files)",
        [_cell(s.coordinator.phases["export"].wall_s, s.coordinator.phases["export"].cpu_s) for s in sides])
    add(f"**store bytes** (goal < {GOAL_BYTES / 1e9:g} GB)", [f"**{_gb(sum(s.store_bytes.values()))}**" for s in sides])
    add("store bytes by entry", [_breakdown(s) for s in sides])
    add("peak RSS, largest writer process", [f"{s.write.max_rss_mb:.0f} MB" for s in sides])
    add("peak RSS, coordinator process", [f"{s.coordinator.max_rss_mb:.0f} MB" for s in sides])
    if len(sides) > 1:
        add("CPU of the S3 server process (same cores), whole run", ["-", *(f"{s.server_cpu_s:.1f} s" for s in sides[1:])])
    if len(sides) > 1:
        for m in METHODS:
            ratio = total_s(sides[1], m) / total_s(sides[0], m)
            add(f"**S3 / local disk**, with {m} (goal <= {GOAL_S3_RATIO:g})", ["1", f"**{ratio:.2f}**"])
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return "\n".join([
        BEGIN, "## Llama-3.1-405B by simulation: 64 writers, reduce, scales, INC export", "",
        f"Generated by `{command}` on {date} (`make bench-405b`). {shape.layers} layers, hidden {shape.hidden}, "
        f"intermediate {shape.intermediate}, {shape.heads} q / {shape.kv_heads} kv heads, vocab {shape.vocab}, "
        f"{len(shape.modules)} Linears; dp={shape.dp} x tp={shape.tp} shards; observer maxabs (per-tensor inputs and "
        f"outputs, per-output-channel weights); scales on GAUDI3. Wall seconds, CPU seconds of the processes "
        f"involved in parentheses (the machine is shared: CPU time is the steadier figure). Load average at the "
        f"end: {load} on {os.cpu_count()} cores.", "",
        *lines, "", *([f"S3 column not run: {s3_reason}.", ""] if len(sides) < 2 and s3_reason else []),
        f"I/O floor on the local disk (the time rows' baseline): {_cell(floor.wall_s, floor.cpu_s)} to write "
        f"{len(sides[0].chunk_bytes)} files of the store's chunk sizes ({sum(sides[0].chunk_bytes) / 1e6:.1f} MB) "
        "with one thread, read them back and np.fmax them into one vector. Every reduced value and count was "
        "checked against the independently computed global statistics.", END, ""])
