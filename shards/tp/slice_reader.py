"""Read slices of safetensors tensors into tensors of their own, with ``pread`` (no file mapping).

Why not ``safe_open(...).get_slice``: safetensors 0.8 maps the whole file (a private mapping) and
hands out views of it. A shard's parameters would stay views of that mapping for the life of the
process, so every file page that the load or a forward touched stays in the shard's resident
memory: a row-parallel slice (a few columns of every row) touches every page of its full tensor,
a column slice keeps the whole file mapped, and after quantization the replaced high-precision
weights' pages stay resident beside their FP8 codes. Here each slice is read into a freshly
allocated tensor that holds exactly that slice, so a shard's resident memory is its slice; the
kernel's page cache still serves the file, outside every process's RSS.

The format: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
tensors' bytes, C-contiguous and little-endian, ``data_offsets`` counting from the end of the
header.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from shards.errors import ShardError

Index = tuple[int | slice, ...]

# safetensors dtype names → torch (the names the format defines that torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# A header larger than this is a damaged file, not a checkpoint (safetensors itself refuses > 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Bytes converted at a time when the stored dtype differs from the wanted one: the only memory a
# read needs besides its result (a pread and a copy per 4 MiB cost nothing next to the bytes moved).
STAGING_BYTES = 4 << 20
# Linux transfers at most 0x7ffff000 bytes per read call.
_MAX_READ = 1 << 30


class SafetensorsFormatError(ShardError, ValueError):
    """A safetensors file whose header or size does not follow the format."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor sits in its file.

    Attributes:
        dtype: the stored dtype.
        shape: the stored shape.
        offset: absolute byte offset of its first element in the file.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def _bad(path: Path, what: str) -> SafetensorsFormatError:
    return SafetensorsFormatError(f"safetensors file {str(path)!r}: {what}; rewrite the checkpoint with "
                                  "save_pretrained(..., safe_serialization=True)")


def _entry(path: Path, name: str, raw: object, data_start: int, size: int) -> TensorEntry:
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise _bad(path, f"tensor {name!r} lacks dtype, shape or data_offsets in the header")
    dtype = DTYPES.get(raw["dtype"])
    if dtype is None:
        raise _bad(path, f"tensor {name!r} has dtype {raw['dtype']!r}; readable dtypes: {', '.join(DTYPES)}")
    shape, offsets = raw["shape"], raw["data_offsets"]
    if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has shape {shape!r} and data_offsets {offsets!r}")
    entry = TensorEntry(dtype, tuple(shape), data_start + offsets[0])
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(entry.shape) * entry.itemsize:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} do not hold {entry.shape} of {raw['dtype']}")
    if data_start + end > size:
        raise _bad(path, f"tensor {name!r} ends at byte {data_start + end}, after the end of the file "
                         f"({size} bytes): the file is truncated")
    return entry


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file by name, checked against the file's size (no data read)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise _bad(path, f"the header length ({n} bytes) does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(path, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    return {name: _entry(path, name, raw_entry, 8 + n, size)
            for name, raw_entry in header.items() if name != "__metadata__"}


def _ranges(entry: TensorEntry, index: Index, where: str) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """Per stored axis the ``[start, stop)`` that ``index`` selects, and the result's shape."""
    if len(index) > len(entry.shape):
        raise IndexError(f"{where}: index {index} has more axes than the stored shape {entry.shape}")
    ranges, shape = [], []
    for axis, n in enumerate(entry.shape):
        ix = index[axis] if axis < len(index) else slice(None)
        if isinstance(ix, int):
            i = ix + n if ix < 0 else ix
            if not 0 <= i < n:
                raise IndexError(f"{where}: index {ix} is out of range for axis {axis} of length {n}")
            ranges.append((i, i + 1))
        elif isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1:
                raise IndexError(f"{where}: slice {ix} has step {step}; only contiguous slices are read")
            ranges.append((start, max(start, stop)))
            shape.append(max(start, stop) - start)
        else:
            raise IndexError(f"{where}: index {ix!r} on axis {axis} is neither an int nor a slice")
    return ranges, tuple(shape)


