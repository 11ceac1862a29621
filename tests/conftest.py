"""Shared pytest fixtures (keep small).

    python -m pytest                    # everything, e2e included (CI)
    python -m pytest -m "not e2e"       # fast tiers only
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: longer than CI should pay for; run by hand (see docs/)")


@pytest.fixture
def store(tmp_path: Path):
    """An empty local ablate Store under the test's tmp dir."""
    from ablate.store.parquet import Store

    return Store(str(tmp_path / "store"))


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT
