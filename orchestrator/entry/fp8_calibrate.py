"""``fp8-calibrate``: measure, quantize, or both, on a Ray cluster, from an INC JSON config.

    fp8-calibrate run --config maxabs_quant.json --model ckpt/ --data calib.txt --tp 2 --export out/
    ray job submit --working-dir . -- fp8-calibrate run --config ... --model ... --data ...
    fp8-calibrate smooth --model ckpt/ --store stats/pc.zarr --alpha 0.45 --out ckpt-smoothed/

``smooth`` writes a smoothed copy of a checkpoint (activation outliers migrated into the weights,
factors from a store measured with ``observer: maxabs_per_channel``); calibrate that copy next.

Without ``--address`` (and outside a Ray job) an in-process local cluster is started, with one
simulated card per shard on CPU.

Errors print as one line and exit with status 2. An exception raised inside a shard actor names
its type, the rank and the actor method; its full traceback goes to a log file the line names,
under ``$FP8_ORCHESTRATOR_LOG_DIR`` (default ``<tempdir>/fp8-orchestrator-logs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ray.exceptions import RayActorError, RayTaskError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.driver.calibration import Calibration, RunReport
from orchestrator.driver.coverage import UncoveredPolicy
from orchestrator.driver.data import Batch, make_batches, read_texts, tokenize_texts
from orchestrator.errors import Fp8OrchestratorError
from orchestrator.driver.measure_loop import OWN_ERRORS
from shards.card.actor_errors import ShardActorError, actor_error
from shards.tp.checkpoint import read_config
from shards.errors import ShardError
from shards.fp8.numerics import ScaleDevice
from stats_store.errors import StatsStoreError


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1e9"`` → bytes (decimal units as transformers' ``max_shard_size``)."""
    t = text.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if t.endswith(u)), "B")
    number = t[: len(t) - len(unit)] if t.endswith(unit) else t
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB") from None
    if not value >= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r}: a shard size must be at least one byte")
    return int(value)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be more than 0 seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp8-calibrate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("measure", "measure max-abs statistics into the stats store"),
                        ("quantize", "compute scales from the store and quantize the shards"),
                        ("run", "measure, then quantize (one command)")):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", required=True, help="INC-style JSON config (mode, observer, scale_method, ...)")
        s.add_argument("--model", required=True, help="HF checkpoint directory (safetensors)")
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per group (default 1)")
        s.add_argument("--dp", type=int, default=1, help="data-parallel groups (default 1)")
        s.add_argument("--address", default=None, help="Ray cluster address (default: local in-process cluster)")
        s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "hpu"], help="card kind of the shards")
        s.add_argument("--hpu-device", default=None, choices=["GAUDI2", "GAUDI3"], help="Gaudi generation (hpu only)")
        s.add_argument("--placement-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                       help="how long a tp group that lost its node waits for another node with room before "
                            "the measure stops, keeping every committed batch (default 300, as the start)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--json", action="store_true", help="print the summary as JSON")
        if name in ("measure", "run"):
            s.add_argument("--data", required=True, help="calibration text (.txt, paragraphs) or .jsonl with 'text'")
            s.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
            s.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
            s.add_argument("--max-batches", type=int, default=None, help="use at most this many batches")
            s.add_argument("--flush-every", type=int, default=8, help="batches between store flushes (default 8)")
            s.add_argument("--overwrite", action="store_true", help="replace a store of a different run")
        if name in ("quantize", "run"):
            s.add_argument("--uncovered", default=None, choices=[p.value for p in UncoveredPolicy],
                           help="selected modules that saw no data: fail (default; warn when the config sets "
                                "ignore_modules_wo_measures), warn (leave them in high precision), unit_scale "
                                "(scale 1.0, not calibrated) or expert_max (an idle MoE expert gets the max of "
                                "its layer's experts that saw tokens)")
            s.add_argument("--export", default=None, help="write a compressed-tensors FP8 checkpoint here")
            s.add_argument("--inc-world", type=int, default=None, help="also export INC measurement/scale files for N ranks")
            s.add_argument("--max-shard-size", type=byte_size, default=None,
                           help="split the exported safetensors into files of at most this size (default 5GB; "
                                "a tensor larger than it gets a file of its own)")
    sm = sub.add_parser("smooth", help="write a smoothed copy of a checkpoint (factors from a per-channel stats store)",
                        description="write a smoothed copy of a checkpoint (factors from a per-channel stats store)")
    sm.add_argument("--model", required=True, help="HF checkpoint directory (safetensors) of a dense family")
    sm.add_argument("--store", required=True, help="stats store (.zarr) measured on it with observer maxabs_per_channel")
    sm.add_argument("--alpha", type=float, default=0.5, help="migration strength in [0, 1] (default 0.5)")
    sm.add_argument("--out", required=True, help="new folder for the smoothed checkpoint")
    sm.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def calibration_batches(data: str | Path, model: str | Path, seq_len: int, batch_size: int,
                        max_batches: int | None) -> list[Batch]:
    """Read and tokenize the calibration data for ``model``."""
    vocab = int(read_config(model).vocab_size)
    streams = tokenize_texts(read_texts(data), model, vocab)
    return make_batches(streams, seq_len, batch_size, max_batches)


