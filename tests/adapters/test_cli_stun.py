"""End to end: the real `wavesync stun-server` and `wavesync stun-binding` programs on loopback."""

from __future__ import annotations

import re
import socket

import pytest

from tests.daemons import run_wavesync, wavesync_daemon
from wavesync_proto import __version__

READY = r"listening on udp (?P<host>[\d.]+):(?P<port>\d+)"


def test_version_and_help() -> None:
    version = run_wavesync("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"wavesync {__version__}"
    help_text = run_wavesync("--help")
    assert help_text.returncode == 0
    assert "stun-binding" in help_text.stdout


def test_binding_against_our_server_prints_the_mapped_address() -> None:
    with wavesync_daemon(
        "stun-server", "--listen", "127.0.0.1:0", "--log-level", "info", ready=READY
    ) as (server, ready):
        result = run_wavesync("stun-binding", f"127.0.0.1:{ready['port']}", "--log-level", "info")
    assert result.returncode == 0, result.stderr
    host, port = result.stdout.strip().rsplit(":", 1)
    assert host == "127.0.0.1"
    assert 0 < int(port) < 65536
    assert f"127.0.0.1:{ready['port']} answered after 1 request" in result.stderr
    # The server logs what it did when it stops.
    server.terminate()
    _, log = server.communicate(timeout=10)
    assert "answered=1" in log


def test_binding_gives_up_after_the_rfc_schedule() -> None:
    # A bound UDP socket that never answers: every request is swallowed.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        result = run_wavesync("stun-binding", f"127.0.0.1:{port}", "--rto", "0.01")
        received = 0
        silent.setblocking(False)
        while True:
            try:
                silent.recv(2048)
            except BlockingIOError:
                break
            received += 1
    assert result.returncode == 1
    assert received == 7
    assert re.fullmatch(
        rf"wavesync stun-binding: no response from 127\.0\.0\.1:{port} after 7 requests"
        r" in 0\.\d\d s \(RFC 8489 retransmission schedule\)\n",
        result.stderr,
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["stun-binding", "127.0.0.1:99999"], "port must be a number in 0..65535"),
        (["stun-binding", "[::1"], "unbalanced '\\['"),
        (["stun-binding", "127.0.0.1:1", "--rto", "0"], "must be positive"),
        (["stun-binding", "127.0.0.1:1", "--requests", "0"], "must be a whole number"),
        (["stun-server", "--listen", "1:2:3"], "write IPv6 addresses as"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], error: str) -> None:
    result = run_wavesync(*args)
    assert result.returncode == 2
    assert re.search(error, result.stderr)


def test_unresolvable_server_is_a_clear_error() -> None:
    result = run_wavesync("stun-binding", "name.invalid:3478")
    assert result.returncode == 1
    assert result.stderr.startswith("wavesync stun-binding: cannot resolve 'name.invalid'")


def test_server_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        result = run_wavesync("stun-server", "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 1
    assert "Address already in use" in result.stderr
