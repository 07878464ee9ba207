"""The smoothed checkpoint (orchestrator.export.smoothed) written from a maxabs_per_channel store.

Checked against explicit SmoothQuant formulas computed here from the store values and the original
safetensors, against the original model's logits (HF loads both), across stores measured at tp=1
and tp=2 on a Ray cluster, and for the refusals (each one error naming what is wrong).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import orchestrator
from orchestrator.driver.calibration import Calibration
from orchestrator.export.smoothed import PROVENANCE_FILE, SmoothingError, write_smoothed_checkpoint
from stats_store.zarr_store import ZarrStatsStore, store_path
from tests.family_models import tiny_model
from tests.orchestrator.test_calibration import SIM_CARD, _batches
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)
from tests.shards.tp_fixtures import make_tiny_llama, reference_model, sample_ids

ALPHA = 0.5
LAYERS = 2  # tp_fixtures.TINY
WEIGHTS = "model.safetensors"


class Case(NamedTuple):
    ckpt: Path
    store: Path
    out: Path


def _measure(ckpt: Path, prefix: Path, observer: str = "maxabs_per_channel", **select: Any) -> Path:
    """Measure ``ckpt`` on one card with the INC-style API on :func:`_batches`; the store's path."""
    cfg = {"mode": "MEASURE", "observer": observer, "allowlist": {"types": ["Linear"]},
           "dump_stats_path": str(prefix), **select}
    model = orchestrator.prepare(reference_model(ckpt), cfg)
    with torch.no_grad():
        for batch in _batches():
            model(input_ids=torch.tensor(batch.tokens), use_cache=False)
    orchestrator.finalize_calibration(model)
    return store_path(prefix)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "bias"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A tiny Llama (with random biases on every projection for "bias"), its single-card
    maxabs_per_channel store, and its smoothed copy."""
    root = tmp_path_factory.mktemp(f"smooth_{request.param_index}")
    make_tiny_llama(root / "ckpt", bias=request.param)
    store = _measure(root / "ckpt", root / "pc")
    write_smoothed_checkpoint(root / "ckpt", store, root / "out", ALPHA)
    return Case(root / "ckpt", store, root / "out")


def _expected(ckpt: Path, store: Path, alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The SmoothQuant migration written out by hand: (every tensor of the smoothed checkpoint,
    factors per source) from the original safetensors and the store's per-channel input max-abs."""
    orig = load_file(str(ckpt / WEIGHTS))
    stats = ZarrStatsStore.open(store).read_reduced().modules

    def act(name: str) -> np.ndarray:
        return np.asarray(stats[name].inputs[0], dtype=np.float64).reshape(-1)

    def factors(a: np.ndarray, *weights: str) -> torch.Tensor:
        w = np.max([np.abs(orig[k].double().numpy()).max(axis=0) for k in weights], axis=0)
        assert a.shape == w.shape and (a > 0).all() and (w > 0).all()
        return torch.from_numpy(a ** alpha / w ** (1.0 - alpha)).float()

    out, sources = dict(orig), {}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        attn, mlp = tuple(p + f"self_attn.{x}_proj" for x in "qkv"), (p + "mlp.gate_proj", p + "mlp.up_proj")
        for qkv in (p + "self_attn.k_proj", p + "self_attn.v_proj"):  # one input, one statistic
            np.testing.assert_array_equal(act(qkv), act(p + "self_attn.q_proj"), err_msg=qkv)
        s_attn = factors(act(p + "self_attn.q_proj"), *(f"{t}.weight" for t in attn))
        s_mlp = factors(act(p + "mlp.gate_proj"), *(f"{t}.weight" for t in mlp))
        s_down = factors(act(p + "mlp.down_proj"), p + "mlp.down_proj.weight")
        sources |= {p + "input_layernorm": s_attn, p + "post_attention_layernorm": s_mlp, p + "mlp.up_proj": s_down}
        out[p + "input_layernorm.weight"] = orig[p + "input_layernorm.weight"] / s_attn
        out[p + "post_attention_layernorm.weight"] = orig[p + "post_attention_layernorm.weight"] / s_mlp
        for t in attn:
            out[f"{t}.weight"] = orig[f"{t}.weight"] * s_attn[None, :]
        out[p + "mlp.gate_proj.weight"] = orig[p + "mlp.gate_proj.weight"] * s_mlp[None, :]
        out[p + "mlp.up_proj.weight"] = orig[p + "mlp.up_proj.weight"] * s_mlp[None, :] / s_down[:, None]
        if p + "mlp.up_proj.bias" in orig:
            out[p + "mlp.up_proj.bias"] = orig[p + "mlp.up_proj.bias"] / s_down
        out[p + "mlp.down_proj.weight"] = orig[p + "mlp.down_proj.weight"] * s_down[None, :]
    return out, sources


