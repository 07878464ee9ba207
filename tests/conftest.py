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


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``external_cluster`` start and stop their own Ray head (`ray start`/`ray stop`,
    `ray up`/`ray down`). `ray stop` ends every Ray process on the machine, so they must not share
    a pytest run with the in-process cluster of the other Ray tests: `make test` runs them in a
    second pytest process (``pytest -m external_cluster``)."""
    external = [i for i in items if i.get_closest_marker("external_cluster")]
    if external and len(external) != len(items):
        skip = pytest.mark.skip(reason="stops every Ray process on the machine; run separately: pytest -m external_cluster")
        for item in external:
            item.add_marker(skip)
