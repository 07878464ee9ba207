"""The pread slice reader (shards/tp/slice_reader.py) against safetensors' own reader.

Every slice must equal what ``safe_open(...).get_slice(name)[index]`` returns, in a tensor that
owns exactly its bytes (never a view of a mapping of the file).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shards.tp import slice_reader
from shards.tp.slice_reader import SafetensorsFormatError, SliceFile, byte_runs, read_header

SHAPES = {"w": (12, 10), "v": (7,), "e": (3, 8, 6), "s": ()}
INDICES = [
    (), (slice(None),), (slice(2, 5),), (slice(None), slice(4, 10)), (slice(3, 4), slice(0, 1)),
    (1,), (-1, slice(2, 6)), (slice(0, 0),), (slice(10, 40),),
]
EXPERT_INDICES = [(1,), (2, slice(2, 6)), (0, slice(None), slice(3, 6)), (slice(1, 3), slice(4, 8), slice(0, 2))]


def _write(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=g) * 100).to(dtype) for n, s in SHAPES.items()}
    tensors["i"] = torch.arange(-20, 20, dtype=torch.int64).reshape(4, 10)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


@pytest.fixture(params=[torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn], ids=str)
def file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "t.safetensors"
    _write(path, request.param)
    return path


def _expected(path: Path, name: str, index: tuple) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_slice(name)[index].clone() if index else f.get_tensor(name).clone()


def _cases() -> list[tuple[str, tuple]]:
    cases = [(n, ix) for n in ("w", "i") for ix in INDICES]
    cases += [("e", ix) for ix in EXPERT_INDICES] + [("v", (slice(2, 5),)), ("v", ()), ("s", ())]
    return cases


@pytest.mark.parametrize(("name", "index"), _cases())
def test_slices_equal_safetensors_own(file: Path, name: str, index: tuple) -> None:
    with SliceFile(file) as f:
        got = f.read(name, index)
    expected = _expected(file, name, index)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    assert got.is_contiguous() and got.untyped_storage().nbytes() == got.numel() * got.element_size()


@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", [(), (slice(None), slice(4, 10)), (slice(3, 9),)])
def test_dtype_is_converted_while_reading(file: Path, target: torch.dtype, index: tuple,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A staging buffer of a few elements, so that runs are cut and batched across several refills.
    monkeypatch.setattr(slice_reader, "STAGING_BYTES", 7)
    with SliceFile(file) as f:
        got = f.read("w", index, target)
    expected = _expected(file, "w", index)
    assert got.dtype == target
    assert torch.equal(got, expected.to(target))


def test_runs_are_one_per_row_only_where_columns_are_cut(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    _write(path, torch.bfloat16)
    w = read_header(path)["w"]
    assert byte_runs(w, (slice(2, 5),)) == ((3, 10), [(w.offset + 2 * 10 * 2, 3 * 10 * 2)])
    shape, runs = byte_runs(w, (slice(None), slice(4, 10)))
    assert shape == (12, 6) and runs == [(w.offset + (r * 10 + 4) * 2, 12) for r in range(12)]
    assert byte_runs(w, ()) == ((12, 10), [(w.offset, 240)])


@pytest.mark.parametrize(("index", "match"), [
    ((slice(None, None, 2),), "step 2"),
    ((12,), "out of range"),
    ((0, 0, 0), "more axes"),
    (([1, 2],), "neither an int nor a slice"),
])
def test_bad_index_is_named(file: Path, index: tuple, match: str) -> None:
    with SliceFile(file) as f, pytest.raises(IndexError, match=rf"tensor 'w' in .*t\.safetensors.*{match}"):
        f.read("w", index)


def _header_file(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(("header", "data", "match"), [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, "do not hold"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"", "lacks dtype, shape or data_offsets"),
    ([1, 2], b"", "not a JSON object"),
])
def test_bad_header_is_named(tmp_path: Path, header: object, data: bytes, match: str) -> None:
    path = _header_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsFormatError, match=rf"bad\.safetensors.*{match}.*save_pretrained"):
        read_header(path)


def test_garbage_and_short_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsFormatError, match="short.safetensors.*header length"):
        read_header(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(SafetensorsFormatError, match="junk.safetensors.*not JSON"):
        read_header(tmp_path / "junk.safetensors")


def test_file_truncated_after_the_header_was_read(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    _write(path, torch.float32)
    with SliceFile(path) as f:
        with open(path, "r+b") as raw:
            raw.truncate(f.entries["e"].offset + 10)
        with pytest.raises(SafetensorsFormatError, match="tensor 'e'.*ended at byte.*truncated"):
            f.read("e")


def test_nothing_of_the_file_stays_mapped(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    _write(path, torch.bfloat16)
    with SliceFile(path) as f:
        kept = [f.read("w", (slice(0, 3),)), f.read("w", (slice(None), slice(0, 5)))]
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert str(path) not in maps
    assert all(t.untyped_storage().nbytes() == t.numel() * 2 for t in kept)
