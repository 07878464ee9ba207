"""The run's stats store as the driver sees it: finished measurements and INC export paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from orchestrator.errors import CalibrationError, IncompleteStoreError
from stats_store.records import Measurement
from stats_store.zarr_store import ZarrStatsStore


def read_measured_store(dump_stats_path: str | Path, fingerprint: Any) -> Measurement:
    """The global statistics of a finished measurement of the model with ``fingerprint``.

    Raises:
        StoreNotFoundError, StoreFormatError, RunMismatchError, TornWriteError: from the store,
            each naming its path and what to do.
        IncompleteStoreError: no shard committed, or only some tp ranks of a group did (a commit
            record is missing or the run was interrupted between their flushes).
    """
    store = ZarrStatsStore.open(dump_stats_path, expect_fingerprint=fingerprint)  # a path or an s3:// URL
    commits, tp = store.commits(), store.meta.tp
    fix = "rerun the measure command with the same config, model and data to finish it, or --overwrite to start over"
    if not commits:
        raise IncompleteStoreError(f"{store.location}: no shard has committed statistics; {fix}")
    for g in sorted({k // tp for k in commits}):
        records = [commits.get(g * tp + r) for r in range(tp)]
        missing = [g * tp + r for r, rec in enumerate(records) if rec is None]
        if missing:
            raise IncompleteStoreError(f"{store.location}: shard(s) {missing} of dp group {g} have no commit record "
                                       f"while their tp peers have one; {fix}")
        sets = [frozenset(rec.batch_ids) for rec in records if rec is not None]
        if len(set(sets)) > 1:
            odd = sorted(frozenset.union(*sets) - frozenset.intersection(*sets))
            raise IncompleteStoreError(f"{store.location}: batches {odd[:10]} were committed by only some tp ranks of "
                                       f"dp group {g}; {fix}")
    stats, _ = store.current()  # merges (checksum-verified) when the reduced arrays are stale
    return stats


def inc_export_prefix(out_dir: str | Path, dump_stats_path: str) -> Path:
    """``out_dir/inc/<name>``: the config's prefix reduced to a plain file name, so INC files stay in ``out_dir/inc``.

    ``dump_stats_path`` comes from a config: ``..``, separators, absolute paths and odd characters
    must never steer where an export writes.
    """
    raw = Path(str(dump_stats_path).replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).lstrip(".") or "measure"
    inc = Path(out_dir) / "inc"
    prefix = inc / name
    if prefix.parent != inc:  # cannot happen after the cleaning above; kept as the guarantee it is
        raise CalibrationError(f"dump_stats_path: value {dump_stats_path!r} would export outside {inc}")
    return prefix