def summary_table(report: RunReport, title: str = "fp8-calibrate") -> Table:
    """The final summary: what was measured, covered and quantized, and where the time went."""
    t = Table(title=title, show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("batches measured", str(report.batches)),
        ("batches already in the store (skipped)", str(report.skipped)),
        ("tokens", str(report.tokens)),
        ("modules measured", str(report.modules_measured)),
        ("modules selected for quantization", str(report.modules_selected)),
        ("modules with no observation", ", ".join(report.uncovered) or "none"),
        ("modules with NaN/Inf (never in a scale)", _nonfinite_text(report.nonfinite)),
        ("shard groups restarted after a fault", str(report.restarts)),
        ("modules with scales", str(report.scales)),
        ("modules quantized (per shard)", str(report.quantized)),
    ]
    from orchestrator.driver.coverage import summary_rows  # idle MoE experts, what the uncovered policy did

    rows += summary_rows(report)
    rows += [(f"time: {k}", f"{v:.2f} s") for k, v in report.timer.seconds.items()]
    profile = report.profile()
    if "all_reduce_share_of_measure" in profile:
        rows.append(("tp all-reduce share of the measure forwards", f"{100 * profile['all_reduce_share_of_measure']:.1f} %"))
    if "quantize_slowest_shard_s" in profile:
        rows.append(("in-place quantize, slowest shard", f"{profile['quantize_slowest_shard_s']:.2f} s, "
                     f"{profile['quantize_slowest_shard_gb_per_s']:.2f} GB/s of weights read + written"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def _nonfinite_text(report: dict[str, dict[str, int]]) -> str:
    """``module (inputs.0: 3)`` per module that saw NaN/Inf values."""
    parts = [f"{name} ({', '.join(f'{k}: {v}' for k, v in labels.items())})" for name, labels in report.items()]
    return ", ".join(parts) or "none"


def run(args: argparse.Namespace) -> RunReport:
    """Execute one command; returns the run report."""
    hpu = ScaleDevice(args.hpu_device) if args.hpu_device else None
    overwrite = getattr(args, "overwrite", False)
    with Calibration(args.config, args.model, tp=args.tp, dp=args.dp, address=args.address, device=args.device,
                     hpu_device=hpu, overwrite=overwrite, progress=not args.no_progress,
                     flush_every=getattr(args, "flush_every", 8), uncovered=getattr(args, "uncovered", None),
                     placement_timeout_s=args.placement_timeout) as cal:
        if args.command in ("measure", "run"):
            batches = calibration_batches(args.data, args.model, args.seq_len, args.batch_size, args.max_batches)
            cal.measure(batches)
        if args.command in ("quantize", "run"):
            cal.quantize()
            if args.export:
                cal.export(args.export, inc_world=args.inc_world, max_shard_bytes=args.max_shard_size)
        return cal.report


def smooth(args: argparse.Namespace, console: Console) -> int:
    """``fp8-calibrate smooth``: one line (or JSON) saying where the smoothed checkpoint is."""
    from orchestrator.export.smoothed import write_smoothed_checkpoint

    summary = write_smoothed_checkpoint(args.model, args.store, args.out, args.alpha)
    lo = min(float(s.min()) for s in summary.factors.values())
    hi = max(float(s.max()) for s in summary.factors.values())
    if args.json:
        print(json.dumps({"out": str(summary.out), "alpha": summary.alpha, "groups": len(summary.factors),
                          "factor_min": lo, "factor_max": hi}))
    else:
        console.print(f"smoothed checkpoint (alpha {summary.alpha}, {len(summary.factors)} groups, factors "
                      f"{lo:.3g} .. {hi:.3g}): {summary.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "smooth":
            return smooth(args, console)
        report = run(args)
    except (ShardActorError, Fp8OrchestratorError, ShardError, StatsStoreError, RayTaskError, RayActorError) as e:
        # An error from a shard actor names its exception type, rank and the log of its traceback
        # (ShardActorError); a Ray error not converted on the way is converted here, never printed.
        error = actor_error(e, own=OWN_ERRORS)
        # One line whatever the terminal width; the message is text, never rich markup ("[0, 1]").
        message = " ".join(str(error).split())
        console.print(f"[bold red]fp8-calibrate {args.command}:[/] {escape(message)}", soft_wrap=True)
        return 2
    if args.json:
        print(json.dumps({"batches": report.batches, "skipped": report.skipped, "modules_measured": report.modules_measured,
                          "modules_quantized": report.quantized, "uncovered": report.uncovered,
                          "nonfinite": report.nonfinite, "restarts": report.restarts,
                          "uncovered_policy": report.uncovered_policy, "filled": report.filled,
                          "expert_tokens": {layer: {str(e): n for e, n in experts.items()}
                                            for layer, experts in report.expert_tokens.items()},
                          "seconds": report.timer.seconds, "shards": report.shard_times, "profile": report.profile()}))
    else:
        console.print(summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
