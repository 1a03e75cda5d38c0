"""Fixtures of the interop tests: the libudt 4.11 peer, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.libudt import LibudtUnavailableError, build_udt_peer


@pytest.fixture(scope="session")
def udt_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled ``udt_peer`` binary; the test skips, saying why, without g++ or libudt."""
    try:
        return build_udt_peer(tmp_path_factory.mktemp("udt_peer"))
    except LibudtUnavailableError as missing:
        pytest.skip(f"libudt interop: {missing}")
