"""Backends: the emulation is the reference; CUDA's _scaled_mm path and the HPU ops must agree."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from shards.fp8 import numerics
from shards.quantized.backends import (
    BackendUnavailableError,
    CudaBackend,
    EmulatedBackend,
    HpuBackend,
    UnknownBackendError,
    backend_for_device,
    detect_gaudi,
    get_backend,
    register_backend,
)
from shards.errors import DuplicateRegistrationError
from shards.fp8.numerics import E4M3, E4M3_GAUDI2, E5M2, ScaleDevice

F8 = torch.float8_e4m3fn


def _codes(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 8).to(F8)


@pytest.mark.parametrize("fmt", [E4M3, E4M3_GAUDI2, E5M2])
def test_emulated_quantize_is_the_numeric_core(fmt: numerics.Fp8Format) -> None:
    x = torch.linspace(-700, 700, 301)
    q = EmulatedBackend().quantize(x, 0.5, fmt)
    assert q.dtype == fmt.storage
    expected = (x / 0.5).clamp(-fmt.fullscale, fmt.fullscale).to(fmt.storage)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_gaudi2_emulation_saturates_at_240() -> None:
    b = EmulatedBackend()
    q = b.quantize(torch.tensor([1000.0, -300.0, 100.0]), 1.0, E4M3_GAUDI2)
    assert b.dequantize(q, 1.0, torch.float32).tolist() == [240.0, -240.0, 96.0]
    assert b.dequantize(b.quantize(torch.tensor([1000.0]), 1.0, E4M3), 1.0, torch.float32).tolist() == [448.0]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_emulated_gemm_is_dequantize_then_matmul(out_dtype: torch.dtype) -> None:
    qa, qb = _codes(0, 5, 16), _codes(1, 16, 7)
    sa, sb = torch.rand(5, 1) + 0.5, torch.rand(1, 7) + 0.5
    got = EmulatedBackend().gemm(qa, qb, sa, sb, out_dtype)
    ref = torch.matmul((qa.float() * sa).to(out_dtype), (qb.float() * sb).to(out_dtype))
    assert got.dtype == out_dtype and torch.equal(got, ref)


@pytest.mark.parametrize(
    "shape_a, sa, sb",
    [
        ((8, 32), 0.25, 2.0),  # per tensor
        ((2, 4, 32), "row", 0.5),  # per token, 3-D input
        ((8, 32), "row", "col"),  # per token x per channel
    ],
)
def test_cuda_scaled_mm_matches_emulation_exactly(shape_a: tuple[int, ...], sa: Any, sb: Any) -> None:
    # Power-of-two scales and small K: every product and partial sum is exact in fp32, so the
    # fp32-accumulating kernel and the emulation must agree bit for bit.
    qa, qb = _codes(2, *shape_a), _codes(3, 32, 16)
    s_a = torch.exp2(torch.randint(-3, 3, (*shape_a[:-1], 1)).float()) if sa == "row" else sa
    s_b = torch.exp2(torch.randint(-3, 3, (1, 16)).float()) if sb == "col" else sb
    got = CudaBackend().gemm(qa, qb, s_a, s_b, torch.float32)
    ref = EmulatedBackend().gemm(qa, qb, s_a, s_b, torch.float32)
    assert torch.equal(got, ref)


def test_cuda_backend_falls_back_for_unaligned_or_batched() -> None:
    qa, qb = _codes(4, 2, 3, 5), _codes(5, 2, 5, 7)
    assert torch.equal(CudaBackend().gemm(qa, qb, 0.5, 0.25, torch.float32),
                       EmulatedBackend().gemm(qa, qb, 0.5, 0.25, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_on_gpu_matches_emulation() -> None:
    qa, qb = _codes(6, 32, 64).cuda(), _codes(7, 64, 32).cuda()
    got = CudaBackend().gemm(qa, qb, 0.5, 0.25, torch.float32).cpu()
    ref = EmulatedBackend().gemm(qa.cpu(), qb.cpu(), 0.5, 0.25, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert backend_for_device("cuda:0").name == "cuda"


class RecordingHpuOps:
    """Stand-in for ``torch.ops.hpu``: records every call and computes what the kernel would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def cast_to_fp8_v2(self, x, scale_inv, stochastic, is_amax, dtype):  # type: ignore[no-untyped-def]
        self.calls.append(("cast_to_fp8_v2", (scale_inv, stochastic, is_amax, dtype)))
        return (x.float() * scale_inv).clamp(-240, 240).to(dtype), None

    def cast_from_fp8(self, q, scale, out_dtype):  # type: ignore[no-untyped-def]
        self.calls.append(("cast_from_fp8", (scale, out_dtype)))
        return (q.float() * scale).to(out_dtype)

    def fp8_gemm_v2(self, a, trans_a, b, trans_b, d, out_dtype, a_scale, b_scale, bias, accumulate):  # type: ignore[no-untyped-def]
        self.calls.append(("fp8_gemm_v2", (trans_a, trans_b, d, out_dtype, a_scale, b_scale, bias, accumulate)))
        return torch.matmul(a.float() * a_scale, b.float() * b_scale).to(out_dtype)


