"""MoE on a real local Ray cluster: tp=2 gives exactly tp=1's per-expert FP8 weights and scales."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator import quantize, scales_of
from orchestrator.driver.calibration import Calibration
from orchestrator.driver.data import Batch
from shards.families.registry import EXPERT_NAME
from orchestrator.driver.grid import WorkerResources
from tests.family_models import VOCAB, tiny_model
from tests.shards.tp_fixtures import concat_shards
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(400)]

SIM_CARD = WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})


def _batches(n: int = 4, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [Batch(i, tuple(tuple(int(t) for t in row) for row in rng.integers(0, VOCAB, (2, 16)))) for i in range(n)]


def _ckpt(tmp: Path, fam: str) -> Path:
    path = tmp / fam
    if not (path / "config.json").is_file():
        tiny_model(fam).save_pretrained(path)
    return path


def _run(ckpt: Path, tmp: Path, method: str, tp: int) -> dict[str, Any]:
    cfg = {"observer": "maxabs", "scale_method": method, "device_for_scales": "GAUDI2",
           "allowlist": {"types": ["Linear"]}, "dump_stats_path": str(tmp / f"tp{tp}" / "stats")}
    with Calibration(cfg, ckpt, tp=tp, progress=False, flush_every=2, resources=SIM_CARD,
                     uncovered="warn") as cal:
        stats = cal.measure(_batches())
        scales = cal.quantize()
        return {"stats": stats, "scales": scales, "fp8": cal.quantized_state_by_rank()}


@pytest.mark.parametrize("fam, method", [("mixtral", "maxabs_pow2"), ("deepseek_v3", "maxabs_hw"),
                                         ("qwen3_moe", "act_maxabs_pow2_weights_pcs_opt_pow2")])
def test_moe_tp2_gives_exactly_the_tp1_fp8_weights_and_scales(tmp_path_factory: pytest.TempPathFactory,
                                                              fam: str, method: str) -> None:
    ckpt = _ckpt(tmp_path_factory.getbasetemp(), fam)
    tmp = tmp_path_factory.mktemp(f"{fam}_{method}")
    one, two = _run(ckpt, tmp, method, tp=1), _run(ckpt, tmp, method, tp=2)
    experts = [n for n in one["stats"].modules if EXPERT_NAME.match(n)]
    assert len(experts) >= 3 * 4, "experts were not measured one by one"
    for name in experts:  # every rank saw every routed token of every expert
        for label, v in one["stats"].modules[name].tensors().items():
            # Equal up to the all-reduce's summation order in earlier layers (a few fp32 ulps).
            np.testing.assert_allclose(v, two["stats"].modules[name].tensors()[label], rtol=1e-5,
                                       err_msg=f"{name} {label}")
    assert one["scales"].nodes == two["scales"].nodes
    for name, s in one["scales"].weight_scales.items():
        assert torch.equal(s, two["scales"].weight_scales[name]), name
    (fp8_one,) = one["fp8"]
    assert [n for n in fp8_one if EXPERT_NAME.match(n)] == experts
    for name, state in fp8_one.items():
        cat = concat_shards(name, [r[name]["codes"] for r in two["fp8"]])
        assert torch.equal(cat, state["codes"]), f"{name}: FP8 weights differ between tp=1 and tp=2"


def test_moe_tp2_equals_the_single_card_api(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, "qwen3_moe")
    two = _run(ckpt, tmp_path, "maxabs_pow2", tp=2)
    model = tiny_model("qwen3_moe")
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "device_for_scales": "GAUDI2",
           "allowlist": {"types": ["Linear"]}, "ignore_modules_wo_measures": True,
           "dump_stats_path": str(tmp_path / "single" / "stats")}
    quantize(model, cfg, [{"input_ids": torch.tensor(b.tokens), "use_cache": False} for b in _batches()])
    single = scales_of(model)
    assert single.keys() == two["scales"].nodes.keys()
    assert single == two["scales"].nodes
