"""A shard never materializes the full model (issue 19, item 6).

On a generated ~200 MB bf16 Llama checkpoint (four safetensors files), a shard built in a fresh
process holds exactly its slice (the bytes computed here from the file headers with safetensors'
own reader and the Megatron split of each projection), maps none of the checkpoint's files, and
its load raises the process's peak RSS by less than 1.3 x its slice plus a fixed margin. Not
timed; the per-phase figures with real Ray actors are in ``bench/bench_shard_memory.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from bench.bench_shard_memory import GENERATED, write_llama_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# Allocator and interpreter bookkeeping of a load besides the tensors (the meta model, the state
# dict, per-tensor Python objects): measured at ~2-5 MiB here.
MARGIN = 32 << 20
# Rows (column-parallel) or columns (row-parallel) of each projection that tp splits; the rest is
# replicated.
SPLIT_AXIS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("llama200m"), GENERATED["llama-200m"])


def slice_bytes(ckpt: Path, world: int, itemsize: int | None = None) -> tuple[int, int]:
    """(bytes of one rank's slice at tp=``world``, bytes of the whole checkpoint), from the headers;
    with ``itemsize``, as if every tensor were cast to a dtype of that size."""
    files = set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values())
    part = whole = 0
    for file in files:
        with safe_open(ckpt / file, framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                n = itemsize or ITEMSIZE[s.get_dtype()]
                for d in s.get_shape():
                    n *= d
                proj = name.split(".")[-2]
                whole += n
                part += n // world if proj in SPLIT_AXIS else n
    return part, whole


def probe(ckpt: Path, rank: int, world: int, dtype: str | None) -> dict[str, Any]:
    """``bench.bench_shard_memory.probe_load`` in a fresh interpreter (its peak RSS is the load's own)."""
    code = ("import json, sys; from pathlib import Path; from bench.bench_shard_memory import probe_load; "
            "print(json.dumps(probe_load(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None)))")
    done = subprocess.run([sys.executable, "-c", code, str(ckpt), str(rank), str(world), dtype or ""], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# (rank, tp, the dtype the load casts to): the bf16 slices as stored, and cast to float32 on the
# way in (through one small staging buffer, never a whole stored-dtype copy).
@pytest.mark.parametrize(("rank", "world", "dtype"), [(1, 2, None), (0, 1, None), (0, 2, "float32")])
def test_a_shard_holds_its_slice_and_nothing_more(checkpoint: Path, rank: int, world: int, dtype: str | None) -> None:
    expected, whole = slice_bytes(checkpoint, world, 4 if dtype == "float32" else None)
    got = probe(checkpoint, rank, world, dtype)
    assert got["slice"] == expected + got["buffers"]  # distinct storages: no view of anything larger
    assert got["buffers"] < 1 << 10  # the rotary inv_freq only
    assert got["mapped"] == []  # no page of the checkpoint stays in the shard's memory
    grown = got["peak"] - got["baseline"]
    assert grown < 1.3 * expected + MARGIN, (
        f"tp={world} rank {rank}: the load raised the peak RSS by {grown / 2**20:.0f} MiB for a "
        f"{expected / 2**20:.0f} MiB slice (whole checkpoint {whole / 2**20:.0f} MiB)")
    if world > 1:
        assert grown < 0.75 * whole  # far from the full model
