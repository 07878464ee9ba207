"""Issue 19.5: peak memory of the FP8 export of a sharded run, streamed vs the in-memory funnel.

Two synthetic bf16 Llama checkpoints of different depth (full size: ~114 MB and ~394 MB; untied
16k-vocab embedding and head, hidden 1024) are calibrated with ``Calibration`` at tp=2 (one batch,
``maxabs_pow2``), then exported:

- *streamed*: ``Calibration.export`` (``orchestrator.export.streamed``: the driver asks the ranks
  for one tensor at a time and writes it);
- *in-memory* (the baseline, what export did before): every rank's full ``quantized_state()`` pulled
  into the driver, ``gather_checkpoint`` and ``write_compressed_tensors`` (today's file writer: the
  old ``save_file`` also turned every tensor into bytes first, so the old funnel peaked higher still).

Each (checkpoint, way) runs in a fresh process (own Ray cluster), so memory one export freed cannot
hide another's. The peak resident memory *of the export alone* is measured per process: its high-water
mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the export, in the driver and
in each shard actor (through ``__ray_call__``), and the rows report ``VmHWM`` after the export minus
``VmRSS`` before it. Pages of Ray's shared-memory object store that a process touches count in its
resident memory (and stay counted while it maps them, even after the objects are freed), so objects
passing through Ray are in the figures; the notes give the growth of those shared pages
(``RssShmem``) over the export, the rest is the process's own memory.

Rows: the streamed driver's and the worst actor's export peak relative to the largest tensor of the
export, per checkpoint (goal: a few tensors); the streamed driver's and actor's peak on the larger
checkpoint relative to the smaller one (goal: flat, independent of model size), with the in-memory
path's figures in the notes.

Run alone: ``.venv/bin/python -m bench.bench_export [--quick]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.rss import proc_memory, reset_peak
from bench.timing import Row, row

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
TP = 2
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class CkptSize:
    """A synthetic Llama checkpoint (bf16, untied head)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int


# size name -> (smaller, larger) checkpoint
SIZES: dict[str, tuple[CkptSize, CkptSize]] = {
    "toy": (CkptSize(64, 128, 4, 2, 256, 2), CkptSize(64, 128, 4, 2, 256, 6)),
    "quick": (CkptSize(256, 704, 4, 2, 4096, 2), CkptSize(256, 704, 4, 2, 4096, 10)),
    "full": (CkptSize(1024, 2816, 16, 8, 16384, 2), CkptSize(1024, 2816, 16, 8, 16384, 14)),
}


def write_checkpoint(size: CkptSize, folder: Path) -> int:
    """A random bf16 ``LlamaForCausalLM`` checkpoint in ``folder``; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=256, initializer_range=0.02,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)  # built in bf16: no fp32 copy
    model.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---- one export, in its own process -------------------------------------------------------------

def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    value = proc_memory().get(field)
    if value is None:
        raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")
    return value


def _reset_peak(_: Any = None) -> tuple[int, int]:
    """Reset this process's resident high-water mark; returns its resident and shared-memory bytes now."""
    if not reset_peak():
        raise RuntimeError("/proc/self/clear_refs refused the reset of VmHWM (Linux only); the export peaks need it")
    return _status("VmRSS"), _status("RssShmem")


def _peak(_: Any = None) -> tuple[int, int]:
    """This process's resident high-water mark and its shared-memory pages now."""
    return _status("VmHWM"), _status("RssShmem")


