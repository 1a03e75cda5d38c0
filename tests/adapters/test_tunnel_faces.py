"""End to end: the mediator's and relay's HTTP faces, and sessions that reach them by tunnel.

The real ``wavesync mediator --http`` runs as a subprocess. A server's listen
session reaches it over each tunnel method (directly, no proxy) and a client's
connect over plain TCP reaches that server: the connection_requested arrives
through the tunnel. A client's TCP connect copy rides a tunnel too. Every wait
is bounded by ``fail_after``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from tests.daemons import run_wavesync, wavesync_daemon
from wavesync_adapters.anyio._dial import AUTO, TunnelChoice, parse_tunnel_choice
from wavesync_adapters.anyio.connect import request_connection
from wavesync_adapters.anyio.listen import MediatorListener
from wavesync_proto.addresses import Endpoint, format_endpoint
from wavesync_proto.mediator.listen import ConnectionRequestReceived
from wavesync_proto.mediator.systems import parse_systems
from wavesync_proto.tunnel import TunnelKind, TunnelMethod

MEDIATOR_READY = (
    r"mediator listening on udp\+tcp (?P<host>[\d.]+):(?P<port>\d+),"
    r" http (?P<http_host>[\d.]+):(?P<http_port>\d+)"
)
WAIT = 15.0

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@dataclass(frozen=True)
class Mediator:
    address: Endpoint
    http: str
    system_id: uuid.UUID
    key: str


@pytest.fixture(scope="module")
def mediator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mediator]:
    entry = run_wavesync("keygen", "--name", "faces")
    assert entry.returncode == 0, entry.stderr
    path: Path = tmp_path_factory.mktemp("faces") / "systems.toml"
    path.write_text(entry.stdout, encoding="utf-8")
    [(system_id, key)] = parse_systems(entry.stdout).items()
    with wavesync_daemon(
        "mediator", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
        "--systems", str(path), ready=MEDIATOR_READY,
    ) as (_, ready):  # fmt: skip
        yield Mediator(
            ("127.0.0.1", int(ready["port"])),
            f"127.0.0.1:{ready['http_port']}",
            system_id,
            key,
        )


def kind(name: str) -> TunnelKind:
    return TunnelKind(method=TunnelMethod(name))


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("tunnel", ["upgrade", "websocket", "getpost", "auto"])
async def test_a_listen_session_over_a_tunnel_registers_and_gets_a_tcp_clients_request(
    mediator: Mediator, tunnel: str
) -> None:
    choice: TunnelChoice = AUTO if tunnel == "auto" else kind(tunnel)
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
        tunnel=choice,
        http=mediator.http,
    )
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
        ):
            local = server_udp.extra(anyio.abc.SocketAttribute.local_address)
            await group.start(listener.run)
            await listener.wait_registered()
            requests: list[ConnectionRequestReceived] = []

            async def server_side() -> None:
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                requests.append(request)
                await listener.acknowledge(request.connect_session_id, server_udp)

            group.start_soon(server_side)
            answer = await request_connection(mediator.address, server_id=listener.server_id)
            group.cancel_scope.cancel()
    # The session really rode the tunnel (the probe picks one of the direct methods).
    assert listener.dialer.last_kind is not None
    if tunnel != "auto":
        assert str(listener.dialer.last_kind) == tunnel
    assert len(requests) == 1
    assert answer.response.server_id == listener.server_id
    assert answer.response.udp_endpoints == ((str(local[0]), int(local[1])),)


@pytest.mark.parametrize("tunnel", ["websocket", "getpost"])
async def test_a_clients_connect_copy_over_a_tunnel_reaches_a_tcp_server(
    mediator: Mediator, tunnel: str
) -> None:
    listener = MediatorListener(
        mediator.address,
        system_id=mediator.system_id,
        server_id=uuid.uuid4(),
        system_key=mediator.key,
    )
    with anyio.fail_after(WAIT):
        async with (
            anyio.create_task_group() as group,
            await anyio.create_udp_socket(local_host="127.0.0.1") as server_udp,
        ):
            await group.start(listener.run)
            await listener.wait_registered()

            async def server_side() -> None:
                request = await listener.next_request()
                assert isinstance(request, ConnectionRequestReceived)
                await listener.acknowledge(request.connect_session_id, server_udp)

            group.start_soon(server_side)
            # UDP goes to a port nobody answers on: only the tunnelled copy can succeed.
            answer = await request_connection(
                ("127.0.0.1", unused_udp_port()),
                server_id=listener.server_id,
                tunnel=kind(tunnel),
                http=f"http://{mediator.http}",
            )
            group.cancel_scope.cancel()
    assert answer.via == "tcp"
    assert answer.response.server_id == listener.server_id


def test_tunnel_choices_parse_as_the_cli_spells_them() -> None:
    assert parse_tunnel_choice("auto") == AUTO
    assert parse_tunnel_choice("getpost") == kind("getpost")
    assert parse_tunnel_choice("ssl+websocket") == TunnelKind(
        method=TunnelMethod.WEBSOCKET, tls=True
    )
    for bad in ("tls+getpost", "carrier-pigeon", "ssl+"):
        with pytest.raises(ValueError, match="bad tunnel"):
            parse_tunnel_choice(bad)
    assert format_endpoint(("127.0.0.1", 1)) == "127.0.0.1:1"
