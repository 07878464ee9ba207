"""Errors raised by the ``shards`` package.

Every error derives from :class:`ShardError` and from the builtin that fits, so callers can catch
either. Messages name the module, the tensor and the value, and say what to change.
"""

from __future__ import annotations


class ShardError(Exception):
    """Base class of every error raised by ``shards``."""


class NonFiniteStatsError(ShardError, ValueError):
    """A max-abs value that would become a scale is NaN or infinite."""

    def __init__(self, where: str, value: object) -> None:
        super().__init__(
            f"{where}: max-abs value {value!r} is not finite, so no scale can be computed from it; "
            "re-measure this module or block it (blocklist.names) so it stays in high precision"
        )


class MissingStatsError(ShardError, KeyError):
    """A scale needs a measurement (or a weight) that was not supplied."""

    def __init__(self, module: str, tensor: str, hint: str) -> None:
        self.message = f"module {module!r}: no measurement for {tensor!r}; {hint}"
        super().__init__(self.message)

    def __str__(self) -> str:
        # KeyError would print the message with quotes around it.
        return self.message


class DeviceForScalesError(ShardError, ValueError):
    """HW-aligned scales were asked for without a Gaudi to align them to."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs the HW-aligned scale set of a Gaudi, but device_for_scales is not set; "
            'set "device_for_scales" to "GAUDI2" or "GAUDI3" in the config, or pick a method without '
            "HW-aligned rounding (maxabs_pow2, maxabs_arbitrary, unit_scale, ...)"
        )


class ScaleMethodError(ShardError, ValueError):
    """A scale-method section cannot be applied to this tensor (wrong kind or missing input)."""


class DuplicateRegistrationError(ShardError, ValueError):
    """A registry (module classes, observers, backends, op implementations) already has this key."""
