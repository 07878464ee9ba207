"""INC's own Gaudi2 scale files are reproduced from the imported measurements (issue 9.3).

Corpus: ``../shared/oracle/inc_gold/deepseek-r1-distill-llama-70b-g2/``, written by INC on real
Gaudi2 cards (``maxabs_hw``, tp=2 and tp=4). For each rank, importing its measurement file and
computing ``maxabs_hw`` scales for GAUDI2 (full scale 240, activation backoff 0.25, powers of 16
in [2^-8, 16]) must give **every input scale** of INC's scale file for that rank, exactly.

Compared: ``inputs`` only. Per file that is 1,441 values: 1,361 from input measurements
(linear 1, matmul 2, kv cache 1, fused SDPA q/k/v 3) plus 80 fused-SDPA softmax-amax scales,
which INC also lists as inputs but derives from ``outputs[1]``.

Not compared, because these files predate INC 3.5 (reference §2.10):

- ``outputs``: INC < 3.5 computed Linear output scales from the *measured outputs*; today's rule
  (and ours) is s_w · s_in, so they differ by design.
- ``params.weight``: INC computes weight scales from the weights at convert time; the weight
  max-abs stored in the measurement is not always what the weights gave then (a few modules per
  file disagree), and the weights themselves are not in the corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.fp8.module_scales import module_scales
from shards.fp8.numerics import ScaleDevice
from shards.model.op_types import get_op_type
from shards.fp8.methods import PREDEFINED
from shards.fp8.scale_math import ScaleContext
from stats_store.inc_read import read_measurement_json
from stats_store.inc_names import inc_file_name

GOLD = "inc_gold/deepseek-r1-distill-llama-70b-g2"
RANKS = [(0, 2), (1, 2), (0, 4), (1, 4), (2, 4), (3, 4)]
CTX = ScaleContext(device=ScaleDevice.GAUDI2)  # E4M3, hp bf16, as on the Gaudi2 cards
# Scales per file that come from input measurements, and from fused SDPA's outputs[1].
FROM_INPUTS, FROM_SDPA_AMAX = 1361, 80


@pytest.mark.parametrize(("rank", "world"), RANKS, ids=[f"inc_output_hooks_maxabs_MAXABS_HW_{r}_{w}.json" for r, w in RANKS])
def test_input_scales_equal_incs_gaudi2_scale_file(oracle_dir: Path, rank: int, world: int) -> None:
    folder = oracle_dir / GOLD
    measurement = read_measurement_json(inc_file_name(folder / "inc_output", "maxabs", None, rank, world))
    gold_path = inc_file_name(folder / "inc_output", "maxabs", "MAXABS_HW", rank, world)
    gold = json.loads(gold_path.read_text())["Nodes"]
    assert list(measurement.modules) == list(gold)

    method = PREDEFINED["MAXABS_HW"]
    compared = from_inputs = 0
    mismatches = []
    for name, stats in measurement.modules.items():
        scales = module_scales(get_op_type(stats.op_type), method, CTX, stats)
        got = scales.to_inc_node()["inputs"]
        expected = gold[name]["inputs"]
        if got != expected:
            mismatches.append(f"{name} ({stats.op_type}): ours {got}, INC {expected}")
        compared += len(expected)
        from_inputs += min(len(expected), len(stats.inputs))
    assert not mismatches, f"{len(mismatches)} modules differ from {gold_path.name}:\n" + "\n".join(mismatches[:10])
    assert (from_inputs, compared - from_inputs) == (FROM_INPUTS, FROM_SDPA_AMAX)
