"""Fixtures shared by the vendor backend tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.hosts import FakeHost


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")
