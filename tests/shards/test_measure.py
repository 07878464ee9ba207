"""MEASURE: statistics equal torch.amax over inputs captured independently; rules of §3.2."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from shards.model.hf_attention import install_hf_attention
from shards.measuring.session import MEASURE_BEHAVIOURS, MeasureBehaviour, MeasureSession, UnmeasurableModuleError, measure
from shards.fp8.numerics import HpDtype, LpDtype
from shards.model.op_types import OP_TYPES
from shards.plan import MeasureExclude, Mode, RunPlan
from shards.fp8.methods import predefined_plan
from shards.model.selection import ModuleFilter, SelectionRules
from tests.models import llama_tokens, sequential_batches, tiny_llama, tiny_sequential


def make_plan(observer: str = "maxabs", exclude: MeasureExclude = MeasureExclude.OUTPUT, block: tuple[str, ...] = (),
              interval: int = 0) -> RunPlan:
    return RunPlan(
        mode=Mode.MEASURE, observer=observer, dump_stats_path="unused/measure", lp=LpDtype.E4M3, hp=HpDtype.BF16,
        scale_plan=predefined_plan("maxabs_pow2"),
        selection=SelectionRules(block=ModuleFilter(tuple(re.compile(b) for b in block))),
        measure_exclude=exclude, calibration_sample_interval=interval,
    )


def capture(model: nn.Module, names: list[str]) -> dict[str, list[tuple[Any, Any]]]:
    """Record (args, output) of named modules with plain hooks, independently of the observers."""
    seen: dict[str, list[tuple[Any, Any]]] = {n: [] for n in names}
    for n in names:
        model.get_submodule(n).register_forward_hook(
            lambda _m, args, out, n=n: seen[n].append((tuple(a.detach().clone() for a in args), out.detach().clone()))
        )
    return seen


def amax(tensors: list[torch.Tensor]) -> float:
    return float(torch.stack([t.float().abs().amax() for t in tensors]).amax())


def test_every_op_type_has_a_behaviour_or_a_reason() -> None:
    for name in OP_TYPES:
        entry = MEASURE_BEHAVIOURS.get(name)
        assert isinstance(entry, MeasureBehaviour) or (isinstance(entry, str) and entry), name


def test_sequential_inputs_weights_and_no_outputs_by_default() -> None:
    model, batches = tiny_sequential(), sequential_batches(0, 3)
    seen = capture(model, ["0", "2", "4"])
    m = measure(model, make_plan(), batches)
    assert list(m.modules) == ["0", "2", "4"] and m.observer == "maxabs"
    for name in ["0", "2", "4"]:
        st = m.modules[name]
        assert st.op_type == "linear" and st.num_samples == 3 and st.outputs is None
        assert st.inputs[0].tolist() == [amax([a[0] for a, _ in seen[name]])]
        w = model.get_submodule(name).weight.detach()
        np.testing.assert_array_equal(st.params["weight"], w.abs().amax(dim=1).numpy())


@pytest.mark.parametrize("exclude", [MeasureExclude.NONE, MeasureExclude.INPUT, MeasureExclude.PARAMS])
def test_outputs_measured_unless_excluded(exclude: MeasureExclude) -> None:
    model, batches = tiny_sequential(), sequential_batches(1, 2)
    seen = capture(model, ["4"])
    m = measure(model, make_plan(exclude=exclude), batches)
    assert m.modules["4"].outputs is not None
    assert m.modules["4"].outputs[0].tolist() == [amax([o for _, o in seen["4"]])]


def test_per_channel_observer() -> None:
    model, batches = tiny_sequential(), sequential_batches(2, 2)
    seen = capture(model, ["2"])
    m = measure(model, make_plan(observer="maxabs_per_channel"), batches)
    xs = torch.cat([a[0] for a, _ in seen["2"]])
    np.testing.assert_array_equal(m.modules["2"].inputs[0], xs.abs().amax(dim=0).numpy())


def test_never_called_module_has_no_measurement() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    m = measure(TwoHeads(), make_plan(), [torch.randn(2, 4)])
    assert list(m.modules) == ["used"]


def test_blocked_modules_are_not_observed() -> None:
    m = measure(tiny_sequential(), make_plan(block=("^4$",)), sequential_batches(3, 1))
    assert list(m.modules) == ["0", "2"]


def test_nonfinite_inputs_are_counted_by_tensor() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 0.5, 0.5]])
    m = measure(model, make_plan(exclude=MeasureExclude.NONE), [x])
    st = m.modules["0"]
    assert st.inputs[0].tolist() == [2.0]
    assert st.nonfinite["inputs.0"] == 2
    assert m.nonfinite_report() == {"0": dict(st.nonfinite)}


def test_hf_llama_attention_matmuls_are_measured() -> None:
    model = tiny_llama()
    install_hf_attention(model)
    attn = "model.layers.0.self_attn"
    names = [f"{attn}.matmul_qk", f"{attn}.matmul_av", f"{attn}.k_cache", f"{attn}.softmax"]
    seen = capture(model, names)
    batches = [llama_tokens(i, 2, 16) for i in range(2)]
    m = measure(model, make_plan(), batches)
    for name in (f"{attn}.matmul_qk", f"{attn}.matmul_av"):
        st = m.modules[name]
        assert st.op_type == "matmul" and st.num_samples == 2 and st.outputs is None
        for i in range(2):
            assert st.inputs[i].tolist() == [amax([a[i] for a, _ in seen[name]])]
    # The softmax output is always measured (its op type requires it), its input too.
    sm = m.modules[f"{attn}.softmax"]
    assert sm.outputs is not None and sm.outputs[0].tolist() == [amax([o for _, o in seen[f"{attn}.softmax"]])]
    assert m.modules[f"{attn}.k_cache"].inputs[0].tolist() == [amax([a[0] for a, _ in seen[f"{attn}.k_cache"]])]
    assert len(m.modules) == 2 * (7 + 5)  # the lm_head tied to the embedding is not selected


def test_interval_callback_and_num_samples() -> None:
    model, dumps = tiny_sequential(), []
    session = MeasureSession(model, make_plan(interval=2), on_interval=lambda s: dumps.append(s.collect().num_samples))
    with torch.no_grad():
        for x in sequential_batches(4, 5):
            model(x)
    assert dumps == [2, 4]
    assert session.collect().num_samples == 5
    session.close()
    model(torch.randn(1, 32))
    assert session.collect().modules["0"].num_samples == 5  # hooks are gone


def test_unknown_observer_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="observer 'shape' is not implemented"):
        MeasureSession(tiny_sequential(), make_plan(observer="shape"))


def test_unmeasurable_op_is_named() -> None:
    class ModuleFusedSDPA(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return q

    model = nn.Sequential(ModuleFusedSDPA())
    with pytest.raises(UnmeasurableModuleError, match="module '0' .*fused_sdpa.*blocklist"):
        MeasureSession(model, make_plan())


def test_save_observer_writes_tensors(tmp_path) -> None:
    model, batches = tiny_sequential(), sequential_batches(5, 3)
    m = measure(model, make_plan(observer="save"), batches, tensors_dir=tmp_path, chunk_calls=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "0.inputs.0.00000.safetensors" in names and "0.inputs.0.00001.safetensors" in names
    assert "0.params.safetensors" in names
    assert m.modules["0"].inputs[0].tolist() == [amax(batches)]


def test_tokens_are_the_rows_fed_to_the_first_input_of_every_call() -> None:
    """A toy routed MoE: each expert gets only the rows routed to it; an expert with none is never called."""

    class ToyMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(x)
            for e in route.unique().tolist():
                rows = route == e
                out[rows] = self.experts[e](x[rows])
            return out

    routes = [torch.tensor([0, 0, 1, 0, 1]), torch.tensor([1, 1, 1]), torch.tensor([0])]
    batches = [(torch.randn(len(r), 4), r) for r in routes]
    m = measure(ToyMoE(), make_plan(), batches)
    assert m.modules["experts.0"].num_tokens == 3 + 0 + 1 and m.modules["experts.0"].num_samples == 2
    assert m.modules["experts.1"].num_tokens == 2 + 3 and m.modules["experts.1"].num_samples == 2
    assert "experts.2" not in m.modules  # never routed to: no measurement at all
    # A 3-D input counts batch x sequence rows (x.numel() // x.shape[-1]).
    seq = measure(tiny_sequential(), make_plan(), [torch.randn(2, 5, 32), torch.randn(3, 32)])
    assert {n: s.num_tokens for n, s in seq.modules.items()} == {"0": 2 * 5 + 3, "2": 2 * 5 + 3, "4": 2 * 5 + 3}


@pytest.mark.parametrize("head_measured", [False, True])
def test_a_shard_skips_the_logits_of_an_unobserved_head(head_measured: bool) -> None:
    """A calibrating shard computes the LM head only where something observes it: blocklisted, it
    runs on the last position only (HF ``logits_to_keep``), and every other module measures the same."""
    from shards.card.calibration import ShardCalibration
    from shards.families.catalog import family_for

    def untied() -> nn.Module:  # a tied head is never quantized; an untied one is, unless blocklisted
        m = tiny_llama(3)
        m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())
        return m

    model = untied()
    block = () if head_measured else (r"lm_head",)
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[1]))
    cal = ShardCalibration(model, family_for(model.config).dims(model.config), 0, 1)
    cal.start(make_plan(block=block))
    ids = llama_tokens(0, 2, 16)
    cal.run(ids)
    got = cal.increment()
    cal.stop()
    assert rows == [16 if head_measured else 1]
    assert ("lm_head" in got.modules) is head_measured
    want = measure(untied(), make_plan(block=block), [ids])  # the plain forward, every logit
    assert set(got.modules) == set(want.modules)
    for name, st in want.modules.items():
        np.testing.assert_array_equal(got.modules[name].inputs[0], st.inputs[0], err_msg=name)
