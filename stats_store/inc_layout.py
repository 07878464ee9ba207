"""What an INC measurement file looked like beyond its values: the records the reader fills and
the writer follows, so that import → export gives back the original file byte for byte.

Reference ``inc-fp8-semantics.md`` §4. Kept apart from ``inc_read`` and ``inc_write`` so that
both import these records and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stats_store.records import Measurement

__all__ = [
    "DEFAULT_INDENT",
    "KEY_ALIASES",
    "MEASUREMENT_MODE",
    "SCALE_MODE",
    "IncLayout",
    "IncMeasurementFile",
    "NodeLayout",
    "Shape",
]

Shape = tuple[int, ...]
MEASUREMENT_MODE = "DynamicRange"
SCALE_MODE = "Scale"
DEFAULT_INDENT = 4

# INC's loader still accepts the old singular keys; the layout remembers which one a file used.
KEY_ALIASES = {"inputs": ("inputs", "input"), "outputs": ("outputs", "output"), "params": ("params",)}


@dataclass(frozen=True)
class NodeLayout:
    """How one node was written.

    Attributes:
        keys: the node's keys in file order (``"inputs"``, ``"outputs"``, ``"params"``; or the old
            singular spellings).
        inputs: the nesting shape of each input value: ``(1, 1)`` for ``[[v]]``, ``(C, 1)`` for a
            per-channel state, ``(1, 1, 1)``, ``(1,)``... as found.
        outputs: the same for outputs; None when the node had no outputs key.
        params: ``(name, shape)`` of each parameter; None when the node had no params key.
    """

    keys: tuple[str, ...]
    inputs: tuple[Shape, ...]
    outputs: tuple[Shape, ...] | None
    params: tuple[tuple[str, Shape], ...] | None


@dataclass(frozen=True)
class IncLayout:
    """Everything about an INC measurement file except the values.

    Attributes:
        top_keys: top-level keys in file order (``"Nodes"`` included).
        header: values of the top-level keys other than ``Nodes`` and ``NumSamples`` (those come
            from the Measurement).
        nodes: layout of each node, by module name.
        indent: JSON indent the file used (INC writes 4; tools such as the unify script write
            compact JSON, None).
    """

    top_keys: tuple[str, ...]
    header: Mapping[str, Any]
    nodes: Mapping[str, NodeLayout] = field(default_factory=dict)
    indent: int | None = DEFAULT_INDENT

    @property
    def local_rank(self) -> int | None:
        """The file's ``LocalRank`` (null, -1 or a rank)."""
        value = self.header.get("LocalRank")
        return value if isinstance(value, int) else None


@dataclass(frozen=True)
class IncMeasurementFile:
    """One imported INC measurement file: its statistics and its layout."""

    path: Path
    measurement: Measurement
    layout: IncLayout
