"""Observers: exact running max-abs (brute force on numpy), NaN/Inf counting, registry rules, save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shards.errors import DuplicateRegistrationError
from shards.measuring.observers import (
    MaxAbsObserver,
    MaxAbsPerChannelObserver,
    ObserverSpec,
    ObserveTarget,
    SaveObserver,
    UnknownObserverError,
    get_observer,
    known_observers,
    declared_merges,
    merge_values,
    register_observer,
)
from stats_store.errors import UnknownMergeError
from stats_store.metadata import RunMeta
from stats_store.records import Measurement, ModuleStats
from stats_store.reduce import MERGES
from stats_store.shard_map import ShardSpec
from stats_store.zarr_store import ZarrStatsStore


def _batches(seed: int, shape: tuple[int, ...], n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_maxabs_is_the_max_over_all_calls(dtype: torch.dtype) -> None:
    xs = [x.to(dtype) for x in _batches(0, (4, 5, 6))]
    obs = MaxAbsObserver(ObserveTarget("m", "inputs.0"))
    for x in xs:
        obs.update(x)
    expected = max(float(np.abs(x.float().numpy()).max()) for x in xs)
    result = obs.result()
    assert result is not None and result.dtype == np.float32 and result.shape == (1,)
    assert result[0] == np.float32(expected)


@pytest.mark.parametrize("dim", [-1, -2, 0])
def test_per_channel_along_the_declared_axis(dim: int) -> None:
    xs = _batches(1, (3, 4, 5))
    obs = MaxAbsPerChannelObserver(ObserveTarget("m", "inputs.0", channel_dim=dim))
    for x in xs:
        obs.update(x)
    stacked = np.stack([np.abs(x.numpy()) for x in xs])  # [calls, 3, 4, 5]
    axis = dim % 3 + 1
    other = tuple(a for a in range(4) if a != axis)
    np.testing.assert_array_equal(obs.result(), stacked.max(axis=other).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nonfinite_values_are_counted_and_left_out(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0, float("nan"), -3.0], [float("inf"), 2.0, float("-inf")]], dtype=dtype)
    for obs in (MaxAbsObserver(ObserveTarget("m", "i")), MaxAbsPerChannelObserver(ObserveTarget("m", "i", 0))):
        obs.update(x)
        obs.update(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, float("nan")]], dtype=dtype))
        assert obs.nonfinite() == 4
    per_tensor = MaxAbsObserver(ObserveTarget("m", "i"))
    per_tensor.update(x)
    assert per_tensor.result().tolist() == [3.0]
    per_row = MaxAbsPerChannelObserver(ObserveTarget("m", "i", 0))
    per_row.update(x)
    assert per_row.result().tolist() == [3.0, 2.0]


def test_fp8_tensors_are_observed() -> None:
    x = torch.tensor([1.0, -6.0, 2.5]).to(torch.float8_e4m3fn)
    obs = MaxAbsObserver(ObserveTarget("m", "i"))
    obs.update(x)
    assert obs.result().tolist() == [6.0]


def test_state_stays_on_device_in_fp32() -> None:
    """The sync-free path (taken off CPU, and on CPU for tensors with NaN/Inf) keeps fp32 device state;
    finite CPU tensors fold into a host float, and both parts make the result."""
    obs = MaxAbsObserver(ObserveTarget("m", "i"))
    obs.update(torch.tensor([1.0, float("nan"), -2.0], dtype=torch.bfloat16))
    assert obs._state is not None and obs._state.dtype == torch.float32
    obs.update(torch.tensor([3.0, -1.0], dtype=torch.bfloat16))
    assert obs._host == 3.0 and obs.result().tolist() == [3.0]
    obs.update(torch.tensor([-5.0, float("inf")]))
    assert obs.result().tolist() == [5.0] and obs.nonfinite() == 2


@pytest.mark.parametrize("native", ["1", "0"])
def test_siblings_fed_one_tensor_reduce_it_once(monkeypatch: pytest.MonkeyPatch, native: str) -> None:
    """q/k/v observe the same input: the session memo reduces it once, and never matches a tensor
    changed in place or a different reduction kind. With the C kernel, per-tensor observers of CPU
    tensors skip the memo (one kernel pass returning a float costs less than the lookup), and so do
    per-channel ones once their first call has set the state (one pass folding into it)."""
    from shards.fp8 import native_cast
    from shards.measuring import observers

    monkeypatch.setenv(native_cast.ENV_FLAG, native)
    kernel = native_cast.enabled()
    calls: list[int | None] = []
    real = observers._reduce
    monkeypatch.setattr(observers, "_reduce", lambda x, dim: calls.append(dim) or real(x, dim))
    memo = observers.ReductionMemo()
    q, k, v = (MaxAbsObserver(ObserveTarget(n, "inputs.0", memo=memo)) for n in "qkv")
    per_channel = [MaxAbsPerChannelObserver(ObserveTarget(n, "inputs.0", -1, memo=memo)) for n in "gu"]
    x = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    for obs in (q, k, v):
        obs.update(x)
    per_tensor_calls = [] if kernel else [None]
    assert calls == per_tensor_calls and [o.result().tolist() for o in (q, k, v)] == [[4.0]] * 3
    for obs in per_channel:
        obs.update(x)
    assert calls == per_tensor_calls + [-1] and [o.result().tolist() for o in per_channel] == [[2.0, 4.0]] * 2
    x.mul_(2)  # in place: the version counter moves, the memo must not answer
    q.update(x)
    per_channel[0].update(x)  # with the kernel: folded straight into the state set by the first call
    assert calls == per_tensor_calls + [-1] + per_tensor_calls + ([] if kernel else [-1])
    assert q.result().tolist() == [8.0] and k.result().tolist() == [4.0]
    assert per_channel[0].result().tolist() == [4.0, 8.0] and per_channel[1].result().tolist() == [2.0, 4.0]


def test_nothing_observed_gives_none() -> None:
    obs = MaxAbsObserver(ObserveTarget("m", "i"))
    obs.update(torch.empty(0, 3))
    assert obs.result() is None and obs.nonfinite() == 0


def test_registry_declares_merges() -> None:
    assert {"maxabs", "maxabs_per_channel", "save"} <= set(known_observers())
    for name in known_observers():
        assert get_observer(name).merge in MERGES
    a, b = np.array([1.0, 5.0], np.float32), np.array([3.0, 2.0], np.float32)
    assert merge_values("max", a, b).tolist() == [3.0, 5.0]


def test_the_reducer_applies_the_observers_declared_merge(tmp_path: Path) -> None:
    """One vocabulary of merges: an observer declaring ``sum`` gets its values summed over
    data-parallel shards by the store's reducer (a max-abs observer's are maxed)."""
    register_observer(ObserverSpec("test_summing_observer", "sum", MaxAbsObserver))
    for observer, expected in (("maxabs", [3.0, 5.0]), ("test_summing_observer", [4.0, 7.0])):
        store = ZarrStatsStore.open_run(tmp_path / observer, RunMeta("cfg", {"m": 1}, dp=2, tp=1, observer=observer))
        for k, values in enumerate(([1.0, 5.0], [3.0, 2.0])):
            m = Measurement(num_samples=1)
            m.modules["lin"] = ModuleStats("lin", "linear", [np.array(values, np.float32)], None, {}, 1)
            assert declared_merges(observer, m) == {"inputs.0": get_observer(observer).merge}
            store.commit(store.write_shard(ShardSpec(k, 2, 1, {}), m, [k], declared_merges(observer, m)))
        assert store.reduce().modules["lin"].inputs[0].tolist() == expected


def test_an_unknown_merge_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(UnknownMergeError, match="observer 'odd'.*unknown merge 'median'.*max, sum, count"):
        register_observer(ObserverSpec("odd", "median", MaxAbsObserver))


def test_duplicate_observer_raises() -> None:
    with pytest.raises(DuplicateRegistrationError, match="'maxabs' is already registered"):
        register_observer(ObserverSpec("maxabs", "max", MaxAbsObserver))


def test_unknown_observer_lists_known() -> None:
    with pytest.raises(UnknownObserverError, match="'shape' is not implemented.*maxabs, maxabs_per_channel"):
        get_observer("shape")


def test_save_writes_chunks_of_safetensors(tmp_path) -> None:
    xs = _batches(2, (2, 3), n=5)
    obs = SaveObserver(ObserveTarget("layer.0", "inputs.0", tensors_dir=tmp_path, chunk_calls=2))
    for x in xs:
        obs.update(x)
    obs.flush()
    assert [p.name for p in obs.files] == [f"layer.0.inputs.0.{i:05d}.safetensors" for i in range(3)]
    saved = {}
    for p in obs.files:
        saved.update(load_file(str(p)))
    assert sorted(saved) == [f"call_{i}" for i in range(5)]
    for i, x in enumerate(xs):
        assert torch.equal(saved[f"call_{i}"], x)
    assert obs.result()[0] == max(float(x.abs().max()) for x in xs)


def test_save_needs_a_directory() -> None:
    with pytest.raises(ValueError, match="needs a tensors directory"):
        SaveObserver(ObserveTarget("m", "inputs.0"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("channel_dim", [None, 0, 1, -1])
@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
def test_cpu_fast_maxabs_equals_the_max_of_abs(dtype: torch.dtype, channel_dim: int | None, sign: float) -> None:
    """The CPU shortcut (C kernel or torch route) gives torch.abs(x).amax exactly, also for all-negative / all-positive tensors."""
    from shards.measuring.observers import _fast_cpu_maxabs

    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, 7, generator=g) * 30
    x = (x.abs() * sign if sign else x).to(dtype)
    got = _fast_cpu_maxabs(x, channel_dim)
    xf = x.to(torch.float32)
    if channel_dim is None:
        want = xf.abs().amax().reshape(1)
    else:
        want = xf.abs().movedim(channel_dim, 0).reshape(xf.shape[channel_dim], -1).amax(dim=1)
    assert got is not None and torch.equal(torch.as_tensor(got, dtype=torch.float32).reshape(want.shape), want)
    bad = xf.clone()
    bad[0, 0, 0] = float("nan")
    assert _fast_cpu_maxabs(bad, channel_dim) is None  # NaN: the counting path takes over


@pytest.mark.parametrize("native", ["1", "baseline", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("observer", [MaxAbsObserver, MaxAbsPerChannelObserver])
def test_many_calls_with_nonfinite_ones_between(monkeypatch: pytest.MonkeyPatch, native: str, dtype: torch.dtype,
                                                observer: type) -> None:
    """Calls alternate between the kernel's per-call paths (a float per tensor; per channel, a fold
    into the state after the first call) and the NaN-skipping path: the result is the float64 max of
    the finite values, and every NaN/Inf is counted, whichever path each call took."""
    from shards.fp8 import native_cast

    monkeypatch.setenv(native_cast.ENV_FLAG, native)
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(2, 9, 16, generator=g, dtype=torch.float64) * (i + 1)).to(dtype) for i in range(6)]
    xs[2][1, 3, 7] = float("nan")
    xs[4][0, 0, 0] = float("-inf")
    xs[4][1, 8, 15] = float("inf")
    obs = observer(ObserveTarget("m", "inputs.0", -1))
    for x in xs:
        obs.update(x)
    finite = torch.stack([x.double() for x in xs]).nan_to_num(0.0, 0.0, 0.0).abs()
    want = finite.amax().reshape(1) if observer is MaxAbsObserver else finite.reshape(-1, 16).amax(dim=0)
    assert obs.result().tolist() == want.float().tolist() and obs.nonfinite() == 3
