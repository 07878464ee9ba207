"""Real-client tests: our compressed-tensors FP8 exports load with ``AutoModelForCausalLM.from_pretrained``
through transformers' compressed-tensors quantizer, for every model family, single-card (tp=1) and
sharded on Ray (tp=1, tp=2), and compute what our in-memory quantized model computes.

What the client does (transformers 5.25 + compressed-tensors 0.20.1, read in
``compressed_tensors.quantization.lifecycle.forward`` and checked by the tests below):

- Every ``Linear`` a config group targets gets a wrapped forward that fake-quantizes its *input*:
  ``round_e4m3(clamp(x / input_scale, -448, 448)) · input_scale`` (a cast to ``float8_e4m3fn``, round
  to nearest even, computed in x's dtype), then ``F.linear`` with the weight decompressed to
  ``W8 · weight_scale``. Our CPU emulation does the same arithmetic (divide, clamp, RNE, multiply;
  fp32 here), so in fp32 the logits agree up to matmul summation order: tolerance ``TIGHT``. The
  client's own activation QDQ (its logits with quantization switched off) moves the logits by
  ≥ 100x ``TIGHT`` in every test, so a missing, doubled or misplaced input scale would show.
  (In bf16 the client divides in bf16 and we in fp32; outside this test's scope.)
- FP8_DYNAMIC (``input_activations`` dynamic, strategy token): the client computes per-token scales
  ``amax / 448`` (as vLLM does); our dynamic emulation uses INC's ``pow2(amax / (fullscale · 0.5))``.
  Both are FP8 roundings of the same activations: with the client's rule substituted into our
  forward the logits agree to ``TIGHT``; without it they differ by an FP8 rounding, bounded by
  ``DYNAMIC_FACTOR`` x the client's activation-QDQ effect.
- MoE: transformers 5 fuses the per-expert tensors on load (``mlp.experts.gate_up_proj``), dequantizing
  each expert's FP8 weight exactly (``W8 · s``, checked), and runs the fused experts with no
  activation QDQ (they are no ``Linear``): the experts' ``input_scale`` tensors are reported
  UNEXPECTED. vLLM's FP8 MoE does read per-expert input scales (the max per layer for w13), so the
  export writes them and these tests allow exactly those keys as unexpected. The client's logits are
  then compared with our model whose expert Linears compute without activation QDQ (weights still
  the FP8 ones), to ``TIGHT``.
- KV cache: compressed-tensors 0.20.1 treats an attention module as cached only if its forward takes
  ``past_key_value(s)``; transformers 5.25 attention takes ``cache``. So the client applies no
  ``kv_cache_scheme`` and reports ``k_scale``/``v_scale`` UNEXPECTED (vLLM reads them; without them it
  uses 1.0). The test allows exactly those, compares with our model without KV QDQ, and checks that
  compressed-tensors' own fake-quantization with our ``k_scale``/``v_scale`` reproduces our KV QDQ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import orchestrator
import shards.quantized.modules as qmodules
from orchestrator.export.writer import ExportError, checkpoint_from_model
from orchestrator.export.compressed_tensors import copy_serving_files, serving_files, write_compressed_tensors
from shards.quantized.swap import quantized_modules
from shards.families import family_for
from shards.families.registry import EXPERT_NAME
from shards.model.hf_attention import KVCache
from shards.quantized.modules import QuantKVCache, QuantLinear
from tests.orchestrator.test_export import read_all
from tests.family_models import FAMILY_NAMES, MOE_FAMILIES, VOCAB, family_tokens, tiny_model
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.timeout(600)

# Same QDQ, same FP8 codes and scales on both sides: only fp32 summation order differs.
TIGHT = 1e-5
# The client's activation QDQ must move the logits by at least this many TIGHTs (the check can see it).
VISIBLE = 100
# Two FP8 roundings of the same activations with different per-token scales differ by at most about
# twice one rounding's effect; measured 1.6x on tiny Llama.
DYNAMIC_FACTOR = 3.0
CALIB = [family_tokens(1, 2, 16), family_tokens(2, 2, 16)]
PROBE = family_tokens(7, 2, 12)


# --- helpers ---------------------------------------------------------------------------------------

def quantized_family(fam: str, tmp: Path, *, method: str = "maxabs_pow2", types: tuple[str, ...] = ("Linear",),
                     dynamic: bool = False, model: nn.Module | None = None, calib: list[torch.Tensor] | None = None,
                     **extra: Any) -> nn.Module:
    cfg = {"mode": "AUTO", "scale_method": method, "hp_dtype": "FP32", "allowlist": {"types": list(types)},
           "dump_stats_path": str(tmp / "stats" / fam), "dynamic_quantization": dynamic, **extra}
    model = model if model is not None else tiny_model(fam)
    return orchestrator.quantize(model, cfg, None if dynamic else (calib or CALIB))


def saved_names(model: nn.Module, tmp: Path) -> set[str]:
    """The tensor names transformers' own ``save_pretrained`` writes for ``model``."""
    model.save_pretrained(tmp)
    return set(read_all(tmp))


