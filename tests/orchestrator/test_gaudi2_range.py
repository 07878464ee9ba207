"""Gaudi2's FP8 range, a stated decision (README "Where we differ from INC").

With ``device_for_scales: GAUDI2`` the quantized modules saturate at ±240, as the Gaudi2 hardware
does (E4M3 there has no values above 240); INC's CPU QDQ clamps at ±448 even with Gaudi2 scales
(reference §2.9.4, §7). The reference here computes each layer explicitly, the way INC's CPU QDQ
does, with the full scale as a parameter: our model equals it at 240 everywhere, and equals it at
448 on every row whose quantized inputs stay within ±240 — so saturation is the only difference,
with per-channel weight scales and with a blocked module in the chain as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import orchestrator

BLOCKED = "1"


def chain() -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)).to(torch.bfloat16).eval()


def codes(x: torch.Tensor, s: torch.Tensor, fullscale: float) -> torch.Tensor:
    return (x.float() / s).clamp(-fullscale, fullscale).to(torch.float8_e4m3fn)


def inc_qdq_linear(lin: nn.Linear, node: dict, x: torch.Tensor, fullscale: float) -> torch.Tensor:
    """INC's CPU QDQ Linear: ``matmul(QDQ(x), dequant(W8)) + b`` in bf16."""
    s_in = torch.tensor(node["inputs"][0])
    w = node["params"]["weight"]
    if isinstance(w, dict):  # per channel: {"0": output-channel scales, "1": input-channel ones}
        assert set(w["1"]) == {1.0}
        w = w["0"]
    s_w = torch.tensor(w).reshape(-1, 1) if isinstance(w, list) else torch.tensor(w)
    xd = (codes(x, s_in, fullscale).float() * s_in).to(torch.bfloat16)
    wd = (codes(lin.weight, s_w, fullscale).float() * s_w).to(torch.bfloat16)
    return torch.matmul(xd, wd.t()) + lin.bias


def saturated_rows(node: dict, x: torch.Tensor) -> torch.Tensor:
    return (x.float().abs() / node["inputs"][0] > 240).any(dim=-1)


@pytest.mark.parametrize("method", ["maxabs_hw", "act_maxabs_hw_weights_pcs_maxabs_pow2", "unit_scale"])
@torch.no_grad()
def test_gaudi2_saturates_at_240_and_differs_from_inc_cpu_only_there(tmp_path: Path, method: str) -> None:
    source = chain()
    config = {"mode": "AUTO", "scale_method": method, "device_for_scales": "GAUDI2",
              "dump_stats_path": str(tmp_path / "measure"), "blocklist": {"names": [f"^{BLOCKED}$"]}}
    calib = torch.randn(64, 16).to(torch.bfloat16) * 2000  # > 16·240·0.25: the HW scale is clipped at 16
    model = orchestrator.quantize(chain(), config, [calib])
    nodes = orchestrator.scales_of(model)
    assert set(nodes) == {"0", "2"} and type(model[1]) is nn.Linear
    if method == "maxabs_hw":
        assert nodes["0"]["inputs"] == [16.0]  # Gaudi2's largest HW scale
    if "pcs" in method:
        assert len(nodes["0"]["params"]["weight"]["0"]) == 32

    # Rows from tiny to large: some stay within ±240 at every quantized input, some saturate.
    x = torch.randn(96, 16).to(torch.bfloat16) * torch.logspace(-2, 4, 96).reshape(-1, 1).to(torch.bfloat16)
    ours = model(x)

    def reference(fullscale: float) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = inc_qdq_linear(source[0], nodes["0"], x, fullscale)
        h1 = source[1](h0)  # blocked: plain bf16 Linear in both
        sat = saturated_rows(nodes["0"], x) | saturated_rows(nodes["2"], h1)
        return inc_qdq_linear(source[2], nodes["2"], h1, fullscale), sat

    at_240, saturated = reference(240.0)
    at_448, _ = reference(448.0)
    assert torch.equal(ours, at_240)
    assert 0 < int(saturated.sum()) < len(x)
    assert torch.equal(ours[~saturated], at_448[~saturated])
    assert not torch.equal(ours[saturated], at_448[saturated])
