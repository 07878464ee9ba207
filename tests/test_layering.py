"""The package picture holds: imports point one way (orchestrator → shards → stats_store) and every
module stays small. Read from the source with ``ast`` (function-level imports included), so a
deferred import cannot hide an upward arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"stats_store": 0, "shards": 1, "orchestrator": 2}
MAX_LINES = 460


def modules() -> list[Path]:
    return sorted(p for pkg in LAYER for p in (ROOT / pkg).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found & set(LAYER)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_modules_stay_small(path: Path) -> None:
    own = path.relative_to(ROOT).parts[0]
    upward = {pkg for pkg in imported_packages(path) if LAYER[pkg] > LAYER[own]}
    assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}, a layer above {own}"
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by job"
