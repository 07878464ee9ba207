"""Scales of whole modules: every predefined method x device x op type against explicit formulas.

Each of INC's 13 methods is pinned by ``test_predefined_method[<METHOD>-...]``: the expected scale
of every tensor is written below with Python floats (bf16 rounding via ``test_scales.bf16``, OPT via
the per-candidate loops of ``test_opt_search``), never with ``shards.fp8.scale_math``.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import pytest
import torch

from shards.errors import DeviceForScalesError, MissingStatsError, NonFiniteStatsError
from stats_store.records import ModuleStats
from shards.fp8.module_scales import module_scales
from shards.fp8.numerics import HW_TRAITS, ScaleDevice
from shards.model.op_types import get_op_type
from shards.fp8.methods import PCS_OPT_MULTIPLIERS, POW2_OPT_CANDIDATES, PREDEFINED
from shards.fp8.scale_math import ScaleContext
from tests.shards.test_opt_search import loop_pick_pcs, loop_pick_pts
from tests.shards.test_scales import bf16, f32, pow2

G2, G3 = ScaleDevice.GAUDI2, ScaleDevice.GAUDI3
DEVICES = [None, G2, G3]
IN0, IN1, SOFTMAX_OUT = 5.375, 0.1162, 0.75
_ROW = [1.75, -1.5, 1.0, 0.5, -0.375, 0.75, 0.3, -0.2]
WEIGHT = torch.tensor([[v * m for v in _ROW] for m in (1.0, 0.01, 3.3, 40.0)], dtype=torch.float32)


def fullscale(dev: ScaleDevice | None) -> float:
    return 240.0 if dev is G2 else 448.0


def hw(x: float, dev: ScaleDevice | None) -> float:
    if dev is None:
        raise DeviceForScalesError("test")
    t = HW_TRAITS[dev]
    return min(max(2.0 ** (math.ceil(math.ceil(math.log2(x)) / t.step_exp) * t.step_exp), t.min_scale), t.max_scale)


def first_hw(dev: ScaleDevice | None) -> float:
    return hw(1e9, dev)  # the largest HW scale: 16 on Gaudi2, 128 on Gaudi3


def ident(x: float, dev: ScaleDevice | None) -> float:
    return x


def p2(x: float, dev: ScaleDevice | None) -> float:
    return pow2(x)


Rnd = Callable[[float, ScaleDevice | None], float]


# Activation formulas: measured max-abs -> scale (None = dynamic, no static activation scale).
def a_fixed(value: Callable[[ScaleDevice | None], float]) -> Callable[[float, ScaleDevice | None], float]:
    return lambda m, dev: value(dev)


def a_max(rnd: Rnd, backoff: float = 0.25) -> Callable[[float, ScaleDevice | None], float]:
    return lambda m, dev: rnd(bf16(bf16(m) / (fullscale(dev) * backoff)), dev)


# Weight formulas: weight -> scale (float for PTS, list for PCS).
def w_fixed(value: Callable[[ScaleDevice | None], float]) -> Callable[[ScaleDevice | None], float | list[float]]:
    return lambda dev: value(dev)


def w_pts(rnd: Rnd) -> Callable[[ScaleDevice | None], float | list[float]]:
    mw = bf16(float(WEIGHT.abs().max()))
    return lambda dev: rnd(bf16(mw / (fullscale(dev) * 0.5)), dev)


def w_pcs(dev: ScaleDevice | None) -> list[float]:
    return [pow2(f32(m / (fullscale(dev) * 0.5))) for m in WEIGHT.abs().amax(dim=1).tolist()]


def w_opt_hw(dev: ScaleDevice | None) -> float:
    if dev is None:
        raise DeviceForScalesError("test")
    ctx = ScaleContext(device=dev)
    return loop_pick_pts(WEIGHT.reshape(-1).tolist(), HW_TRAITS[dev].scales, ctx)


def w_opt_pow2(dev: ScaleDevice | None) -> float:
    return pow2(loop_pick_pts(WEIGHT.reshape(-1).tolist(), POW2_OPT_CANDIDATES, ScaleContext(device=dev)))


def w_pcs_opt(dev: ScaleDevice | None) -> list[float]:
    return [pow2(v) for v in loop_pick_pcs(WEIGHT.numpy(), PCS_OPT_MULTIPLIERS, ScaleContext(device=dev))]


one = lambda dev: 1.0  # noqa: E731
EXPECTED: dict[str, tuple[Callable, Callable | None]] = {
    "UNIT_SCALE": (w_fixed(one), a_fixed(one)),
    "HW_ALIGNED_SINGLE_SCALE": (w_fixed(first_hw), a_fixed(first_hw)),
    "MAXABS_HW": (w_pts(hw), a_max(hw)),
    "MAXABS_POW2": (w_pts(p2), a_max(p2)),
    "MAXABS_ARBITRARY": (w_pts(ident), a_max(ident)),
    "MAXABS_HW_OPT_WEIGHT": (w_opt_hw, a_max(hw)),
    "MAXABS_POW2_OPT_WEIGHT": (w_opt_pow2, a_max(p2)),
    "ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2": (w_pcs, a_max(hw)),
    "ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2": (w_pcs_opt, a_max(hw)),
    "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2": (w_pcs, a_max(p2)),
    "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2": (w_pcs_opt, a_max(p2)),
    "ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW": (w_pts(hw), None),
    "MAXABS_PCS_POW2": (w_pcs, None),
}


def test_every_predefined_method_has_a_formula() -> None:
    assert set(EXPECTED) == set(PREDEFINED)


def _stats(op: str) -> ModuleStats:
    v = lambda x: np.array([x], np.float32)  # noqa: E731
    return {
        "linear": ModuleStats("m", "linear", [v(IN0)], params={"weight": WEIGHT.abs().max().reshape(1).numpy()}),
        "matmul": ModuleStats("m", "matmul", [v(IN0), v(IN1)]),
        "kv_cache": ModuleStats("m", "kv_cache", [v(IN0)]),
        "softmax": ModuleStats("m", "softmax", [v(3.0)], outputs=[v(SOFTMAX_OUT)]),
    }[op]


def _expected_node(name: str, op: str, dev: ScaleDevice | None) -> dict:
    w_formula, a_formula = EXPECTED[name]
    w = w_formula(dev) if op == "linear" else None
    fixed = PREDEFINED[name].activation.value_type.value == "FIXED_VALUE"
    params: dict = {}
    if w is not None:
        params["weight"] = {"0": w, "1": [1.0] * WEIGHT.shape[1]} if isinstance(w, list) else w
    if a_formula is None:  # dynamic: activation scales are computed per call
        return {"inputs": [], "outputs": [], "params": params}
    a = lambda m: a_formula(m, dev)  # noqa: E731
    arbitrary = name == "MAXABS_ARBITRARY"  # bf16 x bf16 product rounds; powers of two do not
    prod = (lambda x, y: bf16(x * y)) if arbitrary else (lambda x, y: x * y)
    if op == "linear":
        out = a(0) if fixed else ([prod(s, a(IN0)) for s in w] if isinstance(w, list) else prod(w, a(IN0)))
        return {"inputs": [a(IN0)], "outputs": [out], "params": params}
    if op == "matmul":
        return {"inputs": [a(IN0), a(IN1)], "outputs": [prod(a(IN0), a(IN1))], "params": {}}
    if op == "kv_cache":
        return {"inputs": [a(IN0)], "outputs": [a(IN0)], "params": {}}
    return {"inputs": [], "outputs": [a(SOFTMAX_OUT)], "params": {}}


@pytest.mark.parametrize("op", ["linear", "matmul", "kv_cache", "softmax"])
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.value if d else "cpu")
@pytest.mark.parametrize("name", list(PREDEFINED))
def test_predefined_method(name: str, device: ScaleDevice | None, op: str) -> None:
    ctx = ScaleContext(device=device)
    run = lambda: module_scales(  # noqa: E731
        get_op_type(op), PREDEFINED[name], ctx, _stats(op), weight=WEIGHT if op == "linear" else None
    )
    try:
        want = _expected_node(name, op, device)
    except DeviceForScalesError:
        with pytest.raises(DeviceForScalesError, match="device_for_scales"):
            run()
        return
    got = run().to_inc_node()
    assert got == want
    json.dumps(got)


# --- op types whose scales come from outputs ------------------------------------------------------


def _v(*xs: float) -> list[np.ndarray]:
    return [np.array([x], np.float32) for x in xs]


CTX = ScaleContext()
POW2 = PREDEFINED["MAXABS_POW2"]
a25 = lambda m: pow2(bf16(m) / 112)  # noqa: E731


def test_b2b_matmul_input1_comes_from_the_output_measurement() -> None:
    stats = ModuleStats("bb", "b2b_matmul", _v(1.0, 99.0), outputs=_v(7.0))
    node = module_scales(get_op_type("b2b_matmul"), POW2, CTX, stats).to_inc_node()
    assert node["inputs"] == [a25(1.0), a25(7.0)] and node["outputs"] == [a25(1.0) * a25(7.0)]


def test_fused_sdpa_has_four_input_scales() -> None:
    stats = ModuleStats("f", "fused_sdpa", _v(1.0, 2.0, 3.0), outputs=_v(40.0, 0.9))
    node = module_scales(get_op_type("fused_sdpa"), POW2, CTX, stats).to_inc_node()
    assert node["inputs"] == [a25(1.0), a25(2.0), a25(3.0), a25(0.9)] and node["outputs"] == [a25(40.0)]


def test_dynamic_moe_inputs_are_hidden_states_then_experts() -> None:
    stats = ModuleStats("moe", "dynamic_moe", _v(5.0), outputs=_v(30.0, 1.0, 2.0, 0.0))
    node = module_scales(get_op_type("dynamic_moe"), POW2, CTX, stats).to_inc_node()
    assert node["inputs"] == [a25(5.0), a25(1.0), a25(2.0), 2.0**-126] and node["outputs"] == [a25(30.0)]
    unit = module_scales(get_op_type("dynamic_moe"), PREDEFINED["UNIT_SCALE"], CTX, None).to_inc_node()
    assert unit["inputs"] == [1.0] * 9 and unit["outputs"] == [1.0]  # INC: 8 experts without stats


def test_embedding_has_a_weight_scale_only() -> None:
    w = torch.tensor([[3.0, -0.5], [1.0, 2.0]])
    node = module_scales(get_op_type("embedding"), POW2, CTX, None, weight=w).to_inc_node()
    assert node == {"inputs": [], "outputs": [], "params": {"weight": pow2(3.0 / 224)}}


def test_row_parallel_linear_output_scale_is_weight_times_input() -> None:
    """Reference §2.5 "like linear": the partial outputs[0] is never used, so tp sizes agree."""
    stats = ModuleStats("o", "row_parallel_linear", _v(2.0), outputs=_v(50.0, 60.0))
    w = torch.tensor([[1.0, -2.0]])
    op = get_op_type("row_parallel_linear")
    expected = pow2(2.0 / 224) * a25(2.0)
    assert module_scales(op, POW2, CTX, stats, weight=w).to_inc_node()["outputs"] == [expected]
    both = module_scales(op, POW2, CTX, stats, weight=w, allreduce_quantization=True).to_inc_node()
    assert both["outputs"] == [expected, a25(60.0)]


@pytest.mark.parametrize(("backoff", "expected"), [(None, pow2(0.75 / 112)), (1.0, pow2(0.75 / 448))])
def test_output_backoff_applies_to_measured_outputs_only(backoff: float | None, expected: float) -> None:
    stats = ModuleStats("sm", "softmax", _v(3.0), outputs=_v(0.75))
    node = module_scales(get_op_type("softmax"), POW2, CTX, stats, output_backoff=backoff).to_inc_node()
    assert node["outputs"] == [expected]
    mm = module_scales(get_op_type("matmul"), POW2, CTX, _stats("matmul"), output_backoff=1.0).to_inc_node()
    assert mm["outputs"] == [a25(IN0) * a25(IN1)]


# --- reference examples at module level ------------------------------------------------------------


def test_reference_gaudi2_matmul_output_is_the_product_of_inputs() -> None:
    """§2.10: inputs 0.1162 -> 2^-8 and 4.406 -> 1.0, output their product."""
    stats = ModuleStats("mm", "matmul", _v(0.1162, 4.406))
    node = module_scales(get_op_type("matmul"), PREDEFINED["MAXABS_HW"], ScaleContext(device=G2), stats).to_inc_node()
    assert node == {"inputs": [2.0**-8, 1.0], "outputs": [2.0**-8], "params": {}}


def test_reference_pcs_output_scale_is_fp32_product() -> None:
    """§2.2: fp32 model, channel max 14.0137 -> 0.125; output 0.125 * s_in in fp32."""
    w = torch.tensor([[14.0137, 1.0], [0.5, 0.25]])
    stats = ModuleStats("l", "linear", _v(5.375))
    got = module_scales(get_op_type("linear"), PREDEFINED["ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2"], CTX, stats, weight=w)
    assert got.weight is not None and got.weight.tolist() == [0.125, pow2(0.5 / 224)]
    assert got.outputs[0].dtype == torch.float32 and got.outputs[0].tolist() == [0.125 * 0.0625, pow2(0.5 / 224) * 0.0625]
    assert got.to_inc_node()["params"]["weight"]["1"] == [1.0, 1.0]


# --- where the weight scale comes from; errors --------------------------------------------------------


def test_given_weight_scale_wins_and_stats_serve_when_no_weight() -> None:
    op, stats = get_op_type("linear"), _stats("linear")
    given = torch.tensor(0.5, dtype=torch.bfloat16)
    got = module_scales(op, POW2, CTX, stats, weight=WEIGHT, weight_scale=given)
    assert got.weight is given and got.to_inc_node()["outputs"] == [0.5 * a25(IN0)]
    from_stats = module_scales(op, POW2, CTX, stats).to_inc_node()["params"]["weight"]
    assert from_stats == pow2(bf16(float(WEIGHT.abs().max())) / 224)


def test_opt_without_weight_is_a_missing_stats_error() -> None:
    with pytest.raises(MissingStatsError, match="module 'm'.*params.weight") as info:
        module_scales(get_op_type("linear"), PREDEFINED["MAXABS_POW2_OPT_WEIGHT"], CTX, _stats("linear"))
    assert isinstance(info.value, KeyError) and not str(info.value).startswith('"')


def test_missing_input_names_module_and_tensor() -> None:
    stats = ModuleStats("model.layers.0.mlp", "matmul", _v(1.0))
    with pytest.raises(MissingStatsError, match=r"model\.layers\.0\.mlp.*inputs\.1"):
        module_scales(get_op_type("matmul"), POW2, CTX, stats)
    with pytest.raises(MissingStatsError, match="outputs.0"):
        module_scales(get_op_type("softmax"), POW2, CTX, ModuleStats("sm", "softmax", _v(1.0)))


def test_non_finite_stats_name_module_and_tensor() -> None:
    stats = ModuleStats("attn.matmul_qk", "matmul", [np.array([1.0], np.float32), np.array([np.inf], np.float32)])
    with pytest.raises(NonFiniteStatsError, match=r"attn\.matmul_qk.*inputs\.1"):
        module_scales(get_op_type("matmul"), POW2, CTX, stats)


def test_scale_methods_are_inc_file_naming_vocabulary() -> None:
    """One vocabulary: the scale math is keyed by exactly the method names INC files use."""
    from shards.fp8.methods import PREDEFINED
    from stats_store.inc_names import INC_SCALE_METHODS

    assert tuple(PREDEFINED) == INC_SCALE_METHODS
