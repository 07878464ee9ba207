"""Errors of the stats store: INC files, the zarr store, its reducer and re-sharding.

Each derives from ``StatsStoreError`` and from the fitting builtin, so callers can catch either the
package's base class or the usual ``ValueError`` / ``FileNotFoundError``.

Messages name the file, module or rank, the value found, and what to do about it. Every class
takes a single message argument, so instances pickle (they may cross Ray).
"""

from __future__ import annotations


class StatsStoreError(Exception):
    """Base class of every error raised by ``stats_store``."""


class IncFormatError(StatsStoreError, ValueError):
    """An INC measurement or scale file (or its name) does not have the expected structure."""


class IncFileNotFoundError(StatsStoreError, FileNotFoundError):
    """An INC file, or some rank files of a per-rank set, could not be found."""


class IncFileExistsError(StatsStoreError, FileExistsError):
    """An export would overwrite an existing INC file (earlier results are never replaced silently)."""


# The zarr store, its reducer and re-sharding.

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


# Where the store lives: its URL, and the object storage behind an s3:// one.

class StoreLocationError(StatsStoreError, ValueError):
    """A ``dump_stats_path`` / store URL of an unsupported form (scheme, bucket name, empty key)."""


class StoreAccessError(StatsStoreError, PermissionError):
    """The object storage refused the request: no credentials, a wrong key or secret, no permission."""


class StoreUnreachableError(StatsStoreError, ConnectionError):
    """The object storage endpoint did not answer (refused, timed out, went away) within the bounded retries."""


class StoreRequestError(StatsStoreError, OSError):
    """The object storage answered a request with another error (its code and message are in the text)."""
