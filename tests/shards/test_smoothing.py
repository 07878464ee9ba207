"""Activation smoothing math (shards.fp8.smoothing) against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch

from shards.fp8.smoothing import column_maxabs, smooth_source, smooth_target, smoothing_factors


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_factors_are_the_smoothquant_formula(alpha: float) -> None:
    a = torch.tensor([4.0, 0.5, 100.0, 1e-3])
    w = torch.tensor([0.25, 2.0, 0.01, 8.0])
    s = smoothing_factors(a, w, alpha)
    for j in range(4):
        expected = float(a[j]) ** alpha / float(w[j]) ** (1.0 - alpha)
        assert math.isclose(float(s[j]), expected, rel_tol=1e-6), (j, float(s[j]), expected)
    assert s.dtype == torch.float32


def test_dead_channels_keep_factor_one_and_bad_alpha_is_refused() -> None:
    s = smoothing_factors(torch.tensor([0.0, 2.0, float("inf")]), torch.tensor([1.0, 0.0, 1.0]), 0.5)
    assert s.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(torch.ones(2), torch.ones(2), 1.5)
    with pytest.raises(ValueError, match="same length"):
        smoothing_factors(torch.ones(2), torch.ones(3), 0.5)


def test_folding_keeps_the_function() -> None:
    """norm → (q, k) and up → down: W' X' = W X with X' = X / s."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g) * torch.tensor([1, 50, 1, 1, 0.01, 1, 3, 1.0])
    norm = torch.rand(8, generator=g) + 0.5
    q, k = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    s = smoothing_factors((x * norm).abs().amax(0), column_maxabs([q, k]), 0.5)
    assert torch.equal(column_maxabs([q, k]), torch.maximum(q.abs().amax(0), k.abs().amax(0)))
    for w in (q, k):
        assert torch.allclose((x * smooth_source(norm, s)) @ smooth_target(w, s).T, (x * norm) @ w.T, rtol=1e-5, atol=1e-5)
    up, bias, down = torch.randn(8, 3, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
    h = torch.randn(5, 3, generator=g)
    ref = (h @ up.T + bias) @ down.T
    got = (h @ smooth_source(up, s).T + smooth_source(bias, s)) @ smooth_target(down, s).T
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    # bf16 tensors stay bf16
    assert smooth_target(q.to(torch.bfloat16), s).dtype == torch.bfloat16