def load_client(out: Path) -> tuple[nn.Module, dict[str, list[str]]]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def logits(model: nn.Module, tokens: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def client_without_qdq(client: nn.Module) -> torch.Tensor:
    """The client's logits with its activation QDQ switched off (weights stay the dequantized FP8 ones)."""
    mods = [m for m in client.modules() if getattr(m, "quantization_scheme", None) is not None]
    assert mods, "the client quantized no module"
    for m in mods:
        m.quantization_enabled = False
    try:
        return logits(client)
    finally:
        for m in mods:
            m.quantization_enabled = True


def expert_linears(model: nn.Module) -> list[str]:
    return [n for n, m in quantized_modules(model).items() if isinstance(m, QuantLinear) and EXPERT_NAME.match(n)]


def without_activation_qdq(model: nn.Module, names: list[str]) -> None:
    """Replace quantized Linears by plain Linears holding their dequantized FP8 weight (in place)."""
    for name in names:
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        s = q.module_scales().weight
        assert s is not None
        s = s.float().reshape(-1, 1) if s.numel() > 1 else s.float().reshape(())
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight = nn.Parameter(q.weight.float() * s, requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.detach().float().clone(), requires_grad=False)
        model.set_submodule(name, lin)


def without_kv_qdq(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantKVCache):
            model.set_submodule(name, KVCache())


def assert_close(theirs: torch.Tensor, ours: torch.Tensor, what: str, qdq_effect: float | None = None) -> None:
    scale = ours.abs().max().item()
    diff = (theirs - ours).abs().max().item()
    assert diff <= TIGHT * scale, f"{what}: client logits differ from ours by {diff:.3g} (scale {scale:.3g})"
    if qdq_effect is not None:
        assert qdq_effect >= VISIBLE * TIGHT * scale, f"{what}: the client's activation QDQ moved logits by only {qdq_effect:.3g}"


def expected_unexpected(model: nn.Module) -> set[str]:
    """The experts' input scales, which transformers' fused experts do not read (module docstring)."""
    return {f"{n}.input_scale" for n in expert_linears(model)}


def write_tokenizer(folder: Path) -> Any:
    """A small word-level fast tokenizer with a chat template, saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    fast.save_pretrained(str(folder))
    return fast


def source_checkpoint(fam: str, folder: Path) -> Path:
    """A HF checkpoint directory of the tiny ``fam`` model with a tokenizer, chat template and generation config."""
    if not (folder / "config.json").is_file():
        model = tiny_model(fam)
        model.generation_config.max_new_tokens = 7  # something to recognise
        model.save_pretrained(folder)
        write_tokenizer(folder)
        (folder / ".cache").mkdir(exist_ok=True)  # hidden folders and files are not serving files
        (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return folder


def assert_serving_files(src: Path, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    names = {p.name for p in serving_files(src)}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert not names & {"config.json", "model.safetensors", ".gitattributes"}
    assert all((out / n).read_bytes() == (src / n).read_bytes() for n in names)
    chat = [{"role": "user", "content": "w5 w6"}]
    a, b = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert a.apply_chat_template(chat, tokenize=False) == b.apply_chat_template(chat, tokenize=False)
    assert a("w3 w4 w9")["input_ids"] == b("w3 w4 w9")["input_ids"]
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7


# --- every family, single card ----------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMILY_NAMES)
def test_family_export_loads_in_transformers_and_computes_our_logits(tmp_path: Path, fam: str) -> None:
    model = quantized_family(fam, tmp_path)
    ckpt = checkpoint_from_model(model)
    out = write_compressed_tensors(ckpt, tmp_path / "ct")
    tensors = read_all(out)

    # On-disk names: exactly what save_pretrained writes for the unquantized model, plus the scales.
    disk = family_for(model.config).disk_name
    quantized = [n for n, m in quantized_modules(model).items() if isinstance(m, QuantLinear)]
    scales = {f"{disk(n)}.{s}" for n in quantized for s in ("weight_scale", "input_scale")}
    assert set(tensors) == saved_names(tiny_model(fam), tmp_path / "hf") | scales
    assert all(tensors[f"{disk(n)}.weight"].dtype == torch.float8_e4m3fn for n in quantized)
    if fam == "mixtral":
        assert tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"].dtype == torch.float8_e4m3fn
    # High precision modules are listed by name: routers of MoE families, nothing else here.
    routers = family_for(model.config).high_precision
    assert all(name.endswith(".gate") for name in ckpt.ignored) and bool(ckpt.ignored) == bool(routers)

    client, info = load_client(out)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert set(info["unexpected_keys"]) == expected_unexpected(model)  # experts' input scales only (MoE)
    ours = logits(model)
    if fam in MOE_FAMILIES:
        # The client dequantizes every expert exactly into its fused parameters.
        layer = next(n.rpartition(".experts.")[0] for n in expert_linears(model))
        fused = client.get_submodule(f"{layer}.experts")
        lay = family_for(model.config).experts
        assert lay is not None
        for e in range(fused.gate_up_proj.shape[0]):
            w = [ckpt.linears[disk(f"{layer}.experts.{e}.{p}")].dequantized_weight() for p in lay.projections]
            assert torch.equal(fused.gate_up_proj[e], torch.cat(w[:2])) and torch.equal(fused.down_proj[e], w[2])
        full = ours
        without_activation_qdq(model, expert_linears(model))
        ours = logits(model)
        assert (full - ours).abs().max() > 0  # the experts' activation QDQ is what the client leaves out
    theirs = logits(client)
    assert_close(theirs, ours, fam, (theirs - client_without_qdq(client)).abs().max().item())


def test_non_power_of_two_scales_round_as_the_client_does(tmp_path: Path) -> None:
    """maxabs_arbitrary: x / s is not exact, so both sides must divide (not multiply by 1/s) alike."""
    model = quantized_family("qwen2", tmp_path, method="maxabs_arbitrary")
    scales = [m.module_scales().inputs[0] for m in quantized_modules(model).values()]
    assert any(float(torch.log2(s.float()).frac().abs()) > 0 for s in scales)
    client, info = load_client(write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct"))
    assert not any(info.values())
    theirs = logits(client)
    assert_close(theirs, logits(model), "qwen2 maxabs_arbitrary", (theirs - client_without_qdq(client)).abs().max().item())


# --- tied embeddings ----------------------------------------------------------------------------------

def test_tied_head_stays_high_precision_and_tied(tmp_path: Path) -> None:
    """SmolLM2-like: lm_head is the embedding. It is never quantized, is listed in ignore, the config
    stays tied and no lm_head tensor is written; the client re-ties it and computes our logits."""
    model = quantized_family("llama", tmp_path, model=tiny_model("llama", tie_word_embeddings=True))
    assert "lm_head" not in quantized_modules(model)
    out = write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head" in config["quantization_config"]["ignore"]
    tensors = read_all(out)
    assert not [k for k in tensors if k.startswith("lm_head")] and tensors["model.embed_tokens.weight"].dtype == torch.float32
    client, info = load_client(out)
    assert not any(info.values())
    assert client.lm_head.weight.data_ptr() == client.model.embed_tokens.weight.data_ptr()
    assert client.lm_head.weight.dtype == torch.float32
    theirs = logits(client)
    assert_close(theirs, logits(model), "tied llama", (theirs - client_without_qdq(client)).abs().max().item())


# --- FP8_DYNAMIC ----------------------------------------------------------------------------------------

def _client_token_scale(x: torch.Tensor, ctx: Any, dim: int = -1, per_tensor: bool = False, **_: Any) -> torch.Tensor:
    """compressed-tensors' (and vLLM's) dynamic per-token scale: amax / 448 (zero rows get eps)."""
    amax = x.detach().abs().amax() if per_tensor else x.detach().abs().amax(dim=dim, keepdim=True)
    return (amax / 448.0).clamp_min(torch.finfo(x.dtype).eps)


@pytest.mark.parametrize("method", ["maxabs_pcs_pow2", "maxabs_pcs_arbitrary",
                                    "act_maxabs_pcs_arbitrary_weights_pcs_maxabs_pow2"])
@pytest.mark.parametrize("fam", ["llama", "qwen3_moe"])
def test_fp8_dynamic_export_is_the_fp8_dynamic_scheme(tmp_path: Path, fam: str, method: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme

    model = quantized_family(fam, tmp_path, method=method, dynamic=True)
    out = write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct")
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (group,) = qc.config_groups.values()
    preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    assert isinstance(group, QuantizationScheme)
    assert group.weights == preset.weights and group.input_activations == preset.input_activations
    assert not [k for k in read_all(out) if k.endswith("input_scale")]

    client, info = load_client(out)
    assert not any(info.values())  # no static input scales: nothing unexpected, MoE included
    theirs = logits(client)
    effect = (theirs - client_without_qdq(client)).abs().max().item()
    ours = logits(model)
    if method == "maxabs_pcs_pow2":
        # INC's dynamic per-token scales (pow2, backoff 0.5) are not the client's: one FP8 rounding apart.
        assert (theirs - ours).abs().max().item() <= DYNAMIC_FACTOR * effect
        monkeypatch.setattr(qmodules, "dynamic_activation_scale", _client_token_scale)
    # (our extensions compute the client's per-token rule themselves.)
    # transformers' fused experts do not QDQ their inputs (module docstring).
    without_activation_qdq(model, expert_linears(model))
    assert_close(theirs, logits(model), f"{fam} FP8_DYNAMIC with the client's per-token scales", effect)


# --- KV cache -------------------------------------------------------------------------------------------

def test_kv_cache_scales_and_scheme(tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    model = quantized_family("llama", tmp_path, types=("Linear", "KVCache"))
    ckpt = checkpoint_from_model(model)
    out = write_compressed_tensors(ckpt, tmp_path / "ct")
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(raw)
    want = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    assert qc.kv_cache_scheme == want
    tensors = read_all(out)
    caches = {n: m for n, m in quantized_modules(model).items() if isinstance(m, QuantKVCache)}
    assert len(caches) == 4
    for name, m in caches.items():
        layer, kind = name.rsplit(".", 1)
        t = tensors[f"{layer}.{kind[0]}_scale"]
        assert t.dtype == torch.float32 and tuple(t.shape) == (1,)
        s = m.module_scales().inputs[0]
        assert float(t) == float(s)
        # compressed-tensors' own KV fake-quantization with this scale is our KV QDQ, value for value.
        x = torch.randn(2, 2, 12, 8) * float(s) * 300
        assert torch.equal(fake_quantize(x, t, None, want), m(x))

    client, info = load_client(out)
    kv_keys = {f"{layer}.{kv}_scale" for layer in ckpt.kv_cache for kv in "kv"}
    assert not info["missing_keys"] and not info["mismatched_keys"]
    applied = any(hasattr(m, "k_scale") for m in client.modules())
    # See the module docstring: compressed-tensors 0.20.1 does not find transformers 5.25's cached attention.
    assert set(info["unexpected_keys"]) == (set() if applied else kv_keys)
    if not applied:
        without_kv_qdq(model)
    theirs = logits(client)
    assert_close(theirs, logits(model), "llama + KV cache", (theirs - client_without_qdq(client)).abs().max().item())


def test_kv_cache_in_some_layers_only_or_of_mla_is_refused(tmp_path: Path) -> None:
    partial = quantized_family("llama", tmp_path / "a", types=("Linear", "KVCache"),
                               blocklist={"names": [r"layers\.1\.self_attn\.v_cache"]})
    with pytest.raises(ExportError, match="every attention layer.*layers.1.self_attn.v_cache"):
        checkpoint_from_model(partial)
    mla = quantized_family("deepseek_v3", tmp_path / "b", types=("Linear", "KVCache"))
    with pytest.raises(ExportError, match="MLA latent"):
        checkpoint_from_model(mla)


# --- serving files --------------------------------------------------------------------------------------

def test_single_card_export_carries_tokenizer_chat_template_and_generation_config(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = source_checkpoint("qwen2", tmp_path / "src")
    model = quantized_family("qwen2", tmp_path, model=AutoModelForCausalLM.from_pretrained(src).eval())
    out = write_compressed_tensors(checkpoint_from_model(model, source_dir=src), tmp_path / "ct")
    assert_serving_files(src, out)
    assert not (out / ".gitattributes").exists() and not (out / ".cache").exists()
    # Without a source folder: a tokenizer object is saved, the model's generation config written.
    tok = write_tokenizer(tmp_path / "tok")
    out2 = write_compressed_tensors(checkpoint_from_model(model), tmp_path / "ct2", tokenizer=tok)
    assert (out2 / "tokenizer.json").is_file() and (out2 / "generation_config.json").is_file()
    # The helper alone copies into any folder and keeps what is already there.
    (tmp_path / "ct3").mkdir()
    (tmp_path / "ct3" / "tokenizer.json").write_text("{}")
    copied = copy_serving_files(src, tmp_path / "ct3")
    assert (tmp_path / "ct3" / "tokenizer.json").read_text() == "{}" and tmp_path / "ct3" / "tokenizer.json" not in copied
    with pytest.raises(ExportError, match="not a directory"):
        write_compressed_tensors(checkpoint_from_model(model, source_dir=tmp_path / "nowhere"), tmp_path / "ct4")
    assert not (tmp_path / "ct4").exists()


# --- sharded runs on Ray (tp=1, tp=2) ------------------------------------------------------------------

def _ray_batches(n: int = 4) -> list[Any]:
    from orchestrator.driver.data import Batch

    rng = np.random.default_rng(0)
    return [Batch(i, tuple(tuple(int(t) for t in row) for row in rng.integers(0, VOCAB, (2, 16)))) for i in range(n)]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("fam, types, tps", [
    ("llama", ("Linear", "KVCache"), (1, 2)), ("mixtral", ("Linear",), (1, 2)), ("qwen3_moe", ("Linear",), (1, 2)),
    ("mistral", ("Linear", "KVCache"), (2,)), ("qwen2", ("Linear",), (2,)), ("qwen3", ("Linear", "KVCache"), (2,)),
    ("deepseek_v3", ("Linear",), (2,)),  # MLA: no KV cache export (test_kv_cache_in_some_layers_only_or_of_mla_is_refused)
])
def test_sharded_exports_load_in_transformers(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None,  # noqa: F811
                                              fam: str, types: tuple[str, ...], tps: tuple[int, ...]) -> None:
    """Exports of the Ray path (tp=2 for every family, tp=1 too for one dense and two MoE families) are
    the same files as the single-card export of the same calibration, load in transformers with no
    missing / mismatched keys (unexpected: see the module docstring) and compute the single-card
    model's logits."""
    from transformers import AutoModelForCausalLM

    from orchestrator.driver.calibration import Calibration
    from orchestrator.driver.grid import WorkerResources

    tmp = tmp_path_factory.mktemp(f"sharded_{fam}")
    src = source_checkpoint(fam, tmp / "src")
    batches = _ray_batches()
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "hp_dtype": "FP32", "allowlist": {"types": list(types)},
           "blocklist": {"names": [r"layers\.0\.self_attn\.o_proj"]}}
    outs = {}
    for tp in tps:
        with Calibration({**cfg, "dump_stats_path": str(tmp / f"tp{tp}" / "stats")}, src, tp=tp, progress=False,
                         resources=WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})) as cal:
            cal.measure(batches)
            cal.quantize()
            outs[tp] = cal.export(tmp / f"ct{tp}")
    single = quantized_family(fam, tmp, types=types, model=AutoModelForCausalLM.from_pretrained(src).eval(),
                              blocklist=cfg["blocklist"], calib=[torch.tensor(b.tokens) for b in batches])
    ref_out = write_compressed_tensors(checkpoint_from_model(single, source_dir=src), tmp / "ct_single")

    ref = read_all(ref_out)
    ref_cfg = json.loads((ref_out / "config.json").read_text())
    assert "model.layers.0.self_attn.o_proj" in ref_cfg["quantization_config"]["ignore"]
    for tp, out in outs.items():
        tensors = read_all(out)
        assert tensors.keys() == ref.keys(), f"tp={tp}: {sorted(tensors.keys() ^ ref.keys())[:6]}"
        for k, t in ref.items():
            assert torch.equal(tensors[k].view(torch.uint8), t.view(torch.uint8)), f"tp={tp}: {k} differs"
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"] == ref_cfg["quantization_config"]
        assert_serving_files(src, out)

    client, info = load_client(outs[2])
    allowed = expected_unexpected(single) | {f"{layer}.{kv}_scale" for layer in checkpoint_from_model(single).kv_cache
                                             for kv in "kv"}
    assert not info["missing_keys"] and not info["mismatched_keys"] and set(info["unexpected_keys"]) == allowed
    without_kv_qdq(single)
    without_activation_qdq(single, expert_linears(single))
    theirs = logits(client)
    assert_close(theirs, logits(single), f"{fam} tp=2", (theirs - client_without_qdq(client)).abs().max().item())


@pytest.mark.parametrize("method, warns", [("maxabs_pcs_pow2", True), ("maxabs_pcs_arbitrary", False),
                                           ("act_maxabs_pcs_arbitrary_weights_pcs_maxabs_pow2", False)])
def test_export_says_when_the_client_rounds_activations_by_another_rule(
        tmp_path: Path, method: str, warns: bool, caplog: pytest.LogCaptureFixture) -> None:
    model = quantized_family("llama", tmp_path, method=method, dynamic=True)
    with caplog.at_level("WARNING", logger="orchestrator.export.writer"):
        checkpoint_from_model(model)
    said = [r.getMessage() for r in caplog.records if "per-token activation scales" in r.getMessage()]
    assert bool(said) is warns, said
    if warns:
        assert "POW2 backoff 0.5" in said[0] and "maxabs_pcs_arbitrary" in said[0]
