"""PNG plots of stored statistics (matplotlib, Agg backend: no display needed).

- ``plot_layer_maxabs``: per-tensor max-abs of every module in discovery order, one line per
  tensor label, log scale: shows which layers have outliers.
- ``plot_channel_profile``: one per-channel vector, log scale: shows outlier channels.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stats_store.records import Measurement  # noqa: E402


def _finite_max(value: np.ndarray) -> float:
    finite = value[np.isfinite(value)]
    return float(finite.max()) if finite.size else float("nan")


def _save(fig: "plt.Figure", path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_layer_maxabs(stats: Measurement, path: str | Path, title: str = "max-abs per module") -> Path:
    """Write a PNG of every module's max-abs per tensor label (NaN/Inf left out) and return its path."""
    path = Path(path)
    names = list(stats.modules)
    labels = sorted({lb for m in stats.modules.values() for lb in m.tensors()})
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.25 * len(names))), 4.0))
    try:
        for label in labels:
            ys = [_finite_max(m.tensors()[label]) if label in m.tensors() else np.nan for m in stats.modules.values()]
            ax.plot(range(len(names)), ys, marker=".", linestyle="-", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("module (discovery order)")
        ax.set_ylabel("max |x|")
        ax.set_title(title)
        if len(names) <= 40:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        if labels:
            ax.legend(fontsize=7)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_channel_profile(values: np.ndarray, path: str | Path, title: str) -> Path:
    """Write a PNG of one per-channel max-abs vector and return its path."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8.0, 3.5))
    try:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        ax.plot(np.arange(v.size), np.where(np.isfinite(v) & (v > 0), v, np.nan), linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("channel")
        ax.set_ylabel("max |x|")
        ax.set_title(title, fontsize=9)
        return _save(fig, path)
    finally:
        plt.close(fig)
