"""MoE on one card: each expert measured on its own routed tokens and quantized with its own scales."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import orchestrator
from shards.quantized.swap import MissingMeasurementError
from shards.families import UnfusedExperts, family_for
from shards.quantized.modules import QuantLinear
from shards.fp8.methods import PREDEFINED
from shards.fp8.scale_math import ScaleContext
from shards.fp8.weight_scales import weight_scale
from tests.family_models import MOE_FAMILIES, family_tokens, idle_expert_mixtral, tiny_model


def cfg(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"mode": "AUTO", "scale_method": "maxabs_pow2", "allowlist": {"types": ["Linear"]},
            "dump_stats_path": str(tmp_path / "out" / "measure"), **extra}


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse MoE blocks of a fused HF model (``model.layers.N.mlp``) by name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "experts") and hasattr(m, "gate")}


def routed_expert_amax(model_type: str, batches: list[torch.Tensor]) -> dict[str, tuple[float, float, int]]:
    """Independently of the code under test: for every expert projection name, the max-abs of the
    tokens routed to that expert at the gate/up input and at the down input, and the token count.

    Runs a fresh *fused* HF model, captures each MoE block's input with a plain hook, routes it with
    the block's own router, and computes the expert's intermediate from the fused parameters.
    """
    model = tiny_model(model_type)
    layout = family_for(model.config).experts
    assert layout is not None
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, block in _moe_blocks(model).items():
        handles.append(block.register_forward_pre_hook(
            lambda _m, a, name=name: seen.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).detach())))
    with torch.no_grad():
        for x in batches:
            model(x, use_cache=False)
    for h in handles:
        h.remove()
    out: dict[str, tuple[float, float, int]] = {}
    with torch.no_grad():
        for name, block in _moe_blocks(model).items():
            x = torch.cat(seen[name])
            _, _, idx = block.gate(x)
            experts = block.experts
            inter = experts.gate_up_proj.shape[1] // 2
            for e in range(experts.gate_up_proj.shape[0]):
                rows = x[(idx == e).any(dim=-1)]
                if not len(rows):
                    continue
                gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
                h = experts.act_fn(rows @ gate.T) * (rows @ up.T)
                out[f"{name}.experts.{e}"] = (float(rows.abs().amax()), float(h.abs().amax()), len(rows))
    return out


@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_each_expert_measures_its_own_routed_tokens(tmp_path: Path, fam: str) -> None:
    batches = [family_tokens(s, 2, 16) for s in range(3)]
    expected = routed_expert_amax(fam, batches)
    layout = family_for(tiny_model(fam).config).experts
    assert layout is not None and len(expected) >= 4
    model = tiny_model(fam)
    orchestrator.prepare(model, cfg(tmp_path))
    with torch.no_grad():
        for x in batches:
            model(x, use_cache=False)
    stats = orchestrator.finalize_calibration(model)
    for prefix, (amax_in, amax_mid, tokens) in expected.items():
        # Later layers see the previous MoE output, summed over experts in a different row order
        # than HF's fused loop: equal up to fp32 rounding, not bit for bit.
        for proj in (layout.gate, layout.up):
            assert float(stats.modules[f"{prefix}.{proj}"].inputs[0][0]) == pytest.approx(amax_in, rel=1e-6)
        got = float(stats.modules[f"{prefix}.{layout.down}"].inputs[0][0])
        assert got == pytest.approx(amax_mid, rel=1e-5)
        if hasattr(stats.modules[f"{prefix}.{layout.gate}"], "num_tokens"):
            assert stats.modules[f"{prefix}.{layout.gate}"].num_tokens == tokens


@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_every_expert_weight_becomes_fp8_with_its_own_scale(tmp_path: Path, fam: str) -> None:
    batches = [family_tokens(s, 2, 24) for s in range(4)]
    ref = tiny_model(fam)
    layout = family_for(ref.config).experts
    assert layout is not None
    model = orchestrator.quantize(tiny_model(fam), cfg(tmp_path, ignore_modules_wo_measures=True), batches)
    spec, ctx = PREDEFINED["MAXABS_POW2"], ScaleContext()
    nodes = orchestrator.scales_of(model)
    checked = 0
    for name, block in _moe_blocks(ref).items():
        unfused = model.get_submodule(f"{name}.experts")
        assert isinstance(unfused, UnfusedExperts)
        inter = block.experts.gate_up_proj.shape[1] // 2
        for e in range(len(unfused)):
            fused = {layout.gate: block.experts.gate_up_proj[e, :inter], layout.up: block.experts.gate_up_proj[e, inter:],
                     layout.down: block.experts.down_proj[e]}
            for proj, w in fused.items():
                q = unfused[e].get_submodule(proj)
                if not isinstance(q, QuantLinear):
                    continue  # an expert no token reached stays high precision (announced, tested below)
                assert q.weight.dtype == torch.float8_e4m3fn
                assert nodes[f"{name}.experts.{e}.{proj}"]["params"]["weight"] == float(weight_scale(w, spec.weight, ctx))
                checked += 1
    assert checked >= 3 * 4
    # Every matmul weight of the model is FP8 except the routers (high precision by design) and the
    # embedding-tied or replicated-by-choice ones: nothing else is left behind.
    high = [n for n, p in model.named_parameters() if p.ndim == 2 and p.dtype != torch.float8_e4m3fn]
    assert all(n.endswith(("embed_tokens.weight", "gate.weight", "lm_head.weight")) or ".experts." in n for n in high), high


def test_idle_expert_fails_by_name_or_stays_high_precision_announced(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    batches = [family_tokens(s, 2, 16) for s in range(2)]
    with pytest.raises(MissingMeasurementError, match=r"model\.layers\.0\.mlp\.experts\.2\.w1"):
        orchestrator.quantize(idle_expert_mixtral(), cfg(tmp_path), batches)
    with caplog.at_level(logging.WARNING):
        model = orchestrator.quantize(idle_expert_mixtral(), cfg(tmp_path / "b", ignore_modules_wo_measures=True),
                                      batches)
    idle = model.get_submodule("model.layers.0.mlp.experts.3.w2")
    assert not isinstance(idle, QuantLinear) and not torch.isnan(idle.weight).any()
    assert isinstance(model.get_submodule("model.layers.0.mlp.experts.1.w2"), QuantLinear)
    assert "model.layers.0.mlp.experts.3.w2" in caplog.text


@pytest.mark.parametrize("fam", MOE_FAMILIES)
def test_quantized_moe_forward_stays_close(tmp_path: Path, fam: str) -> None:
    batches = [family_tokens(s, 2, 24) for s in range(4)]
    ids = family_tokens(99, 2, 24)
    with torch.no_grad():
        ref = tiny_model(fam)(ids, use_cache=False).logits
    model = orchestrator.quantize(tiny_model(fam), cfg(tmp_path, ignore_modules_wo_measures=True), batches)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    rel = float((got - ref).norm() / ref.norm())
    assert torch.isfinite(got).all() and rel < 0.1, rel


def test_vllm_gaudi_inc_files_quantize_every_expert(tmp_path: Path) -> None:
    """A user with vLLM-Gaudi's INC measurement of a Mixtral (fused ``moe_op`` + per-expert
    ``w13_list``/``w2_list``) converts our per-expert model from it: every expert is quantized, gate
    and up from the layer's hidden-state max-abs, down from the expert's own intermediate max-abs."""
    from stats_store.records import Measurement, ModuleStats
    from shards.fp8.scale_math import activation_scale
    from stats_store.inc_write import write_measurement

    modules = {"lm_head": ModuleStats("lm_head", "linear", inputs=[np.array([2.0], np.float32)], num_samples=2)}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}"
            modules[name] = ModuleStats(name, "linear", inputs=[np.array([1.5], np.float32)], num_samples=2)
        op = f"model.layers.{layer}.block_sparse_moe.experts.moe_op"
        modules[op] = ModuleStats(op, "dynamic_moe", inputs=[np.array([7.0], np.float32)],
                                  outputs=[np.array([1.0], np.float32)] + [np.array([3.0 + e], np.float32) for e in range(4)],
                                  num_samples=2)
    config = cfg(tmp_path)
    write_measurement(Measurement(modules=modules), str(config["dump_stats_path"]))
    model = orchestrator.convert(tiny_model("mixtral"), config)
    nodes = orchestrator.scales_of(model)
    spec, ctx = PREDEFINED["MAXABS_POW2"], ScaleContext()
    for layer in range(2):
        for e in range(4):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            for proj, amax in (("w1", 7.0), ("w3", 7.0), ("w2", 3.0 + e)):
                assert isinstance(model.get_submodule(f"{prefix}.{proj}"), QuantLinear)
                assert nodes[f"{prefix}.{proj}"]["inputs"] == [float(activation_scale(amax, spec.activation, ctx))]
