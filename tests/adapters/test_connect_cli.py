"""`wavesync demo`: everything in one process, every path in turn, a table and exit 0.

The server and client programs on each runtime are tests/adapters/test_programs_e2e.py.
"""

from __future__ import annotations

import re

import pytest

from tests.daemons import run_wavesync


@pytest.mark.parametrize("adapter", ["anyio", "asyncio", "trio", "blocking"])
def test_demo_prints_its_table_and_exits_zero(adapter: str) -> None:
    result = run_wavesync("demo", "--adapter", adapter, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {
        match["path"].strip(): match["connected"]
        for match in re.finditer(
            r"^(?P<path>lan|tcp|udp|udp \(reused\)|relay|auto)\s+(?P<connected>yes|no)\b",
            result.stdout,
            re.MULTILINE,
        )
    }
    assert rows == dict.fromkeys(("lan", "tcp", "udp", "udp (reused)", "relay", "auto"), "yes")


def test_demo_without_adapter_runs_on_anyio() -> None:
    """README's run command: no ``--adapter``, the anyio demo, the same table."""
    result = run_wavesync("demo", timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^auto\s+yes\b", result.stdout, re.MULTILINE), result.stdout
