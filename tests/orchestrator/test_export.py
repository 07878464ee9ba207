"""compressed-tensors FP8 export: files read back with safetensors and dequantize to within FP8
error of the original weights; config.json validates with compressed-tensors' own model; a
transformers + compressed-tensors load computes what our quantized model computes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

import orchestrator
from orchestrator.export.writer import ExportError, QuantizedCheckpoint, QuantizedLinear, checkpoint_from_model
from orchestrator.export.compressed_tensors import INDEX_FILE, SINGLE_FILE, quantization_config, write_compressed_tensors
from tests.models import llama_tokens, tiny_llama

SEED = 0
BLOCKED = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
# (scale_method, extra config keys, weight strategy on disk)
STATIC_CASES = {
    "maxabs_pow2": ({}, "tensor"),
    "maxabs_arbitrary": ({}, "tensor"),
    "act_maxabs_pow2_weights_pcs_maxabs_pow2": ({}, "channel"),
    "maxabs_hw_gaudi2": ({"scale_method": "maxabs_hw", "device_for_scales": "GAUDI2"}, "tensor"),
}


def quantized_llama(tmp_path: Path, method: str, **extra: Any) -> nn.Module:
    cfg = {"mode": "AUTO", "scale_method": method, "dump_stats_path": str(tmp_path / "stats" / "m"),
           "blocklist": {"names": ["down_proj"]}, **extra}
    calib = None if extra.get("dynamic_quantization") else [llama_tokens(1, 2, 16)]
    return orchestrator.quantize(tiny_llama(SEED), cfg, calib)


def read_all(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, read with plain safetensors (index or single file)."""
    index = out / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [SINGLE_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(out / f), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def e4m3_half_ulp(v: torch.Tensor) -> torch.Tensor:
    """Half an E4M3 step at each |v| (v in code units): 2^(floor(log2|v|) - 4), at least 2^-10 (subnormals)."""
    out = torch.empty_like(v, dtype=torch.float64)
    for i, x in enumerate(v.double().abs().reshape(-1).tolist()):
        out.view(-1)[i] = 2.0 ** -10 if x == 0 else max(2.0 ** (math.floor(math.log2(x)) - 4), 2.0 ** -10)
    return out


def assert_within_fp8_error(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, name: str) -> None:
    w64, s64 = w.double(), s.double()
    err = (w64 - q.double() * s64).abs()
    bound = e4m3_half_ulp(w64 / s64) * s64 + w64.abs() * 2.0 ** -20  # slack: w/s rounds in fp32
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: |w - q*s| exceeds half an E4M3 step by {worst}"


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_export_dequantizes_within_fp8_error(tmp_path: Path, case: str) -> None:
    extra, strategy = STATIC_CASES[case]
    model = quantized_llama(tmp_path, extra.get("scale_method", case), **{k: v for k, v in extra.items()
                                                                          if k != "scale_method"})
    out = write_compressed_tensors(checkpoint_from_model(model, scale_method=case), tmp_path / "ct")
    tensors, original = read_all(out), dict(tiny_llama(SEED).named_modules())
    linears = [n for n, m in original.items() if isinstance(m, nn.Linear)]
    for name in linears:
        w = original[name].weight.detach()
        if name == "lm_head":  # tied to the embeddings in tiny_llama: high precision, stored once (as the embedding)
            assert "lm_head.weight" not in tensors and "lm_head.weight_scale" not in tensors
            continue
        if any(name == b for b in BLOCKED):
            assert torch.equal(tensors[f"{name}.weight"], w) and f"{name}.weight_scale" not in tensors
            continue
        q, s = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert tuple(s.shape) == ((w.shape[0], 1) if strategy == "channel" else (1,))
        assert tensors[f"{name}.input_scale"].dtype == torch.float32 and tensors[f"{name}.input_scale"].shape == (1,)
        assert q.float().abs().max() <= (240 if "gaudi2" in case else 448)
        assert_within_fp8_error(w, q.float(), s, name)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert sorted(qc["ignore"]) == sorted(BLOCKED + ["lm_head"])
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["strategy"] == strategy
    assert group["input_activations"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                          "strategy": "tensor", "dynamic": False}


def test_other_tensors_are_the_original_high_precision_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = quantized_llama(tmp_path, "maxabs_pow2",
                            allowlist={"types": ["Linear", "Matmul", "Softmax", "KVCache"]})
    with caplog.at_level("WARNING", logger="orchestrator.export.writer"):
        out = write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct")
    # Attention matmuls and softmax, asked for here, have no place in the format: said once.
    (warning,) = [r.getMessage() for r in caplog.records if "no place" in r.getMessage()]
    assert warning.startswith("export: 6 quantized op(s)") and "model.layers.0.self_attn.matmul_av" in warning
    tensors = read_all(out)
    reference = tiny_llama(SEED).state_dict()
    plain = [k for k in reference if "norm" in k or "embed_tokens" in k]
    assert plain and all(torch.equal(tensors[k], reference[k]) for k in plain)
    # No internal scale buffers or attention-op scales leak into the checkpoint; the quantized KV
    # cache's scales are the attention layers' k_scale / v_scale.
    suffixes = {k.rsplit(".", 1)[1] for k in tensors}
    assert suffixes == {"weight", "weight_scale", "input_scale", "k_scale", "v_scale"}
    assert sorted(k for k in tensors if k.endswith(("k_scale", "v_scale"))) == [
        f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in "kv"]


def test_config_loads_with_autoconfig_and_tied_lm_head_stays_tied(tmp_path: Path) -> None:
    from transformers import AutoConfig

    out = write_compressed_tensors(checkpoint_from_model(quantized_llama(tmp_path, "maxabs_pow2")), tmp_path / "ct")
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert config.quantization_config["quant_method"] == "compressed-tensors"
    # lm_head is tied to the embeddings in tiny_llama: never selected, listed in ignore, config stays tied.
    assert config.tie_word_embeddings is True and "lm_head" in config.quantization_config["ignore"]
    assert not [k for k in read_all(out) if k.startswith("lm_head.")]


def test_untied_lm_head_is_quantized_and_the_config_stays_untied(tmp_path: Path) -> None:
    from tests.family_models import family_tokens, tiny_model

    cfg = {"mode": "AUTO", "scale_method": "maxabs_pow2", "allowlist": {"types": ["Linear"]},
           "dump_stats_path": str(tmp_path / "m")}
    model = orchestrator.quantize(tiny_model("llama"), cfg, [family_tokens(1, 2, 16)])
    out = write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    tensors = read_all(out)
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn and "lm_head.weight_scale" in tensors


def test_blocked_tied_lm_head_stays_tied_and_is_stored_once(tmp_path: Path) -> None:
    model = quantized_llama(tmp_path, "maxabs_pow2", blocklist={"names": ["lm_head"]})
    ckpt = checkpoint_from_model(model)
    out = write_compressed_tensors(ckpt, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["ignore"] == ["lm_head"]
    tensors = read_all(out)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors


def test_dynamic_export_has_token_inputs_and_no_input_scale(tmp_path: Path) -> None:
    model = quantized_llama(tmp_path, "maxabs_pcs_pow2", dynamic_quantization=True)
    ckpt = checkpoint_from_model(model)
    assert ckpt.dynamic and all(lin.input_scale is None for lin in ckpt.linears.values())
    out = write_compressed_tensors(ckpt, tmp_path / "ct")
    tensors = read_all(out)
    assert not [k for k in tensors if k.endswith("input_scale")]
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert group["weights"]["strategy"] == "channel" and group["weights"]["dynamic"] is False
    name = "model.layers.0.self_attn.q_proj"
    q_proj = tiny_llama(SEED).get_submodule(name).weight.detach()
    assert_within_fp8_error(q_proj, tensors[f"{name}.weight"].float(), tensors[f"{name}.weight_scale"], name)


@pytest.mark.parametrize("max_shard_bytes", [1, 4096, 30_000])
def test_sharded_export_has_an_index_and_the_same_tensors(tmp_path: Path, max_shard_bytes: int) -> None:
    ckpt = checkpoint_from_model(quantized_llama(tmp_path, "maxabs_pow2"))
    single = read_all(write_compressed_tensors(ckpt, tmp_path / "one"))
    out = write_compressed_tensors(ckpt, tmp_path / "many", max_shard_bytes=max_shard_bytes)
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert not (out / SINGLE_FILE).exists() and set(index["weight_map"].values()) == set(files)
    assert all(p.startswith("model-") and p.endswith(f"-of-{len(files):05d}.safetensors") for p in files)
    for f in files:  # every tensor lies in the file the index names; no file above the limit but 1-tensor ones
        with safe_open(str(out / f), framework="pt") as fh:
            keys = list(fh.keys())
            assert all(index["weight_map"][k] == f for k in keys)
            sizes = [fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in keys]
            assert len(keys) == 1 or sum(sizes) <= max_shard_bytes
    many = read_all(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    assert many.keys() == single.keys() and all(torch.equal(many[k].view(torch.uint8), single[k].view(torch.uint8))
                                                for k in single)


def hand_checkpoint(per_channel: list[bool], dynamic: bool = False) -> QuantizedCheckpoint:
    """Linears "l0", "l1", ... with explicit codes and scales (no model involved)."""
    linears = {}
    for i, pc in enumerate(per_channel):
        q = torch.arange(-12, 12, dtype=torch.float32).reshape(4, 6).to(torch.float8_e4m3fn)
        s = torch.tensor([0.5, 0.25, 2.0, 1.0]) if pc else torch.tensor(0.125)
        linears[f"l{i}"] = QuantizedLinear(q, s, None if dynamic else torch.tensor(0.5), torch.ones(4))
    return QuantizedCheckpoint({"model_type": "llama"}, linears, {"head.weight": torch.zeros(2, 4)}, ["head"], dynamic)


def test_mixed_weight_strategies_get_one_group_each_with_module_names(tmp_path: Path) -> None:
    qc = quantization_config(hand_checkpoint([True, False, True]))
    groups = {g["weights"]["strategy"]: g["targets"] for g in qc["config_groups"].values()}
    assert groups == {"channel": ["l0", "l2"], "tensor": ["l1"]}


def test_hand_built_checkpoint_writes_codes_and_scales_verbatim(tmp_path: Path) -> None:
    ckpt = hand_checkpoint([True, False])
    tensors = read_all(write_compressed_tensors(ckpt, tmp_path / "ct"))
    assert torch.equal(tensors["l0.weight_scale"], torch.tensor([[0.5], [0.25], [2.0], [1.0]]))
    assert torch.equal(tensors["l1.weight_scale"], torch.tensor([0.125]))
    assert torch.equal(tensors["l1.input_scale"], torch.tensor([0.5]))
    expected = torch.arange(-12, 12, dtype=torch.float32).reshape(4, 6)
    assert torch.equal(tensors["l0.weight"].float(), expected) and torch.equal(tensors["l0.bias"], torch.ones(4))
    # Dequantization: code × scale of its row, written out by hand.
    assert torch.equal(ckpt.linears["l0"].dequantized_weight(), expected * torch.tensor([[0.5], [0.25], [2.0], [1.0]]))


@pytest.mark.parametrize("bad, match", [
    (lambda c: {"l0": QuantizedLinear(c.linears["l0"].weight_fp8.to(torch.float8_e5m2), torch.tensor(1.0),
                                      torch.tensor(1.0), None)}, "float8_e5m2"),
    (lambda c: {"l0": QuantizedLinear(c.linears["l0"].weight_fp8, torch.ones(3), torch.tensor(1.0), None)},
     "weight_scale has 3 values"),
    (lambda c: {"l0": QuantizedLinear(c.linears["l0"].weight_fp8, torch.tensor(1.0), None, None)},
     "needs a static input_scale"),
    (lambda c: {"l0": QuantizedLinear(c.linears["l0"].weight_fp8, torch.tensor(1.0), torch.tensor(1.0),
                                      torch.ones(5))}, "bias has shape"),
])
def test_inconsistent_checkpoints_are_refused_naming_the_linear(tmp_path: Path, bad: Any, match: str) -> None:
    good = hand_checkpoint([False])
    ckpt = QuantizedCheckpoint(good.hf_config, bad(good), good.other, good.ignored)
    with pytest.raises(ExportError, match=match) as exc:
        write_compressed_tensors(ckpt, tmp_path / "ct")
    assert "'l0'" in str(exc.value)
    assert not (tmp_path / "ct").exists()


def test_existing_export_is_not_overwritten_and_shard_size_must_be_positive(tmp_path: Path) -> None:
    ckpt = hand_checkpoint([False])
    write_compressed_tensors(ckpt, tmp_path / "ct")
    with pytest.raises(ExportError, match="already holds"):
        write_compressed_tensors(ckpt, tmp_path / "ct")
    with pytest.raises(ExportError, match="max_shard_bytes=0"):
        write_compressed_tensors(ckpt, tmp_path / "other", max_shard_bytes=0)


def test_model_without_hf_config_is_refused(tmp_path: Path) -> None:
    from tests.models import sequential_batches, tiny_sequential

    model = orchestrator.quantize(tiny_sequential(), {"mode": "AUTO", "scale_method": "maxabs_pow2",
                                                      "dump_stats_path": str(tmp_path / "m")}, sequential_batches(0, 2))
    with pytest.raises(ExportError, match="no HF config"):
        checkpoint_from_model(model)


# --- compressed-tensors' own view of the files (skipped where it is not installed) ---------------------

@pytest.mark.parametrize("per_channel, dynamic", [([False], False), ([True], True), ([True, False], False)])
def test_quantization_config_validates_and_decompresses_with_compressed_tensors(
        tmp_path: Path, per_channel: list[bool], dynamic: bool) -> None:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    ckpt = hand_checkpoint(per_channel, dynamic)
    out = write_compressed_tensors(ckpt, tmp_path / "ct")
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert qc.quant_method == "compressed-tensors" and qc.format == "float-quantized" and ct is not None
    tensors = read_all(out)
    for scheme in qc.config_groups.values():
        names = ckpt.linears if scheme.targets == ["Linear"] else scheme.targets
        for name in names:
            assert scheme.input_activations.dynamic is dynamic
            local = {"weight": tensors[f"{name}.weight"], "weight_scale": tensors[f"{name}.weight_scale"]}
            theirs = FloatQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(theirs.float(), ckpt.linears[name].dequantized_weight())


@pytest.mark.parametrize("method", ["maxabs_pow2", "act_maxabs_pow2_weights_pcs_maxabs_pow2"])
def test_transformers_loads_the_export_and_computes_our_logits(tmp_path: Path, method: str) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    # Linears only, in fp32: then both sides compute Q(x)·s_in @ (W8·s_w)ᵀ in fp32.
    model = orchestrator.quantize(tiny_llama(SEED), {
        "mode": "AUTO", "scale_method": method, "hp_dtype": "FP32", "allowlist": {"types": ["Linear"]},
        "blocklist": {"names": ["down_proj"]}, "dump_stats_path": str(tmp_path / "m")}, [llama_tokens(1, 2, 16)])
    out = write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct")
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,  # type: ignore[misc]
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.float8_e4m3fn
    tokens = llama_tokens(7, 2, 12)
    with torch.no_grad():
        ours, theirs = model(tokens).logits, loaded(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
