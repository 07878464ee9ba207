"""The streamed export of a sharded run (``Calibration.export``) on a real local Ray cluster: the same
tensors (names, dtypes, bytes) and config as the in-memory export of the same shards' full states,
in one file or in shards of a bounded size with the standard index; a sharded export loads in
transformers + compressed-tensors exactly as the single file does; and what the export holds at once
stays within two of the largest tensors, whatever the depth of the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.export.compressed_tensors import checkpoint_layout, write_compressed_tensors
from orchestrator.export.gather import gather_checkpoint
from orchestrator.export.safetensors_files import INDEX_FILE, SINGLE_FILE
from shards.card.calibration import ExportPartError
from shards.plan import Mode
from tests.family_models import tiny_model
from tests.orchestrator.test_export import read_all
from tests.orchestrator.test_export_files import read_file, same_tensor
from tests.orchestrator.test_real_client import PROBE, _ray_batches, load_client, logits
from tests.ray_fixtures import ray_cluster  # noqa: F401  (session fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SHARD_BYTES = 6_000  # several files for every tiny model here


def calibrated_exports(tmp: Path, fam: str, tp: int, layers: int, types: tuple[str, ...]) -> dict[str, Any]:
    """Export one tiny checkpoint's calibration streamed (one file, and shards of SHARD_BYTES), and
    the in-memory checkpoint gathered from the same shards' full states."""
    from orchestrator.driver.calibration import Calibration
    from orchestrator.driver.grid import WorkerResources
    from orchestrator.driver.measure_loop import get_all

    src = tmp / "src"
    tiny_model(fam, num_hidden_layers=layers).save_pretrained(src)
    cfg = {"observer": "maxabs", "scale_method": "maxabs_pow2", "hp_dtype": "FP32", "allowlist": {"types": list(types)},
           "blocklist": {"names": [r"layers\.0\.self_attn\.o_proj"]}, "dump_stats_path": str(tmp / "stats")}
    with Calibration(cfg, src, tp=tp, progress=False,
                     resources=WorkerResources(num_cpus=0.25, resources={"HPU": 1.0})) as cal:
        cal.measure(_ray_batches())
        scales = cal.quantize()
        single = cal.export(tmp / "single")
        summary = cal.exported
        sharded = cal.export(tmp / "sharded", max_shard_bytes=SHARD_BYTES)
        with pytest.raises(ExportPartError, match="no quantized module 'model.norm' with a 'weight' tensor"):
            get_all([a.quantized_part.remote("model.norm", "weight") for a in cal.groups[0]])
        plan = cal.config.to_plan(Mode.QUANTIZE)
        gathered = gather_checkpoint(src, cal.quantized_state_by_rank(), scales.weight_scales, dynamic=plan.dynamic,
                                     scale_method=plan.scale_plan.name, nodes=scales.nodes)
    return {"single": single, "sharded": sharded, "summary": summary, "gathered": gathered}


@pytest.mark.parametrize("fam, tp, layers, types", [
    ("llama", 1, 2, ("Linear", "KVCache")), ("llama", 2, 2, ("Linear", "KVCache")), ("llama", 2, 5, ("Linear",)),
    ("mixtral", 1, 2, ("Linear",)), ("qwen3_moe", 2, 2, ("Linear",)),
])
def test_streamed_export_is_the_in_memory_export(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None,  # noqa: F811
                                                 fam: str, tp: int, layers: int, types: tuple[str, ...]) -> None:
    tmp = tmp_path_factory.mktemp(f"streamed_{fam}_tp{tp}_{layers}")
    runs = calibrated_exports(tmp, fam, tp, layers, types)
    single, sharded, summary, gathered = runs["single"], runs["sharded"], runs["summary"], runs["gathered"]
    # The in-memory export of the gathered states, as it was written before export streamed.
    reference = {k: t.contiguous() for k, t in checkpoint_layout(gathered).items()}
    memory_out = write_compressed_tensors(gathered, tmp / "memory")

    # One file: the same tensors, dtypes and bytes, the same config, the same serving files.
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in memory_out.iterdir())
    assert (single / "config.json").read_bytes() == (memory_out / "config.json").read_bytes()
    header, tensors, metadata = read_file(single / SINGLE_FILE)
    assert header == read_file(memory_out / SINGLE_FILE)[0]
    assert metadata == read_file(memory_out / SINGLE_FILE)[2] == {"format": "pt", "fp8_orchestrator.scale_method": "MAXABS_POW2"}
    assert tensors.keys() == reference.keys()
    assert all(same_tensor(tensors[k], reference[k]) for k in reference), [k for k in reference
                                                                            if not same_tensor(tensors[k], reference[k])]

    # Shards: standard names and index, each file within the limit (or one tensor), same tensors.
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and not (sharded / SINGLE_FILE).exists()
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    assert set(index["weight_map"].values()) == set(files) and index["weight_map"].keys() == reference.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    for f in files:
        part = read_file(sharded / f)[1]
        assert all(index["weight_map"][k] == f for k in part)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= SHARD_BYTES
    sharded_tensors = read_all(sharded)
    assert all(same_tensor(sharded_tensors[k], reference[k]) for k in reference)
    assert (sharded / "config.json").read_bytes() == (single / "config.json").read_bytes()

    # What the export held at once: two of the largest tensors (tp slices and their join), never the model.
    assert summary.tensors == len(reference) and summary.total_bytes == index["metadata"]["total_size"]
    assert summary.largest_tensor_bytes == max(t.numel() * t.element_size() for t in reference.values())
    assert summary.largest_tensor_bytes <= summary.peak_held_bytes <= 2 * summary.largest_tensor_bytes

    # transformers + compressed-tensors load the shards as they load the single file.
    one, one_info = load_client(single)
    many, many_info = load_client(sharded)
    assert not many_info["missing_keys"] and not many_info["mismatched_keys"] and not many_info["error_msgs"]
    assert set(many_info["unexpected_keys"]) == set(one_info["unexpected_keys"])
    assert torch.equal(logits(many, PROBE), logits(one, PROBE))
