"""Our dynamic methods, which compute activation scales by the client's per-token rule (amax / 448):
``maxabs_pcs_arbitrary`` (compressed-tensors' FP8_DYNAMIC math) and
``act_maxabs_pcs_arbitrary_weights_pcs_maxabs_pow2`` (INC's per-channel pow2 weights), pinned against
explicit references (brute force over the FP8 code points for the rounding)."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator import Fp8Config, quantize
from shards.fp8.methods import EXTENSIONS, INC_DYNAMIC_SCALING, METHODS, PREDEFINED, DynamicScaling, Rounding
from shards.fp8.scale_math import ScaleContext, dynamic_activation_scale
from shards.fp8.numerics import E4M3
from tests.models import sequential_batches, tiny_sequential
from tests.shards.test_numerics import decode, nearest_code



def nearest_value(v: torch.Tensor) -> torch.Tensor:
    """Each element rounded to the nearest E4M3 value (ties to even, saturating) by the project's
    independent bit-level reference, never torch's cast."""
    out = [decode(nearest_code(float(x), E4M3), E4M3.exp_bits) for x in v.reshape(-1).tolist()]
    return torch.tensor(out, dtype=torch.float64).reshape(v.shape).to(v.dtype)


def test_the_methods_are_ours_not_incs() -> None:
    assert set(EXTENSIONS) == {"MAXABS_PCS_ARBITRARY", "ACT_MAXABS_PCS_ARBITRARY_WEIGHTS_PCS_MAXABS_POW2"}
    assert not set(EXTENSIONS) & set(PREDEFINED) and set(METHODS) == set(PREDEFINED) | set(EXTENSIONS)
    for spec in EXTENSIONS.values():
        assert spec.dynamic_only and DynamicScaling.of(spec.activation) == DynamicScaling(1.0, Rounding.IDENTITY)
    # INC's dynamic methods keep their forced POW2 / 0.5 whatever their section says
    assert DynamicScaling.of(PREDEFINED["MAXABS_PCS_POW2"].activation) == INC_DYNAMIC_SCALING


def test_per_token_scale_is_amax_over_448() -> None:
    x = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0], [1e-3, 5e4, -7.0]])
    s = dynamic_activation_scale(x, ScaleContext(), scaling=DynamicScaling(1.0, Rounding.IDENTITY))
    assert s.shape == (3, 1)
    assert s[0, 0] == torch.tensor(3.0) / 448.0 and s[2, 0] == torch.tensor(5e4) / 448.0
    assert s[1, 0] == torch.finfo(torch.float32).tiny  # an all-zero token: any scale gives 0
    inc = dynamic_activation_scale(x, ScaleContext())  # INC: pow2 of amax / 224
    assert inc[0, 0] == 2.0 ** torch.ceil(torch.log2(torch.tensor(3.0 / 224.0)))


def test_config_accepts_it_dynamic_only_and_by_dict_form() -> None:
    cfg = Fp8Config.model_validate({"scale_method": "MAXABS_PCS_ARBITRARY", "dynamic_quantization": True})
    assert cfg.scale_method == "MAXABS_PCS_ARBITRARY"
    with pytest.raises(ValueError, match="scale_method.*dynamic"):
        Fp8Config.model_validate({"scale_method": "maxabs_pcs_arbitrary"})
    section = {"granularity": "PCS", "scale_value_type": "MAXABS", "rounding_method": "IDENTITY"}
    d = Fp8Config.model_validate({"scale_method": {"default": {"weight": section, "activation": section}},
                                  "dynamic_quantization": True})
    assert d.to_plan().scale_plan.name == "MAXABS_PCS_ARBITRARY"


def _arbitrary(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(dim=1, keepdim=True) / 448.0


def _pow2(w: torch.Tensor) -> torch.Tensor:
    """INC's POW2 per-channel weight scale with backoff 0.5: the next power of two of amax / 224."""
    return torch.tensor([[2.0 ** math.ceil(math.log2(float(m) / 224.0))] for m in w.abs().amax(dim=1)])


@pytest.mark.parametrize("method, weight_scale", [("maxabs_pcs_arbitrary", _arbitrary),
                                                  ("act_maxabs_pcs_arbitrary_weights_pcs_maxabs_pow2", _pow2)])
def test_quantized_linear_computes_fp8_dynamic(tmp_path, method, weight_scale) -> None:  # type: ignore[no-untyped-def]
    ref = tiny_sequential()
    model = quantize(tiny_sequential(), {"scale_method": method, "dynamic_quantization": True,
                                         "hp_dtype": "FP32", "dump_stats_path": str(tmp_path / "s")})
    x = sequential_batches(1, 1)[0]
    h = x
    for layer in ref:
        if isinstance(layer, torch.nn.Linear):
            w = layer.weight.detach()
            sw = weight_scale(w)
            sx = h.abs().amax(dim=-1, keepdim=True) / 448.0
            h = (nearest_value(h / sx) * sx) @ (nearest_value(w / sw) * sw).T + layer.bias.detach()
        else:
            h = layer(h)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-6)


def test_inc_scale_file_of_our_method_is_refused_naming_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from orchestrator import convert
    from stats_store.errors import IncFormatError

    cfg = {"scale_method": "maxabs_pcs_arbitrary", "dynamic_quantization": True, "dump_stats_path": str(tmp_path / "s")}
    model = tiny_sequential()
    with pytest.raises(IncFormatError, match="maxabs_pcs_arbitrary is ours"):
        convert(model, cfg, inc_scale_file=True)
    assert isinstance(model[0], torch.nn.Linear)  # refused before the model was touched
    assert not list(tmp_path.iterdir())
