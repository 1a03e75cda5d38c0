"""The benchmarks still run (tiny budgets, no timing asserted): they must not rot between runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> str:
    """Run ``bench/SCRIPT ARGS``; its stdout, once it has exited cleanly."""
    result = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows_starting(output: str, *prefixes: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefixes)]


def test_stun_codec_bench_runs_and_reports_every_message() -> None:
    output = run_bench("stun_codec.py", "--iterations", "20", "--repeats", "1")
    assert len(rows_starting(output, "binding", "RFC", "all")) == 7


def test_mediator_bench_runs_and_reports_every_row() -> None:
    output = run_bench("mediator.py", "--quick")
    prefixes = ("registration", "handshake", "daemon capacity", "Binding", "service memory")
    assert len(rows_starting(output, *prefixes)) == 11
    assert len(rows_starting(output, "handshake, loopback, raw load")) == 1
    # The raw load checked every answer: any failure voids its figure.
    assert "targets:" in output
    assert "VOID" not in output


def test_relay_bench_runs_and_reports_every_row() -> None:
    output = run_bench("relay.py", "--quick")
    # The squid rows are printed either way: figures, or why they were skipped.
    assert len(rows_starting(output, "throughput: ")) == 3
    assert len(rows_starting(output, "pairing: ")) == 4
    assert len(rows_starting(output, "memory: ")) == 3
    assert len(rows_starting(output, "targets:")) == 1


def test_udt_bench_runs_and_reports_every_row() -> None:
    output = run_bench("udt.py", "--quick")
    # Every row is printed: a figure, or why it is not available (no g++/libudt, no
    # aioquic, `wavesync udt` not running yet); no transfer may fail or differ.
    rows = ("TCP", "aioquic", "libudt", "wavesync-UDT")
    assert len(rows_starting(output, *rows)) == 11  # GSO and uvloop: figures or why not
    assert "FAILED" not in output
    assert len(rows_starting(output, "targets:")) == 1


def test_tunnel_bench_runs_and_reports_every_row() -> None:
    output = run_bench("tunnel.py", "--quick")
    # Direct TCP, 3 methods without a proxy, 4 more through each squid config (or none
    # when squid is missing); every row is figures, a refusal or a skip, as are ssl+'s.
    assert len(rows_starting(output, "direct TCP")) == 1
    plain = rows_starting(output, "upgrade, ", "websocket, ", "getpost, ", "connect, ")
    assert len(plain) in (3, 11)
    assert "Traceback" not in output
    assert "FAILED" not in output


def test_connect_bench_runs_and_reports_every_row() -> None:
    output = run_bench("connect.py", "--quick")
    # Six forced or auto wavesync rows back to back and again after idle time, two floors,
    # aioice both ways; each connect proven by an echo through the server.
    paths = ("lan", "tcp", "udp", "udp-reused", "relay", "auto", "aioice gather+connect")
    rows = [f"{path} " for path in paths] + [f"{path}, " for path in paths] + ["floor: "]
    assert len(rows_starting(output, *rows)) == 16
    assert len(rows_starting(output, "targets:")) == 1
    assert "Traceback" not in output


def test_adapters_bench_runs_and_reports_every_row() -> None:
    output = run_bench("adapters.py", "--quick")
    # One row per measure, a figure for every adapter (a run that fails prints ERROR and
    # leaves "-" in its cell); the verdict line, whatever it says on a loaded machine.
    rows = rows_starting(output, "UDT goodput", "relay throughput", "connect ")
    assert len(rows) == 8
    assert not [row for row in rows if " - " in row]
    assert "ERROR" not in output
    assert "Traceback" not in output
    assert len(rows_starting(output, "targets:")) == 1


def test_udt_many_bench_runs_and_reports_every_count() -> None:
    output = run_bench("udt_many.py", "--quick")
    rows = [line.split("|") for line in output.splitlines() if line.count("|") == 4]
    assert [row[0].strip() for row in rows] == ["N idle", "0", "100", "1000"]
    # Every cell of the table is a figure: no count failed to move its bytes.
    assert all(float(cell) > 0 for row in rows[1:] for cell in row[1:])
