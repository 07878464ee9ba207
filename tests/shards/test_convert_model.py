"""Converting a model in place: all or nothing, and without holding both copies of its weights."""

from __future__ import annotations

import math
import re
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from shards.errors import NonFiniteStatsError
from shards.fp8.methods import predefined_plan
from shards.fp8.numerics import HpDtype, LpDtype
from shards.model.selection import ModuleFilter, SelectionRules
from shards.plan import Mode, RunPlan
from shards.quantized.backends import EmulatedBackend
from shards.quantized.modules import QuantModule
from shards.quantized.swap import UnquantizableModuleError, convert_model
from stats_store.records import Measurement, ModuleStats
from tests.models import tiny_sequential


def _plan(block: tuple[str, ...] = ()) -> RunPlan:
    return RunPlan(mode=Mode.QUANTIZE, observer="maxabs", dump_stats_path="unused/measure", lp=LpDtype.E4M3,
                   hp=HpDtype.BF16, scale_plan=predefined_plan("maxabs_pow2"),
                   selection=SelectionRules(block=ModuleFilter(tuple(re.compile(b) for b in block))))


def _measurement(bad: str | None = None) -> Measurement:
    def stats(name: str) -> ModuleStats:
        value = math.nan if name == bad else 2.0
        return ModuleStats(name, "linear", [np.array([value], np.float32)])

    return Measurement(modules={n: stats(n) for n in ("0", "2", "4")})


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_a_refused_conversion_leaves_every_module_as_it_was() -> None:
    model = tiny_sequential(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteStatsError, match="'4'"):  # the last module: the first two are fine
        convert_model(model, _plan(), _measurement(bad="4"), EmulatedBackend())
    assert _linears(model) == ["0", "2", "4"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class ModuleFusedSDPA(nn.Module):
    """Named like Gaudi's fused attention, whose op type has no CPU implementation."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v


def test_an_unquantizable_module_is_refused_before_any_swap() -> None:
    model = tiny_sequential(0)
    model.add_module("5", ModuleFusedSDPA())
    m = _measurement()
    v = lambda x: np.array([x], np.float32)  # noqa: E731
    m.modules["5"] = ModuleStats("5", "fused_sdpa", [v(1.0), v(1.0), v(1.0)], outputs=[v(1.0), v(1.0)])
    with pytest.raises(UnquantizableModuleError, match="'5'"):
        convert_model(model, _plan(), m, EmulatedBackend())
    assert _linears(model) == ["0", "2", "4"]


class _Watching(EmulatedBackend):
    """Counts, at each weight it quantizes, how many of the model's original weights are alive."""

    def __init__(self, refs: list[weakref.ref[nn.Parameter]]) -> None:
        super().__init__()
        self.refs = refs
        self.alive: list[int] = []

    def quantize(self, x, scale, fmt):  # type: ignore[no-untyped-def]
        self.alive.append(sum(r() is not None for r in self.refs))
        return super().quantize(x, scale, fmt)


def test_replaced_weights_are_freed_during_the_conversion() -> None:
    model = tiny_sequential(0)
    refs = [weakref.ref(model.get_submodule(n).weight) for n in ("0", "2", "4")]
    backend = _Watching(refs)
    result = convert_model(model, _plan(), _measurement(), backend)
    assert result.quantized == ("0", "2", "4") and result.left_high_precision == ()
    assert all(isinstance(model.get_submodule(n), QuantModule) for n in ("0", "2", "4"))
    # Each weight is freed once its module is swapped out: the conversion never holds both copies.
    assert backend.alive == [3, 2, 1]
    assert all(r() is None for r in refs)