@pytest.mark.parametrize("alpha", [ALPHA, 0.8])  # 0.8: a^alpha / w^(1-alpha) is not symmetric in a and w
def test_tensors_are_the_explicit_smoothquant_migration(case: Case, tmp_path: Path, alpha: float) -> None:
    out = case.out if alpha == ALPHA else write_smoothed_checkpoint(case.ckpt, case.store, tmp_path / "out", alpha).out
    expected, sources = _expected(case.ckpt, case.store, alpha)
    orig, got = load_file(str(case.ckpt / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert got.keys() == expected.keys()
    changed = {k for k in orig if not torch.equal(expected[k], orig[k])}
    assert len(changed) == LAYERS * 8 + (LAYERS if "model.layers.0.mlp.up_proj.bias" in orig else 0)
    for key, want in expected.items():
        assert got[key].dtype == orig[key].dtype and got[key].shape == orig[key].shape, key
        if key in changed:
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=0, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got[key], orig[key]), f"{key} is not smoothed but was changed"
    for s in sources.values():
        assert not torch.allclose(s, torch.ones_like(s))  # the migration does something
    # Config and the other non-weight files are copied byte for byte; the provenance is added.
    source_files = {f.name for f in case.ckpt.iterdir()}
    assert {f.name for f in out.iterdir()} == source_files | {PROVENANCE_FILE}
    assert {"config.json", "generation_config.json"} <= source_files
    for name in source_files - {WEIGHTS}:
        assert (out / name).read_bytes() == (case.ckpt / name).read_bytes(), name
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["alpha"] == alpha
    assert provenance["groups"].keys() == sources.keys()
    for name, s in sources.items():
        assert provenance["groups"][name]["min"] == pytest.approx(float(s.min()), rel=1e-6), name
        assert provenance["groups"][name]["max"] == pytest.approx(float(s.max()), rel=1e-6), name


def test_smoothed_checkpoint_computes_the_original_logits(case: Case) -> None:
    ids = sample_ids(batch=3, seq=16)
    with torch.no_grad():
        want = reference_model(case.ckpt)(input_ids=ids, use_cache=False).logits
        smoothed = AutoModelForCausalLM.from_pretrained(case.out, dtype=torch.float32).eval()
        got = smoothed(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _calibration_store(ckpt: Path, prefix: Path, tp: int) -> Path:
    with Calibration({"observer": "maxabs_per_channel", "dump_stats_path": str(prefix)}, ckpt, tp=tp,
                     progress=False, flush_every=2, resources=SIM_CARD) as cal:
        cal.measure(_batches())
    return store_path(prefix)


# Layer 0's attention reads the embeddings; its o_proj (row-parallel at tp=2) is the first all-reduce.
BEFORE_ALL_REDUCE = tuple(f"model.layers.0.self_attn.{x}_proj" for x in "qkvo")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(300)
def test_tp1_and_tp2_stores_give_the_same_smoothed_checkpoint(case: Case, tmp_path: Path) -> None:
    """tp=1 on Ray gives the single-card store and checkpoint bit for bit. tp=2 sums row-parallel
    partial products (o_proj, down_proj), so every activation after layer 0's o_proj is rounded
    differently (measured: up to 1.5e-6 relative): exact before the first all-reduce, within float
    rounding after it; a channel misplaced by the row-parallel down_proj would differ by O(1)."""
    stores = {tp: _calibration_store(case.ckpt, tmp_path / f"tp{tp}", tp) for tp in (1, 2)}
    reduced = {k: ZarrStatsStore.open(s).read_reduced().modules for k, s in ((0, case.store), *stores.items())}
    assert reduced[0].keys() == reduced[1].keys() == reduced[2].keys()
    for name, stats in reduced[0].items():
        np.testing.assert_array_equal(reduced[1][name].inputs[0], stats.inputs[0], err_msg=f"{name} at tp=1")
        rtol = 0.0 if name in BEFORE_ALL_REDUCE else 1e-5
        np.testing.assert_allclose(reduced[2][name].inputs[0], stats.inputs[0], rtol=rtol, atol=0,
                                   err_msg=f"{name} at tp=2")
    outs = {tp: write_smoothed_checkpoint(case.ckpt, s, tmp_path / f"out{tp}", ALPHA).out for tp, s in stores.items()}
    single, one, two = (load_file(str(out / WEIGHTS)) for out in (case.out, outs[1], outs[2]))
    assert single.keys() == one.keys() == two.keys()
    for key, want in single.items():
        assert torch.equal(one[key], want), f"{key}: smoothed from the tp=1 store differs from the single-card one"
        torch.testing.assert_close(two[key], want, rtol=1e-5, atol=0, msg=lambda m: f"{key} from the tp=2 store: {m}")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a good store and two unusable ones, and a tiny Qwen3-MoE checkpoint."""
    root = tmp_path_factory.mktemp("smooth_refusals")
    make_tiny_llama(root / "llama")
    tiny_model("qwen3_moe").save_pretrained(root / "moe", safe_serialization=True)
    return {"llama": root / "llama", "moe": root / "moe",
            "per_channel": _measure(root / "llama", root / "pc"),
            "maxabs": _measure(root / "llama", root / "tensor", observer="maxabs"),
            "no_down": _measure(root / "llama", root / "no_down", blocklist={"names": ["mlp.down_proj"]})}


@pytest.mark.parametrize(("ckpt", "store", "alpha", "exists", "error", "needles"), [
    pytest.param("llama", "maxabs", ALPHA, False, SmoothingError, ["'maxabs'", "maxabs_per_channel", "{store}"],
                 id="per-tensor-store"),
    pytest.param("llama", "per_channel", ALPHA, True, SmoothingError, ["{out}", "already exists"], id="out-exists"),
    pytest.param("moe", "per_channel", ALPHA, False, SmoothingError, ["Qwen3-MoE"], id="moe-family"),
    pytest.param("llama", "per_channel", 1.5, False, ValueError, ["alpha", "1.5"], id="alpha-out-of-range"),
    pytest.param("llama", "no_down", ALPHA, False, SmoothingError, ["model.layers.0.mlp.down_proj", "{store}"],
                 id="module-not-measured"),
])
def test_refusals_name_what_is_wrong(refusals: dict[str, Path], tmp_path: Path, ckpt: str, store: str, alpha: float,
                                     exists: bool, error: type[Exception], needles: list[str]) -> None:
    out = tmp_path / "smoothed"
    if exists:
        out.mkdir()
    with pytest.raises(error) as info:
        write_smoothed_checkpoint(refusals[ckpt], refusals[store], out, alpha)
    message = str(info.value)
    for needle in needles:
        assert needle.format(out=out, store=refusals[store]) in message, message
    # Nothing is written: no output folder (an existing one is left empty), no temporary folder.
    assert sorted(tmp_path.iterdir()) == ([out] if exists else [])
    assert not exists or not any(out.iterdir())
