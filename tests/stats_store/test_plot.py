"""The PNG plots: files that decode, with the size asked for, also for NaN/Inf/zero values."""

from __future__ import annotations

import struct
from pathlib import Path

import matplotlib.image
import numpy as np

from stats_store.records import Measurement, ModuleStats
from stats_store.plot import plot_channel_profile, plot_layer_maxabs


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _stats() -> Measurement:
    f = np.float32
    return Measurement(modules={
        f"model.layers.{i}.mlp.up_proj": ModuleStats(
            f"model.layers.{i}.mlp.up_proj", "linear", [np.array([2.0**i], f)], [np.array([np.inf], f)],
            {"weight": np.array([0.5, np.nan, 3.0], f)}, 4)
        for i in range(5)
    })


def test_layer_plot_is_a_decodable_png(tmp_path: Path) -> None:
    path = plot_layer_maxabs(_stats(), tmp_path / "sub" / "layers.png")
    assert path == tmp_path / "sub" / "layers.png"
    assert _png_size(path) == (600, 400)  # 6 x 4 inches at 100 dpi
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 600) and image.std() > 0  # something was drawn


def test_channel_profile_handles_zero_nan_and_inf(tmp_path: Path) -> None:
    values = np.array([0.0, 1.0, np.nan, np.inf, 4.0, 1e-3], np.float32)
    path = plot_channel_profile(values, tmp_path / "profile.png", "q_proj params.weight")
    assert _png_size(path) == (800, 350)
    assert matplotlib.image.imread(path).std() > 0


def test_an_empty_measurement_still_plots(tmp_path: Path) -> None:
    assert _png_size(plot_layer_maxabs(Measurement(), tmp_path / "empty.png")) == (600, 400)
