"""The one-card API (prepare → finalize_calibration → convert) with ``dump_stats_path`` on a real
S3-protocol server (moto on 127.0.0.1, ``tests.s3_server``): the same results as a local store,
and the local-file features (INC files beside the store, the ``save`` observer) refused in one
line naming the URL before anything is measured or converted. (Refusing to overwrite a
measurement runs on both stores in ``test_api.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import orchestrator
from orchestrator import api
from shards.quantized.swap import MissingMeasurementError
from stats_store.errors import RunMismatchError, StoreLocationError
from stats_store.zarr_store import ZarrStatsStore
from tests.models import sequential_batches, tiny_sequential
from tests.orchestrator.test_api import calibrate, cfg
from tests.s3_server import S3Server, s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)


def s3_cfg(bucket: str, **extra: object) -> dict[str, object]:
    return {"mode": "AUTO", "scale_method": "maxabs_pow2", "dump_stats_path": f"s3://{bucket}/out/measure", **extra}


def test_measure_on_s3_then_convert_a_fresh_model_from_it(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    batches = sequential_batches(1, 2)
    local = orchestrator.quantize(tiny_sequential(), cfg(tmp_path), batches)
    calibrate(tiny_sequential(), s3_cfg(s3_bucket), batches)
    fresh = orchestrator.convert(tiny_sequential(), s3_cfg(s3_bucket))  # from the s3 store alone
    assert orchestrator.scales_of(fresh) == orchestrator.scales_of(local)
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), local(x))
    assert ZarrStatsStore.open(f"s3://{s3_bucket}/out/measure").selected_modules() == ["0", "2", "4"]
    assert all(k.startswith("out/measure.zarr/") for k in s3_env.keys(s3_bucket))


def test_no_store_on_s3_names_the_url(s3_bucket: str) -> None:
    with pytest.raises(MissingMeasurementError, match=rf"stats store 's3://{s3_bucket}/out/measure.zarr' \(none there\)"):
        orchestrator.convert(tiny_sequential(), s3_cfg(s3_bucket))


def test_a_store_of_another_model_on_s3_is_refused(s3_bucket: str) -> None:
    calibrate(tiny_sequential(0), s3_cfg(s3_bucket), sequential_batches(7, 1))
    model = tiny_sequential(1)
    with pytest.raises(RunMismatchError, match=f"s3://{s3_bucket}/out/measure.zarr holds statistics of another model"):
        orchestrator.convert(model, s3_cfg(s3_bucket))
    assert type(model[0]) is nn.Linear


def test_local_file_features_are_refused_before_anything_changes(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/out/measure"
    model = orchestrator.prepare(tiny_sequential(), s3_cfg(s3_bucket))
    with torch.no_grad():
        model(torch.randn(2, 32))
    with pytest.raises(StoreLocationError, match=f"dump_stats_path {url} is on object storage, but inc_files=True "
                                                 f"writes INC's measurement files .*`stats-store export-inc {url}.zarr"):
        orchestrator.finalize_calibration(model, inc_files=True)
    assert model in api._CALIBRATING  # still being measured: nothing lost
    orchestrator.finalize_calibration(model)
    fresh = tiny_sequential()
    with pytest.raises(StoreLocationError, match="inc_scale_file=True writes INC's scale file"):
        orchestrator.convert(fresh, s3_cfg(s3_bucket), inc_scale_file=True)
    assert type(fresh[0]) is nn.Linear
    saving = tiny_sequential()
    with pytest.raises(StoreLocationError, match="observer 'save' writes every observed tensor to local files"):
        orchestrator.prepare(saving, s3_cfg(s3_bucket, observer="save", mode="MEASURE",
                                            dump_stats_path=f"s3://{s3_bucket}/tensors/measure"))
    assert saving not in api._CALIBRATING and not saving._forward_pre_hooks


def test_the_object_storage_cluster_config_is_the_gaudi2_one_plus_the_aws_setup() -> None:
    configs = Path(__file__).resolve().parents[2] / "cluster_configs"
    s3, plain = (yaml.safe_load((configs / f"{n}.yaml").read_text()) for n in ("gaudi2-8card-s3", "gaudi2-8card"))
    differs = {k for k in s3.keys() | plain.keys() if s3.get(k) != plain.get(k)}
    assert differs == {"cluster_name", "setup_commands"}
    assert "endpoint_url = https://" in s3["setup_commands"][0] and "s3fs" in s3["setup_commands"][-1]
    assert "secret" not in yaml.safe_dump(s3).lower()  # keys never travel in the cluster config
