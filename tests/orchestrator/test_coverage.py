"""The uncovered-module policies on hand-built measurements of routed MoE experts.

Expected values are computed here independently (plain Python max over the sibling experts), so
the tests do not depend on any MoE model code.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from orchestrator.entry.fp8_calibrate import _parser, summary_table
from orchestrator.driver.calibration import RunReport
from orchestrator.configuration.fp8_config import Fp8Config
from orchestrator.driver.global_scales import global_nodes, weight_scales
from orchestrator.driver.coverage import (
    UncoveredModulesError,
    UncoveredPolicy,
    expert_token_counts,
    fill_expert_max,
    resolve_uncovered,
    summary_rows,
    uncovered_modules,
    with_expert_siblings,
)
from shards.measuring.expert_coverage import EXPERT_RE
from stats_store.records import Measurement, ModuleStats
from shards.plan import Mode, RunPlan
from shards.card.calibration import ModuleInfo
from stats_store.zarr_store import ZarrStatsStore, store_path
from stats_store.reshard import SplitRule
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)

LAYER = "model.layers.3.mlp"
PROJS = ("gate_proj", "up_proj", "down_proj")
ATTN = "model.layers.3.self_attn.o_proj"
SOURCE = "/stores/run.zarr"


def _name(expert: int, proj: str, layer: str = LAYER) -> str:
    return f"{layer}.experts.{expert}.{proj}"


def _values(expert: int, proj: str, kind: str, width: int) -> list[float]:
    """Distinct values per expert, projection and tensor, so that every position's max has one winner."""
    rng = np.random.default_rng([expert, PROJS.index(proj), len(kind), width])
    return [float(v) for v in rng.uniform(0.5, 20.0, width).astype(np.float32)]


def _stats(tokens: dict[int, int], width: int = 1, outputs: bool = True) -> Measurement:
    """Experts of LAYER with the given token counts (a count of 0: called on empty inputs only)."""
    m = Measurement()
    for e, n in tokens.items():
        for proj in PROJS:
            name = _name(e, proj)
            m.modules[name] = ModuleStats(
                name, "linear", [np.array(_values(e, proj, "in", width), np.float32)],
                [np.array(_values(e, proj, "out", 1), np.float32)] if outputs else None,
                {"weight": np.array([0.25 * (e + 1)], np.float32)}, num_samples=2, num_tokens=n)
    m.modules[ATTN] = ModuleStats(ATTN, "linear", [np.array([3.0], np.float32)], None, {}, 2, num_tokens=64)
    return m


def _plan(tmp_path, scale_method: str = "maxabs_pow2") -> RunPlan:
    return Fp8Config.load({"mode": "QUANTIZE", "observer": "maxabs", "scale_method": scale_method,
                           "dump_stats_path": str(tmp_path / "run")}).to_plan(Mode.QUANTIZE)


def _inventory(experts: range, extra: tuple[str, ...] = ()) -> dict[str, ModuleInfo]:
    names = [ATTN, *extra, *(_name(e, p) for e in experts for p in PROJS)]
    return {n: ModuleInfo(("Linear",), "linear", "bfloat16", np.array([2.0 ** i, 1.0], np.float32), 2)
            for i, n in enumerate(names)}


