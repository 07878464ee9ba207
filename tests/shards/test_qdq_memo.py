"""Sibling Linears fed one tensor share its gemm operand (its FP8 grid rounding); anything that could
change the values does not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shards.quantized.backends import EmulatedBackend
from shards.fp8.module_scales import ModuleScales
from shards.fp8.numerics import HpDtype, LpDtype
from shards.plan import ScaleFormat
from shards.quantized.qdq_memo import SharedInputMemo
from shards.quantized.modules import QuantContext, QuantLinear
from shards.fp8.scale_math import ScaleContext


def _siblings(scale_format: ScaleFormat, scales: tuple[float, ...] = (2.0**-4, 2.0**-4, 2.0**-4)) -> list[QuantLinear]:
    qctx = QuantContext(ScaleContext(LpDtype.E4M3, HpDtype.BF16), EmulatedBackend(), scale_format)
    g = torch.Generator().manual_seed(0)
    out = []
    for s in scales:
        lin = nn.Linear(32, 16, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(16, 32, generator=g) * 0.1)
        ms = ModuleScales((torch.tensor(s, dtype=torch.bfloat16),), (), torch.tensor(2.0**-8, dtype=torch.bfloat16))
        out.append(QuantLinear(lin, ms, qctx))
    return out


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = EmulatedBackend.input_operand

    def counted(self: EmulatedBackend, *args: object) -> torch.Tensor:
        calls.append(1)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(EmulatedBackend, "input_operand", counted)
    return calls


def _unshared(mods: list[QuantLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """Each module alone, with a fresh memo: the reference values."""
    out = []
    for m in mods:
        m2 = copy.deepcopy(m)
        out.append(m2(x.clone()))
    return out


@pytest.mark.parametrize("scale_format", [ScaleFormat.SCALAR, ScaleFormat.CONST])
def test_siblings_on_one_input_quantize_it_once(scale_format: ScaleFormat, monkeypatch: pytest.MonkeyPatch) -> None:
    mods = _siblings(scale_format)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    want = _unshared(mods, x)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        got = [m(x) for m in mods]
    assert len(calls) == 1
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)


def test_changed_input_other_scale_or_other_tensor_are_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = _siblings(ScaleFormat.SCALAR, (2.0**-4, 2.0**-4, 2.0**-2))
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        a(x)
        c(x)  # another scale
        a(x)
        x.mul_(3.0)  # in place: the version counter moves
        y_after = b(x)
        same_values = x.clone()
        b(same_values)  # equal values, another tensor
    assert len(calls) == 5
    assert torch.equal(y_after, _unshared([b], x)[0])


def test_inference_and_autograd_inputs_bypass_the_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _ = _siblings(ScaleFormat.SCALAR)
    calls = _counting(monkeypatch)
    with torch.inference_mode():
        x = torch.randn(4, 32, dtype=torch.bfloat16)
        a(x), b(x)
    xg = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    a(xg), b(xg)
    assert len(calls) == 4


def test_a_memo_entry_is_never_copied_or_serialized() -> None:
    a, _, _ = _siblings(ScaleFormat.SCALAR)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = a(x)
    assert a.qctx.memo._entry is not None
    assert copy.copy(a.qctx.memo)._entry is None  # copy and pickle both go through __getstate__
    clone = copy.deepcopy(a)
    assert clone.qctx.memo._entry is None
    with torch.no_grad():
        assert torch.equal(clone(x), want)


def test_memo_holds_its_input_weakly() -> None:
    memo = SharedInputMemo()
    x = torch.ones(3)
    memo.input_operand(x, 1.0, lambda: torch.full((3,), 2.0))
    ref = memo._entry[1]  # type: ignore[index]
    del x
    assert ref() is None
