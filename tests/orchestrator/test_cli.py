"""`fp8-calibrate` end to end on the session's local Ray cluster: store, export, INC files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from orchestrator.entry.fp8_calibrate import main
from orchestrator.entry.demo_model import build_demo_checkpoint
from stats_store.zarr_store import ZarrStatsStore
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "calibration.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("cli_model"))


def _config(tmp: Path, **extra: object) -> Path:
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(tmp / "stats" / "run"), **extra}
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _fp8_bound(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Half an E4M3 ulp at |w/s| (3 mantissa bits), or half the smallest subnormal step, times s."""
    x = (w / s).abs().double()
    exp = torch.floor(torch.log2(x.clamp_min(2.0**-6)))
    return (torch.maximum(2.0 ** (exp - 4), torch.full_like(x, 2.0**-10)) * s.double()).float()


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(300)
def test_run_tp2_writes_a_complete_store_an_fp8_checkpoint_and_inc_files(tmp_path: Path, model_dir: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fp8"
    rc = main(["run", "--config", str(_config(tmp_path)), "--model", str(model_dir), "--data", str(DATA),
               "--tp", "2", "--seq-len", "32", "--batch-size", "2", "--max-batches", "6", "--flush-every", "4",
               "--export", str(out), "--inc-world", "2", "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    store = ZarrStatsStore.open(tmp_path / "stats" / "run.zarr")
    commits = store.commits()
    assert sorted(commits) == [0, 1]
    assert all(sorted(c.batch_ids) == list(range(6)) for c in commits.values())
    reduced = store.read_reduced()
    assert reduced.modules["model.layers.0.self_attn.q_proj"].num_samples == 6
    # The exported FP8 weights dequantize to within FP8 rounding of the original weights.
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(model_dir / "model.safetensors"), "pt") as src:
        names = [k[: -len(".weight_scale")] for k in f.keys() if k.endswith(".weight_scale")]
        weight_bytes = 0
        assert len(names) == 14  # 2 layers x 7 projections; the tied lm_head stays high precision
        for name in names:
            q = f.get_tensor(f"{name}.weight")
            assert q.dtype == torch.float8_e4m3fn
            s = f.get_tensor(f"{name}.weight_scale").reshape(-1)[0]
            tied = name == "lm_head" and "lm_head.weight" not in src.keys()
            w = src.get_tensor("model.embed_tokens.weight" if tied else f"{name}.weight")
            err = (q.float() * s - w).abs()
            assert bool((err <= _fp8_bound(w, s)).all()), name
            weight_bytes += w.numel() * (w.element_size() + 1)  # read in hp, written as FP8
    # What the shards report: both tp ranks all-reduced inside their forwards, and together they
    # quantized exactly the selected weights' bytes.
    shards = summary["shards"]
    assert len(shards) == 2 and all(t["forward_s"] > t["all_reduce_s"] > 0 for t in shards)
    assert 0 < summary["profile"]["all_reduce_share_of_measure"] < 1
    assert sum(t["quantize_bytes"] for t in shards) == weight_bytes
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    inc = out / "inc"
    assert (inc / "run_hooks_maxabs_0_2.json").is_file() and (inc / "run_hooks_maxabs_1_2.json").is_file()
    scales = json.loads((inc / "run_hooks_maxabs_MAXABS_POW2.json").read_text())
    assert scales["Mode"] == "Scale" and "model.layers.1.mlp.down_proj" in scales["Nodes"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"scale_method": "uint_scale"}, "unit_scale"), ({"observr": "maxabs"}, "observer")],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, model_dir: Path, extra: dict[str, object], match: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, **extra)
    rc = main(["measure", "--config", str(cfg), "--model", str(model_dir), "--data", str(DATA), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().out.strip()
    assert match in err and err.startswith("fp8-calibrate measure:")
    assert not (tmp_path / "stats").exists()  # nothing measured, nothing created


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("measure", "quantize", "run", "smooth"))


def test_smooth_writes_the_checkpoint_or_says_why_not_in_one_line(tmp_path: Path, model_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import orchestrator
    from transformers import AutoModelForCausalLM

    model = orchestrator.prepare(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                 {"mode": "MEASURE", "observer": "maxabs_per_channel", "allowlist": {"types": ["Linear"]},
                                  "dump_stats_path": str(tmp_path / "pc")})
    with torch.no_grad():
        model(input_ids=torch.arange(32).reshape(2, 16), use_cache=False)
    orchestrator.finalize_calibration(model)
    args = ["smooth", "--model", str(model_dir), "--store", str(tmp_path / "pc.zarr"), "--alpha", "0.45", "--json"]
    assert main([*args, "--out", str(tmp_path / "smoothed")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["alpha"] == 0.45 and summary["groups"] == 3 * model.config.num_hidden_layers
    assert (tmp_path / "smoothed" / "smoothing.json").is_file()
    assert main([*args, "--out", str(tmp_path / "smoothed")]) == 2  # the folder exists now
    err = capsys.readouterr().out
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(["smooth", "--model", str(model_dir), "--store", str(tmp_path / "nope.zarr"),
                 "--out", str(tmp_path / "other")]) == 2
    assert "nope.zarr" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "expected"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("64kib", 64 * 1024), ("1e9", 10**9),
    ("4096", 4096), ("1.5 GB", 1_500_000_000), ("12B", 12),
])
def test_max_shard_size_reads_the_units_transformers_users_write(text: str, expected: int) -> None:
    from orchestrator.entry.fp8_calibrate import _parser

    args = _parser().parse_args(["run", "--config", "c.json", "--model", "m", "--data", "d.txt", "--export", "out",
                                 "--max-shard-size", text])
    assert args.max_shard_size == expected


@pytest.mark.parametrize("text", ["five", "GB", "0", "0GB", "nan", "0.5B"])
def test_a_max_shard_size_that_is_not_a_size_is_one_usage_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.entry.fp8_calibrate import _parser

    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["run", "--config", "c.json", "--model", "m", "--data", "d.txt", "--max-shard-size", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-shard-size" in err and repr(text) in err, err


@pytest.mark.parametrize("command", ["measure", "run"])
def test_placement_timeout_reaches_the_calibration(command: str) -> None:
    from orchestrator.entry.fp8_calibrate import _parser

    base = [command, "--config", "c.json", "--model", "m", "--data", "d.txt"]
    assert _parser().parse_args(base).placement_timeout is None  # Calibration then uses its start timeout
    assert _parser().parse_args([*base, "--placement-timeout", "42.5"]).placement_timeout == 42.5


@pytest.mark.parametrize("text", ["0", "-3", "soon", "nan"])
def test_a_placement_timeout_that_is_not_positive_seconds_is_one_usage_error(text: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.entry.fp8_calibrate import _parser

    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["run", "--config", "c.json", "--model", "m", "--data", "d.txt",
                              f"--placement-timeout={text}"])
    assert e.value.code == 2
    assert "--placement-timeout" in capsys.readouterr().err
