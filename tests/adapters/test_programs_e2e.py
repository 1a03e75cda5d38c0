"""The four programs on every runtime: `wavesync ... --adapter anyio|asyncio|trio|blocking`.

Everything is a real subprocess started as a user would: a relay, a mediator, a
server forwarding to a small HTTP service, a client listening on a local port. An
HTTP GET to the client's port must come back byte-exact from the service behind the
server over every path, whichever runtime runs each program: all four on one
runtime, and server and client on different ones (the cross-runtime matrix). Then
what a user meets next: a hole reused, bad input, a daemon restarted.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import (
    MEDIATOR_READY,
    RELAY_READY,
    RelayAndMediator,
    free_udp_port,
    new_system,
    relay_and_mediator,
    wavesync_daemon,
)
from tests.pages import LOOPBACK, PAGE, http_get, page_body, serve_page
from tests.squid import DEFAULT, squid_binary, squid_proxy
from wavesync_adapters.programs import ADAPTERS
from wavesync_proto.discovery import DEFAULT_GROUP

SERVER_READY = (
    r"server (?P<id>[0-9a-f-]+) of system .* accepting on tcp (?P<host>[\d.]+):(?P<port>\d+)"
)
CLIENT_READY = r"client listening on tcp (?P<host>[\d.]+):(?P<port>\d+)"
PATHS = ["auto", "lan", "tcp", "udp", "relay"]
#: Server and client on different runtimes; each direction of each pair the issue names.
CROSS = [("anyio", "blocking"), ("blocking", "anyio"), ("asyncio", "trio"), ("trio", "asyncio")]
#: How long a test retries a GET while a restarted daemon is rejoined: above the standby
#: pool's 30 s back-off cap, which a slow restart on a loaded machine can reach.
REJOIN_SECONDS = 45.0


@pytest.fixture(scope="module")
def web_service() -> Iterator[tuple[str, int]]:
    with serve_page() as address:
        yield address


@dataclass
class Lab:
    """A relay and a mediator, and what a server or client needs to reach them."""

    tmp_path: Path
    systems: Path
    system_id: uuid.UUID
    key: str
    relay_url: str
    mediator_at: str
    service: tuple[str, int]
    stack: ExitStack
    lan: tuple[str, ...]
    daemons: RelayAndMediator

    def server(self, adapter: str, *extra: str) -> tuple[subprocess.Popen[str], uuid.UUID, int]:
        server_id = uuid.uuid4()
        process, ready = self.stack.enter_context(
            wavesync_daemon(
                "server",
                "--adapter",
                adapter,
                "--system-id",
                str(self.system_id),
                f"--key={self.key}",
                "--server-id",
                str(server_id),
                "--mediator",
                self.mediator_at,
                "--relay",
                self.relay_url,
                "--forward",
                f"{self.service[0]}:{self.service[1]}",
                "--tcp-listen",
                f"{LOOPBACK}:0",
                "--udp-host",
                LOOPBACK,
                *self.lan,
                *extra,
                ready=SERVER_READY,
            )
        )
        return process, server_id, int(ready["port"])

    def client(
        self, adapter: str, server_id: uuid.UUID, path: str, *extra: str
    ) -> tuple[subprocess.Popen[str], int]:
        process, ready = self.stack.enter_context(
            wavesync_daemon(
                "client",
                "--adapter",
                adapter,
                "--server-id",
                str(server_id),
                "--mediator",
                self.mediator_at,
                "--relay",
                self.relay_url,
                "--listen",
                f"{LOOPBACK}:0",
                "--path",
                path,
                "--log-level",
                "info",
                *self.lan,
                *extra,
                ready=CLIENT_READY,
            )
        )
        return process, int(ready["port"])


@contextmanager
def lab(
    tmp_path: Path,
    service: tuple[str, int],
    adapter: str = "anyio",
    *,
    relay_port: int = 0,
    mediator_port: int = 0,
) -> Iterator[Lab]:
    systems, system_id, key = new_system(tmp_path, "programs")
    group = f"{DEFAULT_GROUP[0]}:{free_udp_port()}"
    with (
        relay_and_mediator(
            systems, adapter=adapter, relay_port=relay_port, mediator_port=mediator_port
        ) as daemons,
        ExitStack() as stack,
    ):
        yield Lab(
            tmp_path=tmp_path,
            systems=systems,
            system_id=system_id,
            key=key,
            relay_url=daemons.relay_url,
            mediator_at=f"{LOOPBACK}:{daemons.mediator[1]}",
            service=service,
            stack=stack,
            lan=("--lan-group", group, "--lan-interface", LOOPBACK),
            daemons=daemons,
        )


def connected_paths(client: subprocess.Popen[str]) -> list[str]:
    """Stop the client and return what its log says each connect used, in order."""
    client.terminate()
    _, err = client.communicate(timeout=10)
    return re.findall(r"connected by (\w+ .*?) in [\d.]+ ms", err)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_path_on_every_runtime(
    tmp_path: Path, web_service: tuple[str, int], adapter: str, path: str
) -> None:
    with lab(tmp_path, web_service, adapter) as net:
        _, server_id, _ = net.server(adapter)
        _, port = net.client(adapter, server_id, path)
        assert page_body(http_get(port)) == PAGE


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("server_adapter", "client_adapter"), CROSS)
def test_a_server_and_a_client_on_different_runtimes_connect(
    tmp_path: Path,
    web_service: tuple[str, int],
    server_adapter: str,
    client_adapter: str,
    path: str,
) -> None:
    with lab(tmp_path, web_service) as net:
        _, server_id, _ = net.server(server_adapter)
        _, port = net.client(client_adapter, server_id, path)
        assert page_body(http_get(port)) == PAGE


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_second_connection_reuses_the_punched_hole(
    tmp_path: Path, web_service: tuple[str, int], adapter: str
) -> None:
    with lab(tmp_path, web_service, adapter) as net:
        _, server_id, _ = net.server(adapter)
        client, port = net.client(adapter, server_id, "udp")
        assert page_body(http_get(port)) == PAGE
        assert page_body(http_get(port)) == PAGE
        first, second = connected_paths(client)
    assert first.startswith("udp ")
    # The Connector logs a reuse as its own kind of attempt: no mediator was asked.
    assert second == f"{first} (reused hole)"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bad_input_is_refused_and_the_daemons_carry_on(
    tmp_path: Path, web_service: tuple[str, int], adapter: str
) -> None:
    with lab(tmp_path, web_service, adapter) as net:
        _, server_id, server_port = net.server(adapter)
        mediator_port = int(net.mediator_at.rsplit(":", 1)[1])
        relay_port = int(net.relay_url.rsplit(":", 1)[1])
        # Not a wavesync client: the server closes the stream (no tunnel_syn), and the
        # mediator and the relay answer or drop what is not their protocol.
        for port in (server_port, mediator_port, relay_port):
            with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 4096)
                sock.settimeout(10)
                # Read until the far end closes, as it must within the timeout; a close
                # with our bytes unread is a reset, which is a close too.
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(65536):
                        pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"\x00\x01\x00\x08" + b"\xff" * 20, (LOOPBACK, mediator_port))
        for path in ("tcp", "relay", "udp"):
            _, port = net.client(adapter, server_id, path)
            assert page_body(http_get(port)) == PAGE


@pytest.mark.parametrize("daemon", ["relay", "mediator"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_restarted_daemon_is_rejoined(
    tmp_path: Path, web_service: tuple[str, int], adapter: str, daemon: str
) -> None:
    # The relay path needs the server's standby pool at the relay; the TCP path needs the
    # server registered at the mediator (it reports the server's endpoints).
    path = "relay" if daemon == "relay" else "tcp"
    with lab(tmp_path, web_service, adapter) as net:
        _, server_id, _ = net.server(adapter)
        _, port = net.client(adapter, server_id, path, "--deadline", "3", "--no-lan")
        assert page_body(http_get(port)) == PAGE
        # The daemon stops and a new one takes its port; the server must find it again
        # without being told (its standby pool backs off from 0.5 s, its listen session
        # reconnects and registers anew).
        options: tuple[str, ...]
        if daemon == "relay":
            stopped, address = net.daemons.relay_process, net.relay_url.rsplit("//", 1)[1]
            options, ready = (), RELAY_READY
        else:
            stopped, address = net.daemons.mediator_process, net.mediator_at
            options, ready = ("--relay-url", net.relay_url), MEDIATOR_READY
        stopped.terminate()
        stopped.communicate(timeout=10)
        net.stack.enter_context(
            wavesync_daemon(
                daemon,
                "--adapter",
                adapter,
                "--listen",
                address,
                "--systems",
                str(net.systems),
                *options,
                ready=ready,
            )
        )
        assert page_body(get_until_served(port)) == PAGE


def get_until_served(port: int) -> bytes:
    """GET until an answer comes, the whole wait bounded by REJOIN_SECONDS.

    What is awaited is the server's reconnection, which nothing outside it signals: each
    try is one full connect by the client, answered at once (404: no standby yet) until
    it is back. Tries are 0.1 s apart so the waiting does not flood the restarted daemon
    (back to back, they starve the server's reconnection on a loaded machine).
    """
    deadline = time.monotonic() + REJOIN_SECONDS
    while True:
        try:
            answer = http_get(port)
        except (ConnectionResetError, TimeoutError):
            # The client closes a local connection it could not carry; with our request
            # unread that close is a reset.
            answer = b""
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("adapter", "absent"),
    [("asyncio", ("anyio", "trio")), ("blocking", ("anyio", "trio", "asyncio"))],
)
def test_the_command_loads_only_the_runtime_it_is_asked_for(
    adapter: str, absent: tuple[str, ...]
) -> None:
    # What `wavesync mediator|relay|server|client --adapter X` imports before it serves.
    script = (
        "import sys\n"
        "from wavesync_adapters.cli import _build_parser\n"
        "from wavesync_adapters.programs import programs_for\n"
        f"_build_parser(); programs_for({adapter!r})\n"
        f"print([m for m in {absent!r} if m in sys.modules])\n"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


MEDIATOR_HTTP_READY = (
    r"mediator listening on udp\+tcp [\d.]+:(?P<port>\d+), http [\d.]+:(?P<http_port>\d+)"
)


@pytest.mark.skipif(squid_binary() is None, reason="squid is not installed")
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_server_and_a_client_behind_squid_meet_through_http_tunnels(
    tmp_path: Path, web_service: tuple[str, int], adapter: str
) -> None:
    # Every program on one runtime: the mediator's HTTP face and the relay's tunnel face
    # serve the tunnels the server's and the client's probes chose through a Debian-default
    # squid (it lets only some methods through); the page comes back byte-exact.
    systems, system_id, key = new_system(tmp_path, "tunnels")
    with ExitStack() as stack:
        squid = stack.enter_context(squid_proxy(tmp_path, DEFAULT))
        _, relay = stack.enter_context(
            wavesync_daemon(
                "relay", "--adapter", adapter, "--listen", f"{LOOPBACK}:0",
                "--systems", str(systems), ready=RELAY_READY,
            )
        )  # fmt: skip
        relay_url = f"http://{LOOPBACK}:{relay['port']}"
        _, mediator = stack.enter_context(
            wavesync_daemon(
                "mediator", "--adapter", adapter, "--listen", f"{LOOPBACK}:0",
                "--http", f"{LOOPBACK}:0", "--systems", str(systems),
                "--relay-url", relay_url, ready=MEDIATOR_HTTP_READY,
            )
        )  # fmt: skip
        tunnelled = (
            "--mediator", f"{LOOPBACK}:{mediator['port']}",
            "--mediator-http", f"{LOOPBACK}:{mediator['http_port']}",
            "--relay", relay_url, "--tunnel", "auto",
            "--proxy", f"http://{squid.host}:{squid.port}", "--no-lan", "--log-level", "info",
        )  # fmt: skip
        server_id = uuid.uuid4()
        server, _ = stack.enter_context(
            wavesync_daemon(
                "server", "--adapter", adapter, "--system-id", str(system_id), f"--key={key}",
                "--server-id", str(server_id), *tunnelled,
                "--forward", f"{web_service[0]}:{web_service[1]}",
                "--tcp-listen", f"{LOOPBACK}:0", ready=SERVER_READY,
            )
        )  # fmt: skip
        client, ready = stack.enter_context(
            wavesync_daemon(
                "client", "--adapter", adapter, "--server-id", str(server_id), *tunnelled,
                "--listen", f"{LOOPBACK}:0", "--path", "relay", ready=CLIENT_READY,
            )
        )  # fmt: skip
        assert page_body(http_get(int(ready["port"]))) == PAGE
        for process in (client, server):
            process.terminate()
            _, err = process.communicate(timeout=10)
            # Both sides reached the mediator and the relay through tunnels the probe chose.
            assert re.search(r"tunnel to \S+ via \S+: \S+", err), err[-2000:]