def byte_runs(entry: TensorEntry, index: Index, where: str = "tensor") -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """The shape of ``tensor[index]`` and the ``(file offset, bytes)`` runs holding it, in C order.

    The trailing axes read whole join the run of the last axis that is cut, so a column slice (rows
    of a weight) is one run and a row-parallel slice (columns) is one run per row.
    """
    ranges, shape = _ranges(entry, index, where)
    if any(a == b for a, b in ranges):
        return shape, []
    strides = [math.prod(entry.shape[axis + 1:]) for axis in range(len(entry.shape))]
    cut = [axis for axis, (a, b) in enumerate(ranges) if (a, b) != (0, entry.shape[axis])]
    last = cut[-1] if cut else -1
    if last < 0:
        return shape, [(entry.offset, math.prod(entry.shape) * entry.itemsize)]
    a, b = ranges[last]
    run = (b - a) * strides[last] * entry.itemsize
    outer = [range(lo, hi) for lo, hi in ranges[:last]]
    runs = [(entry.offset + (sum(i * s for i, s in zip(pos, strides)) + a * strides[last]) * entry.itemsize, run)
            for pos in itertools.product(*outer)]
    return shape, runs


def _pieces(runs: list[tuple[int, int]], limit: int) -> Iterator[tuple[int, int]]:
    """The runs cut into pieces of at most ``limit`` bytes (``limit`` a multiple of the item size)."""
    for offset, n in runs:
        for start in range(0, n, limit):
            yield offset + start, min(limit, n - start)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class SliceFile:
    """One safetensors file open for reading slices: its header and a file descriptor (no mapping).

    Args:
        path: the file.
    """

    def __init__(self, path: str | Path) -> None:
        if sys.byteorder != "little":
            raise SafetensorsFormatError("safetensors data is little-endian; this reader runs on little-endian "
                                         "hosts only")
        self.path = Path(path)
        self.entries = read_header(self.path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SliceFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, name: str, index: Index = (), dtype: torch.dtype | None = None,
             staging: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor[index]`` (ints and step-1 slices per axis) in a new contiguous CPU tensor, cast
        to ``dtype`` if given; only the selected bytes are read from the file.

        A cast goes through ``staging`` (a uint8 buffer of at least 8 bytes; default a new one of
        up to :data:`STAGING_BYTES`). Pass the same one to every read of a load: buffers allocated
        and freed between the results fragment the heap, which then keeps their pages resident.
        """
        entry = self.entries[name]
        where = f"tensor {name!r} in {str(self.path)!r}"
        shape, runs = byte_runs(entry, index, where)
        out = torch.empty(shape, dtype=dtype or entry.dtype)
        if out.numel() == 0:
            return out
        if out.dtype == entry.dtype:
            self._read_runs(_pieces(runs, _MAX_READ), _bytes_of(out), where)
            return out
        # Another dtype: convert through a bounded staging buffer instead of a whole stored-dtype copy.
        if staging is None:
            staging = torch.empty(min(STAGING_BYTES, sum(n for _, n in runs)), dtype=torch.uint8)
        limit = staging.numel() - staging.numel() % entry.itemsize
        flat, done, filled, batch = out.view(-1), 0, 0, []
        for piece in [*_pieces(runs, limit), None]:
            if piece is None or filled + piece[1] > limit:
                self._read_runs(batch, _bytes_of(staging), where)
                n = filled // entry.itemsize
                flat[done:done + n].copy_(staging[:filled].view(entry.dtype))
                done, filled, batch = done + n, 0, []
            if piece is not None:
                batch.append(piece)
                filled += piece[1]
        return out

    def _read_runs(self, runs: Iterator[tuple[int, int]] | list[tuple[int, int]], dest: memoryview, where: str) -> None:
        """Read the runs one after the other into ``dest`` from its start."""
        if self._fd is None:
            raise ValueError(f"{where}: the file is closed")
        pos = 0
        for offset, n in runs:
            got = 0
            while got < n:
                r = os.preadv(self._fd, [dest[pos + got:pos + n]], offset + got)
                if r == 0:
                    raise SafetensorsFormatError(f"{where}: the file ended at byte {offset + got}, inside the "
                                                 "tensor (truncated since its header was read)")
                got += r
            pos += n
