"""The distributed calibration on a real local Ray cluster.

Invariants of decisions §4: a tp=2 run yields exactly tp=1's FP8 weights and scales (sliced), and
dp=2 yields dp=1's statistics on the same batches. Cards are simulated: CPU shards that each hold
one logical ``HPU`` resource.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator import quantize, scales_of
from orchestrator.driver.calibration import Calibration
from orchestrator.driver.data import Batch
from shards.tp.rules import Parallel, rule_for
from orchestrator.driver.grid import WorkerResources
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)
from tests.shards.tp_fixtures import concat_shards, make_tiny_llama, reference_model

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(300)]

SIM_CARD = WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib_llama")
    make_tiny_llama(path)
    return path


def _batches(n: int = 6, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [Batch(i, tuple(tuple(int(t) for t in row) for row in rng.integers(0, 256, (2, 16)))) for i in range(n)]


def _run(ckpt: Path, tmp: Path, method: str, tp: int, dp: int = 1) -> dict[str, Any]:
    cfg = {"observer": "maxabs", "scale_method": method, "device_for_scales": "GAUDI2",
           "dump_stats_path": str(tmp / f"tp{tp}dp{dp}" / "stats")}
    with Calibration(cfg, ckpt, tp=tp, dp=dp, progress=False, flush_every=2, resources=SIM_CARD) as cal:
        stats = cal.measure(_batches())
        scales = cal.quantize()
        return {"stats": stats, "scales": scales, "fp8": cal.quantized_state_by_rank(),
                "local_nodes": cal.scales_by_rank(), "report": cal.report}


@pytest.mark.parametrize("method", ["maxabs_hw_opt_weight", "act_maxabs_pow2_weights_pcs_opt_pow2"])
def test_tp2_gives_exactly_the_tp1_fp8_weights_and_scales(ckpt: Path, tmp_path: Path, method: str) -> None:
    one, two = _run(ckpt, tmp_path, method, tp=1), _run(ckpt, tmp_path, method, tp=2)
    assert one["scales"].nodes == two["scales"].nodes
    assert one["scales"].weight_scales.keys() == two["scales"].weight_scales.keys()
    for name, s in one["scales"].weight_scales.items():
        assert torch.equal(s, two["scales"].weight_scales[name]), name
    (fp8_one,) = one["fp8"]
    assert len(fp8_one) == 15  # 2 layers x 7 projections + lm_head
    for name, state in fp8_one.items():
        cat = concat_shards(name, [r[name]["codes"] for r in two["fp8"]])
        assert torch.equal(cat, state["codes"]), f"{name}: FP8 weights differ between tp=1 and tp=2"
    # Each rank's own scales are its slice of the global ones (column-parallel PCS sliced by rows).
    for name, node in one["scales"].nodes.items():
        w = node["params"].get("weight")
        if isinstance(w, dict) and rule_for(name) is not None and rule_for(name).parallel is Parallel.COLUMN:
            assert sum((r[name]["params"]["weight"]["0"] for r in two["local_nodes"]), []) == w["0"]


def test_dp2_statistics_equal_dp1_and_the_single_card_api(ckpt: Path, tmp_path: Path) -> None:
    dp1 = _run(ckpt, tmp_path, "maxabs_pow2", tp=1, dp=1)
    dp2 = _run(ckpt, tmp_path, "maxabs_pow2", tp=1, dp=2)
    m1, m2 = dp1["stats"], dp2["stats"]
    assert m1.modules.keys() == m2.modules.keys()
    for name, s in m1.modules.items():
        t1, t2 = s.tensors(), m2.modules[name].tensors()
        assert t1.keys() == t2.keys()
        for label in t1:
            np.testing.assert_array_equal(t1[label], t2[label], err_msg=f"{name} {label}")
        assert s.num_samples == m2.modules[name].num_samples == 6, name
    assert dp1["scales"].nodes == dp2["scales"].nodes
    # The same run on one card through the INC-style API gives the same scales.
    model = reference_model(ckpt)
    data = [torch.tensor(b.tokens) for b in _batches()]
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "device_for_scales": "GAUDI2",
           "dump_stats_path": str(tmp_path / "single" / "stats")}
    quantize(model, cfg, [{"input_ids": d, "use_cache": False} for d in data])
    single = scales_of(model)
    assert single.keys() == dp1["scales"].nodes.keys()
    assert single == dp1["scales"].nodes


def test_fp8_dynamic_method_tp2_equals_tp1_and_the_single_card_api(ckpt: Path, tmp_path: Path) -> None:
    """maxabs_pcs_arbitrary (our FP8_DYNAMIC) on Ray: no measurement; tp=2 gives tp=1's FP8 weights
    and per-channel scales, and the logits of the one-card API's model."""
    cfg = {"scale_method": "maxabs_pcs_arbitrary", "dynamic_quantization": True, "hp_dtype": "FP32",
           "allowlist": {"types": ["Linear"]}, "blocklist": {"names": ["lm_head"]}}
    ids = np.asarray([b.tokens[0] for b in _batches(2)])
    runs = {}
    for tp in (1, 2):
        with Calibration({**cfg, "dump_stats_path": str(tmp_path / f"tp{tp}" / "s")}, ckpt, tp=tp, progress=False,
                         resources=SIM_CARD) as cal:
            runs[tp] = (cal.quantize(), cal.quantized_state_by_rank(), cal.forward(ids))
    (one, (fp8_one,), logits_one), (two, fp8_two, logits_two) = runs[1], runs[2]
    assert one.weight_scales.keys() == two.weight_scales.keys() and len(one.weight_scales) == 14
    for name, s in one.weight_scales.items():
        assert s.ndim == 1 and torch.equal(s, two.weight_scales[name]), name
    for name, state in fp8_one.items():
        assert torch.equal(concat_shards(name, [r[name]["codes"] for r in fp8_two]), state["codes"]), name
    model = quantize(reference_model(ckpt), {**cfg, "dump_stats_path": str(tmp_path / "single" / "s")})
    with torch.no_grad():
        single = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(logits_one, single, rtol=0, atol=1e-5 * np.abs(single).max())
    np.testing.assert_allclose(logits_two, single, rtol=1e-4, atol=1e-4 * np.abs(single).max())
