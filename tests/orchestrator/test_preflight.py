"""Bad input stops the driver before any actor starts, with one line naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from orchestrator.driver import calibration

from orchestrator.entry import fp8_calibrate as cli
from orchestrator.driver.calibration import Calibration
from shards.tp.checkpoint import CheckpointError
from shards.families import UnsupportedModelError
from shards.tp.rules import TensorParallelError
from tests.family_models import tiny_model

CFG = {"scale_method": "maxabs_pow2"}


@pytest.fixture(autouse=True)
def no_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("an actor was started for a run that should have been refused first")

    monkeypatch.setattr(calibration, "make_workers", refuse)
    monkeypatch.setattr(calibration, "ensure_ray", refuse)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mixtral")
    tiny_model("mixtral").save_pretrained(path)
    return path


def test_tp_that_does_not_divide_the_heads(mixtral_dir: Path) -> None:
    with pytest.raises(TensorParallelError, match=r"cannot shard the 'q' axis: .* over tp=3"):
        Calibration(CFG, mixtral_dir, tp=3)


def test_cli_prints_one_line_and_exits_2(mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"scale_method": "maxabs_pow2"}')
    data = tmp_path / "calib.txt"
    data.write_text("some calibration text\n\nmore text\n")
    code = cli.main(["run", "--config", str(cfg), "--model", str(mixtral_dir), "--data", str(data), "--tp", "3",
                     "--no-progress"])
    out = capsys.readouterr().out.strip()
    assert code == 2
    assert len(out.splitlines()) == 1 and "'q' axis" in out and "\x1b" not in out and "Traceback" not in out


def test_unsupported_family_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2' is not a supported model family; supported: "):
        Calibration(CFG, tmp_path, tp=1)


def test_checkpoint_that_does_not_match_its_config(mixtral_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(str(mixtral_dir / "model.safetensors"))
    key = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"experts\.1\.w2\.weight' in .* has shape \(32, 63\), the config gives \(32, 64\)"):
        Calibration(CFG, tmp_path, tp=2)
