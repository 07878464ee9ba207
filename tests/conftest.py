"""Shared fixtures. The real-world INC corpus lives in ../shared/oracle/ and is never copied here."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ORACLE_DIR = PROJECT_ROOT.parent / "shared" / "oracle"


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    """The real INC corpus; tests that need it skip with a clear reason where it is absent."""
    if not ORACLE_DIR.is_dir():
        pytest.skip(f"INC corpus not found at {ORACLE_DIR} (it lives beside the project, in shared/oracle)")
    return ORACLE_DIR