def test_hpu_backend_calls_the_gaudi_ops_with_inverse_and_descales() -> None:
    ops = RecordingHpuOps()
    hpu, emu = HpuBackend(ops), EmulatedBackend()
    x = torch.tensor([[1.0, -500.0, 3.0]])
    q = hpu.quantize(x, 2.0, E4M3_GAUDI2)
    assert ops.calls[0][0] == "cast_to_fp8_v2" and float(ops.calls[0][1][0]) == 0.5
    assert ops.calls[0][1][3] == F8
    assert torch.equal(q.view(torch.uint8), emu.quantize(x, 2.0, E4M3_GAUDI2).view(torch.uint8))
    assert hpu.dequantize(q, 2.0, torch.bfloat16).tolist() == [[1.0, -480.0, 3.0]]
    qb = _codes(8, 3, 4)
    y = hpu.gemm(q, qb, 2.0, 0.5, torch.float32)
    name, (ta, tb, d, out, sa, sb, bias, acc) = ops.calls[-1]
    assert name == "fp8_gemm_v2" and (ta, tb, d, out, bias, acc) == (False, False, None, torch.float32, None, False)
    assert (float(sa), float(sb)) == (2.0, 0.5)
    assert torch.equal(y, emu.gemm(q, qb, 2.0, 0.5, torch.float32))


def test_hpu_backend_without_habana_is_a_clear_error() -> None:
    try:
        import habana_frameworks.torch  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="habana_frameworks.torch"):
            get_backend("hpu")
    else:  # pragma: no cover - only on Gaudi hosts
        pytest.skip("habana_frameworks is installed here")


def test_registry() -> None:
    assert get_backend("cpu").name == "cpu" and backend_for_device("cpu").name == "cpu"
    with pytest.raises(UnknownBackendError, match="'tpu' is unknown; known: cpu, cuda, hpu"):
        get_backend("tpu")
    with pytest.raises(DuplicateRegistrationError, match="'cpu'"):
        register_backend("cpu", EmulatedBackend)


@pytest.mark.parametrize(
    "name, expected",
    [("GAUDI2", ScaleDevice.GAUDI2), ("GAUDI3", ScaleDevice.GAUDI3), ("gaudi2", ScaleDevice.GAUDI2),
     ("GAUDI", None), (None, None)],
)
def test_detect_gaudi_maps_the_device_name(name: str | None, expected: ScaleDevice | None) -> None:
    assert detect_gaudi(lambda: name) is expected


def _fake_habana(monkeypatch: pytest.MonkeyPatch, available: bool, device_name: str) -> None:
    """Stand-in modules for ``habana_frameworks.torch.hpu`` (only what detect_gaudi calls)."""
    hpu = types.ModuleType("habana_frameworks.torch.hpu")
    hpu.is_available = lambda: available  # type: ignore[attr-defined]
    hpu.get_device_name = lambda: device_name  # type: ignore[attr-defined]
    top, torch_pkg = types.ModuleType("habana_frameworks"), types.ModuleType("habana_frameworks.torch")
    top.torch, torch_pkg.hpu = torch_pkg, hpu  # type: ignore[attr-defined]
    for name, module in [("habana_frameworks", top), ("habana_frameworks.torch", torch_pkg),
                         ("habana_frameworks.torch.hpu", hpu)]:
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("available, device_name, expected",
                         [(True, "GAUDI3", ScaleDevice.GAUDI3), (True, "GAUDI2", ScaleDevice.GAUDI2),
                          (False, "GAUDI3", None)])
def test_detect_gaudi_probes_the_habana_plugin(monkeypatch: pytest.MonkeyPatch, available: bool, device_name: str,
                                               expected: ScaleDevice | None) -> None:
    _fake_habana(monkeypatch, available, device_name)
    assert detect_gaudi() is expected


def test_detect_gaudi_off_gaudi_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, as on a host without the plugin.
    monkeypatch.setitem(sys.modules, "habana_frameworks", None)
    monkeypatch.delitem(sys.modules, "habana_frameworks.torch", raising=False)
    monkeypatch.delitem(sys.modules, "habana_frameworks.torch.hpu", raising=False)
    assert detect_gaudi() is None


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [0.0625, 0.048095703125, 0.0481930123, "per-channel"])
def test_emulated_dequantize_equals_the_fp32_route(out_dtype: torch.dtype, scale: object) -> None:
    """Dequantizing in the output dtype gives exactly round(q·s computed in fp32), for any scale."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (16, 24), generator=g, dtype=torch.uint8)
    q = codes.view(torch.float8_e4m3fn)
    q = torch.where(torch.isnan(q.float()), torch.zeros((), dtype=torch.float32), q.float()).to(torch.float8_e4m3fn)
    s = torch.rand(16, 1, generator=g) * 0.1 + 1e-3 if scale == "per-channel" else scale
    expected = (q.float() * torch.as_tensor(s, dtype=torch.float32)).to(out_dtype)
    got = EmulatedBackend().dequantize(q, s, out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, expected)
