"""The calibration shard: ``ShardRunner`` plus measuring, store I/O and in-place quantization.

It lives in ``orchestrator`` because it joins ``shards`` (the model work) with ``stats_store``
(each shard writes its own chunk of the run's store and commits it). The Ray actor is this class
wrapped by ``ray.remote`` (see ``orchestrator.driver.grid.make_workers(runner_cls=...)``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from shards.quantized.backends import backend_for_device
from stats_store.records import Measurement
from shards.plan import RunPlan
from shards.card.runner import ShardRunner, ShardStateError
from shards.card.calibration import ModuleInfo, OptRequest, ShardCalibration
from shards.measuring.observers import declared_merges
from shards.tp.rules import split_channel_slices
from stats_store.zarr_store import ZarrStatsStore
from stats_store.shard_map import ChannelSlice, ShardSpec


class CalibrationRunner(ShardRunner):
    """One shard of a distributed calibration (every tp rank of a group is called together)."""

    _calib: ShardCalibration | None = None
    _store: ZarrStatsStore | None = None
    _pending_batches: list[int]
    _committed: frozenset[int] = frozenset()
    _forward_s: float = 0.0  # measure_batch seconds (forwards with observers, collectives included)
    _all_reduce_s: float = 0.0  # the tp all-reduces inside those forwards, waiting for peers included
    _quantize_s: float = 0.0
    _quantize_bytes: int = 0  # weight bytes read (hp) and written (FP8) by this shard's quantize

    def _calibration(self) -> ShardCalibration:
        if self._calib is None:
            shard = self._shard
            if shard is None:
                raise ShardStateError(f"shard {self.topology.index}: call load() first")
            self._calib = ShardCalibration(shard.model, shard.dims, self.topology.tp_rank, self.topology.tp)
        return self._calib

    # ---- MEASURE --------------------------------------------------------------------------------
    def start_measure(self, plan: RunPlan, store_path: str) -> list[str]:
        """Attach observers and open the run's store (created by the driver).

        The batches this shard's commit record already holds are remembered: after a fault its tp
        peers may have to redo one of them, and this shard then runs it without counting it again.
        """
        self._store = ZarrStatsStore.open(store_path)
        self._pending_batches = []
        record = self._store.commits().get(self.topology.index)
        self._committed = frozenset(record.batch_ids) if record is not None else frozenset()
        return self._calibration().start(plan)

    def measure_batch(self, batch_id: int, tokens: np.ndarray) -> int:
        """Run one calibration batch; returns the number of tokens seen."""
        ids = torch.tensor(np.asarray(tokens), dtype=torch.long, device=next(self.model.parameters()).device)
        group = self._group
        start, collective = time.perf_counter(), group.collective_s if group is not None else 0.0
        if int(batch_id) in self._committed:
            self._calibration().run_uncounted(ids)  # collectives need every rank; the store has its counts
        else:
            self._calibration().run(ids)
            self._pending_batches.append(int(batch_id))
        self._forward_s += time.perf_counter() - start
        if group is not None:
            self._all_reduce_s += group.collective_s - collective
        return int(ids.numel())

    def flush(self) -> list[int]:
        """Write this shard's statistics of the batches since the last flush and commit them."""
        if not self._pending_batches:
            return []
        if self._store is None:
            raise ShardStateError(f"shard {self.topology.index}: start_measure() first")
        m = self._calibration().increment()
        spec = self._shard_spec(m)
        self._store.commit(self._store.write_shard(spec, m, self._pending_batches,
                                                   declared_merges(self._store.meta.observer, m)))
        done, self._pending_batches = self._pending_batches, []
        return done

    def finish_measure(self) -> list[int]:
        """Flush what is left and detach the observers."""
        done = self.flush()
        self._calibration().stop()
        return done

    def _shard_spec(self, m: Measurement) -> ShardSpec:
        t = self.topology
        keys = [(name, label) for name, stats in m.modules.items() for label in stats.tensors()]
        shard = self._shard
        assert shard is not None
        slices = split_channel_slices(keys, shard.dims, t.tp_rank, t.tp)
        # Only per-channel tensors have a channel axis to place; per-tensor values are global maxima.
        sized = {k: ChannelSlice(*v) for k, v in slices.items() if m.modules[k[0]].tensors()[k[1]].size > 1}
        return ShardSpec(t.index, t.dp * t.tp, t.tp, sized)

    # ---- coordinator requests -------------------------------------------------------------------
    def inventory(self, plan: RunPlan) -> dict[str, ModuleInfo]:
        return self._calibration().inventory(plan)

    def opt_partials(self, plan: RunPlan, requests: Mapping[str, OptRequest]) -> dict[str, np.ndarray]:
        return self._calibration().opt_partials(plan, requests)

    # ---- QUANTIZE -------------------------------------------------------------------------------
    def quantize(self, plan: RunPlan, local_stats: Measurement | None,
                 weight_scales: Mapping[str, torch.Tensor]) -> list[str]:
        """Quantize this shard in place with the coordinator's scales; returns the quantized names."""
        backend = backend_for_device(next(self.model.parameters()).device)
        sizes = {n: w.numel() * (w.element_size() + 1) for n, m in self.model.named_modules()
                 if isinstance(w := getattr(m, "weight", None), torch.Tensor)}  # hp read + FP8 written
        start = time.perf_counter()
        result = self._calibration().quantize(plan, local_stats, weight_scales, backend)
        self._quantize_s += time.perf_counter() - start
        self._quantize_bytes += sum(sizes.get(n, 0) for n in result.quantized)
        return list(result.quantized)

    def shard_times(self) -> dict[str, float]:
        """Where this shard's time went: forwards (measure), the tp all-reduces inside them, and
        the in-place quantization with the weight bytes it read and wrote."""
        return {"forward_s": self._forward_s, "all_reduce_s": self._all_reduce_s, "quantize_s": self._quantize_s,
                "quantize_bytes": float(self._quantize_bytes)}

    def quantized_state(self) -> dict[str, dict[str, Any]]:
        return self._calibration().quantized_state()

    def quantized_layout(self) -> dict[str, dict[str, Any]]:
        """``quantized_state`` with meta tensors for codes and biases: what a streamed export plans with."""
        return self._calibration().quantized_state(data=False)

    def quantized_part(self, name: str, part: str) -> torch.Tensor:
        """One quantized module's ``weight`` codes (uint8) or ``bias``: one small call per tensor."""
        return self._calibration().quantized_part(name, part)

    def scales_of(self) -> dict[str, dict[str, Any]]:
        from shards.quantized.swap import scales_of

        return scales_of(self.model)

    def state_dict_of(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Unquantized tensors by state-dict name (embeddings, norms...), copied to CPU."""
        sd = self.model.state_dict()
        return {n: sd[n].detach().cpu().clone() for n in names if n in sd}

    def checkpoint_dir(self) -> Path:
        return self.checkpoint
