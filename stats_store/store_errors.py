"""Errors of the zarr stats store, its reducer and re-sharding.

Each derives from ``stats_store.errors.StatsStoreError`` and the fitting builtin. Messages name the
store path, shard, module or tensor, the value found, and what to do. Every class takes one message
argument, so instances pickle (they cross Ray).
"""

from __future__ import annotations

from stats_store.errors import StatsStoreError


class StoreNotFoundError(StatsStoreError, FileNotFoundError):
    """No stats store at the given path."""


class StoreFormatError(StatsStoreError, ValueError):
    """The store was written by another format version, or its metadata is not ours."""


class RunMismatchError(StatsStoreError, ValueError):
    """The store belongs to another run: another model fingerprint, config hash or topology."""


class ShardSpecError(StatsStoreError, ValueError):
    """A shard index, channel slice or tensor shape that does not fit the store's layout."""


class DuplicateBatchError(StatsStoreError, ValueError):
    """A flush repeats some, but not all, of the batches a shard has already committed."""


class TornWriteError(StatsStoreError, ValueError):
    """A committed chunk does not match its commit record (written after the commit, or damaged)."""


class StaleReducedError(StatsStoreError, ValueError):
    """The reduced arrays are missing or older than the shards' latest commits."""


class ReshardError(StatsStoreError, ValueError):
    """A per-channel statistic cannot be split over the requested tp size."""


class UnknownMergeError(StatsStoreError, KeyError):
    """A tensor declares a merge that the reducer does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""
