"""INC measurement files of vLLM-Gaudi MoE models under our per-expert module names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shards.families import family_for
from shards.families.inc_names import family_view
from stats_store.records import Measurement, ModuleStats
from stats_store.inc_unify import discover_measurement_files, read_measurement_set
from tests.family_models import tiny_config

ORACLE = Path(__file__).resolve().parents[2].parent / "shared" / "oracle" / "inc_stats"


def _moe_measurement(layer: str, experts: int) -> Measurement:
    op = ModuleStats(f"{layer}.experts.moe_op", "dynamic_moe", inputs=[np.array([7.0], np.float32)],
                     outputs=[np.array([1.0], np.float32)] + [np.array([10.0 + e], np.float32) for e in range(experts)],
                     num_samples=3)
    return Measurement(modules={op.name: op})


def test_each_expert_reads_the_layer_input_and_its_own_intermediate() -> None:
    family = family_for(tiny_config("mixtral"))
    view = family_view(_moe_measurement("model.layers.1.block_sparse_moe", 4), family)
    for e in range(4):
        for proj in ("w1", "w3"):
            assert view.modules[f"model.layers.1.mlp.experts.{e}.{proj}"].inputs[0].tolist() == [7.0]
        assert view.modules[f"model.layers.1.mlp.experts.{e}.w2"].inputs[0].tolist() == [10.0 + e]
    assert "model.layers.1.block_sparse_moe.experts.moe_op" in view.modules  # the INC names stay


def test_deepseek_mla_kv_b_proj_is_renamed() -> None:
    st = ModuleStats("model.layers.3.self_attn.mla_attn.impl.kv_b_proj", "linear", inputs=[np.array([2.0], np.float32)])
    view = family_view(Measurement(modules={st.name: st}), family_for(tiny_config("deepseek_v3")))
    assert view.modules["model.layers.3.self_attn.kv_b_proj"].inputs[0].tolist() == [2.0]


@pytest.mark.skipif(not ORACLE.is_dir(), reason=f"INC corpus not found at {ORACLE}")
def test_real_mixtral_files_cover_every_expert_of_every_layer() -> None:
    files = discover_measurement_files(next(ORACLE.glob("*mixtral*_0_2.json")))
    docs = [json.loads(f.read_text())["Nodes"] for f in files]
    view = family_view(read_measurement_set(files), family_for(tiny_config("mixtral")))
    for layer in range(32):
        op = f"model.layers.{layer}.block_sparse_moe.experts.moe_op"
        hidden = max(d[op]["inputs"][0][0][0] for d in docs)
        mids = [d[op]["outputs"][1 + k][0][0] for d in docs for k in range(4)]  # rank 0: experts 0-3, rank 1: 4-7
        for e in range(8):
            assert view.modules[f"model.layers.{layer}.mlp.experts.{e}.w1"].inputs[0].tolist() == [hidden]
            assert view.modules[f"model.layers.{layer}.mlp.experts.{e}.w2"].inputs[0].tolist() == [mids[e]]
