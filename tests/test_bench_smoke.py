"""The benchmarks still run (tiny budgets, no timing asserted): they must not rot between runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_stun_codec_bench_runs_and_reports_every_message() -> None:
    result = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(BENCH / "stun_codec.py"), "--iterations", "20", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line for line in result.stdout.splitlines() if line.startswith(("binding", "RFC", "all"))
    ]
    assert len(rows) == 7


def test_mediator_bench_runs_and_reports_every_row() -> None:
    result = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(BENCH / "mediator.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(
            ("registration", "handshake", "daemon capacity", "Binding", "service memory")
        )
    ]
    assert len(rows) == 9
    assert "targets:" in result.stdout
