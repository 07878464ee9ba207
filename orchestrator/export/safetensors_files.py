"""safetensors files written one tensor at a time, HF-style shards and their index.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a 5 GB shard of a
405B export would then sit in one process. Here a file's header is computed from the tensors'
names, dtypes and shapes alone (:class:`TensorSpec`), written first, and each tensor's bytes follow
as it is fetched, so a writer holds one tensor at a time.

The files read back exactly as ``save_file``'s: the same header entries (dtype, shape, offsets),
tensors laid out by dtype (element size, largest first) then name as safetensors does, so every
tensor starts aligned to its element size; the header padded with spaces to 8 bytes. Only the order of the
``__metadata__`` keys differs (sorted here; ``save_file``'s is a Rust hash map's, random per process).

Shards: tensors in name order, a new file when the next tensor would push the current one above
``max_shard_bytes`` (a bigger tensor alone in its file); one file is ``model.safetensors``, several
are ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` (``{"metadata":
{"total_size": bytes}, "weight_map": {tensor: file}}``), the names and index ``save_pretrained``
writes. Up to tensors bigger than the limit this is ``huggingface_hub.split_torch_state_dict_into_shards``
on the name-sorted tensors; that one keeps the current file open past a too-big tensor, here the
too-big tensor closes it (the split the in-memory export always made; any split loads, the index
says where each tensor is).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence

import torch

from orchestrator.export.writer import ExportError
from shards.tp.slice_reader import read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF's shard size before transformers 5 raised save_pretrained's default to 50 GB: a 405B export is
# ~90 files, each small enough to download, checksum and mmap on its own.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# The safetensors dtype codes of the dtypes a checkpoint holds, in the order safetensors lays a
# file's tensors out (its dtype enum, descending: element size first; checked against save_file).
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_CODES)}


@dataclass(frozen=True)
class TensorSpec:
    """What a file's header says of one tensor: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @staticmethod
    def of(name: str, t: torch.Tensor) -> "TensorSpec":
        """The spec of ``t`` (any device, meta included)."""
        if t.dtype not in DTYPE_CODES:
            raise ExportError(f"tensor {name!r} has dtype {t.dtype}, which the export does not write; "
                              f"allowed: {', '.join(str(d).removeprefix('torch.') for d in DTYPE_CODES)}")
        return TensorSpec(name, t.dtype, tuple(t.shape))

    def meta(self) -> torch.Tensor:
        """An empty tensor of this dtype and shape on the meta device (no memory)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def read_specs(path: Path) -> dict[str, TensorSpec]:
    """The tensors a safetensors file holds, from its header alone (nothing else is read or mapped).

    The header is parsed and checked against the file by the shards' slice reader (one reader of
    the format); the export refuses only the dtypes it does not write.
    """
    specs = {}
    for name, entry in read_header(path).items():
        if entry.dtype not in DTYPE_CODES:
            raise ExportError(f"'{path}': tensor {name!r} has dtype {entry.dtype}, which the export does not copy; "
                              f"allowed: {', '.join(DTYPE_CODES.values())}")
        specs[name] = TensorSpec(name, entry.dtype, entry.shape)
    return specs


def file_layout(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order of the tensors' bytes in a file: by dtype as safetensors orders them (element size
    descending, so every tensor starts aligned to its element size), then by name."""
    return sorted(specs, key=lambda s: (_LAYOUT_RANK[s.dtype], s.name))


def _header(layout: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for s in layout:
        header[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


Fetch = Callable[[str], torch.Tensor]


def _write_bytes(f: BinaryIO, spec: TensorSpec, t: torch.Tensor) -> None:
    if t.is_meta:
        raise ExportError(f"tensor {spec.name!r} has no data (a meta tensor) and nothing fetched it; export a "
                          "checkpoint that holds its tensors, or pass the source that reads them")
    if TensorSpec.of(spec.name, t) != spec:
        raise ExportError(f"tensor {spec.name!r} arrived as {t.dtype} {tuple(t.shape)}, but the export planned "
                          f"{spec.dtype} {spec.shape}; the shards changed while exporting: quantize again and re-export")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def write_file(path: Path, specs: Iterable[TensorSpec], fetch: Fetch, metadata: Mapping[str, str],
               on_written: Callable[[TensorSpec], None] = lambda spec: None) -> None:
    """Write one safetensors file holding ``specs``, asking ``fetch(name)`` for each tensor in turn.

    Only the tensor being written is referenced here; ``on_written`` is called once its bytes are
    out (the export's memory accounting releases it then).
    """
    if sys.byteorder != "little":
        raise ExportError("safetensors files are little-endian; export on a little-endian machine")
    layout = file_layout(specs)
    header = _header(layout, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in layout:
            t = fetch(spec.name)
            _write_bytes(f, spec, t)
            del t
            on_written(spec)


def check_shard_size(max_shard_bytes: int) -> None:
    """Refuse a shard size that is not a positive number of bytes."""
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes={max_shard_bytes}: give a positive number of bytes per shard file")


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups (in name order) of at most ``max_shard_bytes``; a bigger tensor gets its own."""
    check_shard_size(max_shard_bytes)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in sorted(specs, key=lambda s: s.name):
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as ``save_pretrained`` names them."""
    return [SINGLE_FILE] if count == 1 else [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_shards(out_dir: Path, specs: Iterable[TensorSpec], fetch: Fetch, metadata: Mapping[str, str],
                 max_shard_bytes: int, on_written: Callable[[TensorSpec], None] = lambda spec: None) -> list[Path]:
    """Every tensor of ``specs`` into shard files under ``out_dir`` (plus the index when there are several)."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_file(out_dir / name, shard, fetch, metadata, on_written)
    if len(shards) > 1:
        weight_map = {s.name: name for name, shard in zip(names, shards) for s in shard}
        total = sum(s.nbytes for shard in shards for s in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "DTYPE_CODES", "INDEX_FILE", "SINGLE_FILE", "TensorSpec", "check_shard_size",
           "file_layout",
           "plan_shards", "read_specs", "shard_names", "write_file", "write_shards"]
