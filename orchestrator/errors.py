"""Errors raised by the orchestrator package.

Every class derives from :class:`Fp8OrchestratorError` and from the builtin that fits, so callers
can catch either. Messages are one line naming the key (or file), the value found and what to do.
Each class takes a single message argument, so instances pickle (they cross Ray).
"""

from __future__ import annotations


class Fp8OrchestratorError(Exception):
    """Base class of every error the orchestrator raises on purpose."""


class ConfigError(Fp8OrchestratorError, ValueError):
    """An FP8 config key has a value we refuse (or the config file is not valid JSON)."""


class ConfigFileNotFoundError(Fp8OrchestratorError, FileNotFoundError):
    """The config file named by the user does not exist."""


class CalibrationDataError(Fp8OrchestratorError, ValueError):
    """The calibration data file is missing, malformed or too short."""


class CalibrationError(Fp8OrchestratorError, RuntimeError):
    """A calibration step was called out of order, or the run cannot continue."""


class IncompleteStoreError(Fp8OrchestratorError, ValueError):
    """A stats store whose measurement is unfinished (some tp ranks of a group did not commit)."""
