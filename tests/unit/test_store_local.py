"""The store's contract (tests/store_contract.py) on the local backend, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from store_contract import *  # noqa: F403 - the contract's tests and fixtures, collected here


@pytest.fixture
def location(tmp_path: Path) -> str:
    return str(tmp_path / "store")