def test_policies_are_cli_choices_and_fail_stays_the_default(tmp_path) -> None:
    assert UncoveredPolicy("expert_max") is UncoveredPolicy.EXPERT_MAX
    run = next(a for a in _parser()._actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    uncovered = next(a for a in run._actions if a.dest == "uncovered")
    assert set(uncovered.choices) == {"fail", "warn", "unit_scale", "expert_max"}
    from orchestrator.driver.coverage import parse_policy

    assert parse_policy(None, _plan(tmp_path)) is UncoveredPolicy.FAIL


def test_never_called_and_zero_token_experts_are_uncovered(tmp_path) -> None:
    stats = _stats({0: 12, 1: 0, 2: 40})  # expert 1 was called on empty inputs only; 3 never
    got = uncovered_modules(_plan(tmp_path), _inventory(range(4)), stats)
    assert got == [_name(e, p) for e in (1, 3) for p in PROJS]
    assert expert_token_counts(_inventory(range(4)), stats) == {LAYER: {0: 12, 1: 0, 2: 40, 3: 0}}


@pytest.mark.parametrize("width", [1, 5], ids=["per-tensor", "per-channel"])
def test_expert_max_fills_with_the_elementwise_max_over_the_layers_other_experts(tmp_path, width: int,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    tokens = {0: 12, 1: 0, 2: 40, 4: 7}  # 1: empty calls, 3 and 5: never called
    stats = _stats(tokens, width)
    plan = _plan(tmp_path)
    uncovered = uncovered_modules(plan, _inventory(range(6)), stats)
    with caplog.at_level(logging.WARNING, logger="orchestrator.driver.coverage"):
        res = resolve_uncovered(plan, uncovered, UncoveredPolicy.EXPERT_MAX, SOURCE, stats)
    idle = [_name(e, p) for e in (1, 3, 5) for p in PROJS]
    assert res.filled == idle and res.plan is plan
    busy = [e for e, n in tokens.items() if n > 0]
    for name in idle:
        proj = name.rsplit(".", 1)[1]
        s = res.stats.modules[name]  # type: ignore[union-attr]
        want_in = [max(_values(e, proj, "in", width)[i] for e in busy) for i in range(width)]
        want_out = [max(_values(e, proj, "out", 1)[0] for e in busy)]
        assert s.inputs[0].tolist() == want_in and s.outputs[0].tolist() == want_out, name  # type: ignore[index]
        assert s.params == {} and s.num_tokens == 0  # the weight scale comes from its own weight
    for e in busy:  # measured experts are left as they were
        assert res.stats.modules[_name(e, "up_proj")] is stats.modules[_name(e, "up_proj")]  # type: ignore[union-attr]
    assert stats.modules[_name(1, "up_proj")].num_tokens == 0  # the input measurement is not changed
    announced = " ".join(r.getMessage() for r in caplog.records)
    assert "experts 1, 3, 5 of layer model.layers.3.mlp saw no token" in announced and "expert_max" in announced
    assert all(n in announced for n in idle)


def test_filled_experts_get_the_scales_of_their_layers_max_never_nan_zero_or_one(tmp_path) -> None:
    stats = _stats({0: 12, 2: 40})
    plan = _plan(tmp_path)
    modules = _inventory(range(3))
    res = resolve_uncovered(plan, uncovered_modules(plan, modules, stats), UncoveredPolicy.EXPERT_MAX, SOURCE, stats)
    w = weight_scales(res.plan, modules, {})
    nodes = global_nodes(res.plan, modules, res.stats, w)
    for proj in PROJS:
        filled = nodes[_name(1, proj)]
        by_hand = Measurement(modules={_name(1, proj): ModuleStats(
            _name(1, proj), "linear", [np.array([max(_values(e, proj, "in", 1)[0] for e in (0, 2))], np.float32)],
            [np.array([max(_values(e, proj, "out", 1)[0] for e in (0, 2))], np.float32)])})
        want = global_nodes(plan, {_name(1, proj): modules[_name(1, proj)]}, by_hand, w)[_name(1, proj)]
        assert filled == want
        scale = filled["inputs"][0]
        assert math.isfinite(scale) and scale not in (0.0, 1.0)
        # Its own weight scale: from its own weight max-abs, not a sibling's.
        assert filled["params"]["weight"] == float(w[_name(1, proj)]) != float(w[_name(0, proj)])


def test_fail_names_the_expert_and_its_layer_and_suggests_expert_max(tmp_path) -> None:
    stats = _stats({0: 12, 1: 3})
    plan = _plan(tmp_path)
    uncovered = uncovered_modules(plan, _inventory(range(3)), stats)
    with pytest.raises(UncoveredModulesError, match=r"3 selected module\(s\) saw no calibration data in "
                                                    r"/stores/run\.zarr: expert 2 of layer model\.layers\.3\.mlp "
                                                    r"saw no token;.*--uncovered expert_max"):
        resolve_uncovered(plan, uncovered, UncoveredPolicy.FAIL, SOURCE, stats)


def test_expert_max_falls_back_to_fail_for_plain_modules_and_layers_no_expert_saw(tmp_path) -> None:
    stats = _stats({0: 12})
    plan = _plan(tmp_path)
    # A plain module that was never reached.
    missing = "model.layers.3.mlp.shared_experts.gate_proj"  # shared experts are not routed experts
    uncovered = uncovered_modules(plan, _inventory(range(2), (missing,)), stats)
    assert missing in uncovered
    with pytest.raises(UncoveredModulesError, match=rf"cannot fill 1 of 4 .*{missing} \(not routed experts\)"):
        resolve_uncovered(plan, uncovered, UncoveredPolicy.EXPERT_MAX, SOURCE, stats)
    # A layer where no expert saw a token (one expert called on empty inputs, the other never).
    other = "model.layers.7.mlp"
    none_seen = Measurement(modules={**stats.modules, _name(0, "w1", other): ModuleStats(
        _name(0, "w1", other), "linear", [np.array([np.nan], np.float32)], None, {}, 1, num_tokens=0)})
    names = [_name(0, "w1", other), _name(1, "w1", other)]
    with pytest.raises(UncoveredModulesError, match=r"experts 0, 1 of layer model\.layers\.7\.mlp saw no token, "
                                                    r"nor did any other expert of that layer"):
        resolve_uncovered(plan, names, UncoveredPolicy.EXPERT_MAX, SOURCE, none_seen)


@pytest.mark.parametrize("policy", [UncoveredPolicy.WARN, UncoveredPolicy.UNIT_SCALE])
def test_other_policies_drop_zero_token_experts_from_the_statistics(tmp_path, policy: UncoveredPolicy,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    stats = _stats({0: 12, 1: 0})
    plan = _plan(tmp_path)
    uncovered = uncovered_modules(plan, _inventory(range(2)), stats)
    with caplog.at_level(logging.WARNING, logger="orchestrator.driver.coverage"):
        res = resolve_uncovered(plan, uncovered, policy, SOURCE, stats)
    assert res.filled == [] and not set(uncovered) & set(res.stats.modules)  # type: ignore[union-attr]
    assert _name(0, "up_proj") in res.stats.modules  # type: ignore[union-attr]
    if policy is UncoveredPolicy.UNIT_SCALE:
        assert "scale 1.0 (unit_scale; not calibrated)" in caplog.text
    else:
        assert res.plan.ignore_modules_wo_measures


def test_fill_expert_max_refuses_siblings_of_different_shapes() -> None:
    stats = _stats({0: 12, 2: 5})
    stats.modules[_name(2, "up_proj")].inputs[0] = np.ones(3, np.float32)
    out, filled, failed = fill_expert_max(stats, [_name(1, "up_proj"), _name(1, "gate_proj")])
    assert filled == [_name(1, "gate_proj")] and "different shapes" in failed[_name(1, "up_proj")]
    assert _name(1, "up_proj") not in out.modules


def test_a_filled_expert_is_cut_for_tp_like_its_siblings() -> None:
    rule = SplitRule()
    lookup = with_expert_siblings({(_name(0, "down_proj"), "inputs.0"): rule})
    assert lookup(_name(5, "down_proj"), "inputs.0") is rule
    assert lookup(_name(5, "down_proj"), "outputs.0") is None and lookup(_name(5, "up_proj"), "inputs.0") is None
    assert lookup(ATTN, "inputs.0") is None


def test_summary_rows_list_idle_experts_per_layer_and_what_the_policy_did() -> None:
    report = RunReport(expert_tokens={LAYER: {0: 3, 5: 0, 7: 0, 12: 340}, "model.layers.4.mlp": {0: 1, 1: 2}},
                       filled=[_name(5, p) for p in PROJS] + [_name(7, p) for p in PROJS],
                       uncovered=[_name(5, p) for p in PROJS] + [_name(7, p) for p in PROJS],
                       uncovered_policy="expert_max")
    rows = dict(summary_rows(report))
    assert rows["idle experts (per MoE layer)"] == (
        "model.layers.3.mlp: experts 5, 7 (0 tokens); busiest 12 (340 tokens)\n1 other MoE layer(s): no idle expert")
    assert rows["experts given their layer's max (expert_max)"] == "experts 5, 7 of layer model.layers.3.mlp saw no token"
    unit = dict(summary_rows(RunReport(uncovered=[ATTN], uncovered_policy="unit_scale")))
    assert unit == {"CAUTION: quantized with scale 1.0, not calibrated (unit_scale)": ATTN}
    assert summary_rows(RunReport()) == []
    cells = [c for col in summary_table(report).columns for c in col._cells]
    assert "idle experts (per MoE layer)" in cells


def test_the_expert_pattern_is_the_family_registrys() -> None:
    from shards.families.registry import EXPERT_NAME

    assert EXPERT_NAME is EXPERT_RE


def _idle_expert_checkpoint(path: Path) -> Path:
    """A Mixtral whose router never picks experts 2 and 3, saved."""
    from tests.family_models import idle_expert_mixtral

    idle_expert_mixtral().save_pretrained(path)
    return path


@pytest.mark.ray
@pytest.mark.timeout(400)
@pytest.mark.usefixtures("ray_cluster")
def test_driver_records_the_inventory_counts_tokens_and_fills_idle_experts_with_expert_max(tmp_path: Path) -> None:
    from orchestrator.driver.calibration import Calibration
    from orchestrator.driver.data import Batch
    from orchestrator.driver.grid import WorkerResources
    from tests.family_models import VOCAB

    ckpt = _idle_expert_checkpoint(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    batches = [Batch(i, tuple(tuple(int(t) for t in row) for row in rng.integers(0, VOCAB, (2, 16)))) for i in range(3)]
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "allowlist": {"types": ["Linear"]},
           "dump_stats_path": str(tmp_path / "stats" / "run")}
    card = WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})
    layers = ["model.layers.0.mlp", "model.layers.1.mlp"]
    with Calibration(cfg, ckpt, tp=2, progress=False, resources=card) as cal:
        cal.measure(batches)
        for layer in layers:  # every routed token reached expert 0 or 1 (top-1): 3 x 2 x 16 in all
            counts = cal.report.expert_tokens[layer]
            assert counts[2] == counts[3] == 0 and counts[0] > 0 and counts[1] > 0 and counts[0] + counts[1] == 96
        with pytest.raises(UncoveredModulesError, match=r"experts 2, 3 of layer model\.layers\.0\.mlp saw no token;"
                                                        r".*--uncovered expert_max"):
            cal.quantize()
        cal.uncovered = "expert_max"
        scales = cal.quantize()
        fp8 = cal.quantized_state_by_rank()
    idle = [f"{layer}.experts.{e}.{p}" for layer in layers for e in (2, 3) for p in ("w1", "w2", "w3")]
    assert sorted(cal.report.filled) == sorted(idle) and cal.report.uncovered_policy == "expert_max"
    store = ZarrStatsStore.open(store_path(cfg["dump_stats_path"]))
    assert set(idle) <= set(store.selected_modules() or []) and not set(idle) & set(store.module_names())
    for name in idle:
        layer, proj = name.split(".experts.")[0], name.rsplit(".", 1)[1]
        busy = [scales.nodes[f"{layer}.experts.{e}.{proj}"]["inputs"][0] for e in (0, 1)]
        got = scales.nodes[name]["inputs"][0]
        assert got == max(busy) and math.isfinite(got) and got not in (0.0, 1.0), name  # pow2: monotone in max-abs
        assert all(name in rank for rank in fp8), f"{name} was not quantized on every rank"
    rows = dict(summary_rows(cal.report))
    assert rows["idle experts (per MoE layer)"].startswith("model.layers.0.mlp: experts 2, 3 (0 tokens); busiest")


def test_the_single_card_api_records_every_selected_module_called_or_not(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from orchestrator import finalize_calibration, prepare

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(4, 4)}) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            experts = self.mlp.experts
            return experts[0]["w1"](x[:3]) + experts[1]["w1"](x[3:6])  # expert 2: no token

    model = Routed()
    prepare(model, {"observer": "maxabs", "scale_method": "maxabs_pow2", "dump_stats_path": str(tmp_path / "m")})
    model(torch.randn(6, 4))
    model(torch.randn(6, 4))
    m = finalize_calibration(model)
    store = ZarrStatsStore.open(tmp_path / "m")
    assert store.selected_modules() == ["mlp.experts.0.w1", "mlp.experts.1.w1", "mlp.experts.2.w1"]
    assert {n: s.num_tokens for n, s in m.modules.items()} == {"mlp.experts.0.w1": 6, "mlp.experts.1.w1": 6}
    assert expert_token_counts(store.selected_modules() or [], m) == {"mlp": {0: 6, 1: 6, 2: 0}}
