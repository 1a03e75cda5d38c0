"""Issue 9's expected outcomes, one run per cell, through real kernel NAT (``nox -s natlab``).

Each test builds its cell's lab (tests/natlab/topology.py), runs the real ``wavesync``
programs in it (tests/natlab/matrix.py) and asserts what the issue expects: a punched UDT
path through cone NATs, a working connection (by the relay) whenever one side is symmetric or
blocks UDP, a server behind a proxy-only router reached through its HTTP tunnel, and a 10 MB
transfer byte-exact under 10 % loss. Where a path cannot work through a NAT (punching through
``--random-fully`` ports, UDP through a router that drops it) the test asserts that it fails
with the reason the client reports, so a change in either direction is noticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.natlab.matrix import CELLS, Cell, CellResult, Outcome, run_cell

pytestmark = pytest.mark.natlab

AUTO, NO_GRACE, UDP = "auto", "auto, no relay grace", "udp"
#: Shorter than the matrix's 10 s: a forced punch that cannot work ends sooner in CI.
DEADLINE = 5.0


def _cell(name: str) -> Cell:
    [cell] = [cell for cell in CELLS if cell.name == name]
    return cell


def _run(name: str, tmp_path: Path, deadline: float = DEADLINE) -> CellResult:
    return run_cell(_cell(name), 1, tmp_path, deadline=deadline)


def _by_mode(result: CellResult) -> dict[str, Outcome]:
    return {outcome.mode: outcome for outcome in result.outcomes}


def _works(outcome: Outcome) -> None:
    assert outcome.connected, outcome.failure
    assert outcome.exact, f"{outcome.received} bytes: {outcome.failure}"


def test_cone_to_cone_punches(tmp_path: Path) -> None:
    runs = _by_mode(_run("cone<->cone", tmp_path))
    for outcome in runs.values():
        _works(outcome)
    assert runs[UDP].path == "udp"
    # The relay's grace lets the punch win; with none, the standby relay (as fast as the
    # punch in a lab without delay emulation) may come first.
    assert runs[AUTO].path == "udp"
    assert runs[NO_GRACE].path in {"udp", "relay"}


@pytest.mark.parametrize("name", ["cone<->symmetric", "symmetric<->symmetric"])
def test_symmetric_falls_back_to_the_relay(name: str, tmp_path: Path) -> None:
    runs = _by_mode(_run(name, tmp_path))
    _works(runs[AUTO])
    _works(runs[NO_GRACE])
    assert runs[AUTO].path == runs[NO_GRACE].path == "relay"
    # A fresh random port per flow (--random-fully) cannot be predicted: no punch, the
    # client's deadline ends the race with the reason.
    assert not runs[UDP].connected
    assert "no answer by the deadline" in runs[UDP].failure


def test_udp_blocked_connects_by_relay(tmp_path: Path) -> None:
    runs = _by_mode(_run("udp-blocked<->cone", tmp_path))
    _works(runs[AUTO])
    assert runs[AUTO].path == "relay"
    assert not runs[UDP].connected
    assert "no UDP endpoint" in runs[UDP].failure


def test_proxy_only_server_rides_its_tunnel(tmp_path: Path) -> None:
    result = _run("proxy-only<->cone", tmp_path)
    runs = _by_mode(result)
    _works(runs[AUTO])
    assert runs[AUTO].path == "relay"
    # Its router forwards nothing but TCP to squid: the server registered and kept its
    # relay standbys through HTTP tunnels, which the probe chose.
    assert {"203.0.113.1:3478", "203.0.113.1:8081"} & set(result.server_tunnels)
    assert "203.0.113.1:7000" in result.server_tunnels
    assert not runs[UDP].connected


def test_loss_stays_byte_exact(tmp_path: Path) -> None:
    # Under 10 % loss a punch needs retries: the matrix's full 10 s connect deadline.
    runs = _by_mode(_run("cone<->cone 10% loss", tmp_path, deadline=10.0))
    for outcome in runs.values():
        _works(outcome)
    assert runs[UDP].path == "udp"
