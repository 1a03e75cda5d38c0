"""Interop: Debian's `stun` client (package stun-client, an RFC 3489 client) against our server.

Its exit status is a NAT-type bitmask, not success, so the test reads what it
prints. `.ci/run` installs the package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemons import free_udp_port, run_wavesync, wavesync_daemon

STUN_CLIENT = shutil.which("stun")
READY = r"listening on udp 127\.0\.0\.1:(?P<port>\d+)"

pytestmark = pytest.mark.skipif(
    STUN_CLIENT is None, reason="Debian's `stun` (apt-get install stun-client) is not installed"
)


def run_stun_client(*args: str) -> str:
    assert STUN_CLIENT is not None
    result = subprocess.run(  # noqa: S603 - a fixed system binary with test-chosen arguments
        [STUN_CLIENT, *args], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout + result.stderr


def test_stun_client_learns_its_mapped_address_from_our_server() -> None:
    source_port = free_udp_port()
    with wavesync_daemon("stun-server", "--listen", "127.0.0.1:0", ready=READY) as (_, ready):
        output = run_stun_client(f"127.0.0.1:{ready['port']}", "1", "-v", "-p", str(source_port))
    assert f"MappedAddress = 127.0.0.1:{source_port}" in output
    assert "ServerName = wavesync" in output
    assert "problem" not in output


def test_stun_client_nat_type_discovery_sees_an_open_internet_on_loopback() -> None:
    # The full discovery asks for changed addresses too; we refuse those with 420
    # (one address only) and the client still classifies loopback correctly.
    with wavesync_daemon("stun-server", "--listen", "127.0.0.1:0", ready=READY) as (_, ready):
        output = run_stun_client(f"127.0.0.1:{ready['port']}")
    assert "Primary: Open" in output


def test_stun_client_gets_its_mapped_address_from_the_mediator(tmp_path: Path) -> None:
    # The mediator answers plain Binding (RFC 8489 and RFC 3489) on its one port too.
    systems = tmp_path / "systems.toml"
    systems.write_text(run_wavesync("keygen").stdout, encoding="utf-8")
    source_port = free_udp_port()
    with wavesync_daemon(
        "mediator", "--listen", "127.0.0.1:0", "--systems", str(systems),
        ready=r"mediator listening on udp\+tcp 127\.0\.0\.1:(?P<port>\d+)",
    ) as (_, ready):  # fmt: skip
        output = run_stun_client(f"127.0.0.1:{ready['port']}", "1", "-v", "-p", str(source_port))
        discovery = run_stun_client(f"127.0.0.1:{ready['port']}")
    assert f"MappedAddress = 127.0.0.1:{source_port}" in output
    assert "problem" not in output
    assert "Primary: Open" in discovery
