"""Every real INC config in ../shared/oracle/configs/ loads unchanged, except the ones expect.json
says must be refused, which must raise a ValueError naming the key it lists.

One test per file (the id is the file name), so a failure names the file. The corpus is read in
place and never copied; without it the tests skip with the reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from orchestrator.configuration.fp8_config import Fp8Config
from shards.fp8.numerics import ScaleDevice
from shards.plan import Mode
from tests.conftest import ORACLE_DIR

CONFIG_DIR = ORACLE_DIR / "configs"
EXPECT_FILE = "expect.json"


def _corpus_files() -> list[str]:
    if not CONFIG_DIR.is_dir():
        return ["<corpus absent>"]  # one test that skips through the oracle_dir fixture
    return sorted(p.name for p in CONFIG_DIR.glob("*.json") if p.name != EXPECT_FILE)


@pytest.fixture(scope="module")
def expectations(oracle_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((oracle_dir / "configs" / EXPECT_FILE).read_text(encoding="utf-8"))
    return data["files"]


def test_corpus_has_the_documented_size(oracle_dir: Path, expectations: dict[str, Any]) -> None:
    assert len(_corpus_files()) == 426
    assert sum(e["expect"] == "reject" for e in expectations.values()) == 18
    assert len(expectations) == 19  # 18 refusals and one that may go either way
    assert set(expectations) <= set(_corpus_files())


@pytest.mark.parametrize("name", _corpus_files(), ids=_corpus_files())
def test_corpus_config(
    name: str,
    oracle_dir: Path,
    expectations: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="orchestrator.configuration.fp8_config")  # foreign-key warnings are expected here
    monkeypatch.chdir(tmp_path)  # relative dump_stats_path values would land here if anything were created
    path = oracle_dir / "configs" / name
    expected = expectations.get(name, {"expect": "accept", "keys": []})
    try:
        cfg = Fp8Config.from_json(path)
    except ValueError as exc:
        assert expected["expect"] in ("reject", "either"), f"{name} must load, got: {exc}"
        keys = expected["keys"]
        assert not keys or any(key in str(exc) for key in keys), f"error should name one of {keys}: {exc}"
        assert "\n" not in str(exc)
    else:
        assert expected["expect"] in ("accept", "either"), f"{name} must be refused ({expected.get('why')})"
        # The normalised form loads back to the same config.
        assert Fp8Config.from_dict(json.loads(cfg.to_json())) == cfg
    assert list(tmp_path.iterdir()) == [], "loading a config must create nothing on disk"


def test_refused_typo_gets_a_hint(oracle_dir: Path, expectations: dict[str, Any]) -> None:
    typo = next(n for n, e in expectations.items() if "uint_scale" in e["why"])
    with pytest.raises(ValueError, match=r"'scale_method'.*uint_scale.*did you mean 'unit_scale'"):
        Fp8Config.from_json(oracle_dir / "configs" / typo)


def test_refused_legacy_dynamic_method_points_to_the_current_one(
    oracle_dir: Path, expectations: dict[str, Any]
) -> None:
    legacy = next(n for n, e in expectations.items() if "MAXABS_POW2_DYNAMIC" in e["why"])
    with pytest.raises(ValueError, match=r"act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw.*dynamic_quantization"):
        Fp8Config.from_json(oracle_dir / "configs" / legacy)


def test_gold_configs_plan_for_gaudi2(oracle_dir: Path) -> None:
    """The configs that produced the Gaudi2 gold scale files give Gaudi2 MAXABS_HW plans."""
    gold = oracle_dir / "inc_gold" / "deepseek-r1-distill-llama-70b-g2"
    if not gold.is_dir():
        pytest.skip(f"gold folder {gold} not found")
    quant = Fp8Config.from_json(gold / "maxabs_quant_g2.json")
    plan = quant.to_plan(hpu_device=ScaleDevice.GAUDI2)
    assert plan.scale_plan.name == "MAXABS_HW" and plan.fp8.fullscale == 240.0
    assert Fp8Config.from_json(gold / "maxabs_measure_g2.json").to_plan().mode is Mode.MEASURE

