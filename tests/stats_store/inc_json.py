"""Reading INC measurement JSON nodes in tests, independently of stats_store.inc_read."""

from __future__ import annotations

from typing import Any, Iterator


def flat(value: Any) -> Iterator[float]:
    """Every number of an arbitrarily nested list, in order."""
    if isinstance(value, list):
        for v in value:
            yield from flat(v)
    else:
        yield float(value)


def node_values(node: dict[str, Any]) -> dict[str, list[float]]:
    """label (``inputs.0``, ``outputs.1``, ``params.weight``) → flattened values of one JSON node."""
    out = {f"inputs.{i}": list(flat(v)) for i, v in enumerate(node.get("inputs", []))}
    out |= {f"outputs.{i}": list(flat(v)) for i, v in enumerate(node.get("outputs", []))}
    out |= {f"params.{k}": list(flat(v)) for k, v in node.get("params", {}).items()}
    return out