def measure_export(ckpt: Path, way: str, tmp: Path) -> dict[str, Any]:
    """Calibrate ``ckpt`` at tp=2 and export it ``way`` ("streamed" or "memory"); the export's peaks."""
    import ray
    import torch

    from orchestrator.driver.calibration import Calibration
    from orchestrator.driver.data import Batch
    from orchestrator.export.compressed_tensors import write_compressed_tensors
    from orchestrator.export.gather import gather_checkpoint
    from shards.plan import Mode

    torch.set_num_threads(1)
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "allowlist": {"types": ["Linear"]},
           "dump_stats_path": str(tmp / "stats")}
    with Calibration(cfg, ckpt, tp=TP, num_cpus=2, progress=False) as cal:
        cal.measure([Batch(0, (tuple(range(1, 17)),))])
        scales = cal.quantize()
        actors = cal.groups[0]
        before = ray.get([a.__ray_call__.remote(_reset_peak) for a in actors])
        driver_before = _reset_peak()
        out = tmp / "export"
        if way == "streamed":
            cal.export(out)
        else:
            plan = cal.config.to_plan(Mode.QUANTIZE)
            ckpt_in_memory = gather_checkpoint(ckpt, cal.quantized_state_by_rank(), scales.weight_scales,
                                               dynamic=plan.dynamic, scale_method=plan.scale_plan.name,
                                               nodes=scales.nodes)
            write_compressed_tensors(ckpt_in_memory, out)
            del ckpt_in_memory
        driver = [after - now for after, now in zip(_peak(), driver_before)]
        peaks = ray.get([a.__ray_call__.remote(_peak) for a in actors])
        actor = max([p - b for p, b in zip(after, now)] for after, now in zip(peaks, before))  # the worst rank
    from orchestrator.export.safetensors_files import read_specs

    specs = [s for f in out.glob("*.safetensors") for s in read_specs(f).values()]
    return {"driver": driver[0], "driver_shm": driver[1], "actor": actor[0], "actor_shm": actor[1],
            "export_bytes": sum(s.nbytes for s in specs),
            "largest": max(s.nbytes for s in specs)}


def _measure_in_subprocess(ckpt: Path, way: str, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-m", "bench.bench_export", "--measure", str(ckpt), way, str(tmp)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"export measurement ({way}, {ckpt.name}) exited {done.returncode}: {tail}")
    return json.loads(lines[-1])


# ---- rows ---------------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def run(size: str = "full") -> list[Row]:
    """Rows: export peaks vs the largest tensor per checkpoint, and larger / smaller checkpoint."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    ckpt_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for label, ckpt_size in zip(("smaller", "larger"), SIZES[size]):
            ckpt = tmp / label
            ckpt_bytes[label] = write_checkpoint(ckpt_size, ckpt)
            results[label] = {way: _measure_in_subprocess(ckpt, way, tmp / f"{label}-{way}")
                              for way in ("streamed", "memory")}
    rows = []
    for label in ("smaller", "larger"):
        s, m = results[label]["streamed"], results[label]["memory"]
        source = f"{_mb(ckpt_bytes[label])} bf16 checkpoint, FP8 export {_mb(s['export_bytes'])}"
        for who in ("driver", "actor"):
            ratio = s[who] / s["largest"]
            rows.append(row(f"export {who} peak RSS / largest tensor, streamed, {_mb(ckpt_bytes[label])} ckpt",
                            _mb(s[who]), f"largest tensor {_mb(s['largest'])}", ratio, "<= 4", ratio <= 4,
                            f"{source}, tp={TP}; streamed peak = {s[who] / s['export_bytes']:.2f}x the export, "
                            f"of which Ray object-store pages (shared memory) {_mb(s[who + '_shm'])}; "
                            f"in-memory export: {_mb(m[who])} = {m[who] / m['export_bytes']:.2f}x the export"))
    small, large = results["smaller"], results["larger"]
    size_ratio = ckpt_bytes["larger"] / ckpt_bytes["smaller"]
    for who in ("driver", "actor"):
        growth = large["streamed"][who] / small["streamed"][who]
        rows.append(row(f"export {who} peak RSS, larger / smaller checkpoint, streamed",
                        _mb(large["streamed"][who]), _mb(small["streamed"][who]), growth, "<= 1.5", growth <= 1.5,
                        f"checkpoints {size_ratio:.1f}x apart; in-memory export grows "
                        f"{large['memory'][who] / small['memory'][who]:.2f}x "
                        f"({_mb(small['memory'][who])} -> {_mb(large['memory'][who])})"))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure_export(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))))
    else:
        from bench.run_all import print_rows

        print_rows(run("quick" if "--quick" in sys.argv else "full"))
