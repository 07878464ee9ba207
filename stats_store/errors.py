"""Errors of the stats store. Each derives from ``StatsStoreError`` and from the fitting builtin,
so callers can catch either the package's base class or the usual ``ValueError`` /
``FileNotFoundError``.

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
